"""IP-Adapters as an adapter kind: `--ip-adapter SRC[:SCALE]` with `--ip-image IMAGE` (one per job): a reference
image steers the picture like a prompt, through extra keys and values in every cross-attention. Finding the
weight file (a file, an h94/IP-Adapter folder or hub repo: the family's file), what can be refused before the
model loads, and what the image encoder costs are here; installing it is adapter.py."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...base.errors import InputImageError, ModelLoadError, UnsafeFileError, UsageError
from ...base.job import Job
from ...base.settings import IP_PANEL, WITH_BENCH, AdapterRef, Setting
from ...io.hashing import content_digest
from ...io.images import open_image
from ..adapter_kind import AdapterKind
from ..families import Family, family_of_width, safetensors_shapes
from ..hub import PICKLE_SUFFIXES, fetch_snapshot, looks_like_hub_id

if TYPE_CHECKING:
    from ..adapter_kind import Adapter
    from ..loading import Components


KIND = "ip_adapters"


TINY = "tiny"
IP_TOKEN_CHUNK = 1 << 20  # query tokens per cross-attention call (attention.py): its temporaries stop growing there


SAFETENSORS = ".safetensors"


PICKLE_SUFFIX = ".bin"  # h94's older files


ENCODER_FOLDER = "image_encoder"


# The weight file h94/IP-Adapter has for each family's shipped configs (families.Family.configs): (folder, file).
DEFAULT_WEIGHTS: dict[str, tuple[str, str]] = {
    "sd1": ("models", "ip-adapter_sd15.safetensors"),
    "sdxl": ("sdxl_models", "ip-adapter_sdxl.safetensors"),
}


VIT_H_FOLDER = "models"  # h94's SDXL "vit-h" files read the ViT-H encoder of the SD-1.5 folder


# --- finding the files --------------------------------------------------------------------------------------
def _split_hub(source: str) -> tuple[str, str | None] | None:
    """`owner/name` or `owner/name/path/in/repo.safetensors` -> (repo id, path in repo or None); None if the text
    is not shaped like one."""
    parts = source.split("/")
    if len(parts) == 2 and looks_like_hub_id(source):
        return source, None
    if len(parts) > 2 and source.endswith(".safetensors") and looks_like_hub_id("/".join(parts[:2])):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return None


def _default_weights(source: str, family: Family | None) -> tuple[str, str]:
    if family is None:
        raise UsageError(
            f"IP-Adapter '{source}': the model's family is not known yet, so the weight file cannot be picked; "
            "give the weight file itself (FOLDER/models/ip-adapter_sd15.safetensors)"
        )
    if family.configs not in DEFAULT_WEIGHTS:
        raise UsageError(
            f"IP-Adapter '{source}': h94/IP-Adapter has no weights for {family.label}; give a weight file made for "
            "it (.safetensors with an image_encoder/ folder beside it)"
        )
    return DEFAULT_WEIGHTS[family.configs]


def encoder_paths(weights: str) -> list[str]:
    """Where a weight file's image encoder may be: `image_encoder/` beside it, then (h94's SDXL `vit-h` files, which
    read the SD-1.5 folder's ViT-H) `../models/image_encoder/`."""
    folder = Path(weights).parent
    candidates = [folder / ENCODER_FOLDER, folder.parent / VIT_H_FOLDER / ENCODER_FOLDER]
    return [str(c) for c in dict.fromkeys(candidates)]


def find_weights(source: str, family: Family | None) -> Path:
    """The weight file `source` names (a file, a folder, or a hub repo: fetched with the image encoders beside)."""
    path = Path(source).expanduser()
    if path.is_file():
        return _weight_file(path)
    if path.is_dir():
        return _weight_file(_weights_in_folder(path, source, family))
    hub = _split_hub(source)
    if hub is None:
        raise UsageError(_not_found(source))
    repo, inside = hub
    if inside is None:
        sub, name = _default_weights(source, family)
        inside = f"{sub}/{name}"
    encoders = encoder_paths(inside)
    patterns = [inside] + [f"{e}/{f}" for e in encoders for f in ("config.json", "model.safetensors")]
    folder = fetch_snapshot(repo, what="IP-Adapter", allow_patterns=patterns)
    if not (folder / inside).is_file():
        raise ModelLoadError(f"IP-Adapter '{source}': the hub repo {repo} has no file {inside}")
    return _weight_file(folder / inside)


