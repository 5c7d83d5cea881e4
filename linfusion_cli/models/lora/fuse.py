"""LoRA-family adapters, fused into the weights they target and removable bit for bit.

Files come the ways users download them (read.py: kohya/A1111 and LyCORIS, diffusers/PEFT, diffusers' older
attention-processor layout), and each module's network (networks.py: LoRA, LoCon, LoHa, LoKr, full, DoRA) gives
the change to its weight, merged in fp32:

    W' = W + delta(W, scale)          (a plain LoRA: scale * alpha / rank * up @ down)

Fusing costs nothing per step, which is what matters at 16K. The weight (and bias) the module had is kept, in CPU
memory, so `remove()` puts it back exactly.

Self-attention (attn1) and LinFusion: LinFusion's modules keep `to_q/to_k/to_v/to_out.0`, and an attn1 LoRA is
*kept*: its delta lands on the projections that actually run. With the official LinFusion weights those are
LinFusion's own W_q/W_k/W_v/W_out (distilled from the UNet's), so the delta is applied to them. Either order
gives the same UNet: a LoRA fused before LinFusion follows each swapped-in module (it listens to the model's
swaps, models/modules.py), one fused after lands on LinFusion's modules directly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...base.errors import UsageError
from ...base.job import Job
from ...base.settings import AdapterRef
from ..modules import listen_to_swaps, stop_listening
from .kind import TINY, a1111_lora_hash, lora_file
from .networks import LowRank, Network
from .read import read_file

if TYPE_CHECKING:
    from ...base.plan import StagePlan
    from ..adapter_kind import UNetExtra
    from ..loading import Components

TINY_RANK = 4
TINY_SEED = 1234
TINY_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(eq=False)
class LoraAdapter:
    """One LoRA fused into a model's components (the `Adapter` of kind `loras`)."""

    ref: AdapterRef
    name: str
    targets: dict[nn.Module, dict[str, Network]]  # root module -> module path -> its network
    file_hash: str | None = None  # A1111's short hash of the file's tensors
    kind: str = "loras"
    _saved: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list, repr=False)
    _carried: set[int] = field(default_factory=set, repr=False)  # id() of parameters holding this delta

    def fuse(self) -> None:
        for root, pairs in self.targets.items():
            listen_to_swaps(root, self.follow_swap)  # what LinFusion swaps in later carries this LoRA too
            for path, network in pairs.items():
                self._fuse_into(root.get_submodule(path), network, path)

    def _fuse_into(self, module: nn.Module, network: Network, path: str) -> None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in self._carried:
            return
        delta = network.delta(weight.detach().float(), self.ref.scale)
        bias_delta = network.bias_delta(self.ref.scale)
        bias = getattr(module, "bias", None)
        if delta.shape != weight.shape:
            self._refuse(path, tuple(delta.shape), tuple(weight.shape))
        if bias_delta is not None and (bias is None or bias.shape != bias_delta.shape):
            self._refuse(path, f"a bias of {tuple(bias_delta.shape)}", "none" if bias is None else tuple(bias.shape))
        with torch.no_grad():
            for param, change in ((weight, delta), (bias, bias_delta)):
                if change is not None and isinstance(param, nn.Parameter):
                    self._saved.append((param, param.detach().to("cpu", copy=True)))
                    param.copy_((param.float() + change.to(param.device)).to(param.dtype))
        self._carried.add(id(weight))

    def _refuse(self, path: str, theirs: Any, ours: Any) -> None:
        raise UsageError(
            f"LoRA {self.name}: {path} has shape {theirs} but the model's is {ours} (a LoRA made for another model "
            "family?)"
        )

    def follow_swap(self, root: nn.Module, prefix: str, new: nn.Module) -> None:
        """A module at `prefix` was swapped for `new` (LinFusion in, or the original back): fuse this LoRA's
        pairs under it into `new`, unless `new` already carries them."""
        for path, network in self.targets.get(root, {}).items():
            if path.startswith(prefix + "."):
                self._fuse_into(new.get_submodule(path[len(prefix) + 1 :]), network, path)

    @property
    def attn1_layers(self) -> int:
        return len({p.rsplit(".attn1.", 1)[0] for pairs in self.targets.values() for p in pairs if ".attn1." in p})

    # Adapter protocol -----------------------------------------------------------------------------------------
    @property
    def modules(self) -> tuple[nn.Module, ...]:
        return ()  # fused into the model's own weights: nothing of its own on the device

    def begin_job(self, job: Job, device: torch.device) -> None:
        return None

    def stage_extra(self, stage: StagePlan, control: torch.Tensor | None) -> UNetExtra | None:
        return None  # fused: nothing to add per call

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "lora",
            "source": self.ref.source,
            "name": self.name,
            "scale": self.ref.scale,
            "modules": sum(len(p) for p in self.targets.values()),
            "networks": dict(Counter(n.kind for pairs in self.targets.values() for n in pairs.values())),
            "attn1_layers": self.attn1_layers,
            "attn1_note": "attn1 deltas kept, on the projections that run (LinFusion's when patched)",
            "hash": self.file_hash,
        }

    def remove(self) -> None:
        """Every weight this LoRA changed back to exactly what it was, last change first."""
        with torch.no_grad():
            for weight, saved in reversed(self._saved):
                weight.copy_(saved.to(weight.device))
        self._saved.clear()
        self._carried.clear()
        for root in self.targets:
            stop_listening(root, self.follow_swap)


# --- reading LoRA files -------------------------------------------------------------------------------------


def load(comps: Components, ref: AdapterRef) -> LoraAdapter:
    """Read `ref`'s LoRA, match it to the components, fuse it (the `ADAPTER_KINDS` entry point)."""
    if ref.source == TINY:
        name, targets = TINY, tiny_lora(comps.unet)
        adapter = LoraAdapter(ref, name, {comps.unet: targets})
    else:
        path = lora_file(ref.source)
        adapter = LoraAdapter(ref, path.stem, read_file(path, comps), a1111_lora_hash(path))
    adapter.fuse()
    return adapter


def tiny_lora(unet: nn.Module, rank: int = TINY_RANK) -> dict[str, Network]:
    """Random LoRA pairs (seeded) on every attention projection of a UNet: the built-in `--lora tiny`."""
    generator = torch.Generator().manual_seed(TINY_SEED)
    pairs: dict[str, Network] = {}
    for name, module in unet.named_modules():
        if not name.endswith((".attn1", ".attn2")):
            continue
        for target in TINY_TARGETS:
            layer = module.get_submodule(target)
            out_features, in_features = layer.weight.shape
            down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            up = torch.randn(out_features, rank, generator=generator) * 0.5
            pairs[f"{name}.{target}"] = LowRank(down, up, float(rank))
    return pairs
