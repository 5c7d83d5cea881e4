"""The engine: a model loaded once, with LinFusion and the adapters a job asks for, that runs stage plans.

The model is loaded once (`Engine.load`) and reused by every stage and every job. What is applied to it is a
stack owned by the engine: LinFusion's attention swap at the bottom, then adapters (LoRAs fused in, ControlNets,
IP-Adapters) pushed in load order and taken off last-in first-out, so each restores exactly what it found and a
batch switches adapters between jobs without reloading. Running a plan is stages.py; nothing here prints.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..base.errors import UsageError
from ..base.events import CancelToken, EventSink, Note, Working, ignore
from ..base.job import Job
from ..base.plan import Plan
from ..base.settings import EngineSpec
from ..base.text import plural
from ..linfusion.patching import LinFusionPatch, apply_linfusion
from ..models.adapter_kind import Adapter
from ..models.adapters import ADAPTER_KINDS, engine_spec
from ..models.devices import place_text_encoders
from ..models.loading import Components, load_components
from ..models.tensors import to_device_image
from . import memory
from .embeddings import EmbeddingLibrary, embedding_folders, embedding_library
from .host import Host
from .memory_plan import MemoryPlanner, VaeModel
from .parallel import Comm
from .prompts import JobText, job_text
from .refine import REFINE_METHODS
from .rows import RowStream
from .splitting import ImageSplit
from .stages import Handoff, JobRun, PlanOutput, run_stages
from .text import TextOptions

if TYPE_CHECKING:
    from torch import nn


class Patch(Protocol):
    def remove(self) -> None: ...


class PatchStack:
    """What is applied to a loaded model, in the order it was applied; taken off last-in first-out."""

    def __init__(self) -> None:
        self._patches: list[Patch] = []

    def push(self, patch: Patch) -> None:
        self._patches.append(patch)

    def pop(self) -> Patch:
        patch = self._patches.pop()
        patch.remove()
        return patch

    def __len__(self) -> int:
        return len(self._patches)

    def __getitem__(self, index: int) -> Patch:
        return self._patches[index]

    def above(self, depth: int) -> list[Patch]:
        """The patches above the first `depth`, bottom first."""
        return self._patches[depth:]


class Engine:
    """Loaded components, the LinFusion patch and the adapters a spec asks for: load once, generate many."""

    def __init__(
        self,
        comps: Components,
        patch: LinFusionPatch | None,
        device: torch.device,
        dtype: torch.dtype,
        load_seconds: float,
        spec: EngineSpec | None = None,
    ) -> None:
        self.comps = comps
        self.patch = patch
        self.device = device
        self.dtype = dtype
        self.load_seconds = load_seconds
        self.spec = (spec or EngineSpec(comps.model_id)).base()  # adapters join it in `use`
        self.stack = PatchStack()
        if patch is not None:
            self.stack.push(patch)
        self._base_depth = len(self.stack)  # what `use` never takes off
        self._fp32_vae_copy: torch.nn.Module | None = None
        self.host = Host()  # what the device path asks of the host; a memory simulation swaps in its own

    @classmethod
    def load(
        cls,
        spec: EngineSpec,
        *,
        device: torch.device,
        dtype: torch.dtype,
        allow_pickle: bool = False,
        events: EventSink = ignore,
    ) -> Engine:
        """Load the spec's model (its VAE, LinFusion weights), then its adapters."""
        start = time.perf_counter()
        comps = load_components(spec.model, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=spec.vae)
        engine = cls.from_components(comps, spec.linfusion, device, dtype, events, start, spec=spec)
        engine.use(spec, events)
        return engine

    @classmethod
    def for_job(
        cls, job: Job, device: torch.device, dtype: torch.dtype, allow_pickle: bool, events: EventSink = ignore
    ) -> Engine:
        """The engine a job asks for: its model, LinFusion weights, VAE and adapters."""
        events(Working(f"loading {job.model}"))
        return cls.load(engine_spec(job), device=device, dtype=dtype, allow_pickle=allow_pickle, events=events)

    @classmethod
    def from_components(
        cls,
        comps: Components,
        linfusion: str,
        device: torch.device,
        dtype: torch.dtype,
        events: EventSink = ignore,
        start: float | None = None,
        spec: EngineSpec | None = None,
    ) -> Engine:
        """An engine around components already on the device (benchmarks build random ones)."""
        start = time.perf_counter() if start is None else start
        patch = None
        if linfusion != "none":
            patch = apply_linfusion(comps.unet, linfusion)
            events(
                Note(
                    "info",
                    f"LinFusion: {len(patch.layers)} self-attention layers patched "
                    f"({comps.family_label}, weights: {patch.source})",
                )
            )
        else:
            events(Note("info", "LinFusion off: ordinary attention (quadratic in pixels)"))
        comps.linfusion = patch
        spec = spec or EngineSpec(comps.model_id, linfusion)
        return cls(comps, patch, device, dtype, time.perf_counter() - start, spec)

    def release(self) -> None:
        """Take off everything applied to the model (adapters, then LinFusion): its modules as they were loaded."""
        while len(self.stack):
            self.stack.pop()
        self._base_depth = 0
        self.patch = None
        self.comps.linfusion = None

    @property
    def adapters(self) -> list[Adapter]:
        return self.stack.above(self._base_depth)  # type: ignore[return-value]

    def can_serve(self, spec: EngineSpec) -> bool:
        """Whether this engine's loaded model is the one `spec` asks for (adapters aside)."""
        return self.spec.base() == spec.base()

    def use(self, spec: EngineSpec, events: EventSink = ignore) -> None:
        """Switch to the adapters `spec` asks for on the loaded model, without reloading it. The ones after the
        first difference come off last-in first-out (so each restores exactly what it found), then the rest of
        the spec's go on in order."""
        if not self.can_serve(spec):
            raise ValueError(f"this engine holds {self.spec.model}, not {spec.model}")
        loaded = self.adapters
        wanted = list(spec.adapters)
        keep = 0
        while keep < min(len(wanted), len(loaded)) and (loaded[keep].kind, loaded[keep].ref) == wanted[keep]:
            keep += 1
        while len(self.stack) > self._base_depth + keep:
            adapter: Any = self.stack.pop()
            events(Note("info", f"{ADAPTER_KINDS.get(adapter.kind).label} removed: {adapter.ref}"))
        for kind_name, ref in wanted[keep:]:
            kind = ADAPTER_KINDS.get(kind_name)
            adapter = kind.load(self.comps, ref)
            self.stack.push(adapter)
            events(Note("info", f"{kind.label} loaded: {_describe_line(adapter)}"))
        self.spec = spec

    @property
    def linfusion_source(self) -> str:
        return self.patch.source if self.patch else "none"

    def adapter_modules(self) -> list[nn.Module]:
        """Models adapters bring (a ControlNet), chunked and dilated like the UNet."""
        return [module for adapter in self.adapters for module in adapter.modules]

    def weight_bytes(self) -> int:
        """Bytes of every weight on the device: the model's and what adapters brought."""
        comps = self.comps
        return memory.module_bytes(comps.unet, comps.vae, *comps.text_encoders, *self.adapter_modules())

    def control_channels(self) -> float:
        """What the loaded adapters hold during a UNet call (MemoryPlanner.control_channels)."""
        config = self.comps.unet.config
        counts = {kind.name: sum(a.kind == kind.name for a in self.adapters) for kind in ADAPTER_KINDS}
        return sum(kind.activation_channels(config, counts[kind.name]) for kind in ADAPTER_KINDS if counts[kind.name])

    def adapter_extras(self) -> tuple[tuple[str, int], ...]:
        """What the loaded adapters' inputs add to a UNet call, as the planner looks it up (AdapterKind.memory_key)."""
        kinds = [ADAPTER_KINDS.get(adapter.kind) for adapter in self.adapters]
        return tuple((kind.memory_key, kind.memory_cap) for kind in kinds if kind.memory_key)

    def controlnet_count(self) -> int:
        """How many loaded adapters run a pass of their own before every UNet call (AdapterKind.own_pass)."""
        return sum(ADAPTER_KINDS.get(adapter.kind).own_pass for adapter in self.adapters)

    def memory_planner(self, job: Job) -> MemoryPlanner:
        """The memory settings chooser for a job on this engine, from what is loaded (the core plans the same from
        the family before loading, then hands its planner here refined with these measurements)."""
        config = self.comps.unet.config
        return MemoryPlanner.for_job(
            low_vram=job.low_vram,
            max_vram=job.max_vram,
            guidance=job.guidance,
            budget=memory.device_budget(self.device, job.max_vram),
            arch=self.comps.family.arch if self.comps.family else None,
            top_width=int(config["block_out_channels"][0]),
            dtype_bytes=memory.dtype_bytes(self.dtype),
            weights=self.weight_bytes(),
            vae=self.vae_model(job.vae_tile),
            refine=job.refine,
            control_channels=self.control_channels(),
            controlnets=self.controlnet_count(),
            adapter_extras=self.adapter_extras(),
            memory=job.memory,
        )

    def vae_model(self, tile: int | None) -> VaeModel:
        """The VAE as the planner sees it (memory_plan.VaeModel)."""
        free = memory.available_bytes(self.device)
        itemsize = memory.dtype_bytes(self.vae_dtype())
        return VaeModel(dict(self.comps.vae.config), itemsize, self.device.type, free, tile)

    def vae_dtype(self) -> torch.dtype:
        return next(self.comps.vae.parameters()).dtype

    @property
    def fp32_vae_copy(self) -> torch.nn.Module | None:
        """The fp32 VAE copy, if a tile has needed it yet."""
        return self._fp32_vae_copy

    def fp32_vae(self) -> torch.nn.Module:
        """One fp32 copy of the VAE for tiles that overflow in half precision, made on first need."""
        if self._fp32_vae_copy is None:
            self._fp32_vae_copy = copy.deepcopy(self.comps.vae).float()
        return self._fp32_vae_copy

    # --------------------------------------------------------------------------------------------------------
    def _handoff(self, run: JobRun, init_image: np.ndarray | None) -> Handoff:
        """What the first stage starts from: an input image on the device (every process of a split image has it
        whole), held by the hand-off alone, so that a stage that parks it in CPU memory frees it; or nothing."""
        if init_image is None:
            return Handoff(None)
        return Handoff(run.split.everywhere(to_device_image(init_image, self.device, self.vae_dtype())))

    def run_plan(
        self,
        job: Job,
        plan: Plan,
        seed: int,
        *,
        planner: MemoryPlanner | None = None,
        events: EventSink = ignore,
        cancel: CancelToken | None = None,
        init_image: np.ndarray | None = None,
        keep_stages: bool = False,
        group: Comm | None = None,
    ) -> PlanOutput:
        """Run every stage of `plan` for one job and return the final image as uint8. `planner` is the job's
        memory planner (the engine's own when not given). With `group` (processes that all run this
        same call), the image is split between them (splitting.py): its final rows stay on the processes that
        made them (`rows`), for the first process to write as they come or to take whole (PlanOutput.whole_image)."""
        start = time.perf_counter()
        if plan.from_image and init_image is None:
            raise UsageError("this plan upscales an input image, but none was given")
        text = self._conditioning(job, plan, events)
        for adapter in self.adapters:
            adapter.begin_job(job, self.device)
        base_width = plan.stages[0].width if init_image is None else init_image.shape[1]
        run = JobRun(
            self,
            job,
            plan,
            seed,
            text.first,
            planner or self.memory_planner(job),
            events,
            cancel or CancelToken(),
            base_width,
            REFINE_METHODS.get(plan.refine).start_job(job),
            ImageSplit(group, self.comps.unet.config, self.host),
            per_step=text.per_step,
            input_size=None if init_image is None else (init_image.shape[1], init_image.shape[0]),
        )
        final, records, stage_images = run_stages(run, self._handoff(run, init_image), keep_stages)
        if run.fp32_retries:
            events(
                Note(
                    "warning",
                    f"VAE overflowed in {self.vae_dtype()} {plural(run.fp32_retries, 'time')}; "
                    "those tiles were redone in fp32",
                )
            )
        seconds = time.perf_counter() - start
        rows = final if isinstance(final, RowStream) else None
        pixels = None if isinstance(final, RowStream) else final
        return PlanOutput(pixels, records, seconds, stage_images, text.warnings, run.split.report(), rows)

    def embeddings(self, job: Job) -> EmbeddingLibrary:
        """The textual-inversion embeddings a job's prompts may name (its folders'), checked against this model's
        text encoders."""
        widths = [int(encoder.config.hidden_size) for encoder in self.comps.text_encoders]
        return embedding_library(embedding_folders(job.embeddings), widths, self.comps.allow_pickle)

    def _conditioning(self, job: Job, plan: Plan, events: EventSink) -> JobText:
        """Text conditioning, once for all stages (or, with A1111's prompt editing, each distinct text once). With
        --low-vram the text encoders sit in CPU memory while the UNet and VAE work (SDXL's two encoders hold
        1.6 GB in fp16)."""
        encoders = self.comps.text_encoders
        place_text_encoders(encoders, self.device, on_device=True)
        options = TextOptions(job.clip_skip, self.embeddings(job))
        text = job_text(self.comps, job.prompt, job.negative, job.guidance, plan, self.device, options)
        if job.low_vram:
            place_text_encoders(encoders, self.device, on_device=False)
        for note in text.notes:
            events(Note("info", note))
        for warning in text.warnings:
            events(Note("warning", warning))
        return text


def _describe_line(adapter: Adapter) -> str:
    """`SOURCE at scale S (k v, ...)` from the adapter's short numeric/name facts (notes and hashes stay in JSON)."""
    info = adapter.describe()
    facts = [f"{k.replace('_', ' ')} {v}" for k, v in info.items() if isinstance(v, int) and not isinstance(v, bool)]
    return f"{info['source']} at scale {info['scale']:g}" + (f" ({', '.join(facts)})" if facts else "")
