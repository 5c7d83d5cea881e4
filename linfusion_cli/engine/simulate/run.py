"""A job simulated: its model built on the meta device from real configs (models/meta.py), the real engine run on it
(every stage: the hand-off's upscale, the VAE's statistics pass and windows, the UNet calls with the adapters and
the refine method's passes) under the memory and FLOP traces, and per stage the peak a GPU would hold and its parts.

One scheduler step per stage and one VAE window per pass are run (`MetaHost.each`): memory repeats per step and
per window, and the work of the others is counted from the one that ran. With `world` > 1 one process of the split
image is simulated (the tallest band's, and the first process's too: it alone receives the final image).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...base.events import Event, Note, StageFinished, StageStarted
from ...base.job import Job
from ...base.plan import Plan
from ...models.adapters import ADAPTER_KINDS
from ...models.devices import PARKED
from ..memory_plan import GIB, MemoryPlanner, MemorySettings
from ..pipeline import Engine
from .comm import SimulatedComm
from .cuda import Card, block_bytes, device_bytes, fused_attention
from .host import MetaHost
from .trace import FlopTrace, MemoryTrace, PhaseRecord

if TYPE_CHECKING:
    from ...models.loading import Components


@dataclass
class StageSimulation:
    """One stage of one simulated process: what was on the device and the traced phases."""

    index: int
    size: str
    steps: int
    settings: str  # the memory settings the planner chose
    weights: dict[str, int]  # bytes on the device per component
    phases: dict[str, PhaseRecord]  # "unet/unet pass 1", "vae decode/windows"...
    host_peak: int = 0  # bytes in (pinned) CPU memory at most
    comm: dict[str, int] = field(default_factory=dict)

    @property
    def stage(self) -> PhaseRecord:
        return self.phases[""]

    @property
    def traced_peak(self) -> int:
        """Weights plus the peak of live tensors: what the trace saw."""
        return sum(self.weights.values()) + self.stage.peak

    @property
    def peak(self) -> int:
        """What a GPU needs for it (engine/simulate/cuda.py)."""
        return device_bytes(self.traced_peak)

    @property
    def peak_phase(self) -> str:
        top = {path: r for path, r in self.phases.items() if path and r.peak == self.stage.peak}
        return max(top, key=lambda p: p.count("/")) if top else "stage"

    def unet_flops(self) -> float:
        return sum(r.flops for path, r in self.phases.items() if path == "unet")

    def as_dict(self, card: Card | None) -> dict[str, Any]:
        weights = sum(self.weights.values())
        phases = {
            path: {
                "peak_gib": _gib(weights + r.peak),
                "held_gib": _gib(weights + r.entry),
                "own_gib": _gib(r.own),
                "tflop": round(r.flops / 1e12, 3),
            }
            for path, r in self.phases.items()
            if path
        }
        flops = self.stage.flops
        step = self.unet_flops() / self.steps if self.steps else 0.0
        out: dict[str, Any] = {
            "memory": self.settings,
            "peak_gib": _gib(self.peak),
            "peak_bytes": self.peak,
            "traced_peak_gib": _gib(self.traced_peak),
            "peak_phase": self.peak_phase,
            "weights_gib": {name: _gib(b) for name, b in self.weights.items()},
            "phases": phases,
            "host_peak_gib": _gib(self.host_peak),
            "tflop_step": round(step / 1e12, 3),
            "tflop_stage": round(flops / 1e12, 3),
        }
        if card is not None:
            out["floor_seconds"] = round(flops / (card.tflops_fp16 * 1e12), 3)
        if self.comm:
            out["comm_bytes"] = dict(self.comm)
        return out


@dataclass
class JobSimulation:
    """Every stage of one simulated process (`rank` of `world`), how long the simulation took, and notes."""

    stages: list[StageSimulation]
    rank: int = 0
    world: int = 1
    seconds: float = 0.0
    configs: str = ""
    notes: list[str] = field(default_factory=list)


def _gib(size: float) -> float:
    return round(size / GIB, 3)


def resident_bytes(*modules: nn.Module) -> int:
    """Bytes of the weights on the device, as the allocator holds them; what a module marked parked holds (moved
    to CPU memory in a real run, models/devices.place_text_encoders) does not count."""
    parked = {id(t) for model in modules for m in model.modules() if getattr(m, PARKED, False) for t in _tensors(m)}
    tensors = {id(t): t for model in modules for t in _tensors(model) if id(t) not in parked}
    return sum(block_bytes(t.numel() * t.element_size()) for t in tensors.values())


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class _Recorder:
    """The engine's events, read to open and close the trace's phases: a stage from its StageStarted to its
    StageFinished, and each UNet call (by hooks) labelled with its pass of the step."""

    def __init__(self, trace: MemoryTrace, engine: Engine, job: Job, comm: SimulatedComm | None) -> None:
        self.trace, self.engine, self.job, self.comm = trace, engine, job, comm
        self.stages: list[StageSimulation] = []
        self.calls = 0
        self.per_pass = 1
        self.notes: list[str] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            self._start(event)
        elif isinstance(event, StageFinished):
            self.trace.end()
            stage = self.stages[-1]
            stage.phases = self.trace.records(f"stage {event.index + 1}")
            stage.phases[""] = self.trace.phases[f"stage {event.index + 1}"]
            stage.host_peak = self.trace.host_peak
            if self.comm is not None:
                stage.comm = {
                    "sent": sum(self.comm.stats.sent.values()),
                    "received": sum(self.comm.stats.received.values()),
                }
        elif isinstance(event, Note) and event.level == "warning":
            self.notes.append(event.message)

    def _start(self, event: StageStarted) -> None:
        engine = self.engine
        self.trace.reset_peak()
        self.trace.host_peak = self.trace.host_live
        if self.comm is not None:
            self.comm.stats.sent.clear()
            self.comm.stats.received.clear()
        weights = {
            "unet": resident_bytes(engine.comps.unet),
            "vae": resident_bytes(engine.comps.vae),
            "text encoders": resident_bytes(*engine.comps.text_encoders),
            "adapters": resident_bytes(*engine.adapter_modules()) if engine.adapter_modules() else 0,
        }
        if engine.fp32_vae_copy is not None:
            weights["vae (fp32 copy)"] = resident_bytes(engine.fp32_vae_copy)
        settings = event.settings
        guided = self.job.guidance > 1.0
        self.per_pass = 2 if guided and settings.get("cfg_split") else 1
        self.calls = 0
        self.stages.append(
            StageSimulation(event.index, event.size, event.steps, str(settings.get("name")), weights, {})
        )
        self.trace.begin(f"stage {event.index + 1}")

    def unet_enter(self, *_: Any) -> None:
        self.trace.begin(f"unet pass {self.calls // self.per_pass + 1}")
        self.calls += 1

    def leave(self, *_: Any) -> None:
        self.trace.end()

    def enter(self, name: str, *_: Any) -> None:
        self.trace.begin(name)


def simulate_job(
    comps: Components,
    job: Job,
    plan: Plan,
    seed: int,
    planner: MemoryPlanner,
    *,
    linfusion: str = "random",
    adapters: Callable[[Components], list[Any]] | None = None,
    rank: int = 0,
    world: int = 1,
    count_flops: bool = True,
) -> JobSimulation:
    """Run `plan` for `job` on `comps` (on the meta device) under the traces; see the module docstring.
    `adapters` builds the job's adapters on the meta device once LinFusion is on the UNet (their kinds'
    `simulated`). Without `count_flops` the work is not counted (a third of the time saved)."""
    start = time.perf_counter()
    device = next(comps.unet.parameters()).device  # meta; the CPU to compare with a real run
    dtype = next(comps.unet.parameters()).dtype
    trace, flops = MemoryTrace(block_bytes), FlopTrace()
    trace.flops = flops if count_flops else None
    engine = Engine.from_components(comps, linfusion, device, dtype)
    for adapter in adapters(comps) if adapters else []:
        engine.stack.push(adapter)
    engine.host = MetaHost(trace)
    comm = SimulatedComm(rank, world) if world > 1 else None
    recorder = _Recorder(trace, engine, job, comm)
    hooks = [
        engine.comps.unet.register_forward_pre_hook(recorder.unet_enter),
        engine.comps.unet.register_forward_hook(recorder.leave),
    ]
    for adapter in engine.adapters:
        label = ADAPTER_KINDS.get(adapter.kind).label
        for module in adapter.modules:
            hooks.append(module.register_forward_pre_hook(functools.partial(recorder.enter, label)))
            hooks.append(module.register_forward_hook(recorder.leave))
    try:
        counting = flops.counter if count_flops else contextlib.nullcontext()
        with torch.no_grad(), fused_attention(), counting, trace:
            trace.begin("conditioning")
            engine.run_plan(job, plan, seed, planner=planner, events=_first_stage_ends(trace, recorder), group=comm)
    finally:
        for hook in hooks:
            hook.remove()
        while len(engine.stack):  # adapters, then LinFusion: the components are as they came
            engine.stack.pop()
    return JobSimulation(recorder.stages, rank, world, time.perf_counter() - start, notes=recorder.notes)


def _first_stage_ends(trace: MemoryTrace, recorder: _Recorder) -> Any:
    """The event sink: the job's conditioning phase ends where its first stage starts."""

    def sink(event: Event) -> None:
        if isinstance(event, StageStarted) and event.index == 0 and trace.depth:
            trace.end()
        recorder(event)

    return sink


