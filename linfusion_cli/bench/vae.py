"""`linfusion bench vae`: our tiled VAE against the untiled floor and against diffusers' tiling (time and peak
memory), and its fidelity (PSNR of tiled against untiled), all with random weights (docs/reference.md section 5)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..engine.vae import TiledVAE
from ..models.archs import ARCHS
from ..models.devices import free_cached
from .measure import environment, measured, parse_size, timed

FLOOR_TILE = 1024  # the untiled floor: one 1024^2 decode, scaled by area (docs/reference.md section 5)


def psnr(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR over the reference's peak-to-peak range."""
    mse = (ours.double() - ref.double()).pow(2).mean().item()
    peak = (ref.max() - ref.min()).double().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def smooth_latents(width: int, height: int, seed: int = 1, scaling: float = 0.18215) -> torch.Tensor:
    """The VAE fidelity harness (docs/reference.md section 5): 16x16 noise upsampled bicubically to the latent size (scaled latents)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    small = torch.randn((1, 4, 16, 16), generator=gen)
    return F.interpolate(small, size=(height // 8, width // 8), mode="bicubic") * scaling


def random_vae(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """The architecture's VAE with seeded random weights, without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        vae: Any = AutoencoderKL(**ARCHS[arch].vae)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def diffusers_tiled(vae: Any, tile: int) -> Any:
    """`vae` with diffusers' own tiling at `tile` px: the baseline ours is measured against."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 8
    return vae


@dataclass
class VaeBench:
    """One random VAE timed at each size; the untiled floor is timed once per side and kind."""

    arch: str
    device: torch.device
    dtype: torch.dtype
    tile: int | None
    repeats: int
    vae: Any = field(init=False)
    scaling: float = field(init=False)  # the VAE's latent scaling factor
    floors: dict[tuple[str, int], float] = field(default_factory=dict)  # (decode|encode, side) -> seconds

    def __post_init__(self) -> None:
        self.vae = random_vae(self.arch, self.device, self.dtype)
        self.scaling = self.vae.config.scaling_factor

    def row(self, text: str, diffusers: bool) -> dict[str, Any]:
        """Decode and encode at one size: ours against the floor scaled by area, then diffusers' tiling."""
        width, height = parse_size(text)
        side = min(FLOOR_TILE, width, height)
        for kind in ("decode", "encode"):
            if (kind, side) not in self.floors:
                self.floors[kind, side] = self.floor(kind, side)
        latents = smooth_latents(width, height, scaling=self.scaling).to(self.device, self.dtype)
        row, images = self.tiled(latents, width, height, side)
        if diffusers:
            row["diffusers_tiling"] = self.diffusers_tiling(latents, images)
        del images, latents
        free_cached(self.device)
        return row

    def floor(self, kind: str, side: int) -> float:
        """Seconds of one untiled decode or encode of a side x side image."""
        vae, scaling = self.vae, self.scaling
        lat = smooth_latents(side, side, scaling=scaling).to(self.device, self.dtype)
        img = torch.zeros((1, 3, side, side), device=self.device, dtype=self.dtype)
        with torch.no_grad():
            fn = (
                (lambda: vae.decode(lat / scaling).sample)
                if kind == "decode"
                else (lambda: vae.encode(img).latent_dist.mean)
            )
            seconds, _, _ = timed(self.device, fn, max(1, self.repeats))
        return seconds

    def tiled(self, latents: torch.Tensor, width: int, height: int, side: int) -> tuple[dict[str, Any], torch.Tensor]:
        """Our decode (to uint8) and encode of its result; the row so far and the images (B, 3, H, W) in [-1, 1]."""
        tiler = TiledVAE(self.vae, tile=self.tile)
        row: dict[str, Any] = {"size": f"{width}x{height}", "tile": tiler.tile_for(height, width) or "untiled"}
        with torch.no_grad():
            dec_s, dec_use, image = timed(self.device, functools.partial(tiler.decode_to_uint8, latents), self.repeats)
            images = image.to(self.device).permute(2, 0, 1)[None].to(self.dtype) / 127.5 - 1
            del image
            enc_s, enc_use, _ = timed(self.device, functools.partial(tiler.encode, images), self.repeats)
        scale = width * height / (side * side)
        for kind, seconds, usage in (("decode", dec_s, dec_use), ("encode", enc_s, enc_use)):
            floor_s = self.floors[kind, side] * scale
            row[kind] = {
                "seconds": round(seconds, 4),
                "floor_seconds": round(floor_s, 4),
                "over_floor": round(seconds / floor_s, 3),
                **{k: v for k, v in usage.as_dict().items() if k != "seconds"},
            }
        return row, images

    def diffusers_tiling(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, Any]:
        """diffusers' own tiling (FLOOR_TILE tiles) on the same latents and images, in a VAE of its own."""
        ref = diffusers_tiled(random_vae(self.arch, self.device, self.dtype), FLOOR_TILE)
        try:
            with torch.no_grad():
                d_s, d_use, _ = timed(self.device, functools.partial(ref.decode, latents / self.scaling), self.repeats)
                e_s, e_use, _ = timed(self.device, functools.partial(ref.encode, images), self.repeats)
        except torch.OutOfMemoryError:
            return {"skipped": "out of memory"}
        return {"decode": measured(d_s, d_use), "encode": measured(e_s, e_use)}


