"""LoRA adapters, fused into the weights they target and removable bit for bit.

Files come the ways users download them: kohya/A1111 (`lora_unet_...`, `lora_te_...`, alphas), diffusers/PEFT
(`unet....lora_A.weight`), or diffusers' older attention-processor layout; diffusers' own converter reads them
(`lora_state_dict`), and we merge each pair into its module's weight:

    W' = W + scale * (alpha / rank) * up @ down          (a Conv2d LoRA: the same over flattened kernels)

Fusing costs nothing per step, which is what matters at 16K. The merge is done in fp32 and the weight the
module had is kept (in CPU memory), so `remove()` puts it back exactly.

Self-attention (attn1) and LinFusion: LinFusion's modules keep `to_q/to_k/to_v/to_out.0`, and an attn1 LoRA is
*kept*: its delta lands on the projections that actually run. With the official LinFusion weights those are
LinFusion's own W_q/W_k/W_v/W_out (distilled from the UNet's), so the delta is applied to them. Either order
gives the same UNet: a LoRA fused before LinFusion follows each swapped-in module (it listens to the model's
swaps, models/modules.py), one fused after lands on LinFusion's modules directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...base.errors import ModelLoadError, UsageError
from ...base.job import Job
from ...base.settings import AdapterRef
from ..modules import listen_to_swaps, stop_listening
from .kind import TINY, a1111_lora_hash, lora_file

if TYPE_CHECKING:
    from ...base.plan import StagePlan
    from ..adapter_kind import UNetExtra
    from ..loading import Components

TEXT_MODEL_PREFIX = "text_model."
TINY_RANK = 4
TINY_SEED = 1234
TINY_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# (pattern, module path template): where a LoRA pair's down/up weights sit, by key layout.
_KEY_LAYOUTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<m>.+)\.lora_(?P<part>A|B)\.weight$"), "{m}"),  # diffusers / PEFT
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"), "proc"),
    (re.compile(r"^(?P<m>.+)\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"), "te"),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<part>down|up)\.weight$"), "{m}"),  # converted kohya, any module
)
_PROC_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_TARGET = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DOWN_PARTS = ("A", "down")


@dataclass
class LoraPair:
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None

    def delta(self, scale: float) -> torch.Tensor:
        """scale * alpha / rank * up @ down, fp32, in the shape of the target weight's (out, in, ...)."""
        rank = self.down.shape[0]
        factor = scale * ((self.alpha if self.alpha is not None else rank) / rank)
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return factor * (up @ down)
        merged = up.flatten(1) @ down.flatten(1)  # (out, in * kh * kw)
        return factor * merged.reshape(up.shape[0], *down.shape[1:])


@dataclass(eq=False)
class LoraAdapter:
    """One LoRA fused into a model's components (the `Adapter` of kind `loras`)."""

    ref: AdapterRef
    name: str
    targets: dict[nn.Module, dict[str, LoraPair]]  # root module -> module path -> pair
    file_hash: str | None = None  # A1111's short hash of the file's tensors
    kind: str = "loras"
    _saved: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list, repr=False)
    _carried: set[int] = field(default_factory=set, repr=False)  # id() of parameters holding this delta

    def fuse(self) -> None:
        for root, pairs in self.targets.items():
            listen_to_swaps(root, self.follow_swap)  # what LinFusion swaps in later carries this LoRA too
            for path, pair in pairs.items():
                self._fuse_into(root.get_submodule(path), pair, path)

    def _fuse_into(self, module: nn.Module, pair: LoraPair, path: str) -> None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in self._carried:
            return
        delta = pair.delta(self.ref.scale)
        if delta.shape != weight.shape:
            raise UsageError(
                f"LoRA {self.name}: {path} has shape {tuple(delta.shape)} but the model's is {tuple(weight.shape)}"
                " (a LoRA made for another model family?)"
            )
        with torch.no_grad():
            self._saved.append((weight, weight.detach().to("cpu", copy=True)))
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        self._carried.add(id(weight))

    def follow_swap(self, root: nn.Module, prefix: str, new: nn.Module) -> None:
        """A module at `prefix` was swapped for `new` (LinFusion in, or the original back): fuse this LoRA's
        pairs under it into `new`, unless `new` already carries them."""
        for path, pair in self.targets.get(root, {}).items():
            if path.startswith(prefix + "."):
                self._fuse_into(new.get_submodule(path[len(prefix) + 1 :]), pair, path)

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
        name, pairs = path.stem, _read_pairs(path, comps)
        adapter = LoraAdapter(ref, name, _assign(pairs, comps, name), a1111_lora_hash(path))
    adapter.fuse()
    return adapter