@dataclass(frozen=True)
class StepTrace:
    """One UNet call traced: the peak of live tensors it made (inputs and weights not included) and its FLOPs."""

    activations: int
    flops: float
    inputs: int  # bytes of the call's inputs (latents, text embeddings)


def simulate_unet_step(
    unet: nn.Module, width: int, height: int, batch: int, settings: MemorySettings | None = None
) -> StepTrace:
    """One guided UNet call of `batch` samples at width x height px (a UNet on the meta device, its LinFusion patch
    on or not), under `settings` (fastest when None): the unit the H200 measurements in docs/memory.md were made
    on."""
    from ..memory import apply_settings
    from ..memory_plan import settings_ladder

    config: Any = unet.config
    dtype = next(unet.parameters()).dtype
    trace, flops = MemoryTrace(block_bytes), FlopTrace()
    trace.flops = flops
    apply_settings(unet, settings or settings_ladder()[0], each=MetaHost(trace).each)
    meta = torch.device("meta")
    sample = torch.empty(batch, int(config["in_channels"]), height // 8, width // 8, device=meta, dtype=dtype)
    text = torch.empty(batch, 77, int(config["cross_attention_dim"]), device=meta, dtype=dtype)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
        added = {
            "text_embeds": torch.empty(batch, pooled, device=meta, dtype=dtype),
            "time_ids": torch.empty(batch, 6, device=meta, dtype=dtype),
        }
    with torch.no_grad(), fused_attention(), flops.counter, trace:
        unet(sample, torch.tensor(500), encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)
    inputs = sample.numel() * sample.element_size() + text.numel() * text.element_size()
    return StepTrace(trace.peak, flops.total(), inputs)
