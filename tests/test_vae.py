"""TiledVAE: seam-free tiles with whole-image GroupNorm statistics, fp32 retry, uint8 output."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from linfusion_cli.engine import memory_model
from linfusion_cli.engine.vae import TiledVAE, to_uint8
from linfusion_cli.engine.vae_tiles import tile_windows
from linfusion_cli.models.archs import ARCHS

SD_WIDTHS = [128, 256, 512, 512]  # the fidelity harness of docs/reference.md section 5: SD-shaped
NARROW = [32, 64, 128, 128]  # same shape, cheaper, for the slower cases


def make_vae(widths: list[int], seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    groups = min(32, widths[0] // 2)
    return AutoencoderKL(**{**ARCHS["sd15"].vae, "block_out_channels": widths, "norm_num_groups": groups}).eval()


def smooth_latent(size: int, seed: int = 1) -> torch.Tensor:
    """The fidelity harness (docs/reference.md section 5): 16x16 noise upsampled bicubically to the latent size (scaled latents)."""
    torch.manual_seed(seed)
    return F.interpolate(torch.randn(1, 4, 16, 16), size=(size // 8, size // 8), mode="bicubic") * 0.18215


def psnr(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR over the reference's peak-to-peak range."""
    mse = (ours.double() - ref.double()).pow(2).mean()
    return float(10 * torch.log10((ref.max() - ref.min()).double() ** 2 / mse))


def untiled_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents / vae.config.scaling_factor).sample


def test_windows_partition_the_image() -> None:
    windows = tile_windows(101, 67, core=32, halo=8, multiple=1)
    cover = torch.zeros(101, 67, dtype=torch.int32)
    for w in windows:
        assert (w.height, w.width) == (windows[0].height, windows[0].width)  # batchable
        assert 0 <= w.y0 and w.y0 + w.height <= 101 and 0 <= w.x0 and w.x0 + w.width <= 67
        top, left, bottom, right = w.core
        cover[w.y0 + top : w.y0 + bottom, w.x0 + left : w.x0 + right] += 1
        # the core keeps its halo unless it touches the image border
        assert top >= 8 or w.y0 == 0
        assert w.height - bottom >= 8 or w.y0 + w.height == 101
    assert torch.all(cover == 1)


def test_windows_align_to_the_latent_grid() -> None:
    for w in tile_windows(776, 1000, core=256, halo=64, multiple=8):
        assert w.y0 % 8 == 0 and w.x0 % 8 == 0 and all(c % 8 == 0 for c in w.core[:2])


@pytest.mark.slow
def test_decode_fidelity_sd_shaped() -> None:
    """SD-shaped random VAE (128/256/512/512), four tiles with whole-image statistics: >= 42 dB against untiled
    (docs/reference.md section 5: diffusers' tiling gives 34.5 dB on this harness at 768 px; 52 dB here at 128 px
    in tiles of 64 px with 24 px of context, as 53 dB at 192 px in tiles of 96 with 32: a third of the time)."""
    vae = make_vae(SD_WIDTHS)
    latents = smooth_latent(128)
    ref = untiled_decode(vae, latents)
    tiler = TiledVAE(vae, tile=64, overlap=24)
    assert len(tiler._windows(128, 128, 64, 8)) == 4
    ours = tiler.decode(latents, clamp=False)
    assert ours.shape == ref.shape
    assert psnr(ours, ref) >= 42.0


ODD = (30, 46)  # latent size: 240x368 px, which 128 px tiles do not divide