def _read_pairs(path: Path, comps: Components) -> dict[str, LoraPair]:
    """Keys as diffusers names them (`unet.<module>`, `text_encoder.<module>`...) -> their LoRA pair."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ModelLoadError(f"LoRA {path}: not a readable .safetensors file ({exc})") from None
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(raw, unet_config=comps.unet.config)
    alphas = dict(alphas or {})
    pairs: dict[str, LoraPair] = {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, part = _module_of(key)
        if module is None:
            if not key.endswith(".alpha"):
                raise UsageError(f"LoRA {path.name}: key '{key}' is not a LoRA weight this tool can read")
            alphas[key] = float(tensor)
            continue
        halves.setdefault(module, {})["down" if part in _DOWN_PARTS else "up"] = tensor
        for alpha_key in (f"{key}.alpha", key.rsplit(".", 2)[0] + ".alpha"):
            if part in _DOWN_PARTS and alpha_key in alphas:
                halves[module]["alpha"] = torch.tensor(float(alphas[alpha_key]))
    for module, parts in halves.items():
        if "down" not in parts or "up" not in parts:
            raise UsageError(f"LoRA {path.name}: {module} has only one half of its pair")
        alpha = parts.get("alpha")
        pairs[module] = LoraPair(parts["down"], parts["up"], None if alpha is None else float(alpha))
    if not pairs:
        raise UsageError(f"LoRA {path.name} has no LoRA weights")
    return pairs


def _module_of(key: str) -> tuple[str | None, str]:
    for pattern, template in _KEY_LAYOUTS:
        match = pattern.match(key)
        if match is None:
            continue
        part = match["part"]
        if template == "proc":
            return f"{match['m']}.{_PROC_TARGET[match['p']]}", part
        if template == "te":
            return f"{match['m']}.{_TE_TARGET[match['p']]}", part
        return match["m"], part
    return None, ""


def _assign(pairs: dict[str, LoraPair], comps: Components, name: str) -> dict[nn.Module, dict[str, LoraPair]]:
    """Split `prefix.module` keys over the UNet and text encoders; a key that matches no module is an error."""
    roots: dict[str, nn.Module] = {"unet": comps.unet}
    for i, encoder in enumerate(comps.text_encoders):
        roots["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
    targets: dict[nn.Module, dict[str, LoraPair]] = {}
    missing = []
    for key, pair in pairs.items():
        prefix, _, path = key.partition(".")
        root = roots.get(prefix)
        if root is None and prefix not in ("unet", "text_encoder", "text_encoder_2"):
            root, path = comps.unet, key  # old attention-processor files name UNet modules without a prefix
        if root is None:
            missing.append(key)
            continue
        found = _existing_path(root, path)
        if found is None:
            missing.append(key)
            continue
        targets.setdefault(root, {})[found] = pair
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        matched = sum(len(v) for v in targets.values())
        raise UsageError(
            f"LoRA {name}: {len(missing)} of {len(pairs)} modules match nothing in this model ({shown}); "
            f"{matched} matched. Is it a LoRA for another model family?"
        )
    return targets


def _existing_path(root: nn.Module, path: str) -> str | None:
    """`path` if `root` has it; files name CLIP modules `text_model.<...>`, which transformers 5 flattened away."""
    candidates = [path]
    if path.startswith(TEXT_MODEL_PREFIX):
        candidates.append(path[len(TEXT_MODEL_PREFIX) :])
    for candidate in candidates:
        try:
            root.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def tiny_lora(unet: nn.Module, rank: int = TINY_RANK) -> dict[str, LoraPair]:
    """Random LoRA pairs (seeded) on every attention projection of a UNet: the built-in `--lora tiny`."""
    generator = torch.Generator().manual_seed(TINY_SEED)
    pairs = {}
    for name, module in unet.named_modules():
        if not name.endswith((".attn1", ".attn2")):
            continue
        for target in TINY_TARGETS:
            layer = module.get_submodule(target)
            out_features, in_features = layer.weight.shape
            down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            up = torch.randn(out_features, rank, generator=generator) * 0.5
            pairs[f"{name}.{target}"] = LoraPair(down, up, float(rank))
    return pairs
