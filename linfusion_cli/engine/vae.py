"""Seam-free tiled VAE encode/decode with whole-image GroupNorm statistics.

Why tiles show seams elsewhere: each tile normalises with its *own* GroupNorm statistics, so neighbouring tiles
get different tone curves. Here every GroupNorm uses statistics of the whole image instead:

1. Tiles. The image is split evenly into cores; every tile is its core plus a halo (context) on each side, and
   all tiles have the same window size (windows are shifted inward at the borders), so they can be batched.
2. Statistics pass. Tile windows run through the network *together* (as one batch), with every GroupNorm
   pooling its mean/variance over the cores of all windows in the batch (fp32, Chan's combination). When one
   batch holds every tile these are exactly the statistics of the tiled computation, and that pass already is
   the output. When memory asks for several batches, statistics are streamed: each batch normalises with
   everything seen so far, and a second round over the same windows re-measures them under that estimate, so
   the result does not depend on which batch came first. Huge images use an evenly spread sample of tiles
   (all of an image up to memory_model.SAMPLE_MIN_PIXELS, else SAMPLE_FRACTION of it); what the sample misses of the
   image's large-scale content becomes a small *uniform* tone offset, never a seam. A split image's processes
   each run their own rows' share of the sample, a batch on each at once, every GroupNorm's statistics pooled
   over them as measured: one batch of all windows gives the whole image's statistics exactly, as one process
   does, and streamed batches hold the processes' windows together (more per batch than one process's).
3. Output pass. Each tile runs alone with every GroupNorm fixed to those statistics; its core is written out.
   With a halo covering the convolutions' effective reach, cores match the untiled result.

Fidelity cost: the VAE's mid-block self-attention sees one tile window (core + halo) rather than the whole
image whenever the image is split. Its contribution is a smooth, low-frequency correction, so a windowed
attention changes tones slightly inside each tile (on the fidelity harness of docs/reference.md section 5, a few tenths of a dB
of PSNR), but never introduces a step between tiles beyond that. Images that fit in one tile are decoded untiled.

Precision: convolutions run in the VAE's dtype, GroupNorm statistics accumulate in fp32, and a tile whose
output is not finite (SDXL's VAE overflows in fp16) is redone with an fp32 copy of the VAE and reported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .host import Host
from .memory import auto_vae_tile, vae_windows_per_batch
from .memory_model import stats_sample
from .memory_plan import tile_used
from .vae_stats import NormControl
from .vae_tiles import Window, WindowShare, spread, tile_windows

LATENT_SCALE = 8  # SD VAEs: 3 downsamples
DEFAULT_HALO_PX = 64  # context around each tile core, image px (8 latent px)

TileCallback = Callable[[str, int, int], None]  # (kind "encode"/"decode"/"stats", done, total)


# --- GroupNorm with external statistics ----------------------------------------------------------------------


# --- the tiled VAE -------------------------------------------------------------------------------------------


class TiledVAE:
    """Tiled encode/decode for a diffusers AutoencoderKL with whole-image GroupNorm statistics.

    tile: tile core side in image px (None: automatic from free memory, untiled when the image fits).
    overlap: halo (context) on each side of a core, image px (default 64).
    memory_budget: bytes the VAE may use when choosing automatic tiles and statistics batches.
    fp32_vae: returns an fp32 copy of the VAE for tiles that overflow in half precision (default: a deep copy
    made on first need); an engine that builds a tiler per stage passes one shared copy.
    share: one process's part of a split image: only its tiles' outputs are written (elsewhere zeros; the
    caller sums the processes' results), an untiled image only by process 0.
    host: what the work asks of the host (finite checks, copies to CPU memory, loops; engine/host.py).
    `encode` takes images (B, 3, H, W) in [-1, 1] and returns scaled latents; `decode` is its inverse.
    """

    def __init__(
        self,
        vae: Any,
        tile: int | None = None,
        overlap: int | None = None,
        on_tile: TileCallback | None = None,
        memory_budget: int | None = None,
        fp32_vae: Callable[[], Any] | None = None,
        share: WindowShare | None = None,
        host: Host | None = None,
    ) -> None:
        self.vae = vae
        self.host = host or Host()
        self.share = share
        self.tile = tile
        self.halo = DEFAULT_HALO_PX if overlap is None else overlap
        if self.halo < 0 or self.halo % LATENT_SCALE:
            raise ValueError(f"overlap must be a non-negative multiple of {LATENT_SCALE} px, got {self.halo}")
        if tile is not None and (tile < 64 or tile % LATENT_SCALE):
            raise ValueError(f"tile must be a multiple of {LATENT_SCALE} px and at least 64, got {tile}")
        self.on_tile = on_tile
        self.memory_budget = memory_budget
        self.fp32_retries = 0
        self._fp32_source = fp32_vae
        self._fp32: Any = None

    # public API --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8), scaled (and shifted) as the UNet expects."""
        if images.shape[-1] % LATENT_SCALE or images.shape[-2] % LATENT_SCALE:
            raise ValueError(f"image sides must be multiples of {LATENT_SCALE}, got {tuple(images.shape[-2:])}")
        dtype = self._dtype()
        return torch.cat([self._encode_one(img[None].to(dtype)) for img in images])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [-1, 1] (unclamped with clamp=False, for fidelity
        measurements), on the VAE's device and dtype."""
        outs = []
        for z in latents:
            h, w = z.shape[-2] * LATENT_SCALE, z.shape[-1] * LATENT_SCALE
            shared = self.share is not None and self.tile_for(h, w) is not None
            out = (torch.zeros if shared else torch.empty)((1, 3, h, w), device=z.device, dtype=self._dtype())

            def write(ys: slice, xs: slice, pixels: torch.Tensor, _out: torch.Tensor = out) -> None:
                _out[:, :, ys, xs] = pixels

            self._decode_one(z[None], write)
            if shared and self.share is not None:
                self.share.combine(out)  # each process decoded its rows: every process gets the whole image
            outs.append(out.clamp_(-1, 1) if clamp else out)
        return torch.cat(outs)

    @torch.no_grad()
    def decode_to_uint8(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Scaled latents (1, 4, h, w) -> CPU uint8 image (H, W, 3), moved off the device tile by tile. Shared
        (a split image), each process decodes its rows and the first gets the whole image (None elsewhere)."""
        z = latents[:1]
        h, w = z.shape[-2] * LATENT_SCALE, z.shape[-1] * LATENT_SCALE
        tile = self.tile_for(h, w)
        share = self.share if tile is not None else None
        bands = [(0, h)]
        if share is not None:
            windows = self._windows(h, w, tile or 0, grid=LATENT_SCALE)
            bands = [share.rows(windows, LATENT_SCALE, rank) for rank in range(share.world)]
        start, end = bands[share.rank if share is not None else 0]
        pin = z.device.type == "cuda"
        out = self.host.host_buffer((end - start, w, 3), torch.uint8, pin)

        def write(ys: slice, xs: slice, pixels: torch.Tensor) -> None:
            rows = slice(ys.start - start if ys.start is not None else None, ys.stop - start if ys.stop else None)
            out[rows, xs] = self.host.download(to_uint8(pixels)[0].permute(1, 2, 0), pin)

        self._decode_one(z, write)
        if pin:
            torch.cuda.synchronize(z.device)
        return out if share is None else share.gather(out, bands)

    # geometry -----------------------------------------------------------------------------------------------
    def tile_for(self, height: int, width: int) -> int | None:
        """Tile core side (image px) for an image, or None when it is decoded untiled."""
        tile = self.tile
        if tile is None:
            tile = auto_vae_tile(
                self.vae.config, self._dtype(), self._device(), height, width, self.memory_budget, self.halo
            )
        return tile_used(tile, height, width)

    def _windows(self, height: int, width: int, tile: int, grid: int) -> list[Window]:
        """Windows on a grid where one unit is `grid` image px (8 for latents, 1 for images)."""
        return tile_windows(
            height // grid, width // grid, tile // grid, self.halo // grid, multiple=LATENT_SCALE // grid
        )

    def _sample(self, windows: list[Window], grid: int) -> list[list[list[Window]]]:
        """Which windows the statistics pass runs, in batches that fit memory: batches[i][rank] are the windows
        process `rank` runs of batch i (one process: all of it). A split image's processes each sample their own
        windows, as many as their share of the one-process sample (memory_model.stats_sample); they run the same
        number of batches (some possibly empty), each process's part of a batch at most what one batch holds."""
        owners = [sorted(self.share.mine(windows, r)) for r in range(self.share.world)] if self.share else []
        owned = [[windows[i] for i in own] for own in owners] or [windows]
        win_px = windows[0].height * windows[0].width * grid * grid
        core_px = sum((w.core[2] - w.core[0]) * (w.core[3] - w.core[1]) for w in windows) * grid * grid
        fit = vae_windows_per_batch(self.vae.config, self._dtype(), self._device(), win_px, self.memory_budget)
        take, per_batch = stats_sample(len(windows), core_px, fit)
        chosen = [[own[i] for i in spread(len(own), math.ceil(take * len(own) / len(windows)))] for own in owned]
        if self.share is not None:  # the same batches on every process: the smallest any of them can afford
            per_batch = min(self.share.agree(per_batch))
        count = max(math.ceil(len(part) / per_batch) for part in chosen)
        return [[part[i::count] for part in chosen] for i in range(count)]  # interleaved: each spans its rows

    # internals ----------------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def _config(self, key: str, default: float | None) -> float | None:
        value = self.vae.config.get(key, default)
        return default if value is None else float(value)

    def _fp32_vae(self) -> Any:
        if self._fp32 is None:
            self._fp32 = self._fp32_source() if self._fp32_source else copy.deepcopy(self.vae).float()
        return self._fp32

    def _progress(self, kind: str, done: int, total: int) -> None:
        if self.on_tile is not None:
            self.on_tile(kind, done, total)

    def _encode_one(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        tile = self.tile_for(height, width)
        scale, shift = self._config("scaling_factor", 0.18215), self._config("shift_factor", None)

        def run(vae: Any, x: torch.Tensor) -> torch.Tensor:
            moments = vae.encoder(x)
            if getattr(vae, "quant_conv", None) is not None:
                moments = vae.quant_conv(moments)
            return moments[:, : moments.shape[1] // 2]  # the posterior mean

        if tile is None:
            self._progress("encode", 0, 1)
            mean = self._guarded(run, image, "encode")
            self._progress("encode", 1, 1)
        else:
            windows = self._windows(height, width, tile, grid=1)
            channels = int(self.vae.config.get("latent_channels", 4))
            mean = self._tiled(image, windows, grid=1, run=run, out_grid=LATENT_SCALE, kind="encode", channels=channels)
        mean = mean.float()
        if shift is not None:
            mean = mean - shift
        return (mean * scale).to(image.dtype)  # type: ignore[operator]

    def _decode_one(self, z: torch.Tensor, write: Callable[[slice, slice, torch.Tensor], None]) -> None:
        scale, shift = self._config("scaling_factor", 0.18215), self._config("shift_factor", None)
        z = z.float() / scale  # type: ignore[operator]
        if shift is not None:
            z = z + shift
        z = z.to(self._dtype())
        height, width = z.shape[-2] * LATENT_SCALE, z.shape[-1] * LATENT_SCALE

        def run(vae: Any, x: torch.Tensor) -> torch.Tensor:
            if getattr(vae, "post_quant_conv", None) is not None:
                x = vae.post_quant_conv(x)
            return vae.decoder(x)

        tile = self.tile_for(height, width)
        if tile is None:
            self._progress("decode", 0, 1)
            write(slice(None), slice(None), self._guarded(run, z, "decode"))
            self._progress("decode", 1, 1)
            return
        windows = self._windows(height, width, tile, grid=LATENT_SCALE)
        self._tiled(z, windows, grid=LATENT_SCALE, run=run, out_grid=1 / LATENT_SCALE, kind="decode", write=write)

    def _guarded(
        self, run: Callable[[nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor, kind: str
    ) -> torch.Tensor:
        """Run the VAE; if the result is not finite in half precision, run it again in fp32."""
        out = run(self.vae, x)
        if x.dtype != torch.float32 and not self.host.all_finite(out):
            self.fp32_retries += 1
            out = run(self._fp32_vae(), x.float()).to(x.dtype)
        return out

    def _tiled(
        self,
        x: torch.Tensor,
        windows: list[Window],
        *,
        grid: int,
        run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        out_grid: float,
        kind: str,
        write: Callable[[slice, slice, torch.Tensor], None] | None = None,
        channels: int = 0,
    ) -> torch.Tensor:
        """Statistics pass over a sample of windows, then every window with those statistics."""
        result: list[torch.Tensor] = []
        mine = set(range(len(windows))) if self.share is None else self.share.mine(windows)
        index = {id(w): i for i, w in enumerate(windows)}
        if self.share is not None and write is None:  # shared: the others' rows stay 0 until combined
            shape = (1, channels, round(x.shape[-2] / out_grid), round(x.shape[-1] / out_grid))
            result.append(torch.zeros(shape, device=x.device, dtype=x.dtype))

        def emit(w: Window, tile_out: torch.Tensor) -> None:
            if index[id(w)] not in mine:
                return
            cy, cx = w.core_slices(1 / out_grid)
            piece = tile_out[:, :, cy, cx]
            oy = slice(round((w.y0 + w.core[0]) / out_grid), round((w.y0 + w.core[2]) / out_grid))
            ox = slice(round((w.x0 + w.core[1]) / out_grid), round((w.x0 + w.core[3]) / out_grid))
            if write is not None:
                write(oy, ox, piece)
                return
            if not result:
                shape = (1, piece.shape[1], round(x.shape[-2] / out_grid), round(x.shape[-1] / out_grid))
                result.append(torch.empty(shape, device=x.device, dtype=piece.dtype))
            result[0][:, :, oy, ox] = piece

        def crop(ws: list[Window]) -> torch.Tensor:
            """The windows' crops as one batch. None (a process of a split image with no window in a batch of the
            statistics pass): one window of zeros, which counts for nothing but runs every GroupNorm's exchange."""
            if not ws:
                return x.new_zeros((1, x.shape[1], windows[0].height, windows[0].width))
            return torch.cat([x[:, :, w.y0 : w.y0 + w.height, w.x0 : w.x0 + w.width] for w in ws])

        own = sorted(mine)
        self._progress(kind, 0, len(own))  # the bar shows from the start, before the statistics pass
        batches = self._sample(windows, grid)
        # When one batch holds every window, its pooled statistics *are* the whole image's, so the
        # statistics pass already produced the output: no second pass.
        whole = len(batches) == 1 and sum(map(len, batches[0])) == len(windows)
        with self.host.phase("stats"):
            control, wrote_all = self._statistics(batches, crop, run, emit if whole else None, kind, len(own))
        if not wrote_all:
            control.next_round("apply")
            with control.installed(self.vae), self.host.phase("windows"):
                done = 0
                for done, i in enumerate(self.host.each(own), 1):  # the windows this process owns (all, unsplit)
                    emit(windows[i], self._apply_guarded(control, run, crop([windows[i]]), kind))
                    self._progress(kind, done, len(own))
                if done < len(own):  # a simulation runs one window for all
                    self._progress(kind, len(own), len(own))
        if self.share is not None and write is None:
            self.share.combine(result[0])  # every process's rows, on every process
        return result[0] if result else x.new_empty(0)

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


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounding to nearest."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
