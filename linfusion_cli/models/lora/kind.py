"""LoRAs as an adapter kind: `--lora SRC[:SCALE]` (repeatable), job field and preset key `lora`. Files come the
ways users download them (kohya/A1111, diffusers/PEFT, diffusers' older attention-processor layout), safetensors
only; a LoRA is fused into the weights it targets (fuse.py), so it costs nothing per step and adds no memory,
and `<lora:name:scale>` tags and `Lora hashes` go into the image's parameters as A1111 writes them."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...base.errors import ModelLoadError, UsageError
from ...base.job import Job
from ...base.settings import MODEL_PANEL, WITH_BENCH, AdapterRef, Setting
from ..adapter_kind import AdapterKind
from ..families import Family, family_of_width, safetensors_shapes
from ..hub import looks_like_hub_id, resolve_local_or_hub

if TYPE_CHECKING:
    from ..adapter_kind import Adapter
    from ..loading import Components

TINY = "tiny"  # the built-in random LoRA on every attention projection


LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors",)  # diffusers' name; else the folder's one .safetensors


def _preflight(job: Job, family: Family | None) -> None:
    """Before the model loads: each LoRA that is not a hub id exists, is a readable .safetensors file, and was
    made for the model's family (its cross-attention key's input width against the family's). Hub LoRAs are
    checked once fetched."""
    for text in job.lora or ():
        ref = AdapterRef.parse(text)
        if ref.source == "tiny" or looks_like_hub_id(ref.source):
            continue
        if not Path(ref.source).expanduser().exists():
            head, sep, tail = ref.source.rpartition(":")
            if sep and (head == "tiny" or Path(head).expanduser().exists()):
                raise UsageError(
                    f"--lora {ref.source}: the scale '{tail}' is not a number (SRC:SCALE, e.g. {head}:0.8)"
                )
            raise UsageError(f"LoRA '{ref.source}' does not exist: give a .safetensors file, a folder or a hub id")
        path = lora_file(ref.source)
        try:
            shapes = safetensors_shapes(path)
        except ModelLoadError as exc:
            raise UsageError(f"LoRA {exc}") from None
        width = lora_cross_width(shapes)
        if family is not None and width is not None and width != family.cross_attention_dim:
            raise UsageError(
                f"LoRA '{ref.source}' is made for {family_of_width(width)}, but the model '{job.model}' is "
                f"{family_of_width(family.cross_attention_dim)}: use a LoRA made for the model's family"
            )


def lora_cross_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The text width a LoRA was trained against: the input width of a cross-attention key projection's down
    (A) weight, in kohya (`..._attn2_to_k.lora_down.weight`) or diffusers (`...attn2.to_k.lora_A.weight`) names."""
    for key, shape in shapes.items():
        flat = key.replace(".", "_")
        if "attn2_to_k" in flat and flat.endswith(("lora_down_weight", "lora_A_weight")) and len(shape) == 2:
            return int(shape[1])
    return None


def lora_file(source: str) -> Path:
    path = resolve_local_or_hub(source, what="LoRA", allow_patterns=["*.safetensors", "*.json"])
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UsageError(
                f"LoRA '{source}': only .safetensors files are read, whatever --allow-pickle says (pickled weights "
                "can run code); convert it to .safetensors first"
            )
        return path
    for name in LORA_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        what = "no .safetensors file" if not found else f"{len(found)} .safetensors files ({found[0].name}, ...)"
        raise UsageError(f"LoRA folder '{source}' has {what}: name the file itself")
    return found[0]


def a1111_lora_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash: sha256 of a .safetensors file's tensor bytes (after its JSON header), first
    12 hex digits, so edits to the metadata header do not change it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class LoraKind(AdapterKind):
    name = "loras"
    label = "LoRA"
    described_as = "lora"
    ref_setting = "lora"
    settings = (
        Setting(
            "lora",
            "refs",
            help="A LoRA to fuse into the model (repeatable): .safetensors file, folder or hub id in kohya/A1111 or "
            "diffusers format, or tiny (built-in, random); :SCALE weights it \\[default scale: 1].",
            panel=MODEL_PANEL,
            commands=WITH_BENCH,
            metavar="SRC[:SCALE]",
        ),
    )
    fields_rank = 0

    def preflight(self, job: Job, family: Family | None, allow_pickle: bool) -> None:
        _preflight(job, family)

    def plan_line(self, entry: Mapping[str, Any]) -> str:
        return f"LoRA {entry['source']} at scale {entry['scale']:g} (fused)"

    def a1111_fields(self, described: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """A1111's `Lora hashes: "name: hash, ..."` for the LoRAs read from files."""
        hashed = [f"{a['name']}: {a['hash']}" for a in described if a.get("hash")]
        return [("Lora hashes", f'"{", ".join(hashed)}"')] if hashed else []

    def prompt_tags(self, described: list[dict[str, Any]]) -> list[str]:
        # A1111 keeps a LoRA as a <lora:name:weight> tag in the prompt; its readers find the LoRA there.
        return [f"<lora:{a['name']}:{a['scale']:g}>" for a in described]

    def load(self, comps: Components, ref: AdapterRef) -> Adapter:
        from .fuse import load  # lazy: torch stays out of CLI start-up

        return load(comps, ref)


LORA = LoraKind()
