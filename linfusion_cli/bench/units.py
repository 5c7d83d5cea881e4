"""Benchmarks of the units, with random weights (cost does not depend on weight values): UNet steps, the
attention layer and the PNG writer here, the tiled VAE in vae.py. Each returns plain data; the CLI prints it
as JSON. cli/bench.py imports every unit benchmark (and parse_size) from this module."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..base.schema import SCHEMA
from ..engine import memory
from ..engine.memory_model import StageShape
from ..engine.memory_plan import MemoryPlanner, MemorySettings, VaeModel
from ..io.pngfast import deflate_name, write_png
from ..linfusion.attention import LinFusionAttention, phi
from ..linfusion.patching import LinFusionPatch, apply_linfusion
from ..models.devices import free_cached
from ..models.loading import build_random
from .measure import environment, measured, parse_size, timed
from .vae import bench_vae, vae_fidelity

__all__ = ["bench_attention", "bench_png", "bench_unet", "bench_vae", "parse_size", "vae_fidelity"]

DEFAULT_UNET_SIZES = {
    "tiny": ["128", "256", "512", "1024"],
    "tiny-sd2": ["128", "256", "512", "1024"],
    "tiny-sdxl": ["128", "256", "512", "1024"],
    "sd15": ["512", "1024", "2048", "4096", "8192", "16384x8192"],
    "sd21": ["768", "1536", "3072", "6144"],
    "sdxl": ["1024", "2048", "4096", "8192"],
}
SDPA_TIME_LIMIT_S = 120.0  # skip ordinary attention where a quadratic extrapolation says a step takes longer
UNET_BATCH = 2  # classifier-free guidance


# --- bench unet -----------------------------------------------------------------------------------------


def unet_inputs(comps: Any, width: int, height: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Seeded UNet inputs for one guided step at width x height (and SDXL's added conditioning)."""
    unet = comps.unet
    batch = UNET_BATCH
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


def unet_step(unet: Any, inputs: dict[str, Any]) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


def unet_planner(comps: Any, device: torch.device, dtype: torch.dtype) -> MemoryPlanner:
    """A generate job's memory planner cut to its first two rungs: at most feed-forward chunking, so that the
    numbers compare the attention and not the memory settings."""
    planner = MemoryPlanner.for_job(
        low_vram=False,
        max_vram=None,
        guidance=2.0,  # bench compares attention at batch 2: at most feed-forward chunking
        budget=memory.device_budget(device, None),
        arch=comps.family.arch if comps.family else None,
        top_width=comps.unet.config["block_out_channels"][0],
        dtype_bytes=memory.dtype_bytes(dtype),
        weights=memory.module_bytes(comps.unet),
        vae=VaeModel(dict(comps.vae.config), memory.dtype_bytes(dtype), device.type),
    )
    return replace(planner, ladder=planner.ladder[:2])


