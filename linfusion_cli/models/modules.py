"""A model's modules by name: the self-attention layers, and swapping one module for another with the patches
fused into the old one following (a LoRA fused into an `attn1` must land on the module that runs after LinFusion
swaps it, and back). The listeners are kept per model (its root module), so what follows a swap never depends on
which module was imported first."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

SELF_ATTENTION_SUFFIX = ".attn1"
CROSS_ATTENTION_SUFFIX = ".attn2"

SwapListener = Callable[[nn.Module, str, nn.Module], None]  # (root, module name, the module now there)
_LISTENERS: weakref.WeakKeyDictionary[nn.Module, list[SwapListener]] = weakref.WeakKeyDictionary()


def self_attention_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """Every transformer block's `attn1`, in the model's module order."""
    return [(n, m) for n, m in model.named_modules() if n.endswith(SELF_ATTENTION_SUFFIX)]


def cross_attention_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """Every transformer block's `attn2`, in the model's module order."""
    return [(n, m) for n, m in model.named_modules() if n.endswith(CROSS_ATTENTION_SUFFIX)]


def listen_to_swaps(root: nn.Module, listener: SwapListener) -> None:
    """Call `listener` after every `swap` under `root` until `stop_listening`."""
    _LISTENERS.setdefault(root, []).append(listener)


def stop_listening(root: nn.Module, listener: SwapListener) -> None:
    listeners = _LISTENERS.get(root, [])
    if listener in listeners:
        listeners.remove(listener)


def swap(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at `name` under `root`, then tell the root's listeners."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
    for listener in list(_LISTENERS.get(root, ())):
        listener(root, name, module)


class AttentionPatch(Protocol):
    """What a model-side adapter reads of the LinFusion patch on a UNet (linfusion.patching.LinFusionPatch):
    which `attn1` layers were swapped, what was there before, and the weights' source."""

    unet: nn.Module
    source: str

    @property
    def layers(self) -> list[str]: ...

    @property
    def originals(self) -> list[nn.Module]: ...

    def original_attention(self) -> contextlib.AbstractContextManager[None]: ...