@functools.cache
def _odd_case(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Odd-aspect latents and their untiled decode by the NARROW VAE (shared by the tests that compare to it)."""
    torch.manual_seed(3)
    if kind == "smooth":
        latents = F.interpolate(torch.randn(1, 4, 10, 14), size=ODD, mode="bicubic") * 0.18215
    else:
        latents = torch.randn(1, 4, *ODD) * 0.18215
    return latents, untiled_decode(make_vae(NARROW), latents)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["smooth", "noise"])
def test_decode_fidelity_odd_aspect_partial_tiles(kind: str) -> None:
    vae = make_vae(NARROW)
    latents, ref = _odd_case(kind)
    assert psnr(TiledVAE(vae, tile=128, overlap=96).decode(latents, clamp=False), ref) >= 42.0


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "floor"), [("smooth", 45.0), ("noise", 40.0)])
def test_decode_fidelity_streamed_statistics(kind: str, floor: float) -> None:
    """With memory for one window at a time, statistics are streamed over batches: a little below the
    one-batch result, far above per-tile statistics."""
    vae = make_vae(NARROW)
    latents, ref = _odd_case(kind)
    tiler = TiledVAE(vae, tile=128, overlap=64, memory_budget=48 << 20)
    assert len(tiler._sample(tiler._windows(ODD[0] * 8, ODD[1] * 8, 128, 8), 8)) > 1  # really several batches
    assert psnr(tiler.decode(latents, clamp=False), ref) >= floor


@pytest.mark.slow
def test_encode_fidelity() -> None:
    vae = make_vae(NARROW)
    torch.manual_seed(4)
    images = F.interpolate(torch.rand(1, 3, 20, 28) * 2 - 1, size=(272, 400), mode="bicubic").clamp(-1, 1)
    with torch.no_grad():
        ref = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    ours = TiledVAE(vae, tile=128).encode(images)
    assert ours.shape == ref.shape == (1, 4, 34, 50)  # 128 px tiles do not divide it
    assert psnr(ours, ref) >= 42.0


def test_untiled_when_it_fits_is_exact() -> None:
    vae = make_vae(NARROW)
    latents = smooth_latent(128)
    ref = untiled_decode(vae, latents)
    assert torch.allclose(TiledVAE(vae).decode(latents, clamp=False), ref, atol=1e-5)


@pytest.mark.slow
def test_no_seams_at_tile_boundaries() -> None:
    """The step across a tile boundary is no larger than steps elsewhere in the image (3x3 tiles, each with half
    its side of context: 192 px in tiles of 64, as 384 px in tiles of 128 with the default 64 at 5x the time)."""
    vae = make_vae(NARROW)
    latents = smooth_latent(192)
    out = TiledVAE(vae, tile=64, overlap=32).decode(latents, clamp=False)[0].mean(0)  # (H, W)
    steps = (out[:, 1:] - out[:, :-1]).abs().mean(0)  # mean |step| between columns x and x+1
    boundaries = [c - 1 for c in (64, 128)]
    typical = steps.median()
    assert all(steps[b] < 3 * typical for b in boundaries), (steps[boundaries], typical)


@pytest.mark.slow
def test_sampled_statistics_for_huge_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the sampling threshold only some tiles feed the statistics; the result stays close."""
    monkeypatch.setattr(memory_model, "SAMPLE_MIN_PIXELS", 64 * 64)
    monkeypatch.setattr(memory_model, "SAMPLE_FRACTION", 0.5)
    vae = make_vae(NARROW)
    torch.manual_seed(5)
    latents = torch.randn(1, 4, 48, 48) * 0.18215
    ref = untiled_decode(vae, latents)
    tiler = TiledVAE(vae, tile=128)
    windows = tiler._windows(384, 384, 128, 8)
    assert sum(len(b) for b in tiler._sample(windows, 8)) < len(windows) == 9  # a sample, not every tile
    assert psnr(tiler.decode(latents, clamp=False), ref) >= 35.0


def test_half_precision_overflow_is_redone_in_fp32() -> None:
    vae = make_vae([16, 16, 32, 32])
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(3e4)  # outputs far beyond fp16's 65504
    latents = smooth_latent(128)  # four tiles
    tiler = TiledVAE(vae.half(), tile=64)
    out = tiler.decode(latents.half())
    assert torch.isfinite(out).all() and tiler.fp32_retries > 0


def test_uint8_output_matches_decode() -> None:
    vae = make_vae([16, 16, 32, 32])
    latents = smooth_latent(256)
    tiler = TiledVAE(vae, tile=64)
    image = tiler.decode_to_uint8(latents)
    assert image.dtype == torch.uint8 and image.shape == (256, 256, 3)
    assert torch.equal(image, to_uint8(tiler.decode(latents))[0].permute(1, 2, 0))


def test_tile_progress_events() -> None:
    vae = make_vae([16, 16, 32, 32])
    seen: list[tuple[str, int, int]] = []
    TiledVAE(vae, tile=64, on_tile=lambda k, d, t: seen.append((k, d, t))).decode(smooth_latent(192))
    assert seen and seen[-1][1] == seen[-1][2]


def test_bad_arguments() -> None:
    vae = make_vae([16, 16, 32, 32])
    with pytest.raises(ValueError, match="multiple of 8"):
        TiledVAE(vae, tile=100)
    with pytest.raises(ValueError, match="multiples of 8"):
        TiledVAE(vae).encode(torch.zeros(1, 3, 60, 64))