@dataclass
class UnetBench:
    """One random UNet timed at each size with LinFusion and with ordinary attention, patched in and out."""

    comps: Any
    device: torch.device
    dtype: torch.dtype
    repeats: int
    sdpa_limit: float
    patch: LinFusionPatch | None = None  # LinFusion, while it is patched in
    last_sdpa: tuple[int, float] | None = None  # (tokens, seconds) of the last size ordinary attention ran at

    def row(self, text: str, planner: MemoryPlanner, modes: tuple[str, ...]) -> dict[str, Any]:
        """One size: each mode under the memory settings the planner picks for it, and their ratio."""
        width, height = parse_size(text)
        tokens = (width // 8) * (height // 8)
        settings = planner.choose(StageShape(width, height, last=True)).settings
        row: dict[str, Any] = {"size": f"{width}x{height}", "tokens": tokens, "memory": settings.name}
        inputs = unet_inputs(self.comps, width, height, self.device, self.dtype)
        for mode in modes:
            row[mode] = self.measure(mode, tokens, settings, inputs)
        lin, sd = row.get("linfusion", {}), row.get("sdpa", {})
        if "seconds" in lin and "seconds" in sd:
            row["sdpa_over_linfusion"] = round(sd["seconds"] / lin["seconds"], 2)
        return row

    def measure(self, mode: str, tokens: int, settings: MemorySettings, inputs: dict[str, Any]) -> dict[str, Any]:
        """One step's time and peak memory with `mode`'s attention; a reason instead where it cannot run."""
        too_slow = self.sdpa_too_slow(tokens) if mode == "sdpa" else None
        if too_slow is not None:
            return {"skipped": too_slow}
        self.use(mode)
        memory.apply_settings(self.comps.unet, settings)
        try:
            with torch.no_grad():
                seconds, usage, out = timed(
                    self.device, functools.partial(unet_step, self.comps.unet, inputs), self.repeats
                )
        except torch.OutOfMemoryError:
            free_cached(self.device)
            return {"skipped": "out of memory"}
        result = {
            "seconds": round(seconds, 5),
            "finite": bool(torch.isfinite(out).all()),
            **{k: v for k, v in usage.as_dict().items() if k != "seconds"},
        }
        if mode == "sdpa":
            self.last_sdpa = (tokens, seconds)
        del out
        free_cached(self.device)
        return result

    def sdpa_too_slow(self, tokens: int) -> str | None:
        """Why ordinary attention is skipped at `tokens`: its last time, grown quadratically, is over the limit."""
        if self.last_sdpa is None:
            return None
        estimate = self.last_sdpa[1] * (tokens / self.last_sdpa[0]) ** 2
        if estimate > self.sdpa_limit:
            return (
                f"ordinary attention is quadratic: about {estimate:.0f} s per step "
                f"expected (limit {self.sdpa_limit:.0f} s)"
            )
        return None

    def use(self, mode: str) -> None:
        """LinFusion patched in for `linfusion`, the original attention back for `sdpa`."""
        if mode == "linfusion" and self.patch is None:
            self.patch = apply_linfusion(self.comps.unet, "random")
        if mode == "sdpa" and self.patch is not None:
            self.patch.remove()
            self.patch = None


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
    planner = unet_planner(comps, device, dtype)
    bench = UnetBench(comps, device, dtype, repeats, sdpa_limit)
    results = []
    for text in sizes or DEFAULT_UNET_SIZES[arch]:
        row = bench.row(text, planner, modes)
        results.append(row)
        if on_result is not None:
            on_result(row)
    return {
        "bench": "unet",
        "arch": arch,
        "batch": UNET_BATCH,
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
            ours_s, ours_use, ours = timed(device, functools.partial(layer, x), repeats)
            plain_s, plain_use, plain = timed(
                device, functools.partial(straightforward_linear_attention, layer, x), repeats
            )
        rel = float((ours.float() - plain.float()).norm() / plain.float().norm())
        results.append(
            {
                "tokens": tokens,
                "ours": measured(ours_s, ours_use, 5),
                "straightforward": measured(plain_s, plain_use, 5),
                "speedup": round(plain_s / ours_s, 2),
                "relative_difference": rel,
            }
        )
    return {"bench": "attention", "dim": dim, "heads": heads, **environment(device, dtype), "results": results}


# --- bench png --------------------------------------------------------------------------------------------


def photo_like(width: int, height: int, seed: int = 0) -> Any:
    """A test image that compresses like a rendered photo (smooth structure plus fine grain), not like noise
    (incompressible) or a gradient (trivial)."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((1, 3, max(2, height // 64), max(2, width // 64)), dtype=np.float32))
    smooth = F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    grain = rng.normal(0.0, 6.0, size=(height, width, 3)).astype(np.float32)
    return np.clip(smooth.numpy() * 255.0 + grain, 0, 255).astype(np.uint8)


def bench_png(width: int, height: int, repeats: int = 3, pillow: bool = True) -> dict[str, Any]:
    """Write a width x height RGB PNG with our encoder (and Pillow's fastest level) to a temp file, fsynced."""
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
