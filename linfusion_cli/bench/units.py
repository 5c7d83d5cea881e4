"""Benchmarks with random weights (cost does not depend on weight values): UNet steps, the attention layer,
the tiled VAE and the whole pipeline. Each returns plain data; the CLI prints it as JSON."""

from __future__ import annotations

import datetime
import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..engine import memory
from ..linfusion.attention import LinFusionAttention, phi
from ..linfusion.patching import apply_linfusion
from ..models.devices import free_cached
from ..models.loading import build_random

DEFAULT_UNET_SIZES = {
    "tiny": ["128", "256", "512", "1024"],
    "tiny-sd2": ["128", "256", "512", "1024"],
    "tiny-sdxl": ["128", "256", "512", "1024"],
    "sd15": ["512", "1024", "2048", "4096", "8192", "16384x8192"],
    "sd21": ["768", "1536", "3072", "6144"],
    "sdxl": ["1024", "2048", "4096", "8192"],
}
SDPA_TIME_LIMIT_S = 120.0  # skip ordinary attention where a quadratic extrapolation says a step takes longer


def parse_size(text: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '16384x8192' -> (16384, 8192) as (width, height)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size '{text}' is not N or WxH") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 64 or any(v % 8 for v in values):
        raise ValueError(f"size '{text}': sides must be multiples of 8, at least 64")
    return values[0], values[1]


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from ..base.precision import dtype_flag
    from ..base.schema import SCHEMA
    from ..core.run import describe_device, versions

    return {
        "schema": SCHEMA,
        "device": describe_device(device),
        "dtype": dtype_flag(dtype),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "threads": torch.get_num_threads(),
    }


def _timed(device: torch.device, fn: Callable[[], Any], repeats: int) -> tuple[float, memory.Usage, Any]:
    """Median seconds over `repeats` runs after one warm-up; peak memory over all of them."""
    fn()  # warm-up: kernels, allocator, lazy init
    times = []
    out = None
    with memory.Meter(device) as meter:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), meter.usage, out


# --- bench unet -----------------------------------------------------------------------------------------


