"""One context manager that makes models run on this process's band of a split image, and puts them back exactly.

Inside `split_image(comm, unet, *controlnets)` every Conv2d runs as a halo conv, every GroupNorm with the whole
image's statistics, every LinFusionAttention with summaries summed over bands, and every ordinary softmax
self-attention (a ControlNet layer LinFusion left quadratic, the VAE's mid-block) with keys and values gathered
from all bands. Everything else in diffusers' UNet2DConditionModel, ControlNetModel and AutoencoderKL works per
token or per pixel (cross-attention, feed-forward, LayerNorms, time/text embeddings, nearest 2x upsampling,
skip connections), so it runs unchanged. What mixes rows in a way we cannot split (FreeU's Fourier filter,
transposed convs, FIR resamplers, batch/instance norms) is refused up front rather than computed wrong.

Convs read their dilation and padding at call time, so `refine.dilated` composes in either order.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...base.errors import UsageError
from ...linfusion.attention import LinFusionAttention
from .comm import Comm
from .ops import AttentionReduce, ConvSpec, band_conv2d, band_group_norm, gather_tokens

# Modules that mix rows in ways a band cannot reproduce exactly.
REFUSED = (
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.InstanceNorm2d,
    nn.Conv1d,
    nn.Conv3d,
)
REFUSED_NAMES = ("FirUpsample2D", "FirDownsample2D", "KUpsample2D", "KDownsample2D")
FREEU_ATTRIBUTES = ("s1", "s2", "b1", "b2")  # set on up blocks by UNet2DConditionModel.enable_freeu


class _Patches:
    """Attribute swaps and hooks, each recorded so that exit restores exactly what was there."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, str, bool, Any]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def set(self, module: nn.Module, name: str, value: Any) -> None:
        self._saved.append((module, name, name in module.__dict__, module.__dict__.get(name)))
        setattr(module, name, value)

    def hook(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self._hooks.append(module.register_forward_hook(hook))

    def undo(self) -> None:
        for handle in reversed(self._hooks):
            handle.remove()
        for module, name, had, value in reversed(self._saved):
            if had:
                setattr(module, name, value)
            else:
                delattr(module, name)
        self._saved.clear()
        self._hooks.clear()


class SplitRun:
    """What `split_image` installed, and how often each op ran (conv, norm, attention, attention_kv)."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.ops: Counter[str] = Counter()
        self.installed: Counter[str] = Counter()
        self._extra_bottom: dict[int, int] = {}  # id(conv) -> zero rows diffusers pads below the image

    def conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        self.ops["conv"] += 1
        return band_conv2d(self.comm, ConvSpec.of(conv, self._extra_bottom.get(id(conv), 0)), x)

    def norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        self.ops["norm"] += 1
        return band_group_norm(self.comm, norm, x)

    def keys_values(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        self.ops["attention_kv"] += 1
        return gather_tokens(self.comm, output)

    def downsample(self, module: Any, hidden_states: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        """diffusers' Downsample2D with padding 0 (the VAE encoder's) pads (0, 1, 0, 1) itself: on a band that
        would put a zero row under every band. Pad the right column only; the band conv adds the image's row."""
        if module.norm is not None:
            hidden_states = module.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return module.conv(F.pad(hidden_states, (0, 1)))

    def mark_extra_bottom(self, conv: nn.Module) -> None:
        self._extra_bottom[id(conv)] = 1


@contextlib.contextmanager
def split_image(comm: Comm, *models: nn.Module) -> Iterator[SplitRun]:
    """Run `models` (a UNet, the ControlNets that feed it, a VAE...) on this process's band of the image set in
    `comm.bands`; on leaving, every module is exactly as before, whatever happened inside."""
    modules = list({id(m): m for model in models for m in model.modules()}.values())
    _check(modules)
    run, patches = SplitRun(comm), _Patches()
    try:
        for module in modules:
            if isinstance(module, nn.Conv2d):
                patches.set(module, "forward", functools.partial(run.conv, module))
            elif isinstance(module, nn.GroupNorm):
                patches.set(module, "forward", functools.partial(run.norm, module))
            elif isinstance(module, LinFusionAttention):
                patches.set(module, "reducer", AttentionReduce(comm, module.heads))
            elif _is_softmax_self_attention(module):
                patches.hook(cast(nn.Module, module.to_k), run.keys_values)
                patches.hook(cast(nn.Module, module.to_v), run.keys_values)
            elif _pads_below(module):
                patches.set(module, "forward", functools.partial(run.downsample, module))
                run.mark_extra_bottom(cast(nn.Module, module.conv))
            else:
                continue
            run.installed[type(module).__name__] += 1
        yield run
    finally:
        patches.undo()


def split_forward(module: nn.Module) -> bool:
    """Whether the module's own forward is the one `split_image` set (a Conv2d or GroupNorm on this band): the
    module's arithmetic is still the stock one, which engine/banded may then run on rows itself."""
    forward = vars(module).get("forward")
    return isinstance(forward, functools.partial) and isinstance(getattr(forward.func, "__self__", None), SplitRun)


def _check(modules: list[nn.Module]) -> None:
    """Refuse, before touching anything, what a band cannot compute exactly."""
    for module in modules:
        name = type(module).__name__
        if isinstance(module, REFUSED) or name in REFUSED_NAMES:
            raise UsageError(f"{name} mixes image rows in a way a split image cannot reproduce; run unsplit")
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) > 1:
            raise UsageError(f"a LayerNorm over {tuple(module.normalized_shape)} may span image rows; run unsplit")
        if any(getattr(module, key, None) is not None for key in FREEU_ATTRIBUTES):
            raise UsageError("FreeU filters whole feature maps in Fourier space: disable it to split the image")
        for base in (nn.Conv2d, nn.GroupNorm):
            if isinstance(module, base) and (type(module).forward is not base.forward or "forward" in vars(module)):
                raise UsageError(f"{name} has its own forward (a patch or subclass); it cannot be split safely")


def _is_softmax_self_attention(module: nn.Module) -> bool:
    """diffusers' Attention computing keys and values from the image itself (not from text)."""
    projections = (getattr(module, "to_k", None), getattr(module, "to_v", None))
    return (
        hasattr(module, "processor")
        and getattr(module, "is_cross_attention", True) is False
        and all(isinstance(p, nn.Module) for p in projections)
    )


def _pads_below(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "Downsample2D"
        and bool(getattr(module, "use_conv", False))
        and (getattr(module, "padding", None) == 0)
    )
