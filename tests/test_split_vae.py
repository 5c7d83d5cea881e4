"""The tiled VAE split over processes: each runs the statistics pass and the windows of its own rows of tiles, the
GroupNorm statistics pooled as they are measured, and the image equals the one-process image.

One launch of gloo processes per group size runs every case (a launch costs more than its cases); each process
compares with references built before it was forked.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from parallel_harness import compare, launch, ok_results

from linfusion_cli.engine.parallel import Comm
from linfusion_cli.engine.splitting import ImageSplit
from linfusion_cli.engine.vae import TiledVAE
from linfusion_cli.engine.vae_tiles import Window, WindowShare
from linfusion_cli.models.archs import ARCHS

UNET = {"block_out_channels": [32, 64]}  # band edges on multiples of 2 latent rows
HEIGHT, WIDTH = 264, 72  # px: 33 latent rows, ragged for 2 and 3 processes; 2 columns of tiles
# px cores by group size: 5 rows of tiles over 2 processes, 3 over 3 (process bands end inside tiles); the
# 2-process case also streams its statistics in several batches (a memory budget of a few windows a batch)
TILES = {2: 64, 3: 88}
SMALL_BUDGET = 3 << 20  # bytes


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
    share = WindowShare(0, world, *(None,) * 3, agree=lambda value: [value] * world)  # type: ignore[arg-type]
    tiler = TiledVAE(vae, tile=TILES[world], overlap=16, share=share, memory_budget=SMALL_BUDGET)
    windows = tiler._windows(HEIGHT, WIDTH, TILES[world], grid=8)
    return [[w for part in batch for w in part] for batch in tiler._sample(windows, grid=8)]


def reference(vae: Any, latents: torch.Tensor, image: torch.Tensor, world: int) -> dict[str, torch.Tensor]:
    tiler = TiledVAE(vae, tile=TILES[world], overlap=16)
    out = {"decode": tiler.decode(latents), "encode": tiler.encode(image)}
    if world == 2:  # one process streaming the statistics in the batches the split processes run together
        streamed = TiledVAE(vae, tile=TILES[world], overlap=16, memory_budget=SMALL_BUDGET)
        batches = pooled_batches(vae, world)
        assert len(batches) > 1 and max(map(len, batches)) == world and min(map(len, batches)) < world  # ghosts
        streamed._sample = lambda windows, grid: [[batch] for batch in batches]  # type: ignore[method-assign]
        out["streamed decode"] = streamed.decode(latents)
    return out


def vae_battery(comm: Comm, vae: Any, latents: torch.Tensor, image: torch.Tensor, ref: dict) -> dict[str, Any]:
    share = ImageSplit(comm, UNET).vae_share()
    tiler = TiledVAE(vae, tile=TILES[comm.world], overlap=16, share=share)
    out: dict[str, Any] = {"decode": compare(tiler.decode(latents), ref["decode"])}
    out["encode"] = compare(tiler.encode(image), ref["encode"])
    if "streamed decode" in ref:
        streamed = TiledVAE(vae, tile=TILES[comm.world], overlap=16, share=share, memory_budget=SMALL_BUDGET)
        out["streamed decode"] = compare(streamed.decode(latents), ref["streamed decode"])
    out["calls"] = dict(comm.stats.calls)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_split_tiled_vae_equals_one_process(world: int) -> None:
    vae, latents, image = vae_inputs()
    with torch.no_grad():
        ref = reference(vae, latents, image, world)
    for result in ok_results(launch(world, vae_battery, vae, latents, image, ref, deadline_s=120)):
        for name in ref:
            assert result[name]["rel"] < 1e-4, (name, result[name])  # fp32 reduction order only
        assert result["calls"]["vae stats"] > 0  # the statistics were pooled, not measured whole on each