def _unet_inputs(comps: Any, width: int, height: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    unet = comps.unet
    batch = 2  # classifier-free guidance
    cross = unet.config["cross_attention_dim"]
    gen = torch.Generator("cpu").manual_seed(0)
    inputs: dict[str, Any] = {
        "sample": torch.randn((batch, 4, height // 8, width // 8), generator=gen).to(device, dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn((batch, 77, cross), generator=gen).to(device, dtype),
    }
    if comps.is_sdxl:
        pooled = unet.config["projection_class_embeddings_input_dim"] - 6 * unet.config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn((batch, pooled), generator=gen).to(device, dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch, device=device, dtype=dtype),
        }
    return inputs


def _unet_step(unet: Any, inputs: dict[str, Any]) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


def bench_unet(
    arch: str,
    sizes: list[str] | None,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    modes: tuple[str, ...] = ("linfusion", "sdpa"),
    sdpa_limit: float = SDPA_TIME_LIMIT_S,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One UNet step (batch 2) per size, LinFusion vs ordinary attention, time and peak memory."""
    comps = build_random(arch, device=device, dtype=dtype)
    planner = memory.MemoryPlanner.for_job(
        low_vram=False,
        max_vram=None,
        guidance=2.0,  # bench compares attention at batch 2: at most feed-forward chunking
        device=device,
        top_width=comps.unet.config["block_out_channels"][0],
        dtype=dtype,
        weights=memory.module_bytes(comps.unet),
    )
    planner = replace(planner, ladder=planner.ladder[:2])
    results = []
    last_sdpa: tuple[int, float] | None = None
    patch = None
    for text in sizes or DEFAULT_UNET_SIZES[arch]:
        width, height = parse_size(text)
        tokens = (width // 8) * (height // 8)
        settings = planner.choose(width, height).settings
        row: dict[str, Any] = {"size": f"{width}x{height}", "tokens": tokens, "memory": settings.name}
        inputs = _unet_inputs(comps, width, height, device, dtype)
        for mode in modes:
            if mode == "sdpa" and last_sdpa is not None:
                estimate = last_sdpa[1] * (tokens / last_sdpa[0]) ** 2
                if estimate > sdpa_limit:
                    row[mode] = {
                        "skipped": f"ordinary attention is quadratic: about {estimate:.0f} s per step "
                        f"expected (limit {sdpa_limit:.0f} s)"
                    }
                    continue
            if mode == "linfusion" and patch is None:
                patch = apply_linfusion(comps.unet, "random")
            if mode == "sdpa" and patch is not None:
                patch.remove()
                patch = None
            memory.apply_settings(comps.unet, settings)
            try:
                with torch.no_grad():
                    step = functools.partial(_unet_step, comps.unet, inputs)
                    seconds, usage, out = _timed(device, step, repeats)
            except torch.OutOfMemoryError:
                free_cached(device)
                row[mode] = {"skipped": "out of memory"}
                continue
            row[mode] = {
                "seconds": round(seconds, 5),
                "finite": bool(torch.isfinite(out).all()),
                **{k: v for k, v in usage.as_dict().items() if k != "seconds"},
            }
            if mode == "sdpa":
                last_sdpa = (tokens, seconds)
            del out
            free_cached(device)
        lin, sd = row.get("linfusion", {}), row.get("sdpa", {})
        if "seconds" in lin and "seconds" in sd:
            row["sdpa_over_linfusion"] = round(sd["seconds"] / lin["seconds"], 2)
        results.append(row)
        if on_result is not None:
            on_result(row)
    return {
        "bench": "unet",
        "arch": arch,
        "batch": 2,
        "repeats": repeats,
        **environment(device, dtype),
        "results": results,
    }


# --- bench attention: our layer against the straightforward batched-matmul form ---------------------------------


def straightforward_linear_attention(layer: LinFusionAttention, x: torch.Tensor) -> torch.Tensor:
    """The formula written the obvious way: heads as a batch dimension, two matmuls, sums scaled by N^-1/2."""
    batch, tokens, channels = x.shape
    heads, d = layer.heads, channels // layer.heads
    q = phi(layer.to_q(x + layer.to_q_(x))).view(batch, tokens, heads, d).transpose(1, 2)  # (B, h, N, d)
    k = phi(layer.to_k(x + layer.to_k_(x))).view(batch, tokens, heads, d).transpose(1, 2)
    v = layer.to_v(x).view(batch, tokens, heads, d).transpose(1, 2)
    scale = tokens**-0.5
    kv = (k * scale).transpose(-1, -2) @ (v * scale)  # (B, h, d, d)
    k_mean = k.mean(dim=2, keepdim=True, dtype=torch.float32).to(x.dtype)  # (B, h, 1, d)
    out = (q @ kv) / (q @ k_mean.transpose(-1, -2) + 1e-4)  # (B, h, N, d)
    return layer.to_out[0](out.transpose(1, 2).reshape(batch, tokens, channels))


def bench_attention(
    tokens_list: list[int], dim: int, heads: int, device: torch.device, dtype: torch.dtype, repeats: int = 5
) -> dict[str, Any]:
    """LinFusionAttention against the straightforward form, same weights, same inputs."""
    torch.manual_seed(0)
    layer = LinFusionAttention(dim, heads).to(device, dtype).eval()
    results = []
    for tokens in tokens_list:
        x = torch.randn(2, tokens, dim, device=device, dtype=dtype)
        with torch.no_grad():
            ours_s, ours_use, ours = _timed(device, functools.partial(layer, x), repeats)
            plain_s, plain_use, plain = _timed(
                device, functools.partial(straightforward_linear_attention, layer, x), repeats
            )
        rel = float((ours.float() - plain.float()).norm() / plain.float().norm())
        results.append(
            {
                "tokens": tokens,
                "ours": _measured(ours_s, ours_use, 5),
                "straightforward": _measured(plain_s, plain_use, 5),
                "speedup": round(plain_s / ours_s, 2),
                "relative_difference": rel,
            }
        )
    return {"bench": "attention", "dim": dim, "heads": heads, **environment(device, dtype), "results": results}


def _measured(seconds: float, usage: memory.Usage, digits: int = 4) -> dict[str, Any]:
    """One measurement in the layout every report shares: seconds and peak_vram_allocated_gib."""
    return {"seconds": round(seconds, digits), "peak_vram_allocated_gib": usage.as_dict()["peak_vram_allocated_gib"]}


def psnr(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR over the reference's peak-to-peak range."""
    mse = (ours.double() - ref.double()).pow(2).mean().item()
    peak = (ref.max() - ref.min()).double().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def smooth_latents(width: int, height: int, seed: int = 1, scaling: float = 0.18215) -> torch.Tensor:
    """REFERENCE.md's VAE harness: 16x16 noise upsampled bicubically to the latent size (scaled latents)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    small = torch.randn((1, 4, 16, 16), generator=gen)
    return F.interpolate(small, size=(height // 8, width // 8), mode="bicubic") * scaling


# --- bench vae -----------------------------------------------------------------------------------------------

FLOOR_TILE = 1024  # the untiled floor: one 1024^2 decode, scaled by area (REFERENCE.md section 5)


def _random_vae(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    from ..models.archs import ARCHS

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        vae: Any = AutoencoderKL(**ARCHS[arch].vae)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _diffusers_tiled(vae: Any, tile: int) -> Any:
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 8
    return vae


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
    from ..engine.vae import TiledVAE

    vae = _random_vae(arch, device, dtype)
    scaling = vae.config.scaling_factor

    def floor(kind: str, side: int) -> float:
        lat = smooth_latents(side, side, scaling=scaling).to(device, dtype)
        img = torch.zeros((1, 3, side, side), device=device, dtype=dtype)
        with torch.no_grad():
            fn = (
                (lambda: vae.decode(lat / scaling).sample)
                if kind == "decode"
                else (lambda: vae.encode(img).latent_dist.mean)
            )
            seconds, _, _ = _timed(device, fn, max(1, repeats))
        return seconds

    floors: dict[str, float] = {}
    results = []
    for text in sizes:
        width, height = parse_size(text)
        side = min(FLOOR_TILE, width, height)
        for kind in ("decode", "encode"):
            key = f"{kind}-{side}"
            if key not in floors:
                floors[key] = floor(kind, side)
        latents = smooth_latents(width, height, scaling=scaling).to(device, dtype)
        tiler = TiledVAE(vae, tile=tile)
        row: dict[str, Any] = {"size": f"{width}x{height}", "tile": tiler.tile_for(height, width) or "untiled"}
        with torch.no_grad():
            dec_s, dec_use, image = _timed(device, functools.partial(tiler.decode_to_uint8, latents), repeats)
            images = image.to(device).permute(2, 0, 1)[None].to(dtype) / 127.5 - 1
            del image
            enc_s, enc_use, _ = _timed(device, functools.partial(tiler.encode, images), repeats)
        scale = width * height / (side * side)
        for kind, seconds, usage in (("decode", dec_s, dec_use), ("encode", enc_s, enc_use)):
            floor_s = floors[f"{kind}-{side}"] * scale
            row[kind] = {
                "seconds": round(seconds, 4),
                "floor_seconds": round(floor_s, 4),
                "over_floor": round(seconds / floor_s, 3),
                **{k: v for k, v in usage.as_dict().items() if k != "seconds"},
            }
        if diffusers:
            ref = _diffusers_tiled(_random_vae(arch, device, dtype), FLOOR_TILE)
            try:
                with torch.no_grad():
                    d_s, d_use, _ = _timed(device, functools.partial(ref.decode, latents / scaling), repeats)
                    e_s, e_use, _ = _timed(device, functools.partial(ref.encode, images), repeats)
                row["diffusers_tiling"] = {"decode": _measured(d_s, d_use), "encode": _measured(e_s, e_use)}
            except torch.OutOfMemoryError:
                row["diffusers_tiling"] = {"skipped": "out of memory"}
            del ref
        del images, latents
        free_cached(device)
        results.append(row)
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
    from ..engine.vae import TiledVAE

    rows = []
    for seed in seeds:
        vae = _random_vae(arch, device, dtype, seed=seed)
        scaling = vae.config.scaling_factor
        latents = smooth_latents(size, size, seed=seed + 1, scaling=scaling).to(device, dtype)
        with torch.no_grad():
            ref = vae.decode(latents / scaling).sample
            image = ref.clamp(-1, 1)
            ref_latents = vae.encode(image).latent_dist.mean * scaling
            ours_dec = TiledVAE(vae, tile=tile, overlap=overlap).decode(latents, clamp=False)
            ours_enc = TiledVAE(vae, tile=tile, overlap=overlap).encode(image)
            theirs = _diffusers_tiled(_random_vae(arch, device, dtype, seed=seed), tile)
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


# --- bench png --------------------------------------------------------------------------------------------


def photo_like(width: int, height: int, seed: int = 0) -> Any:
    """A test image that compresses like a rendered photo (smooth structure plus fine grain), not like noise
    (incompressible) or a gradient (trivial)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((1, 3, max(2, height // 64), max(2, width // 64)), dtype=np.float32))
    smooth = F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    grain = rng.normal(0.0, 6.0, size=(height, width, 3)).astype(np.float32)
    return np.clip(smooth.numpy() * 255.0 + grain, 0, 255).astype(np.uint8)


def bench_png(width: int, height: int, repeats: int = 3, pillow: bool = True) -> dict[str, Any]:
    """Write a width x height RGB PNG with our encoder (and Pillow's fastest level) to a temp file, fsynced."""
    import os
    import platform
    import tempfile

    from PIL import Image

    from ..io.pngfast import deflate_name, write_png

    image = photo_like(width, height)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.png")
        writers = {"linfusion": lambda f: write_png(image, {"parameters": "bench"}, f)}
        if pillow:
            writers["pillow_level1"] = lambda f: Image.fromarray(image).save(f, format="PNG", compress_level=1)
        for name, writer in writers.items():
            times = []
            for _ in range(repeats if name == "linfusion" else 1):
                start = time.perf_counter()
                with open(path, "wb") as handle:
                    writer(handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                times.append(time.perf_counter() - start)
            results[name] = {
                "seconds": round(statistics.median(times), 3),
                "mib": round(os.path.getsize(path) / 2**20, 1),
            }
    if pillow:
        results["speedup"] = round(results["pillow_level1"]["seconds"] / results["linfusion"]["seconds"], 1)
    from ..base.schema import SCHEMA

    return {
        "schema": SCHEMA,
        "bench": "png",
        "size": f"{width}x{height}",
        "deflate": deflate_name(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **results,
    }
