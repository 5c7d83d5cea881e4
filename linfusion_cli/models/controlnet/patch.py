"""LinFusion on a ControlNet's own self-attention. A ControlNet is a copy of the UNet's encoder (down and mid
blocks), so its `attn1` layers are as quadratic in pixels as the UNet's. Each is swapped for LinFusion attention
taken from the UNet's LinFusion layer of the same module name, with the ControlNet's own training carried over:
its projections become W_cn + (W_linfusion - W_unet), the change LinFusion made to the UNet's layer applied to the
ControlNet's. A ControlNet that is an untouched copy of the UNet's encoder (the built-in `tiny`) thus gets exactly
the UNet's LinFusion layers; with `--linfusion init` (W_linfusion = W_unet) it keeps its own projections (up to
rounding)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...base.text import plural
from ..modules import AttentionPatch, self_attention_layers, swap

log = logging.getLogger(__name__)


# The projections LinFusion attention shares with diffusers' Attention, whose ControlNet deltas carry over.
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class ControlNetPatch:
    """LinFusion on one ControlNet: which attn1 layers, from which weights, and how to undo it."""

    model: nn.Module
    source: str | None  # the UNet's LinFusion weights; None: LinFusion is off
    layers: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # attn1 layers left quadratic (no matching UNet layer)
    _originals: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @classmethod
    def apply(cls, model: nn.Module, linfusion: AttentionPatch | None) -> ControlNetPatch:
        attention = self_attention_layers(model)
        if linfusion is None:
            return cls(model, None, kept=[name for name, _ in attention])
        patch = cls(model, linfusion.source)
        unet_originals = dict(zip(linfusion.layers, linfusion.originals, strict=True))
        for name, attn in attention:
            base = unet_originals.get(name)
            if base is None or not _same_projections(attn, base):
                patch.kept.append(name)
                continue
            module = copy.deepcopy(linfusion.unet.get_submodule(name))
            _carry_delta(module, own=attn, base=base)
            patch._originals[name] = attn
            swap(model, name, module)
            patch.layers.append(name)
        if patch.kept:
            log.warning(
                "ControlNet: %s kept ordinary (quadratic) attention: no UNet LinFusion layer of the same name and shape",
                plural(len(patch.kept), "attn1 layer"),
            )
        return patch

    def remove(self) -> None:
        """Put the ControlNet's own attention back: its state_dict is then exactly what was loaded."""
        for name, original in self._originals.items():
            swap(self.model, name, original)
        self._originals.clear()


def _same_projections(attn: Any, base: Any) -> bool:
    return all(attn.get_submodule(p).weight.shape == base.get_submodule(p).weight.shape for p in PROJECTIONS)


@torch.no_grad()
def _carry_delta(module: nn.Module, own: nn.Module, base: nn.Module) -> None:
    """LinFusion projections + (the ControlNet's own - the UNet's original): W_cn + (W_linfusion - W_unet)."""
    for name in PROJECTIONS:
        target, mine, theirs = module.get_submodule(name), own.get_submodule(name), base.get_submodule(name)
        for param in ("weight", "bias"):
            value = getattr(target, param, None)
            if isinstance(value, torch.Tensor):
                delta = getattr(mine, param).float() - getattr(theirs, param).float()
                value.copy_((value.float() + delta.to(value.device)).to(value.dtype))
