"""Reading LoRA-family files into one network per module of the model (networks.py), in the layouts users
download them in:

- kohya/A1111/LyCORIS: `<prefix><module>.<part>` keys. The prefix says which model (`lora_unet_`, `lora_te_`,
  SDXL's `lora_te1_`/`lora_te2_`), the module is the model's module path with dots as underscores (SDXL files from
  kohya's trainer name the original SGM UNet's blocks, `input_blocks_4_1_...`: diffusers' own converter maps the
  names), and the parts say what kind of network it is (docs/lora-formats.md). A part this tool does not know is
  a named error, never dropped.
- diffusers/PEFT (`unet....lora_A.weight`) and diffusers' older attention-processor layout: plain LoRA pairs,
  read through diffusers' converter (`lora_state_dict`).

A module the file names that the model does not have is an error naming it (a LoRA for another family).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...base.errors import ModelLoadError, UsageError
from .networks import Decomposed, FullDiff, Hadamard, Kronecker, LowRank, Network

if TYPE_CHECKING:
    from ..loading import Components

TEXT_MODEL_PREFIX = "text_model."

PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KIND_PARTS = {
    "LoRA": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LoKr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2"),
    "full": ("diff", "diff_b"),
}
SHARED_PARTS = ("alpha", "dora_scale")
# Parts of LyCORIS network kinds this tool does not merge, by the name a person knows them by.
OTHER_KINDS = {
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "oft_R": "BOFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "on_input": "IA3",
    "weight": "IA3",
    "w_norm": "norm-layer",
    "b_norm": "norm-layer",
}
KNOWN = "LoRA, LoCon, LoHa, LoKr, full and DoRA networks are"


def is_kohya(keys: list[str]) -> bool:
    """Whether a file's keys are in the kohya/A1111 layout (every key under one of its prefixes)."""
    return bool(keys) and all(key.startswith(PREFIXES) and "." in key for key in keys)


def read_networks(state: Mapping[str, torch.Tensor], name: str) -> dict[str, Network]:
    """kohya module name (`lora_unet_..._to_q`) -> its network."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, part = key.partition(".")
        parts.setdefault(module, {})[part] = tensor
    return {module: _network(module, found, name) for module, found in parts.items()}


def _network(module: str, parts: dict[str, torch.Tensor], name: str) -> Network:
    known = {p for names in KIND_PARTS.values() for p in names} | set(SHARED_PARTS)
    unknown = [part for part in parts if part not in known]
    if unknown:
        kind = next((OTHER_KINDS[p] for p in unknown if p in OTHER_KINDS), None)
        what = f"part of {kind}, a network kind this tool cannot merge" if kind else "not a part this tool knows"
        raise UsageError(f"LoRA {name}: {module}.{unknown[0]} is {what} ({KNOWN})")
    kinds = [kind for kind, names in KIND_PARTS.items() if any(p in parts for p in names)]
    if len(kinds) != 1:
        what = "no weights, only " + ", ".join(parts) if not kinds else "parts of " + " and ".join(kinds)
        raise UsageError(f"LoRA {name}: {module} has {what}; one network per module is expected")
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    try:
        inner = _BUILDERS[kinds[0]](parts, alpha)
    except KeyError as exc:
        raise UsageError(f"LoRA {name}: {module} lacks its part {exc.args[0]} ({kinds[0]})") from None
    return Decomposed(inner, parts["dora_scale"]) if "dora_scale" in parts else inner


def _low_rank(parts: dict[str, torch.Tensor], alpha: float | None) -> Network:
    return LowRank(parts["lora_down.weight"], parts["lora_up.weight"], alpha, parts.get("lora_mid.weight"))


def _hadamard(parts: dict[str, torch.Tensor], alpha: float | None) -> Network:
    tucker = (parts["hada_t1"], parts["hada_t2"]) if "hada_t1" in parts or "hada_t2" in parts else (None, None)
    w1a, w1b, w2a, w2b = (parts[f"hada_w{i}_{half}"] for i in (1, 2) for half in ("a", "b"))
    return Hadamard(w1a, w1b, w2a, w2b, alpha=alpha, t1=tucker[0], t2=tucker[1])


def _kronecker(parts: dict[str, torch.Tensor], alpha: float | None) -> Network:
    if "lokr_t1" in parts:
        raise KeyError("lokr_w1 (a Tucker first factor is not a LoKr layout LyCORIS writes)")
    factors: dict[str, Any] = {}
    for i in (1, 2):
        whole = parts.get(f"lokr_w{i}")
        factors[f"w{i}"] = whole
        factors[f"w{i}a"] = None if whole is not None else parts[f"lokr_w{i}_a"]
        factors[f"w{i}b"] = None if whole is not None else parts[f"lokr_w{i}_b"]
    return Kronecker(**factors, t2=parts.get("lokr_t2"), alpha=alpha)


def _full(parts: dict[str, torch.Tensor], alpha: float | None) -> Network:
    return FullDiff(parts["diff"], parts.get("diff_b"))


_BUILDERS = {"LoRA": _low_rank, "LoHa": _hadamard, "LoKr": _kronecker, "full": _full}


def _module_keys(modules: list[str], unet_config: Any) -> dict[str, str]:
    """kohya module name -> `unet.<path>` / `text_encoder.<path>` / `text_encoder_2.<path>`, as diffusers' own
    converter maps kohya names (SGM block names included): each name is run through it as a stand-in LoRA pair
    whose value says which name it was."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    stand_ins: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        marker = torch.tensor([float(index)])
        stand_ins[f"{module}.lora_down.weight"] = marker
        stand_ins[f"{module}.lora_up.weight"] = marker
    converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(stand_ins, unet_config=unet_config)
    found: dict[str, str] = {}
    for key, marker in converted.items():
        path, _ = _module_of(key)
        if path is not None:
            found[modules[int(marker.item())]] = path
    return found


