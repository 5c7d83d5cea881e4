"""The tiled VAE split over processes: each runs the statistics pass and the windows of its own rows of tiles, the
GroupNorm statistics pooled as they are measured, and the image equals the one-process image.

One launch of gloo processes per group size runs every case (a launch costs more than its cases); each process
compares with references built before it was forked.
"""

from __future__ import annotations

import io
import itertools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parallel_harness import compare, launch, ok_results
from PIL import Image

import linfusion_cli.engine.rows as rows_module
import linfusion_cli.io.pngfast as pngfast
from linfusion_cli.engine.parallel import Bands, Comm
from linfusion_cli.engine.rows import Banded
from linfusion_cli.engine.splitting import ImageSplit
from linfusion_cli.engine.vae import TiledVAE, to_uint8
from linfusion_cli.engine.vae_tiles import Window, WindowShare
from linfusion_cli.models.archs import ARCHS
from linfusion_cli.models.tensors import upscale

UNET = {"block_out_channels": [32, 64]}  # band edges on multiples of 2 latent rows
HEIGHT, WIDTH = 264, 72  # px: 33 latent rows, ragged for 2 and 3 processes; 2 columns of tiles
NEXT = (120, 600)  # px of a next stage: 75 latent rows (ragged bands), 600/264 rows (no whole factor)
TILE = 64  # px cores: 5 rows of 2 tiles, dealt 5/5 or 3/4/3 to the processes (some cross their rows' owners)
SMALL_BUDGET = 3 << 20  # bytes: a window a batch; the 3-process case streams its statistics in several batches


