"""`plan --simulate`: the job run as `generate` would run it, on the meta device (engine/simulate), beside the plan.

For each stage: the planner's estimate and the simulated peak a CUDA GPU would need, split into what the weights
hold and each phase (the hand-off's upscale, the VAE's statistics pass and windows, each UNet pass with the
adapters), the TFLOP of a step and of the stage, and the time floor on a card (its dense fp16 peak). With
`world` processes splitting the image, the process with the tallest band and the first process (which alone
receives the final image) are simulated, with what each sends. Nothing is downloaded: the configs come from the
model's folder, the hub cache, or the family's shipped configs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..base.errors import UsageError
from ..models.adapters import ADAPTER_KINDS
from .plan_report import LATENT_PX, multiple_of

if TYPE_CHECKING:
    from ..engine.simulate import Card, JobSimulation
    from .prepare import Prepared

GPU_CONTEXT_GIB = 1.0  # a card's memory that PyTorch's allocator cannot have (CUDA context, other libraries)


def simulate_plan(prep: Prepared, summary: dict[str, Any], world: int, gpu: str | None) -> None:
    """Add the simulation to `summary` (plan_summary's result, planned for a CUDA device): per stage
    `simulated`, and `simulation` (the card, where the configs came from, how long it took, notes)."""
    from ..engine.memory import torch_dtype
    from ..engine.simulate import card, simulate_job
    from ..models.meta import meta_components

    dtype = torch_dtype(summary["dtype"])
    start = time.perf_counter()
    chosen = card(gpu) if gpu else None
    comps, configs = meta_components(prep.job.model, prep.family, dtype)
    planner = prep.planner  # plan_summary's, for the simulated device
    if planner is None:
        raise RuntimeError("simulate_plan needs the plan made first (plan_summary)")
    adapters, notes = _simulated_adapters(prep)
    runs: list[JobSimulation] = []
    for rank in _ranks(prep, world):
        run = simulate_job(
            comps,
            prep.job,
            prep.plan,
            prep.seed,
            planner,
            linfusion="none" if prep.job.linfusion == "none" else "random",
            adapters=adapters,
            rank=rank,
            world=world,
        )
        runs.append(run)
    notes += [n for run in runs for n in run.notes]
    for entry in summary["stages"]:
        entry["simulated"] = _stage(entry, runs, chosen)
    summary["simulation"] = {
        "device": "cuda (simulated on the meta device)",
        "card": None if chosen is None else {"name": chosen.label, "tflops_fp16": chosen.tflops_fp16},
        "configs": configs,
        "ranks": [run.rank for run in runs],
        "seconds": round(time.perf_counter() - start, 1),
        "notes": notes,
    }


def card_budget(gpu: str) -> float | None:
    """The memory budget of a named card (--gpu 4090) when --max-vram does not give one: its memory less what
    PyTorch's allocator cannot have; None for a card given by its TFLOPS alone."""
    from ..engine.simulate import card

    memory = card(gpu).memory_gib
    return memory - GPU_CONTEXT_GIB if memory else None


def _stage(entry: dict[str, Any], runs: list[JobSimulation], chosen: Card | None) -> dict[str, Any]:
    """One stage's simulation: the highest process's, with every simulated process's peak when split."""
    stages = [next(s for s in run.stages if s.index + 1 == entry["stage"]) for run in runs]
    top = max(stages, key=lambda s: s.peak)
    out = top.as_dict(chosen)
    out["estimate_over_simulated"] = round(entry["estimated_peak_bytes"] / max(out["peak_bytes"], 1), 3)
    if len(runs) > 1 or runs[0].world > 1:
        out["per_rank"] = [
            {"rank": run.rank, "peak_gib": s.as_dict(None)["peak_gib"]} for run, s in zip(runs, stages, strict=True)
        ]
    return out


def _ranks(prep: Prepared, world: int) -> list[int]:
    """Which processes of a split image to simulate: the one with the tallest band at the last stage (ties: the
    one with most neighbours), and the first (it receives the image)."""
    if world == 1:
        return [0]
    from ..engine.bands import Bands

    last = prep.plan.stages[-1]
    try:
        heights = Bands.split(last.height // LATENT_PX, world, multiple_of(prep.family)).heights()
    except UsageError:
        return [0]
    tallest = max(range(world), key=lambda r: (heights[r], 0 < r < world - 1))
    return sorted({0, tallest})


def _simulated_adapters(prep: Prepared) -> tuple[Any, list[str]]:
    """A function building the job's adapters on the meta device (each simulated process gets its own), and
    notes on those that cannot be simulated."""
    notes: list[str] = []
    wanted = []
    for kind in ADAPTER_KINDS:
        for ref in kind.refs(prep.job):
            if kind.simulates:
                wanted.append((kind, ref))
            else:
                notes.append(f"{kind.label} {ref.source}: {kind.simulation_note}")
    if not wanted:
        return None, notes

    def build(meta: Any) -> list[Any]:
        return [kind.simulated(meta, ref) for kind, ref in wanted]

    return build, notes
