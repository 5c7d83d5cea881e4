"""Running a VAE half over tile windows (engine/vae.py's TiledVAE is built on this): the statistics pass, with
every GroupNorm's statistics collected over the windows' cores (and pooled over a split image's processes), and
the fp32 retries of windows and statistics that overflow in half precision."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .host import Host
from .vae_stats import NormControl
from .vae_tiles import Window, WindowShare

TileCallback = Callable[[str, int, int], None]  # (kind "encode"/"decode"/"stats", done, total)


class WindowPasses:
    """What TiledVAE runs its windows with (see the module docstring)."""

    vae: Any
    host: Host
    share: WindowShare | None
    on_tile: TileCallback | None
    fp32_retries: int
    _fp32_source: Callable[[], Any] | None
    _fp32: Any

    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def _fp32_vae(self) -> Any:
        if self._fp32 is None:
            self._fp32 = self._fp32_source() if self._fp32_source else copy.deepcopy(self.vae).float()
        return self._fp32

    def _progress(self, kind: str, done: int, total: int) -> None:
        if self.on_tile is not None:
            self.on_tile(kind, done, total)

    def _guarded(
        self, run: Callable[[nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor, kind: str
    ) -> torch.Tensor:
        """Run the VAE; if the result is not finite in half precision, run it again in fp32."""
        out = run(self.vae, x)
        if x.dtype != torch.float32 and not self.host.all_finite(out):
            self.fp32_retries += 1
            out = run(self._fp32_vae(), x.float()).to(x.dtype)
        return out

    def _statistics(
        self,
        batches: list[list[list[Window]]],
        crop: Callable[[list[Window]], torch.Tensor],
        run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        emit: Callable[[Window, torch.Tensor], None] | None,
        kind: str,
        total: int,
    ) -> tuple[NormControl, bool]:
        """The statistics pass (batches[i][rank]: see _sample); with `emit` (one batch of every window), also the
        output.

        Several batches take two rounds: running statistics first, then the same windows again normalised
        with that first estimate, collecting statistics that no longer depend on which batch came first.
        Returns the control (its `collected` are the result) and whether every output was written.
        Statistics that overflow in half precision are recomputed with an fp32 VAE.
        """
        rounds = ["stream"] if len(batches) == 1 else ["stream", "refine"]
        rank = self.share.rank if self.share is not None else 0
        window = next(w for batch in batches for part in batch for w in part)
        for vae in (self.vae, None):
            if vae is None:
                if self._dtype() == torch.float32:
                    break
                self.fp32_retries += 1
                vae, emit = self._fp32_vae(), None
            control = NormControl(window_hw=(window.height, window.width))
            if self.share is not None:
                control.pool = self.share.pool
            wrote_all = emit is not None
            with control.installed(vae):
                for r, mode in enumerate(self.host.each(rounds)):
                    if r:
                        control.next_round(mode)
                    for i, batch in enumerate(self.host.each(batches, [len(b[rank]) or 1 for b in batches])):
                        control.windows, control.peers = batch[rank], batch
                        outs = run(vae, crop(batch[rank]).to(next(vae.parameters()).dtype))
                        if not batch[rank]:
                            continue
                        if emit is not None and self.host.all_finite(outs):
                            for w, out in zip(batch[rank], outs.to(self._dtype()).split(1), strict=True):
                                emit(w, out)
                            self._progress(kind, len(batch[rank]), total)
                        else:
                            wrote_all = False  # the output pass retries overflowing tiles in fp32
                            self._progress("stats", r * len(batches) + i + 1, len(rounds) * len(batches))
            if all(self.host.all_finite(t) for t in control.tensors()):
                return control, wrote_all
        raise FloatingPointError(f"VAE {kind} statistics are not finite even in fp32: the input has NaN/inf")

    def _apply_guarded(
        self,
        control: NormControl,
        run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        crop: torch.Tensor,
        kind: str,
    ) -> torch.Tensor:
        out = run(self.vae, crop)
        if crop.dtype != torch.float32 and not self.host.all_finite(out):
            self.fp32_retries += 1
            fp32 = self._fp32_vae()
            with control.installed(fp32):
                out = run(fp32, crop.float()).to(crop.dtype)
        return out
