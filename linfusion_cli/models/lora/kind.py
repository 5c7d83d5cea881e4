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
from ...io.folders import files_by_name, find_by_name, search_folders
from ..adapter_kind import AdapterKind
from ..families import Family, family_of_width, safetensors_shapes
from ..hub import looks_like_hub_id, resolve_local_or_hub

if TYPE_CHECKING:
    from ..adapter_kind import Adapter
    from ..loading import Components

TINY = "tiny"  # the built-in random LoRA on every attention projection
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors",)  # diffusers' name; else the folder's one .safetensors
LORA_DIR_ENV = "LINFUSION_LORA_DIR"
LORA_DIR_DEFAULT = "loras"  # under the user's linfusion folder: ~/.config/linfusion/loras
LORA_SUFFIXES = (".safetensors",)


def lora_folders(job: Job) -> list[Path]:
    return search_folders(job.lora_dir, LORA_DIR_ENV, LORA_DIR_DEFAULT)


def _by_name(job: Job, name: str, found: dict[str, Path] | None = None) -> Path:
    folders = lora_folders(job)
    return find_by_name(name, files_by_name(folders, LORA_SUFFIXES) if found is None else found, "LoRA", folders)


def _concrete(job: Job, ref: AdapterRef) -> AdapterRef:
    """A ref naming a LoRA by its file name (`--lora NAME`, as a tag does): the file in the LoRA folders. A path, a
    hub id or the built-in `tiny` as it is."""
    source = ref.source
    if source == TINY or looks_like_hub_id(source) or Path(source).expanduser().exists():
        return ref
    if "/" in source or ":" in source or source.endswith(".safetensors"):
        return ref  # a path that does not exist (or a scale that is no number): the preflight says which
    return AdapterRef(str(_by_name(job, source)), ref.scale)


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


# The parts whose second side is a cross-attention key projection's input width (the text encoder's), or a factor
# of it (LoKr: the two factors' second sides multiply).
WIDTH_PARTS = ("lora_down_weight", "lora_A_weight", "hada_w1_b", "diff")
LOKR_FIRST, LOKR_SECOND = ("lokr_w1", "lokr_w1_b"), ("lokr_w2", "lokr_w2_b")


def lora_cross_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The text width a LoRA was trained against: the input width of a cross-attention key projection, from its
    down (A) weight in kohya (`..._attn2_to_k.lora_down.weight`) or diffusers (`...attn2.to_k.lora_A.weight`) names,
    or from a LyCORIS network's factors (LoHa, LoKr, full)."""
    lokr: dict[str, int] = {}
    for key, shape in shapes.items():
        flat = key.replace(".", "_")
        if "attn2_to_k" not in flat or len(shape) != 2:
            continue
        if flat.endswith(WIDTH_PARTS):
            return int(shape[1])
        for half, parts in (("first", LOKR_FIRST), ("second", LOKR_SECOND)):
            if flat.endswith(parts):
                lokr[half] = int(shape[1])
        if len(lokr) == 2:
            return lokr["first"] * lokr["second"]
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
    tag_names = ("lora", "lyco")
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
        Setting(
            "lora_dir",
            "texts",
            None,
            help="A folder of LoRAs (repeatable) where a prompt's <lora:NAME:WEIGHT> tags and --lora NAME find "
            f"NAME.safetensors, sub-folders too; then ${LORA_DIR_ENV}, then ~/.config/linfusion/{LORA_DIR_DEFAULT}.",
            panel=MODEL_PANEL,
            commands=WITH_BENCH,
            in_key=False,  # the files it finds are what the key records (lora)
            path=True,
            metavar="DIR",
        ),
    )
    fields_rank = 0

    def resolve(self, job: Job, tags: list[tuple[str, float]]) -> None:
        """Tags (`<lora:NAME:W>`, `<lyco:...>`) become refs to the files they name, after the job's own; refs by
        name become their files (the built-in `tiny` is a tag's last resort, for the tiny models)."""
        refs = [str(_concrete(job, ref)) for ref in self.refs(job)]
        found = files_by_name(lora_folders(job), LORA_SUFFIXES) if tags else {}
        for name, weight in tags:
            try:
                path = str(_by_name(job, name, found))
            except UsageError:
                if name != TINY:
                    raise
                path = TINY
            refs.append(str(AdapterRef(path, weight)))
        setattr(job, self.ref_setting, refs or getattr(job, self.ref_setting))

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
