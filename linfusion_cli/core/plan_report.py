"""What a job will cost before it runs: the device and precision it runs with, its memory planner, the plan as
data (what `plan` and `--dry-run` print), and what stands in its way (weights not available offline, stages that
fit no memory settings). A run asks the same questions once, before its model loads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..base.errors import ModelLoadError, UsageError
from ..base.events import Note
from ..base.schema import SCHEMA
from ..base.sizes import Target, round_side
from ..engine.bands import Bands, downsampling
from ..engine.memory_model import stage_shape
from ..engine.memory_plan import (
    GIB,
    PRECISION_BYTES,
    MemoryChoice,
    MemoryPlanner,
    MemorySettings,
    VaeModel,
    tile_used,
    vae_share,
    vae_tile_for,
)
from ..engine.placement import Placement, without_gpu
from ..models.adapters import ADAPTER_KINDS
from ..models.archs import ARCHS
from ..models.families import Family, vae_precision
from ..models.hub import hub_offline, missing_from_cache, model_source
from .jobspec import JobSpec
from .planning import make_plan
from .prepare import BUILTIN_LINFUSION, Prepared, RunOptions

if TYPE_CHECKING:
    import torch

    from ..base.plan import StagePlan

LATENT_PX = 8  # image px per latent row
LONG_SIDE_STEP = 64  # the --size a plan suggests when a stage does not fit is a multiple of this
DEFAULT_ARCH = "sd15"  # what a plan assumes of a model whose config is not known yet
DEFAULT_FAMILY_GIB = 2.1  # SD-1.x's weights in fp16


def placement(options: RunOptions) -> tuple[torch.device, torch.dtype]:
    """The device and precision a run uses (resolved once per run; imports torch)."""
    from ..engine.memory import resolve_device, resolve_dtype  # lazy: torch stays out of CLI start-up

    device = resolve_device(options.device)
    return device, resolve_dtype(options.dtype, device)


def where(options: RunOptions, *, here_only: bool = True) -> Placement:
    """The device and precision a job would run with, and the memory free there, without torch where no GPU can
    be here (placement.without_gpu). `here_only`: a device this machine does not have is a usage error, as for a
    run; otherwise a plan for it (a login node planning for its farm's GPU nodes)."""
    found = without_gpu(options.device, options.dtype, here_only=here_only)
    if found is not None:
        return found
    from ..engine.memory import placement_for  # lazy: only where a GPU may be here does torch get asked

    return placement_for(options.device, options.dtype, here_only=here_only)


def plan_anywhere(prep: Prepared, options: RunOptions, world: int = 1) -> dict[str, Any]:
    """The plan `plan` prints (plan_summary, for `world` processes splitting the image), for this machine's device
    or for one it does not have, with a note saying so. Only a run needs the device to be here."""
    placed = where(options, here_only=False)
    if not placed.here:
        memory = "its memory from --max-vram" if prep.job.max_vram else "give --max-vram GB for its memory"
        prep.notes.append(Note("info", f"a plan for {placed.device}, which this machine does not have ({memory})"))
    return plan_summary(prep, placed, world)


def check_device(device: str, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`--device`/`--dtype` as given to any command: spelled right, and a device this machine has (a usage error
    before anything loads), resolved."""
    return placement(RunOptions(device=device, dtype=dtype))


def memory_planner(prep: Prepared, placed: Placement) -> MemoryPlanner:
    """The job's memory planner, from its family's weights and configs and its adapters' (nothing loaded); kept on
    `prep` and refined with what the loaded engine measures."""
    if prep.planner is not None:
        return prep.planner
    job, family = prep.job, prep.family
    arch = ARCHS[family.arch if family else DEFAULT_ARCH]
    family_gib = family.weights_gib_fp16 if family else DEFAULT_FAMILY_GIB
    extra_gib = sum(kind.planned_gib_fp16(job, family, family_gib) for kind in ADAPTER_KINDS)
    if job.low_vram and family:  # the text encoders wait in CPU memory while the stages run
        family_gib -= family.text_gib_fp16
    channels = sum(kind.activation_channels(arch.unet, len(kind.refs(job))) for kind in ADAPTER_KINDS if kind.refs(job))
    vae_item = PRECISION_BYTES[vae_precision(arch.vae, placed.precision, family)]
    prep.planner = MemoryPlanner.for_job(
        low_vram=job.low_vram,
        max_vram=job.max_vram,
        guidance=job.guidance,
        budget=placed.budget(job.max_vram),
        arch=arch.name,
        top_width=arch.unet["block_out_channels"][0],
        dtype_bytes=placed.itemsize,
        weights=int((family_gib + extra_gib) * GIB * placed.itemsize / 2),
        vae=VaeModel(arch.vae, vae_item, placed.kind, placed.free, job.vae_tile),
        refine=job.refine,
        control_channels=channels,
        controlnets=sum(len(kind.refs(job)) for kind in ADAPTER_KINDS if kind.own_pass),
        adapter_extras=tuple(
            (kind.memory_key, kind.memory_cap) for kind in ADAPTER_KINDS if kind.memory_key for _ in kind.refs(job)
        ),
        memory=job.memory,
    )
    return prep.planner


def plan_warnings(prep: Prepared, placed: Placement, world: int = 1) -> list[str]:
    """What a user should hear before the job starts: settings that work badly on this device, and the first
    stage that fits no memory settings."""
    return placed.warnings() + _over_budget(prep, memory_planner(prep, placed), world)


def plan_summary(prep: Prepared, placed: Placement, world: int = 1) -> dict[str, Any]:
    """The plan as data: stages with expected peak memory and VAE tiling on the chosen device, each component's
    dtype, and warnings (a stage that fits no memory settings, fp16 on a CPU, weights not available offline).
    With `world` > 1 processes splitting the image, each stage's bands, and memory planned for the tallest."""
    job, family = prep.job, prep.family
    arch = ARCHS[family.arch if family else DEFAULT_ARCH]
    planner = memory_planner(prep, placed)
    vae = vae_precision(arch.vae, placed.precision, family)
    over = _over_budget(prep, planner, world)
    warnings = placed.warnings() + offline_gaps(job, family) + over
    multiple = multiple_of(family)
    stages = [_stage_entry(prep, stage, planner, vae, placed, world, multiple) for stage in prep.plan.stages]
    budget = planner.budget
    return {
        "schema": SCHEMA,
        "prompt": job.prompt,
        "model": job.model,
        "family": family.label if family else "not downloaded yet: assuming SD-1.x",
        "native": prep.plan.native,
        "width": prep.target.width,
        "height": prep.target.height,
        # A seed picked at random for the plan is not the one a run will pick: no made-up seed or file name.
        "seed": job.seed,
        "scheduler": job.scheduler,
        "refine": job.refine,
        "schedule_steps": job.steps,
        "guidance": job.guidance,
        "device": placed.device,
        "dtype": placed.precision,
        "dtypes": {"unet": placed.precision, "vae": vae, "text_encoder": placed.precision},
        "memory_budget_gib": None if budget is None else round(budget / GIB, 1),
        "world_size": world,
        "fits": all(s["fits"] for s in stages),
        "stages": stages,
        **{kind.name: kind.plan_entries(job) for kind in ADAPTER_KINDS},
        "linfusion": job.linfusion,
        "output": None if job.seed is None else str(prep.paths.image),
        "notes": [note.message for note in prep.notes],  # what to know; what to mind is in warnings, said once
        "warnings": warnings,
    }


def _stage_entry(
    prep: Prepared,
    stage: StagePlan,
    planner: MemoryPlanner,
    vae_precision: str,
    placed: Placement,
    world: int,
    multiple: int,
) -> dict[str, Any]:
    """One stage's line of the plan: its memory settings for the tallest band and its VAE tiling."""
    job, family = prep.job, prep.family
    arch = ARCHS[family.arch if family else DEFAULT_ARCH]
    bands = _bands(stage.height // LATENT_PX, world, multiple)
    rows = _share_rows(stage, world, multiple)
    shape = stage_shape(prep.plan, stage, rows, prep.input_size)
    choice = planner.choose(shape)
    limit = choice.settings.vae_budget or vae_share(placed.kind, placed.free)
    asked = job.vae_tile or vae_tile_for(arch.vae, PRECISION_BYTES[vae_precision], stage.height, stage.width, limit)
    tile = tile_used(asked, stage.height, stage.width)
    return {
        "stage": stage.index + 1,  # counted as the table, the log and the stage files count them
        "kind": stage.kind,
        "width": stage.width,
        "height": stage.height,
        "strength": stage.strength,
        "steps": stage.steps,
        "unet_passes": prep.plan.unet_passes(stage),
        "memory": choice.settings.name,
        "memory_settings": {**choice.settings.as_dict(), "vae_tile": tile},
        "estimated_peak_gib": round(choice.estimate / GIB, 2),
        "estimated_peak_bytes": choice.estimate,
        "estimated_host_gib": round(planner.host_estimate(choice.settings, shape) / GIB, 2),
        "fits": choice.fits,
        "vae": "untiled" if tile is None else f"tiles of {tile} px",
        **_per_rank(stage.width, rows, bands, world),
    }


def multiple_of(family: Family | None) -> int:
    """The UNet's total downsampling: split stages' band edges sit on multiples of it."""
    return downsampling(list(ARCHS[family.arch if family else DEFAULT_ARCH].unet["block_out_channels"]))


def _bands(latent_rows: int, world: int, multiple: int) -> list[int] | None:
    """Latent rows per process of a split stage; None for one process, or a stage that runs whole on each."""
    if world == 1:
        return None
    try:
        return Bands.split(latent_rows, world, multiple).heights()
    except UsageError:
        return None


def _share_rows(stage: StagePlan, world: int, multiple: int) -> int:
    """The image rows (px) of the tallest process's share of a stage: what memory is planned for."""
    bands = _bands(stage.height // LATENT_PX, world, multiple)
    return max(bands) * LATENT_PX if bands else stage.height


def _per_rank(width: int, rows: int, bands: list[int] | None, world: int) -> dict[str, Any]:
    if world == 1:
        return {}
    if bands is None:  # too small to split: every process makes it whole
        return {"per_rank": {"width": width, "height": rows, "whole": True}, "bands_px": None}
    return {"per_rank": {"width": width, "height": rows, "whole": False}, "bands_px": [b * LATENT_PX for b in bands]}


def _over_budget(prep: Prepared, planner: MemoryPlanner, world: int = 1) -> list[str]:
    """The first stage that even the most frugal settings do not fit (on one process of `world`), what it needs
    and what would fit."""
    family = prep.family
    multiple = multiple_of(family)
    for stage in prep.plan.stages:
        rows = _share_rows(stage, world, multiple)
        choice = planner.choose(stage_shape(prep.plan, stage, rows, prep.input_size))
        if not choice.fits:
            return [_over_budget_text(prep, stage, planner, choice, world)]
    return []


def _over_budget_text(
    prep: Prepared, stage: StagePlan, planner: MemoryPlanner, choice: MemoryChoice, world: int = 1
) -> str:
    text = (
        f"stage {stage.index + 1} ({stage.size_text}) needs about {choice.estimate / GIB:.2f} GiB even with the most "
        f"frugal memory settings ({choice.settings.name}, as --low-vram), over the {(choice.budget or 0) / GIB:.1f} "
        "GiB budget"
    )
    long_side = _fitting_long_side(prep, planner, choice.settings, world)
    if long_side is None:
        return f"{text}: not even the model's weights fit; use a device with more memory"
    return f"{text}: about --size {long_side} fits at this aspect (or a device with more memory / --max-vram)"


def _fitting_long_side(prep: Prepared, planner: MemoryPlanner, settings: MemorySettings, world: int = 1) -> int | None:
    """The largest --size (a multiple of 64, the job's aspect) whose every stage fits the budget under `settings`
    (on each of `world` processes splitting it), by planning the job again at each size tried (the plans are
    arithmetic: fast); None if none does."""
    multiple = multiple_of(prep.family)

    def fits(long_side: int) -> bool:
        ratio = long_side / prep.target.long_side
        target = Target(round_side(prep.target.width * ratio), round_side(prep.target.height * ratio))
        job = prep.job
        plan = make_plan(
            target, native=prep.plan.native, schedule_steps=job.steps, base_size=job.base_size, refine=job.refine
        )
        budget = planner.budget or 0
        return all(
            planner.estimate(settings, stage_shape(plan, s, _share_rows(s, world, multiple), prep.input_size)) <= budget
            for s in plan.stages
        )

    low, high = 0, prep.target.long_side // LONG_SIDE_STEP
    while low < high:  # the largest multiple of LONG_SIDE_STEP that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid * LONG_SIDE_STEP) else (low, mid - 1)
    return low * LONG_SIDE_STEP if low else None


def offline_gaps(job: JobSpec, family: Family | None) -> list[str]:
    """With HF_HUB_OFFLINE set, the hub repos this job needs that are not in the local cache, each with the
    command that fetches it (nothing is looked up online)."""
    if not hub_offline():
        return []
    wanted: list[tuple[str, str, str]] = []  # (what, repo, a file every snapshot of it has)
    if model_source(job.model) == "hub":
        wanted.append(("model", job.model, "model_index.json"))
    if job.linfusion == "auto" and family is not None and family.linfusion_repo:
        wanted.append(("LinFusion weights (--linfusion auto)", family.linfusion_repo, "config.json"))
    elif job.linfusion not in BUILTIN_LINFUSION:
        wanted.append(("LinFusion weights", job.linfusion, "config.json"))
    if job.vae:
        wanted.append(("VAE", job.vae, "config.json"))
    for kind in ADAPTER_KINDS:
        wanted += kind.hub_files(job, family)
    return missing_from_cache(wanted)


def check_offline(job: JobSpec, family: Family | None, where: str = "") -> None:
    """Refuse, before any model loads, a job whose weights are not available offline."""
    gaps = offline_gaps(job, family)
    if gaps:
        raise ModelLoadError(f"{where}{'; '.join(gaps)}")
