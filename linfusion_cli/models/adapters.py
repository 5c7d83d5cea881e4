"""The model side's seam for what users bring to a render: LoRAs, ControlNets, IP-Adapters.

An `Adapter` is loaded onto an engine's components once and kept while jobs ask for it (a batch switches
adapters between jobs without reloading the model). Per job it may prepare inputs (an IP-Adapter's image
embedding, computed once per job, not per stage); per stage it may return a `UNetExtra` that every UNet call of
that stage merges in (a ControlNet's residuals at the stage's size); `describe()` is what reports and image
metadata show; `remove()` leaves the model exactly as it was before `load`.

An adapter that brings models of its own (a ControlNet) lists them in a `modules` attribute: memory settings
chunk them like the UNet.

`ADAPTER_KINDS` maps an `EngineSpec` field to the module that builds that kind: one table, so a new kind is
one new module plus one row.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from ..base.errors import UsageError

if TYPE_CHECKING:
    import torch

    from ..base.plan import StagePlan
    from ..core.config import AdapterRef, JobSpec
    from ..engine.sampling import UNetExtra
    from .families import Family
    from .loading import Components


class Adapter(Protocol):
    kind: str  # the EngineSpec field it came from: "loras", ...
    ref: AdapterRef

    def begin_job(self, job: JobSpec, device: torch.device) -> None:
        """Per-job preparation (nothing for most kinds)."""

    def stage_extra(self, stage: StagePlan, control: torch.Tensor | None) -> UNetExtra | None:
        """What this adapter adds to every UNet call of `stage`; `control` is the stage's upscaled previous image
        ((1, 3, H, W) in [-1, 1] on the device), None in a base stage."""

    def describe(self) -> dict[str, Any]:
        """For reports and metadata: at least `kind`, `source`, `scale`."""

    def remove(self) -> None:
        """Undo `load` exactly."""


# EngineSpec field -> the module whose `load(comps, ref) -> Adapter` builds that kind, in load order: a
# ControlNet built from the UNet's config must read it before an IP-Adapter sets its encoder_hid_dim_type.
ADAPTER_KINDS: dict[str, str] = {"loras": "lora", "controlnets": "controlnet", "ip_adapters": "ip_adapter"}


def preflight(job: JobSpec, family: Family | None, allow_pickle: bool = False) -> None:
    """Before any model loads: the checks of each kind the job asks for (its module's optional
    `preflight(job, family, allow_pickle)`: missing inputs, pickles refused, weights made for another family), so
    bad input exits 2 early."""
    from ..core.config import EngineSpec

    if job.ip_image and not job.ip_adapter:
        raise UsageError("--ip-image is the IP-Adapter's reference image: give --ip-adapter too")
    spec = EngineSpec.of(job)
    for kind, module_name in ADAPTER_KINDS.items():
        if not getattr(spec, kind):
            continue
        module = importlib.import_module(f"{__package__}.{module_name}")
        check = getattr(module, "preflight", None)
        if check is not None:
            check(job, family, allow_pickle)


def load_adapter(kind: str, comps: Components, ref: AdapterRef) -> Adapter:
    module = importlib.import_module(f"{__package__}.{ADAPTER_KINDS[kind]}")
    adapter: Adapter = module.load(comps, ref)
    return adapter