def bench_vae(
    arch: str,
    sizes: list[str],
    device: torch.device,
    dtype: torch.dtype,
    tile: int | None = None,
    repeats: int = 1,
    diffusers: bool = True,
) -> dict[str, Any]:
    """Tiled decode/encode time and peak memory against the untiled floor and diffusers' tiling."""
    bench = VaeBench(arch, device, dtype, tile, repeats)
    results = [bench.row(text, diffusers) for text in sizes]
    return {"bench": "vae", "arch": arch, "floor_tile": FLOOR_TILE, **environment(device, dtype), "results": results}


def vae_fidelity(
    arch: str,
    size: int,
    tile: int,
    seeds: list[int],
    device: torch.device,
    dtype: torch.dtype,
    overlap: int | None = None,
) -> dict[str, Any]:
    """PSNR (over the reference's peak-to-peak range) of tiled against untiled, ours and diffusers'."""
    rows = []
    for seed in seeds:
        vae = random_vae(arch, device, dtype, seed=seed)
        scaling = vae.config.scaling_factor
        latents = smooth_latents(size, size, seed=seed + 1, scaling=scaling).to(device, dtype)
        with torch.no_grad():
            ref = vae.decode(latents / scaling).sample
            image = ref.clamp(-1, 1)
            ref_latents = vae.encode(image).latent_dist.mean * scaling
            ours_dec = TiledVAE(vae, tile=tile, overlap=overlap).decode(latents, clamp=False)
            ours_enc = TiledVAE(vae, tile=tile, overlap=overlap).encode(image)
            theirs = diffusers_tiled(random_vae(arch, device, dtype, seed=seed), tile)
            diff_dec = theirs.decode(latents / scaling).sample
            diff_enc = theirs.encode(image).latent_dist.mean * scaling
        rows.append(
            {
                "seed": seed,
                "decode_psnr": round(psnr(ours_dec, ref), 2),
                "encode_psnr": round(psnr(ours_enc, ref_latents), 2),
                "diffusers_decode_psnr": round(psnr(diff_dec, ref), 2),
                "diffusers_encode_psnr": round(psnr(diff_enc, ref_latents), 2),
            }
        )
    return {
        "bench": "vae-fidelity",
        "arch": arch,
        "size": size,
        "tile": tile,
        "overlap": overlap if overlap is not None else 64,
        **environment(device, dtype),
        "results": rows,
    }
