"""The planner against the simulator: fitting the planner's coefficients (engine/memory_model.py) to simulated
UNet, ControlNet and VAE passes, and a grid of jobs whose every stage's estimate is set beside its simulated
peak. Both run on the meta device (no GPU, nothing downloaded)."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.errors import UsageError
from ..engine import memory
from ..engine.banded import Banding, banded_unet
from ..engine.memory_model import LATENT_PX, BandedCost, PassCost
from ..engine.memory_plan import FF_CHUNK_TOKENS, RUNGS, settings_ladder
from ..engine.simulate import MemoryTrace, fused_attention
from ..engine.simulate.cuda import block_bytes
from ..engine.simulate.host import MetaHost
from ..linfusion.patching import apply_linfusion
from ..models.archs import ARCHS
from ..models.families import FAMILIES, Family
from ..models.meta import meta_components

FIT_ARCHS = ("tiny", "tiny-sd2", "tiny-sdxl", "sd15", "sd21", "sdxl")
FIT_TILES = (256, 512)  # px: VAE tile cores the fit traces (two windows each)
# px: square sides the banded pass is traced at, from where SD-1.5's levels start to take several bands to 16K
# (the line's slope from the last two, its constant the most any side needs above the slope's share).
FIT_BANDED_SIDES = (4096, 6144, 8192, 16384)


def _family(arch: str) -> Family:
    return next(f for f in FAMILIES if f.arch == arch)


def ff_scale(unet_config: Any) -> int:
    """Top-level tokens per token at the first level with transformer blocks (4 for SDXL, 1 for SD-1.x)."""
    types = list(unet_config["down_block_types"])
    level = next((i for i, t in enumerate(types) if "CrossAttn" in t), 0)
    return int(4**level)


def _side(tokens: int) -> int:
    """The square image side (px) with `tokens` top-level latent tokens."""
    return round(tokens**0.5) * 8


def fit_pass(run: Callable[[int, int | None], int], scale: int, itemsize: int) -> PassCost:
    """A pass's coefficients from three traced runs (`run(side_px, ff_chunk)` -> activation bytes, batch 1): the
    feed-forward whole at one chunk's worth of tokens, chunked at 4 and at 64 chunks' worth (see PassCost)."""
    first = FF_CHUNK_TOKENS * scale
    sizes = (first, 4 * first, 64 * first)
    whole = run(_side(sizes[0]), None) / (sizes[0] * itemsize)
    four = run(_side(sizes[1]), FF_CHUNK_TOKENS) / (sizes[1] * itemsize)
    other = run(_side(sizes[2]), FF_CHUNK_TOKENS) / (sizes[2] * itemsize)
    inner = max(0.0, (whole - four) * 4 / 3) if four > other else max(0.0, (whole - other) * 4 / 3)
    return PassCost(round(other), round(whole - inner), round(inner), scale)


def _traced(model: nn.Module, call: Callable[[], Any], ff_chunk: int | None) -> int:
    trace = MemoryTrace(block_bytes)
    settings = settings_ladder()[1 if ff_chunk else 0]
    memory.apply_settings(model, settings, each=MetaHost(trace).each)
    with torch.no_grad(), fused_attention(), trace:
        call()
    return trace.peak


def _unet_inputs(config: Any, side: int, dtype: torch.dtype) -> dict[str, Any]:
    meta = torch.device("meta")
    inputs: dict[str, Any] = {
        "sample": torch.empty(1, 4, side // 8, side // 8, device=meta, dtype=dtype),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.empty(1, 77, int(config["cross_attention_dim"]), device=meta, dtype=dtype),
        "return_dict": False,
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(1, pooled, device=meta, dtype=dtype),
            "time_ids": torch.empty(1, 6, device=meta, dtype=dtype),
        }
    return inputs


def _extra_per_token(
    run: Callable[[int, int | None], int],
    base: Callable[[int, int | None], int],
    scale: int,
    itemsize: int,
    cap: int | None = None,
) -> float:
    """What a pass holds more than the plain UNet's, per top-level token and dtype byte: the most over the fit's
    sizes (those up to `cap` tokens, where the extra stops growing)."""
    first = FF_CHUNK_TOKENS * scale
    out = 0.0
    for tokens, chunk in ((first, None), (4 * first, FF_CHUNK_TOKENS), (64 * first, FF_CHUNK_TOKENS)):
        if cap is not None and tokens > cap:
            continue
        side = _side(tokens)
        out = max(out, (run(side, chunk) - base(side, chunk)) / (tokens * itemsize))
    return round(out, 1)


Run = Callable[[int, int | None], int]  # (side px, feed-forward chunk) -> activation bytes of one traced pass


def fit_arch(arch: str, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """The coefficients of one architecture (memory_model.ARCH_COSTS and VAE_COSTS entries)."""
    family = _family(arch)
    model = arch if arch in ("tiny", "tiny-sd2", "tiny-sdxl") else GRID_MODELS[family.key]
    comps, _ = meta_components(model, family, dtype)
    unet = comps.unet
    patch = apply_linfusion(unet, "random")
    comps.linfusion = patch
    itemsize = torch.finfo(dtype).bits // 8
    scale = ff_scale(unet.config)

    def unet_run(side: int, chunk: int | None, **extra: Any) -> int:
        return _traced(unet, lambda: unet(**_unet_inputs(unet.config, side, dtype), **extra), chunk)

    plain = functools.lru_cache(maxsize=None)(unet_run)  # the UNet alone, before the IP-Adapter is installed
    controlnet, with_residuals = _controlnet_runs(unet, patch, unet_run, dtype)
    costs = {
        "unet": fit_pass(plain, scale, itemsize),
        "controlnet": fit_pass(controlnet, scale, itemsize),
        "residuals": _extra_per_token(with_residuals, plain, scale, itemsize),
        "ip_adapter": _ip_adapter_extra(comps, plain, dtype, scale),
        "banded": fit_banded(unet, dtype),
    }
    return {
        "arch": arch,
        **{k: asdict(v) if isinstance(v, (PassCost, BandedCost)) else v for k, v in costs.items()},
        "vae_widths": list(comps.vae.config["block_out_channels"]),
        "vae": fit_vae(comps.vae),
    }


def _controlnet_runs(unet: nn.Module, patch: Any, unet_run: Callable[..., int], dtype: torch.dtype) -> tuple[Run, Run]:
    """A ControlNet made from the UNet (LinFusion-patched as the run patches it): its own pass traced, and the
    UNet's pass traced with its residuals added."""
    from diffusers import ControlNetModel

    from ..models.controlnet.patch import ControlNetPatch

    with patch.original_attention(), torch.device("meta"):
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    controlnet.to(dtype)
    ControlNetPatch.apply(controlnet, patch)

    def inputs(side: int) -> dict[str, Any]:
        image = torch.empty(1, 3, side, side, device="meta", dtype=dtype)
        return {**_unet_inputs(unet.config, side, dtype), "controlnet_cond": image}

    def own(side: int, chunk: int | None) -> int:
        given = inputs(side)
        return _traced(controlnet, lambda: controlnet(**given), chunk)

    def with_residuals(side: int, chunk: int | None) -> int:
        with torch.no_grad():
            down, mid = controlnet(**inputs(side))
        return unet_run(side, chunk, down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)

    return own, with_residuals