def vae_inputs() -> tuple[Any, torch.Tensor, torch.Tensor]:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**ARCHS["tiny"].vae).eval()
    torch.manual_seed(3)
    latents = F.interpolate(torch.randn(1, 4, 7, 5), size=(HEIGHT // 8, WIDTH // 8), mode="bicubic")
    image = F.interpolate(torch.rand(1, 3, 9, 7) * 2 - 1, size=(HEIGHT, WIDTH), mode="bicubic").clamp(-1, 1)
    return vae, latents, image


def pooled_batches(vae: Any, world: int) -> list[list[Window]]:
    """The statistics pass's batches of a split decode streamed in several batches: each the windows every process
    runs of it, put together (the processes' parts in rank order)."""
    share = WindowShare(0, world, None, lambda value: [value] * world, None)  # type: ignore[arg-type]
    tiler = TiledVAE(vae, tile=TILE, overlap=16, share=share, memory_budget=SMALL_BUDGET)
    windows = tiler._windows(HEIGHT, WIDTH, TILE, grid=8)
    return [[w for part in batch for w in part] for batch in tiler._sample(windows, grid=8)]


def reference(vae: Any, latents: torch.Tensor, image: torch.Tensor, world: int) -> dict[str, torch.Tensor]:
    tiler = TiledVAE(vae, tile=TILE, overlap=16)
    out = {"decode": tiler.decode(latents), "encode": tiler.encode(image)}
    if world == 3:  # one process streaming the statistics in the batches the split processes run together
        streamed = TiledVAE(vae, tile=TILE, overlap=16, memory_budget=SMALL_BUDGET)
        batches = pooled_batches(vae, world)
        assert len(batches) > 1 and max(map(len, batches)) == world and min(map(len, batches)) < world  # ghosts
        streamed._sample = lambda windows, grid: [[batch] for batch in batches]  # type: ignore[method-assign]
        out["streamed decode"] = streamed.decode(latents)
    return out


def vae_battery(comm: Comm, vae: Any, latents: torch.Tensor, image: torch.Tensor, ref: dict) -> dict[str, Any]:
    share = ImageSplit(comm, UNET).vae_share()
    tiler = TiledVAE(vae, tile=TILE, overlap=16, share=share)
    out: dict[str, Any] = {"decode": compare(tiler.decode(latents), ref["decode"])}
    out["encode"] = compare(tiler.encode(image), ref["encode"])
    if "streamed decode" in ref:
        streamed = TiledVAE(vae, tile=TILE, overlap=16, share=share, memory_budget=SMALL_BUDGET)
        out["streamed decode"] = compare(streamed.decode(latents), ref["streamed decode"])
    # rows held as the UNet's bands hold them (band edges fall inside tiles), out as each process's rows of tiles
    comm.bands = bands = Bands.split(HEIGHT // 8, comm.world, 2)
    held = tuple(bands.rows(r) for r in range(comm.world))
    rows = tiler.decode_rows(Banded(comm.band(latents), held, comm.rank, HEIGHT // 8))
    out["decode rows"] = compare(rows.tensor, ref["decode"][:, :, slice(*rows.span)])
    pixels = tuple((a * 8, b * 8) for a, b in held)
    rows = tiler.encode_rows(Banded(comm.band(image), pixels, comm.rank, HEIGHT))
    out["encode rows"] = compare(rows.tensor, ref["encode"][:, :, slice(*rows.span)])
    out["spans"] = [rows.held, tiler.rows_of(HEIGHT, WIDTH, "encode")]
    # the last image: each process's rows of tiles, streamed in order into the first process's PNG
    pixels = tiler.decode_rows_to_uint8(Banded(comm.band(latents), held, comm.rank, HEIGHT // 8))
    rows_module.STRIP_ROWS = 40  # px: several messages from each process
    stream = ImageSplit(comm, UNET).stream(pixels)
    out["image rows"] = [pixels.held, tiler.rows_of(HEIGHT, WIDTH, "decode"), len(stream.strips_left)]
    if stream.takes:
        png = io.BytesIO()
        pngfast.write_png_rows(stream, {}, png)
        written = np.asarray(Image.open(io.BytesIO(png.getvalue()))).astype(np.int16)
        expected = to_uint8(ref["decode"])[0].permute(1, 2, 0).numpy().astype(np.int16)
        out["png"] = int(np.abs(written - expected).max())
    else:
        stream.deliver()
    # the hand-off: the decoded rows (as the tiles left them) upscaled to a stage of ragged bands, each process
    # making the rows of its band and of its tiles
    decoded = tiler.decode_rows(Banded(comm.band(latents), held, comm.rank, HEIGHT // 8))
    split = ImageSplit(comm, UNET)
    split.begin_stage(NEXT[1] // 8, NEXT[0] // 8)
    needs = split.upscale_needs(TiledVAE(vae, tile=TILE, share=share).input_rows(NEXT[1], NEXT[0], "encode"))
    up = split.upscale(decoded, *NEXT, needs)
    out["upscale"] = compare(up.tensor, upscale(ref["decode"], *NEXT)[:, :, slice(*up.span)])
    out["ragged"] = split.comm is not None and split.comm.geometry().ragged
    out["calls"] = dict(comm.stats.calls)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_split_tiled_vae_equals_one_process(world: int) -> None:
    vae, latents, image = vae_inputs()
    with torch.no_grad():
        ref = reference(vae, latents, image, world)
    results = launch(world, vae_battery, vae, latents, image, ref, deadline_s=120)
    for result in ok_results(results):
        assert result["ragged"]
        for name in [*ref, "decode rows", "encode rows", "upscale"]:
            assert result[name]["rel"] < 1e-4, (name, result[name])  # fp32 reduction order only
        held, spans = result["spans"]
        assert list(held) == spans and spans[0][0] == 0 and spans[-1][1] == HEIGHT // 8  # a partition of the rows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)) and len({b - a for a, b in spans}) > 1
        assert result["calls"]["vae stats"] > 0  # the statistics were pooled, not measured whole on each
        assert result["calls"]["rows"] > 0 and result["calls"]["vae tiles"] > 0  # rows fetched, cores handed over
        image_rows, tile_rows, strips = result["image rows"]  # the rows of each one's tiles, 40 rows a message
        assert list(image_rows) == tile_rows and strips == sum(-(-(b - a) // 40) for a, b in tile_rows) > world
        assert result["calls"]["image"] > 0
    assert ok_results(results)[0]["png"] <= 1  # the first process wrote the image from every process's rows