# --- diffusers' layouts ------------------------------------------------------------------------------------------
# (pattern, module path template): where a LoRA pair's down/up weights sit, by key layout.
_KEY_LAYOUTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<m>.+)\.lora_(?P<part>A|B)\.weight$"), "{m}"),  # diffusers / PEFT
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"), "proc"),
    (re.compile(r"^(?P<m>.+)\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"), "te"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.(?P<part>down|up)\.weight$"), "{m}"),  # converted kohya
)
_PROC_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_TARGET = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DOWN_PARTS = ("A", "down")


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


def _diffusers_networks(raw: dict[str, torch.Tensor], comps: Components, name: str) -> dict[str, Network]:
    """`unet.<module>` / `text_encoder.<module>`... -> its LoRA pair, for the diffusers and PEFT layouts."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(raw, unet_config=comps.unet.config)
    alphas = dict(alphas or {})
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, part = _module_of(key)
        if module is None:
            if not key.endswith(".alpha"):
                raise UsageError(f"LoRA {name}: key '{key}' is not a LoRA weight this tool can read")
            alphas[key] = float(tensor)
            continue
        halves.setdefault(module, {})["down" if part in _DOWN_PARTS else "up"] = tensor
        for alpha_key in (f"{key}.alpha", key.rsplit(".", 2)[0] + ".alpha"):
            if part in _DOWN_PARTS and alpha_key in alphas:
                halves[module]["alpha"] = torch.tensor(float(alphas[alpha_key]))
    networks: dict[str, Network] = {}
    for module, parts in halves.items():
        if "down" not in parts or "up" not in parts:
            raise UsageError(f"LoRA {name}: {module} has only one half of its pair")
        alpha = parts.get("alpha")
        networks[module] = LowRank(parts["down"], parts["up"], None if alpha is None else float(alpha))
    return networks


# --- a file -> the model's modules -------------------------------------------------------------------------------


def read_file(path: Path, comps: Components) -> dict[nn.Module, dict[str, Network]]:
    """A LoRA-family file's networks, by the model part (UNet, text encoders) and module path they change."""
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ModelLoadError(f"LoRA {path}: not a readable .safetensors file ({exc})") from None
    name = path.stem
    if is_kohya(list(raw)):
        by_module = read_networks(raw, name)
        keys = _module_keys(list(by_module), comps.unet.config)
        unmapped = [module for module in by_module if module not in keys]
        networks = {keys[module]: net for module, net in by_module.items() if module in keys}
        networks.update({module: by_module[module] for module in unmapped})  # named as missing by _assign
    else:
        networks = _diffusers_networks(raw, comps, name)
    if not networks:
        raise UsageError(f"LoRA {name} has no LoRA weights")
    return assign(networks, comps, name)


def assign(networks: dict[str, Network], comps: Components, name: str) -> dict[nn.Module, dict[str, Network]]:
    """Split `prefix.module` keys over the UNet and text encoders; a key that matches no module is an error."""
    roots: dict[str, nn.Module] = {"unet": comps.unet}
    for i, encoder in enumerate(comps.text_encoders):
        roots["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
    targets: dict[nn.Module, dict[str, Network]] = {}
    missing = []
    for key, network in networks.items():
        prefix, _, path = key.partition(".")
        root = roots.get(prefix)
        if root is None and prefix not in ("unet", "text_encoder", "text_encoder_2"):
            root, path = comps.unet, key  # old attention-processor files name UNet modules without a prefix
        found = None if root is None else _existing_path(root, path)
        if root is None or found is None:
            missing.append(key)
            continue
        targets.setdefault(root, {})[found] = network
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        matched = sum(len(v) for v in targets.values())
        raise UsageError(
            f"LoRA {name}: {len(missing)} of {len(networks)} modules match nothing in this model ({shown}); "
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
