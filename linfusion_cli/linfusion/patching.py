"""Apply LinFusion to a UNet (swap every `attn1`), remove it again, and read/write the official checkpoint format.

Official format (a folder or hub repo):
  config.json                         {"_class_name": "LinFusion", "modules_list": [{"module_name": ..., "dim_n": C,
                                        "heads": h, "projection_mid_dim": m or null}, ...]}
  diffusion_pytorch_model.safetensors entry i owns `{i}.to_q.weight`, `{i}.to_k.weight`, `{i}.to_v.weight`,
                                        `{i}.to_out.0.weight/.bias`, `{i}.to_q_.{0,1,3}.weight/.bias`, same for to_k_
                                        (none of those two with projection_mid_dim -1: identity feature maps).
Entries are matched to layers by `module_name`, never by position.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.errors import CheckpointError, UsageError
from ..models.families import Family, detect_family, family_or_none, guess_family_of_checkpoint
from ..models.hub import resolve_local_or_hub
from ..models.modules import self_attention_layers, swap
from .attention import LinFusionAttention

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INIT_SEED = 0  # "random"/"init" weights are reproducible run to run


@dataclass
class LayerSpec:
    module_name: str
    dim_n: int
    heads: int
    projection_mid_dim: int | None

    def as_entry(self) -> dict[str, Any]:
        return {
            "module_name": self.module_name,
            "dim_n": self.dim_n,
            "heads": self.heads,
            "projection_mid_dim": self.projection_mid_dim,
        }


@dataclass
class LinFusionPatch:
    """LinFusion applied to one UNet: which layers, and how to undo or save it."""

    unet: nn.Module
    specs: list[LayerSpec]
    source: str
    family: Family | None
    _originals: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[str]:
        return [s.module_name for s in self.specs]

    @property
    def modules(self) -> list[LinFusionAttention]:
        return [_get(self.unet, name) for name in self.layers]  # type: ignore[misc]

    @property
    def originals(self) -> list[nn.Module]:
        """The UNet's own attention modules that LinFusion replaced, in `layers` order."""
        return [self._originals[name] for name in self.layers]

    @contextlib.contextmanager
    def original_attention(self) -> Iterator[None]:
        """The UNet with its own attention back for a while (a distillation teacher pass), then LinFusion again:
        one UNet in memory plays both teacher and student."""
        linfusion = {name: _get(self.unet, name) for name in self._originals}
        for name, original in self._originals.items():
            swap(self.unet, name, original)
        try:
            yield
        finally:
            for name, module in linfusion.items():
                swap(self.unet, name, module)

    def remove(self) -> None:
        """Put the original attention modules back; the UNet's state_dict is then what it was before."""
        for name, original in self._originals.items():
            current = _get(self.unet, name)
            device = next(current.parameters()).device
            swap(self.unet, name, original.to(device) if device.type != "meta" else original)
        self._originals.clear()

    def save(self, folder: str | Path) -> Path:
        """Write the official format: config.json + diffusion_pytorch_model.safetensors."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self.modules):
            for key, value in module.state_dict().items():
                tensors[f"{i}.{key}"] = value.detach().to("cpu").contiguous()
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {"_class_name": "LinFusion", "modules_list": [s.as_entry() for s in self.specs]}
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return out


def _get(root: nn.Module, name: str) -> Any:
    return root.get_submodule(name)


def _layer_specs(unet: nn.Module, family: Family | None) -> list[LayerSpec]:
    specs = []
    for name, attn in self_attention_layers(unet):
        dim = attn.to_q.in_features
        heads = int(attn.heads)
        if attn.to_q.out_features != dim:
            raise CheckpointError(f"{name}: inner dim {attn.to_q.out_features} != query dim {dim}; not supported")
        specs.append(LayerSpec(name, dim, heads, family.mid_dim(dim) if family else None))
    return specs


def _new_module(spec: LayerSpec, like: Any) -> LinFusionAttention:
    ref = next(like.parameters())
    with ref.device:  # built in place: no CPU round trip for big UNets
        module = LinFusionAttention(spec.dim_n, spec.heads, spec.projection_mid_dim)
    return module.to(dtype=ref.dtype)


def _init_from_original(module: LinFusionAttention, original: Any, generator: torch.Generator) -> None:
    """Copy W_q/W_k/W_v/W_out from the original attention; f_q, f_k start at zero output (distillation init)."""
    _randomize(module, generator)
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v"):
            getattr(module, name).weight.copy_(getattr(original, name).weight)
        out: Any = module.to_out[0]
        out.weight.copy_(original.to_out[0].weight)
        out.bias.copy_(original.to_out[0].bias)
        for mlp in (module.to_q_, module.to_k_):
            if isinstance(mlp, nn.Sequential):  # an identity feature map (projection_mid_dim -1) has no weights
                last: Any = mlp[3]
                last.weight.zero_()
                last.bias.zero_()


def _randomize(module: LinFusionAttention, generator: torch.Generator) -> None:
    """Seeded weights (N(0, 1/fan_in)), zero biases, unit LayerNorm scales: the same on every run."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.device.type == "meta":
                continue
            if param.ndim == 1:
                param.fill_(1.0 if name.endswith("1.weight") else 0.0)  # LayerNorm scale (index 1) or a bias
                continue
            noise = torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5
            param.copy_(noise.to(param.dtype))