def _not_found(source: str) -> str:
    head, sep, tail = source.rpartition(":")
    if sep and head and tail and not any(c in tail for c in "/\\"):
        return f"--ip-adapter '{source}': the scale '{tail}' is not a number (SRC:SCALE, e.g. {head}:0.6)"
    return (
        f"IP-Adapter '{source}' does not exist: give a .safetensors weight file (with an image_encoder/ folder "
        "beside it), a folder in h94/IP-Adapter's layout, a hub id, or tiny"
    )


def _weights_in_folder(folder: Path, source: str, family: Family | None) -> Path:
    """h94's root (`models/`, `sdxl_models/`) or one of those folders: the family's file; another folder: its one
    weight file."""
    default = DEFAULT_WEIGHTS.get(family.configs) if family is not None else None
    if default is not None:
        sub, name = default
        for candidate in (folder / sub / name, folder / name):
            for file in (candidate, candidate.with_suffix(PICKLE_SUFFIX)):  # h94's older .bin beside it
                if file.is_file():
                    return file
    if any((folder / sub).is_dir() for sub, _ in DEFAULT_WEIGHTS.values()):
        sub, name = _default_weights(source, family)  # says why when the family has no file there
        raise UsageError(f"IP-Adapter '{source}': no {sub}/{name} in {folder} (the file for this model's family)")
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    names = ", ".join(f.name for f in files) or "none"
    raise UsageError(
        f"IP-Adapter folder '{source}' holds {len(files)} .safetensors files ({names}); give the weight file itself"
    )


def _weight_file(weights: Path) -> Path:
    if weights.suffix.lower() not in (SAFETENSORS, *PICKLE_SUFFIXES):
        raise UsageError(f"IP-Adapter '{weights.name}': unknown weight file type; give a .safetensors file")
    return weights


def pickle_refused(path: Path) -> UnsafeFileError:
    return UnsafeFileError(
        f"IP-Adapter '{path.name}' is a pickle, which can run arbitrary code when loaded; we only read safetensors "
        "(h94/IP-Adapter ships a .safetensors file beside each .bin), or pass --allow-pickle to load it with "
        "torch's weights-only loader"
    )


def cross_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The text width an IP-Adapter was made for, from its first cross-attention key's shape (hidden, width)."""
    for key in ("ip_adapter.1.to_k_ip.weight", "1.to_k_ip.weight"):
        if key in shapes:
            return int(shapes[key][1])
    return None


def check_fits(source: str, model: str, ip_width: int | None, model_width: int) -> None:
    if ip_width is not None and ip_width != model_width:
        raise UsageError(
            f"IP-Adapter '{source}' is made for {family_of_width(ip_width)}, but the model '{model}' is "
            f"{family_of_width(model_width)}: use an IP-Adapter made for the model's family"
        )


# --- before any model loads ---------------------------------------------------------------------------------
# What h94/IP-Adapter adds on the device for each family, GiB in fp16: its image encoder, ViT-H
# (models/image_encoder, 632M parameters) or ViT-bigG (sdxl_models/image_encoder, 1.84B), with the projection
# (in CPU memory while the stages run with --low-vram), and the adapter's own key/value layers on every
# cross-attention (SDXL has 70). As `plan --simulate` holds them: 1.18 + 0.04 and 3.44 + 0.65.
ENCODER_GIB_FP16: dict[str, float] = {"sd1": 1.22, "sdxl": 3.45}
LAYERS_GIB_FP16: dict[str, float] = {"sd1": 0.04, "sdxl": 0.65}


def _planned_gib_fp16(refs: list[AdapterRef], family: Family | None, low_vram: bool) -> float:
    """The weights a job's IP-Adapter adds on the device while the stages run, for plans made before anything
    loads: the family's h94 image encoder (unless --low-vram moves it out) and the adapter's layers (none for the
    built-in tiny models and the tiny adapter)."""
    refs = [r for r in refs if r.source != TINY]
    if not refs or family is None or family.linfusion_repo is None:
        return 0.0
    key = family.configs if family.configs in ENCODER_GIB_FP16 else "sd1"
    return LAYERS_GIB_FP16[key] + (0.0 if low_vram else ENCODER_GIB_FP16[key])


def _preflight(refs: list[AdapterRef], job: Job, family: Family | None, allow_pickle: bool) -> None:
    """What can be refused before the model loads: no --ip-image, an unreadable one, a weight file that is not
    there, or made for another family than the model's (where both configs can be read locally)."""
    if not job.ip_image:
        raise UsageError("--ip-adapter needs --ip-image: the reference image it reads")
    try:
        with open_image(job.ip_image):
            pass
    except InputImageError as exc:
        raise InputImageError(f"--ip-image: {exc}") from None
    for ref in refs:
        if ref.source == TINY:
            continue
        weights = _local_weights(ref.source, family)
        if weights is not None and weights.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise pickle_refused(weights)
        if weights is None or family is None or weights.suffix.lower() != SAFETENSORS:
            continue  # a pickle's width is known once it is read (with --allow-pickle)
        check_fits(ref.source, job.model, cross_width(safetensors_shapes(weights)), family.cross_attention_dim)