def _ip_adapter_extra(comps: Any, plain: Run, dtype: torch.dtype, scale: int) -> float:
    """What h94/IP-Adapter's image attention adds to a UNet pass per top-level token (up to the query tokens
    where its temporaries stop growing); the adapter is removed again after."""
    from ..base.settings import AdapterRef
    from ..models.ip_adapter.adapter import build_meta
    from ..models.ip_adapter.kind import IP_TOKEN_CHUNK

    unet = comps.unet
    adapter = build_meta(comps, AdapterRef("h94/IP-Adapter"))
    embeds = torch.empty(1, 1, int(adapter.encoder.config.projection_dim), device="meta", dtype=dtype)

    def with_ip(side: int, chunk: int | None) -> int:
        inputs = _unet_inputs(unet.config, side, dtype)
        inputs["added_cond_kwargs"] = {**inputs.get("added_cond_kwargs", {}), "image_embeds": [embeds]}
        return _traced(unet, lambda: unet(**inputs), chunk)

    try:
        return _extra_per_token(with_ip, plain, scale, torch.finfo(dtype).bits // 8, cap=IP_TOKEN_CHUNK)
    finally:
        adapter.remove()


def fit_banded(unet: nn.Module, dtype: torch.dtype) -> BandedCost:
    """The banded rungs' pass (memory_model.BandedCost): one UNet call, batch 1, under the `banded` and
    `banded+host` settings, traced at FIT_BANDED_SIDES."""
    ladder = {s.name: s for s in settings_ladder()}
    itemsize = torch.finfo(dtype).bits // 8
    tokens = [(side // LATENT_PX) ** 2 for side in FIT_BANDED_SIDES]

    def traced(side: int, name: str) -> tuple[int, int]:
        settings, trace = ladder[name], MemoryTrace(block_bytes)
        host = MetaHost(trace)
        memory.apply_settings(unet, settings, each=host.each)
        banding = Banding(host, band_bytes=settings.band_bytes or 0, park=settings.park)
        with torch.no_grad(), fused_attention(), trace, banded_unet(unet, banding):
            unet(**_unet_inputs(unet.config, side, dtype))
        return trace.peak, trace.host_peak

    def line(peaks: list[int]) -> tuple[float, float]:
        slope = round((peaks[-1] - peaks[-2]) / (tokens[-1] - tokens[-2]) / itemsize)
        fixed = max(peak - slope * itemsize * n for peak, n in zip(peaks, tokens, strict=True))
        return slope, round(max(0.0, fixed))

    whole = [traced(side, "banded")[0] for side in FIT_BANDED_SIDES]
    parked = [traced(side, "banded+host") for side in FIT_BANDED_SIDES]
    host = max(h / (n * itemsize) for (_, h), n in zip(parked, tokens, strict=True))
    return BandedCost(*line(whole), *line([p for p, _ in parked]), round(host, 1))


def fit_vae(vae: nn.Module, dtype: torch.dtype = torch.float16) -> list[float]:
    """The tiled VAE's costs (memory_model.VAE_COSTS): bytes per window pixel and dtype byte decoding, and what its
    statistics pass holds more per pixel (fp32 copies of half-precision GroupNorm inputs), then the same encoding.
    Traced through TiledVAE itself in `dtype`, on images of two windows (one per batch) with its 64 px halo; the
    most over two window sizes."""
    from ..engine.memory_plan import VAE_HALO
    from ..engine.vae import TiledVAE

    vae, item = vae.to(dtype), torch.finfo(dtype).bits // 8
    costs = [0.0] * 4
    for tile in FIT_TILES:
        for i, kind in enumerate(("decode", "encode")):
            trace = MemoryTrace(block_bytes)
            tiler = TiledVAE(vae, tile=tile, overlap=VAE_HALO, memory_budget=1, host=MetaHost(trace))
            with torch.no_grad(), fused_attention(), trace:
                if kind == "decode":
                    tiler.decode(torch.empty(1, 4, tile // 8, tile // 4, device="meta", dtype=dtype))
                else:
                    tiler.encode(torch.empty(1, 3, tile, 2 * tile, device="meta", dtype=dtype))
            pixels = tile * min(2 * tile, tile + 2 * VAE_HALO)
            phases = {path.rsplit("/", 1)[-1]: r for path, r in trace.phases.items()}
            windows, stats = phases["windows"].own / pixels, phases["stats"].own / pixels
            costs[2 * i] = max(costs[2 * i], round(windows / item, 1))
            costs[2 * i + 1] = max(costs[2 * i + 1], round(stats - windows, 1))
    return costs


def fit(archs: tuple[str, ...] = FIT_ARCHS) -> dict[str, Any]:
    """`linfusion bench planner --fit`: every architecture's coefficients, and how long the fit took."""
    start = time.perf_counter()
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise UsageError(f"--arch {unknown[0]!r}: must be one of {', '.join(FIT_ARCHS)}")
    rows = [fit_arch(arch) for arch in archs]
    return {"fits": rows, "seconds": round(time.perf_counter() - start, 1)}


# --- the grid -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridCase:
    """One job of the grid (its settings as `plan` takes them), at every stage of its plan."""

    model: str
    size: str
    aspect: str = "1:1"
    memory: str = "fast"  # the rung
    guidance: float = 7.5
    refine: str = "sdedit"
    adapter: str = ""  # "", "controlnet" or "ip-adapter"
    world: int = 1

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "size": self.size, "aspect": self.aspect}
        out.update(guidance=self.guidance, refine=self.refine, steps=4)
        if self.adapter == "controlnet":
            out.update(controlnet=["tiny"], control_image=["previous"])
        return out


GRID_MODELS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


def default_grid() -> Iterator[GridCase]:
    """The grid of docs/benchmarks.md: each family at 16K (its stages give 512 px...16K) on every rung, SD-1.x also in
    2:1 and 3:2 and the others in 3:2 on one rung; then guidance off, demofusion, a ControlNet, an IP-Adapter (not
    for SD-2.x: h94/IP-Adapter has no weights for it), and world sizes 2, 4 and 8, each on its own."""
    for family, model in GRID_MODELS.items():
        aspects = ("1:1", "2:1", "3:2") if family == "sd1" else ("1:1",)
        for aspect, rung in itertools.product(aspects, RUNGS):
            yield GridCase(model, "16k", aspect, rung)
        if family != "sd1":
            yield GridCase(model, "16k", "3:2", "split")
        yield GridCase(model, "16k", memory="split", guidance=1.0)
        yield GridCase(model, "16k", memory="split", refine="demofusion")
        yield GridCase(model, "8k", memory="split", adapter="controlnet")
        if family != "sd2":
            yield GridCase(model, "8k", memory="split", adapter="ip-adapter")
        for world in (2, 4, 8):
            yield GridCase(model, "16k", memory="split", world=world)


def grid_rows(case: GridCase) -> list[dict[str, Any]]:
    """One grid job planned and simulated (`plan --simulate`): a row per stage, its estimate beside its
    simulated peak (per process: the highest simulated one)."""
    from ..core.api import LinFusionPipeline

    settings = case.settings()
    if case.adapter == "ip-adapter":
        settings.update(ip_adapter=["h94/IP-Adapter"], ip_image=_reference_image())
    started = time.perf_counter()
    summary = LinFusionPipeline().plan(
        "a lighthouse at dusk", world_size=case.world, simulate=True, memory=case.memory, **settings
    )
    seconds = round(time.perf_counter() - started, 1)
    rows = []
    for stage in summary["stages"]:
        simulated = stage["simulated"]
        rows.append(
            {
                **asdict(case),
                "family": summary["family"],
                "stage": stage["stage"],
                "size": f"{stage['width']}x{stage['height']}",
                "estimate_gib": stage["estimated_peak_gib"],
                "simulated_gib": simulated["peak_gib"],
                "ratio": simulated["estimate_over_simulated"],
                "peak_phase": simulated["peak_phase"],
                "seconds": seconds,
            }
        )
    return rows


def _reference_image() -> str:
    """A small reference image for IP-Adapter cases (the simulation reads it as a run would)."""
    import tempfile

    from PIL import Image

    path = Path(tempfile.gettempdir()) / "linfusion-grid-reference.png"
    if not path.exists():
        Image.new("RGB", (64, 64), (128, 96, 64)).save(path)
    return str(path)


def grid(cases: list[GridCase] | None = None, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`linfusion bench planner`: every grid case's stages, estimate against simulation, and the worst ratios."""
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for case in cases or list(default_grid()):
        for row in grid_rows(case):
            rows.append(row)
            if on_row is not None:
                on_row(row)
    ratios = [r["ratio"] for r in rows]
    return {
        "bench": "planner",
        "rows": rows,
        "lowest_ratio": min(ratios, default=None),
        "highest_ratio": max(ratios, default=None),
        "seconds": round(time.perf_counter() - started, 1),
    }