def apply_linfusion(unet: nn.Module, source: str = "auto") -> LinFusionPatch:
    """Swap every `attn1` of `unet` for LinFusion attention and return the patch.

    source: "auto" (official weights for the UNet's family), a local folder or hub id in the official format,
    "init" (copy the UNet's own attention weights, zero the last layer of f_q/f_k) or "random".
    """
    config = getattr(unet, "config", {})
    family: Family | None = None
    weights: dict[str, dict[str, torch.Tensor]] | None = None
    specs: list[LayerSpec]
    if source == "auto":
        family = detect_family(config)
        source = family.linfusion_repo or "random"
    elif source in ("init", "random"):
        family = family_or_none(config)
    if source in ("init", "random"):
        specs = _layer_specs(unet, family)
    else:
        family = family_or_none(config)
        specs, weights = load_checkpoint(source, unet)
    if not specs:
        raise CheckpointError("this UNet has no self-attention (attn1) layers to patch")

    patch = LinFusionPatch(unet, specs, source, family)
    generator = torch.Generator().manual_seed(INIT_SEED)
    for spec in specs:
        original = _get(unet, spec.module_name)
        module = _new_module(spec, original)
        if weights is not None:
            module.load_state_dict({k: v.to(module.to_q.weight.dtype) for k, v in weights[spec.module_name].items()})
        elif source == "init":
            _init_from_original(module, original, generator)
        else:
            _randomize(module, generator)
        patch._originals[spec.module_name] = original
        swap(unet, spec.module_name, module)
    log.info("LinFusion: patched %d self-attention layers (%s)", len(specs), source)
    return patch


