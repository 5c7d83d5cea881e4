"""The adapter kinds this build knows, in load order (a ControlNet built from the UNet's config must read it
before an IP-Adapter sets its `encoder_hid_dim_type`), and what is asked of all of them at once. A new kind is one
package plus a row here, or `ADAPTER_KINDS.register(...)` from outside."""

from __future__ import annotations

from ..base.job import Job
from ..base.registry import Registry
from ..base.settings import EngineSpec
from .adapter_kind import AdapterKind
from .controlnet import CONTROLNET
from .families import Family
from .ip_adapter import IP_ADAPTER
from .lora import LORA

ADAPTER_KINDS: Registry[AdapterKind] = Registry("adapter kind", [LORA, CONTROLNET, IP_ADAPTER])


def engine_spec(job: Job) -> EngineSpec:
    """What a job's engine is made of: its model, LinFusion weights, VAE, and adapters in load order."""
    adapters = tuple((kind.name, ref) for kind in ADAPTER_KINDS for ref in kind.refs(job))
    return EngineSpec(job.model, job.linfusion, job.vae, adapters)


def preflight(job: Job, family: Family | None, allow_pickle: bool = False) -> None:
    """Before any model loads: the checks of each kind the job asks for (missing inputs, pickles refused, weights
    made for another family), so bad input exits 2 early."""
    for kind in ADAPTER_KINDS:
        if kind.refs(job):
            kind.preflight(job, family, allow_pickle)
        else:
            kind.refuse_orphans(job)
