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
   each run their share of the windows and of the sample, a batch on each at once, every GroupNorm's statistics
   pooled over them as measured: one batch of all windows gives the whole image's statistics exactly, as one
   process does; streamed batches hold the processes' windows together (more per batch than one process's).
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

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .host import Host
from .memory import auto_vae_tile, vae_windows_per_batch
from .memory_model import stats_sample
from .memory_plan import tile_used
from .rows import Banded, Exchange, Span, fetch_rows
from .vae_pass import TileCallback, WindowPasses
from .vae_tiles import HandOver, Window, WindowShare, core_rows, extent, sample_batches, tile_windows

LATENT_SCALE = 8  # SD VAEs: 3 downsamples
DEFAULT_HALO_PX = 64  # context around each tile core, image px (8 latent px)

Write = Callable[[slice, slice, torch.Tensor], None]  # (output rows, columns, a core) into what this process holds
GATHER_RANK = 0  # the process that gets a split image's whole uint8 image


class TiledVAE(WindowPasses):
    """Tiled encode/decode for a diffusers AutoencoderKL with whole-image GroupNorm statistics.

    tile: tile core side in image px (None: automatic from free memory, untiled when the image fits).
    overlap: halo (context) on each side of a core, image px (default 64).
    memory_budget: bytes the VAE may use when choosing automatic tiles and statistics batches.
    fp32_vae: returns an fp32 copy of the VAE for tiles that overflow in half precision (default: a deep copy
    made on first need); an engine that builds a tiler per stage passes one shared copy.
    share: one process's part of a split image (vae_tiles.WindowShare): it computes its share of the windows and
    holds the output rows of its rows of tiles; the `*_rows` methods take and give rows so held (rows.Banded).
    An image that fits one tile runs whole on every process.
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
        """(B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8), scaled (and shifted) as the UNet expects. Shared
        (a split image), every process gives the whole image and gets the whole latents."""
        return torch.cat([self._whole(self.encode_rows(self._held_whole(img[None]))) for img in images])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [-1, 1] (unclamped with clamp=False, for fidelity
        measurements), on the VAE's device and dtype. Shared, whole latents in and the whole image out on every
        process."""
        return torch.cat([self._whole(self.decode_rows(self._held_whole(z[None]), clamp)) for z in latents])

    @torch.no_grad()
    def decode_to_uint8(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Scaled latents (1, 4, h, w) -> CPU uint8 image (H, W, 3), moved off the device tile by tile. Shared
        (a split image), each process decodes its rows and the first gets the whole image (None elsewhere)."""
        rows = self.decode_rows_to_uint8(self._held_whole(latents[:1]))
        if self.share is None:
            return rows.tensor
        needs = [(0, rows.height) if r == GATHER_RANK else (0, 0) for r in range(self.share.world)]
        whole = fetch_rows(rows, needs, self._exchange("gather"))
        return whole if self.share.rank == GATHER_RANK else None

    @torch.no_grad()
    def encode_rows(self, images: Banded) -> Banded:
        """Image rows (1, 3, h, W) in [-1, 1], held across a split image's processes (or whole) -> scaled latents,
        each process holding the rows of its tiles' cores (rows_of)."""
        if images.height % LATENT_SCALE or images.tensor.shape[-1] % LATENT_SCALE:
            shape = (images.height, images.tensor.shape[-1])
            raise ValueError(f"image sides must be multiples of {LATENT_SCALE}, got {shape}")
        return self._encode_one(replace(images, tensor=images.tensor.to(self._dtype())))

    @torch.no_grad()
    def decode_rows(self, latents: Banded, clamp: bool = True) -> Banded:
        """Scaled latent rows held across a split image's processes (or whole) -> image rows in [-1, 1] (the
        VAE's device and dtype), each process holding the rows of its tiles' cores (rows_of)."""
        height, width = latents.height * LATENT_SCALE, latents.tensor.shape[-1] * LATENT_SCALE
        start, end = self.rows_of(height, width, "decode")[self._rank()]
        out = torch.empty((1, 3, end - start, width), device=latents.tensor.device, dtype=self._dtype())

        def write(ys: slice, xs: slice, pixels: torch.Tensor) -> None:
            out[:, :, ys.start - start : ys.stop - start, xs] = pixels

        held = self._decode_one(latents, write)
        return Banded(out.clamp_(-1, 1) if clamp else out, held, self._rank(), height)

    @torch.no_grad()
    def decode_rows_to_uint8(self, latents: Banded) -> Banded:
        """Scaled latent rows -> CPU uint8 image rows (h, W, 3), moved off the device tile by tile; each process
        holds the rows of its tiles' cores (rows_of)."""
        height, width = latents.height * LATENT_SCALE, latents.tensor.shape[-1] * LATENT_SCALE
        start, end = self.rows_of(height, width, "decode")[self._rank()]
        pin = latents.tensor.device.type == "cuda"
        out = self.host.host_buffer((end - start, width, 3), torch.uint8, pin)

        def write(ys: slice, xs: slice, pixels: torch.Tensor) -> None:
            out[ys.start - start : ys.stop - start, xs] = self.host.download(to_uint8(pixels)[0].permute(1, 2, 0), pin)

        held = self._decode_one(latents, write)
        if pin:
            torch.cuda.synchronize(latents.tensor.device)
        return Banded(out, held, self._rank(), height, dim=0)

    def rows_of(self, height: int, width: int, kind: str) -> list[Span]:
        """The output rows each process holds after an encode or decode of an image (height x width px): the
        cores of the rows of tiles it owns; all of them on every process when the image is not tiled."""
        tile = self.tile_for(height, width)
        out_height = height // LATENT_SCALE if kind == "encode" else height
        if self.share is None or tile is None:
            return [(0, out_height)] * (self.share.world if self.share else 1)
        grid = 1 if kind == "encode" else LATENT_SCALE
        windows = self._windows(height, width, tile, grid)
        scale = 1 / LATENT_SCALE if kind == "encode" else LATENT_SCALE
        return [self.share.rows(windows, scale, rank) for rank in range(self.share.world)]

    def input_rows(self, height: int, width: int, kind: str) -> list[Span]:
        """The input rows each process's windows read in an encode or decode of an image (height x width px): an
        image's rows (encode) or latent rows (decode); all of them when the image is not tiled."""
        grid = 1 if kind == "encode" else LATENT_SCALE
        tile = self.tile_for(height, width)
        world = self.share.world if self.share else 1
        if self.share is None or tile is None:
            return [(0, height // grid)] * world
        windows = self._windows(height, width, tile, grid)
        return [extent(windows, self.share.mine(windows, rank)) for rank in range(world)]

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
        owned = (
            [[windows[i] for i in self.share.mine(windows, r)] for r in range(self.share.world)] if self.share else []
        )
        win_px = windows[0].height * windows[0].width * grid * grid
        core_px = sum((w.core[2] - w.core[0]) * (w.core[3] - w.core[1]) for w in windows) * grid * grid
        fit = vae_windows_per_batch(self.vae.config, self._dtype(), self._device(), win_px, self.memory_budget)
        take, per_batch = stats_sample(len(windows), core_px, fit)
        if self.share is not None:  # the same batches on every process: the smallest any of them can afford
            per_batch = min(self.share.agree(per_batch))
        return sample_batches(owned or [windows], take, len(windows), per_batch)

    # internals ----------------------------------------------------------------------------------------------
    def _config(self, key: str, default: float | None) -> float | None:
        value = self.vae.config.get(key, default)
        return default if value is None else float(value)

    def _rank(self) -> int:
        return self.share.rank if self.share is not None else 0

    def _held_whole(self, x: torch.Tensor) -> Banded:
        return Banded.whole(x, self.share.world if self.share else 1, self._rank())

    def _whole(self, rows: Banded) -> torch.Tensor:
        """The whole tensor on every process, from the rows each holds."""
        if self.share is None or rows.is_whole:
            return rows.tensor
        return fetch_rows(rows, [(0, rows.height)] * self.share.world, self._exchange("rows"))

    def _exchange(self, kind: str) -> Exchange:
        share = self.share
        assert share is not None

        def exchange(sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
            share.exchange(sends, receives, kind)

        return exchange

    def _encode_one(self, image: Banded) -> Banded:
        height, width = image.height, image.tensor.shape[-1]
        tile = self.tile_for(height, width)
        scale, shift = self._config("scaling_factor", 0.18215), self._config("shift_factor", None)

        def run(vae: Any, x: torch.Tensor) -> torch.Tensor:
            moments = vae.encoder(x)
            if getattr(vae, "quant_conv", None) is not None:
                moments = vae.quant_conv(moments)
            return moments[:, : moments.shape[1] // 2]  # the posterior mean

        channels = int(self.vae.config.get("latent_channels", 4))
        start, end = self.rows_of(height, width, "encode")[self._rank()]
        shape = (1, channels, end - start, width // LATENT_SCALE)
        out = torch.empty(shape, device=image.tensor.device, dtype=image.tensor.dtype)

        def write(ys: slice, xs: slice, piece: torch.Tensor) -> None:
            out[:, :, ys.start - start : ys.stop - start, xs] = piece

        if tile is None:
            held = self._untiled(image, run, "encode", write)
        else:
            windows = self._windows(height, width, tile, grid=1)
            held = self._tiled(image, windows, grid=1, run=run, out_grid=LATENT_SCALE, kind="encode", write=write)
        mean = out.float()
        if shift is not None:
            mean = mean - shift
        latents = (mean * scale).to(image.tensor.dtype)  # type: ignore[operator]
        return Banded(latents, held, self._rank(), height // LATENT_SCALE)

    def _decode_one(self, z: Banded, write: Write) -> tuple[Span, ...]:
        """Decode latent rows, writing the image rows this process holds; returns the rows each one holds."""
        scale, shift = self._config("scaling_factor", 0.18215), self._config("shift_factor", None)
        x = z.tensor.float() / scale  # type: ignore[operator]
        if shift is not None:
            x = x + shift
        z = replace(z, tensor=x.to(self._dtype()))
        height, width = z.height * LATENT_SCALE, z.tensor.shape[-1] * LATENT_SCALE

        def run(vae: Any, x: torch.Tensor) -> torch.Tensor:
            if getattr(vae, "post_quant_conv", None) is not None:
                x = vae.post_quant_conv(x)
            return vae.decoder(x)

        tile = self.tile_for(height, width)
        if tile is None:
            return self._untiled(z, run, "decode", write)
        windows = self._windows(height, width, tile, grid=LATENT_SCALE)
        return self._tiled(
            z, windows, grid=LATENT_SCALE, run=run, out_grid=1 / LATENT_SCALE, kind="decode", write=write
        )

    def _untiled(
        self, x: Banded, run: Callable[[nn.Module, torch.Tensor], torch.Tensor], kind: str, write: Write
    ) -> tuple[Span, ...]:
        """An image that fits one tile, run whole (on every process of a split image: it is small)."""
        whole = self._whole(x)
        self._progress(kind, 0, 1)
        out = self._guarded(run, whole, kind)
        write(slice(0, out.shape[-2]), slice(None), out)
        self._progress(kind, 1, 1)
        return ((0, out.shape[-2]),) * (self.share.world if self.share else 1)

    def _tiled(
        self,
        x: Banded,
        windows: list[Window],
        *,
        grid: int,
        run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        out_grid: float,
        kind: str,
        write: Write,
    ) -> tuple[Span, ...]:
        """Statistics pass over a sample of windows, then every window with those statistics. A split image's
        process fetches the input rows its windows read, computes its windows, and writes the cores of the rows of
        tiles it owns (the others' cores travel to their owners). Returns the output rows each process holds."""
        share, rank = self.share, self._rank()
        computes = [share.mine(windows, r) for r in range(share.world)] if share else [list(range(len(windows)))]
        needs = [extent(windows, ids) for ids in computes]
        local = x.tensor if share is None else fetch_rows(x, needs, self._exchange("rows"))
        top = needs[rank][0]
        index = {id(w): i for i, w in enumerate(windows)}
        hand_over = None if share is None else HandOver(share, windows, out_grid, self._like(out_grid, local))

        def emit(w: Window, tile_out: torch.Tensor) -> None:
            cy, cx = w.core_slices(1 / out_grid)
            piece = tile_out[:, :, cy, cx]
            if hand_over is None or not hand_over.keep(index[id(w)], piece):
                write(*core_rows(w, out_grid), piece)

        def crop(ws: list[Window]) -> torch.Tensor:
            """The windows' crops as one batch. None (a process of a split image with no window in a batch of the
            statistics pass): one window of zeros, which counts for nothing but runs every GroupNorm's exchange."""
            if not ws:
                return local.new_zeros((1, local.shape[1], windows[0].height, windows[0].width))
            return torch.cat([local[:, :, w.y0 - top : w.y0 - top + w.height, w.x0 : w.x0 + w.width] for w in ws])

        own = computes[rank]
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
                for done, i in enumerate(self.host.each(own), 1):  # the windows this process computes
                    emit(windows[i], self._apply_guarded(control, run, crop([windows[i]]), kind))
                    self._progress(kind, done, len(own))
                if done < len(own):  # a simulation runs one window for all
                    self._progress(kind, len(own), len(own))
        if hand_over is not None:  # the cores computed here of rows another process holds go to it, and back
            hand_over.finish(write)
        if share is None:
            return ((0, round(x.height / out_grid)),)
        return tuple(share.rows(windows, 1 / out_grid, r) for r in range(share.world))

    def _like(self, out_grid: float, x: torch.Tensor) -> tuple[int, torch.dtype, torch.device]:
        """Channels, dtype and device of what the windows produce: latents (encode) or pixels (decode)."""
        channels = self.vae.config.get("latent_channels", 4) if out_grid > 1 else self.vae.config.get("out_channels", 3)
        return int(channels), self._dtype(), x.device


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounding to nearest."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