def _hub_files(refs: list[AdapterRef], family: Family | None) -> list[tuple[str, str, str]]:
    """(what, repo, file) of the hub weight files the job's IP-Adapter needs, for offline checks."""
    wanted = []
    for ref in refs:
        hub = None if ref.source == TINY or Path(ref.source).expanduser().exists() else _split_hub(ref.source)
        if hub is None:
            continue
        repo, inside = hub
        if inside is None and family is not None and family.configs in DEFAULT_WEIGHTS:
            inside = "/".join(DEFAULT_WEIGHTS[family.configs])
        if inside is not None:
            wanted.append(("IP-Adapter", repo, inside))
    return wanted


def _local_weights(source: str, family: Family | None) -> Path | None:
    """The weight file, where it is on this machine without downloading (a path, or the hub cache)."""
    path = Path(source).expanduser()
    if path.exists():
        return find_weights(source, family) if family is not None or path.is_file() else None
    hub = _split_hub(source)
    if hub is None:
        raise UsageError(_not_found(source))
    if family is None and hub[1] is None:
        return None
    from huggingface_hub import try_to_load_from_cache  # lazy: hub code only when it is asked

    repo, inside = hub
    cached = try_to_load_from_cache(repo, inside or "/".join(_default_weights(source, family)))
    return Path(cached) if isinstance(cached, str) else None


class IpAdapterKind(AdapterKind):
    name = KIND
    label = "IP-Adapter"
    described_as = KIND
    ref_setting = "ip_adapter"
    settings = (
        Setting(
            "ip_adapter",
            "refs",
            help="An IP-Adapter: --ip-image then steers the picture like a prompt. A folder in h94/IP-Adapter's "
            "layout or that hub id (the file for the model's family is picked), a .safetensors weight file with its "
            "image_encoder/ folder beside it, or tiny (built-in, random); :SCALE weights it \\[default scale: 1].",
            panel=IP_PANEL,
            commands=WITH_BENCH,
            check=lambda v: None if len(v) <= 1 else "takes one IP-Adapter per image; give it once",
            metavar="SRC[:SCALE]",
        ),
        Setting(
            "ip_image",
            "str",
            help="The reference image the --ip-adapter reads (embedded once per image, for every stage).",
            panel=IP_PANEL,
            commands=WITH_BENCH,
            metavar="IMAGE",
            key_of=content_digest,
            path=True,  # the image, not where it is: an edited file is another job, a moved one is not
        ),
    )
    fields_rank = 1

    def preflight(self, job: Job, family: Family | None, allow_pickle: bool) -> None:
        _preflight(self.refs(job), job, family, allow_pickle)

    def refuse_orphans(self, job: Job) -> None:
        if job.ip_image:
            raise UsageError("--ip-image is the IP-Adapter's reference image: give --ip-adapter too")

    def hub_files(self, job: Job, family: Family | None) -> list[tuple[str, str, str]]:
        return _hub_files(self.refs(job), family)

    def planned_gib_fp16(self, job: Job, family: Family | None, family_gib: float) -> float:
        return _planned_gib_fp16(self.refs(job), family, job.low_vram)

    def plan_entries(self, job: Job) -> list[dict[str, Any]]:
        return [{"source": ref.source, "scale": ref.scale, "image": job.ip_image} for ref in self.refs(job)]

    def plan_line(self, entry: Mapping[str, Any]) -> str:
        return f"IP-Adapter {entry['source']} at scale {entry['scale']:g} on {entry['image']}"

    def a1111_fields(self, described: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """`IP-Adapter: "ip-adapter_sd15, Weight: 0.6"` for the IP-Adapter that ran (named by its weight file)."""
        return [
            ("IP-Adapter", f'"{Path(str(a.get("weights") or a["source"])).stem}, Weight: {a["scale"]:g}"')
            for a in described
        ]

    def load(self, comps: Components, ref: AdapterRef) -> Adapter:
        from .adapter import load  # lazy: torch stays out of CLI start-up

        return load(comps, ref)

    simulates = True
    memory_key = "ip_adapter"
    memory_cap = IP_TOKEN_CHUNK

    def simulated(self, comps: Components, ref: AdapterRef) -> Adapter:
        from .adapter import build_meta  # lazy: torch stays out of CLI start-up

        return build_meta(comps, ref)


IP_ADAPTER = IpAdapterKind()
