"""What users bring to a render besides the model (LoRAs, ControlNets, IP-Adapters): the seam.

An `AdapterKind` is declared once, in its own package, and listed in `adapters.ADAPTER_KINDS`; it owns every
aspect of its kind: its settings (flags, job fields, preset keys), the checks made before any model loads, what
it fetches (offline checks), the weights and activations it adds (memory plans), its plan lines and image
metadata, and how to load it. Nothing outside its package names a kind. No torch at import: kinds are read to
build the CLI and to plan before anything loads; their torch side is imported when an adapter loads.

An `Adapter` is one loaded instance: loaded onto an engine's components once and kept while jobs ask for it (a
batch switches adapters between jobs without reloading the model). Per job it may prepare inputs (an
IP-Adapter's image embedding, computed once per job, not per stage); per stage it may return a `UNetExtra` that
every UNet call of that stage merges in (a ControlNet's residuals at the stage's size); `describe()` is what
reports and image metadata show; `remove()` leaves the model exactly as it was before the load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..base.events import Note
from ..base.job import Job
from ..base.settings import AdapterRef, Setting, adapter_refs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..base.plan import StagePlan
    from .families import Family
    from .loading import Components


@dataclass(frozen=True)
class UNetCall:
    """One UNet call's inputs, as an adapter's extra sees them. `added_cond_kwargs` is the family's (SDXL's
    text_embeds/time_ids, else None); `rows` selects the guidance halves in this call (0: unconditional,
    1: conditional)."""

    sample: torch.Tensor
    t: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, Any] | None
    rows: slice


class UNetExtra(Protocol):
    """Per-stage conditioning an adapter adds to every UNet call (ControlNet residuals, IP-Adapter image
    embeddings): given the call's inputs, the extra UNet keyword arguments."""

    def __call__(self, call: UNetCall) -> dict[str, Any]: ...


class Adapter(Protocol):
    kind: str  # its AdapterKind's name: "loras", ...
    ref: AdapterRef

    @property
    def modules(self) -> tuple[nn.Module, ...] | list[nn.Module]:
        """Models of its own on the device: counted in the memory budget, chunked and dilated with the UNet."""

    def begin_job(self, job: Job, device: torch.device) -> None:
        """Per-job preparation (nothing for most kinds)."""

    def stage_extra(self, stage: StagePlan, control: torch.Tensor | None) -> UNetExtra | None:
        """What this adapter adds to every UNet call of `stage`; `control` is the stage's upscaled previous image
        ((1, 3, H, W) in [-1, 1] on the device), None in a base stage."""

    def describe(self) -> dict[str, Any]:
        """For reports and metadata: at least `kind`, `source`, `scale`."""

    def remove(self) -> None:
        """Undo the load exactly."""


Offline = tuple[str, str, str]  # (what, hub repo, a file every snapshot of it has): see core's offline checks


class AdapterKind:
    """One kind of adapter (subclass it in the kind's package; see the module docstring)."""

    name = ""  # plural: its key in EngineSpec.adapters, reports and plans ("loras")
    label = ""  # how a person calls one ("LoRA")
    described_as = ""  # the `kind` its adapters' describe() reports in sidecars
    ref_setting = ""  # the setting that lists a job's adapters of this kind (SRC[:SCALE] each)
    settings: tuple[Setting, ...] = ()
    fields_rank = 0  # where its fields go among the kinds' in the image's parameters text
    tag_names: tuple[str, ...] = ()  # AUTOMATIC1111 prompt tags that name one of this kind (`lora`: <lora:NAME:W>)

    def refs(self, job: Job) -> list[AdapterRef]:
        return list(adapter_refs(getattr(job, self.ref_setting)))

    def resolve(self, job: Job, tags: list[tuple[str, float]]) -> None:
        """Before anything else reads the job: add the adapters its prompt's tags name ((NAME, weight) pairs) to
        its refs, and make refs by a short name concrete (the file it names), so that a tag and the same ref
        given as a flag are the same job."""
        if tags:
            raise NotImplementedError(f"{self.label} has no prompt tags")

    def preflight(self, job: Job, family: Family | None, allow_pickle: bool) -> None:
        """Everything about the job's adapters of this kind that can be refused before the model loads."""

    def refuse_orphans(self, job: Job) -> None:
        """The job has no adapter of this kind: refuse its settings that need one (before the model loads)."""

    def notes(self, job: Job, target: tuple[int, int], stages: int) -> list[Note]:
        """What a user should know about the job's use of this kind (before anything loads), each note with its
        level: a warning where the image may not be what the user wants."""
        return []

    def hub_files(self, job: Job, family: Family | None) -> list[Offline]:
        """The hub files the job's adapters of this kind need, for offline checks."""
        return []

    own_pass = False  # its model runs a pass of its own before every UNet call (a ControlNet's encoder copy)
    # What its inputs add to a UNet call, for the memory planner: its term in engine/memory_model.ARCH_COSTS
    # (fitted by `linfusion bench planner --fit`), and the query tokens per layer call beyond which that stops
    # growing (0: never).
    memory_key = ""
    memory_cap = 0

    def planned_gib_fp16(self, job: Job, family: Family | None, family_gib: float) -> float:
        """Weights the job's adapters add on the device (GiB in fp16), for plans made before anything loads;
        `family_gib` is the model's own."""
        return 0.0

    def activation_channels(self, unet_config: Mapping[str, Any], count: int) -> float:
        """What `count` loaded adapters of this kind hold during a UNet call besides its own activations, in
        channels per top-level latent token and batch element (memory_plan.MemoryPlanner.control_channels)."""
        return 0.0

    def plan_entries(self, job: Job) -> list[dict[str, Any]]:
        """The job's adapters of this kind as `plan` lists them (its JSON)."""
        return [{"source": ref.source, "scale": ref.scale} for ref in self.refs(job)]

    def plan_line(self, entry: Mapping[str, Any]) -> str:
        """One plan entry as a line of text."""
        return f"{self.label} {entry['source']} at scale {entry['scale']:g}"

    def a1111_fields(self, described: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """AUTOMATIC1111 `parameters` fields for the adapters of this kind that ran (their describe())."""
        return []

    def prompt_tags(self, described: list[dict[str, Any]]) -> list[str]:
        """Tags A1111 keeps in the prompt line for them (`<lora:name:scale>`)."""
        return []

    def load(self, comps: Components, ref: AdapterRef) -> Adapter:
        raise NotImplementedError

    # A memory simulation (plan --simulate) builds adapters of the shapes a load would give, on the meta device,
    # onto components on the meta device whose UNet has its LinFusion patch; kinds that cannot say why not.
    simulates = False
    simulation_note = "not simulated (its memory and work are left out)"

    def simulated(self, comps: Components, ref: AdapterRef) -> Adapter:
        raise NotImplementedError