def load_checkpoint(source: str, unet: nn.Module) -> tuple[list[LayerSpec], dict[str, dict[str, torch.Tensor]]]:
    """Read and strictly validate an official-format checkpoint against `unet`.

    Returns the layer specs (in the UNet's order) and, per module name, its state dict.
    """
    config_path, entries, state = _read_checkpoint(source)
    unet_layers = dict(self_attention_layers(unet))
    unet_family = family_or_none(getattr(unet, "config", {}))
    unet_label = unet_family.label if unet_family else "an unknown architecture"
    guess = guess_family_of_checkpoint(entries)
    mismatch = f"the checkpoint seems to be for {guess}; this UNet is {unet_label} ({len(unet_layers)} attn1 layers)"

    specs: list[LayerSpec] = []
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for i, entry in enumerate(entries):
        spec = _entry_spec(config_path, i, entry)
        attn = unet_layers.get(spec.module_name)
        if attn is None:
            raise CheckpointError(f"checkpoint module '{spec.module_name}' is not an attn1 of this UNet: {mismatch}")
        specs.append(spec)
        weights[spec.module_name] = _layer_weights(state, i, spec, attn, mismatch)

    seen_keys = {f"{i}.{key}" for i, spec in enumerate(specs) for key in weights[spec.module_name]}
    unexpected = sorted(set(state) - seen_keys)
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected keys {unexpected[:5]}: {mismatch}")
    missing = [name for name in unet_layers if name not in weights]
    if missing:
        raise CheckpointError(
            f"checkpoint covers {len(weights)} of the UNet's {len(unet_layers)} attn1 layers; missing "
            f"'{missing[0]}' and {len(missing) - 1} more: {mismatch}"
        )
    # Keep the UNet's module order (entries may come in any order).
    order = {name: i for i, name in enumerate(unet_layers)}
    specs.sort(key=lambda s: order[s.module_name])
    return specs, weights


def _read_checkpoint(source: str) -> tuple[Path, list[Any], dict[str, torch.Tensor]]:
    """The official folder's config path, its `modules_list` entries and its tensors, or a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_local_or_hub(source, what="LinFusion checkpoint", allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    if folder.is_file():
        raise UsageError(f"LinFusion checkpoint '{source}' must be a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            others = sorted(p.name for p in folder.iterdir())[:8]
            raise CheckpointError(
                f"LinFusion checkpoint '{source}' has no {path.name} (found: {others}); only the official "
                f"safetensors format is read"
            )
    try:
        config = json.loads(config_path.read_text())
        entries = list(config["modules_list"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: not a LinFusion config (needs a 'modules_list'): {exc}") from exc
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{weights_path}: unreadable safetensors file ({exc}); re-download or re-save it"
        ) from exc
    return config_path, entries, state


def _entry_spec(config_path: Path, i: int, entry: Any) -> LayerSpec:
    """One `modules_list` entry as a LayerSpec, its projection_mid_dim read as the official code reads it."""
    try:
        spec = LayerSpec(
            str(entry["module_name"]), int(entry["dim_n"]), int(entry["heads"]), entry.get("projection_mid_dim")
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config_path}: modules_list[{i}] is malformed ({exc})") from exc
    mid = spec.projection_mid_dim
    if mid is not None and (isinstance(mid, bool) or not isinstance(mid, int) or (mid < 1 and mid != -1)):
        raise CheckpointError(
            f"{config_path}: modules_list[{i}] has projection_mid_dim {mid!r}; the official code reads null (the "
            "layer's width), -1 (no feature MLP) or a positive width"
        )
    return spec


def _layer_weights(
    state: dict[str, torch.Tensor], i: int, spec: LayerSpec, attn: Any, mismatch: str
) -> dict[str, torch.Tensor]:
    """Entry i's tensors (keys `i.<param>`), checked against the attn1 layer it replaces."""
    dim, heads = attn.to_q.in_features, int(attn.heads)
    if (spec.dim_n, spec.heads) != (dim, heads):
        raise CheckpointError(
            f"'{spec.module_name}': checkpoint has dim {spec.dim_n} x {spec.heads} heads, the UNet {dim} x "
            f"{heads}: {mismatch}"
        )
    layer: dict[str, torch.Tensor] = {}
    for key, shape_like in LinFusionAttention(dim, heads, spec.projection_mid_dim).state_dict().items():
        full = f"{i}.{key}"
        if full not in state:
            raise CheckpointError(f"checkpoint key '{full}' ({spec.module_name}) is missing: {mismatch}")
        if tuple(state[full].shape) != tuple(shape_like.shape):
            raise CheckpointError(
                f"checkpoint key '{full}' has shape {tuple(state[full].shape)}, expected "
                f"{tuple(shape_like.shape)} for {spec.module_name}: {mismatch}"
            )
        layer[key] = state[full]
    return layer
