"""IP-Adapter: a reference image as a prompt, through extra keys and values in every cross-attention (`attn2`).

The weights come in the layout users download (h94/IP-Adapter): a `.safetensors` file holding `image_proj.*`
(a CLIP image embedding -> a few tokens of the text width) and `ip_adapter.{k}.to_k_ip/to_v_ip.weight`, where k
counts every attention processor in diffusers' module order, so the i-th `attn2` owns k = 2i + 1; beside it an
`image_encoder/` folder (a CLIPVisionModelWithProjection).

It is installed as diffusers installs it (its IP-Adapter processor on each `attn2`, run over chunks of query
tokens at high resolution: ip_attention.py; the projection as the UNet's `encoder_hid_proj`; image embeddings
in `added_cond_kwargs`), but on the `attn2` modules by name only: LinFusion's `attn1` modules are not diffusers
`Attention`s and are never looked at. The CLIP embedding is made once per job (`begin_job`); `remove()` puts
back every processor, the projection and the config value.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..base.errors import InputImageError, ModelLoadError, UnsafeFileError, UsageError
from .families import Family, family_of_width, safetensors_shapes
from .hub import fetch_snapshot
from .loading import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from ..base.plan import StagePlan
    from ..core.config import AdapterRef, JobSpec
    from ..engine.sampling import UNetExtra
    from .loading import Components

log = logging.getLogger(__name__)

KIND = "ip_adapters"
TINY = "tiny"
TINY_SEED = 0  # the built-in IP-Adapter is the same on every run and every machine
CROSS_ATTENTION_SUFFIX = ".attn2"
SAFETENSORS = ".safetensors"
PICKLE_SUFFIX = ".bin"  # h94's older files
ENCODER_FOLDER = "image_encoder"
# The weight file h94/IP-Adapter has for each family's shipped configs (families.Family.configs): (folder, file).
DEFAULT_WEIGHTS: dict[str, tuple[str, str]] = {
    "sd1": ("models", "ip-adapter_sd15.safetensors"),
    "sdxl": ("sdxl_models", "ip-adapter_sdxl.safetensors"),
}
VIT_H_FOLDER = "models"  # h94's SDXL "vit-h" files read the ViT-H encoder of the SD-1.5 folder
# Keys in `image_proj` that tell the variants apart (as diffusers' converter does).
BASIC_KEY = "proj.weight"  # IP-Adapter: CLIP image_embeds -> 4 tokens
FULL_KEY = "proj.3.weight"  # IP-Adapter Full Face: penultimate hidden states, 257 tokens
PLUS_KEY = "latents"  # IP-Adapter Plus: penultimate hidden states through a resampler
FACEID_KEYS = ("perceiver_resampler.proj_in.weight", "norm.weight")
BASIC_TOKENS = 4
FULL_TOKENS = 257
TINY_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}


# --- finding the files --------------------------------------------------------------------------------------
def _split_hub(source: str) -> tuple[str, str | None] | None:
    """`owner/name` or `owner/name/path/in/repo.safetensors` -> (repo id, path in repo or None); None if the text
    is not shaped like one."""
    from .hub import looks_like_hub_id

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


def _encoder_paths(weights: str) -> list[str]:
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
    encoders = _encoder_paths(inside)
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


# --- reading and checking the weights -----------------------------------------------------------------------
def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """A weight file split into its `image_proj` and `ip_adapter` parts (h94's two state dicts): flat keys
    `image_proj.*` / `ip_adapter.*` in a .safetensors file, or the two dicts pickled in a .bin (read only with
    --allow-pickle, by torch's weights-only loader, as models.py reads pickled checkpoints)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from .loading import _check_weights_only

        if not allow_pickle:
            raise _pickle_refused(path)
        state = _check_weights_only(path)
        if isinstance(state, dict):
            parts = {name: dict(state.get(name) or {}) for name in parts}
    else:
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"IP-Adapter '{path}' is not a readable safetensors file: {exc}") from exc
        for key, value in flat.items():
            part, _, rest = key.partition(".")
            if part in parts:
                parts[part][rest] = value
    if not parts["image_proj"] or not parts["ip_adapter"]:
        raise UsageError(
            f"'{path.name}' is not an IP-Adapter: it needs image_proj.* and ip_adapter.* tensors (h94's layout)"
        )
    return parts


def _pickle_refused(path: Path) -> UnsafeFileError:
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


def _variant(image_proj: dict[str, torch.Tensor], source: str) -> tuple[bool, int]:
    """(reads the encoder's penultimate hidden states rather than its image embedding, tokens per image)."""
    if BASIC_KEY in image_proj:
        return False, BASIC_TOKENS
    if FULL_KEY in image_proj:
        return True, FULL_TOKENS
    if PLUS_KEY in image_proj:
        return True, int(image_proj[PLUS_KEY].shape[1])
    if any(k in image_proj for k in FACEID_KEYS):
        raise UsageError(
            f"IP-Adapter '{source}' is a FaceID variant: it reads face embeddings (insightface), not a CLIP image "
            "embedding; not supported"
        )
    raise UsageError(f"IP-Adapter '{source}': unknown image projection (keys {sorted(image_proj)[:4]}...)")


def _encoder_width(encoder_config: Any, hidden_states: bool) -> int:
    return int(encoder_config.hidden_size if hidden_states else encoder_config.projection_dim)


def _proj_input_width(image_proj: dict[str, torch.Tensor]) -> int:
    for key in (BASIC_KEY, "proj_in.weight", "proj.0.weight"):
        if key in image_proj:
            return int(image_proj[key].shape[-1])
    return -1


# --- the adapter --------------------------------------------------------------------------------------------
def cross_attention_layers(unet: nn.Module) -> list[tuple[str, Any]]:
    """Every transformer block's `attn2`, in the UNet's module order (h94's key 2i + 1 is the i-th)."""
    return [(n, m) for n, m in unet.named_modules() if n.endswith(CROSS_ATTENTION_SUFFIX)]


class IPAdapter:
    """An IP-Adapter installed on a UNet's `attn2` layers, with its image encoder."""

    kind = KIND

    def __init__(
        self,
        comps: Components,
        ref: AdapterRef,
        parts: dict[str, dict[str, torch.Tensor]],
        encoder: nn.Module,
        weights_name: str,
        encoder_name: str,
    ) -> None:
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        from .ip_attention import ChunkedIPAdapterAttnProcessor

        self.ref = ref
        self.unet = comps.unet
        self.weights_name = weights_name
        self.encoder_name = encoder_name
        self.hidden_states, tokens = _variant(parts["image_proj"], ref.source)
        self.image: str | None = None
        self._embeds: torch.Tensor | None = None  # (rows, 1, ...) negative then positive, for this job
        unet = self.unet
        if unet.encoder_hid_proj is not None:
            raise UsageError(
                f"IP-Adapter '{ref.source}': this UNet already has an encoder_hid_proj "
                f"({unet.config.get('encoder_hid_dim_type')}); IP-Adapters on it are not supported"
            )
        layers = cross_attention_layers(unet)
        _check_layers(ref.source, comps.model_id, parts["ip_adapter"], layers)
        param = next(unet.parameters())
        processors: dict[str, nn.Module] = {}
        for i, (name, _) in enumerate(layers):
            to_k = parts["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"]
            to_v = parts["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"]
            processor = ChunkedIPAdapterAttnProcessor(
                hidden_size=to_k.shape[0], cross_attention_dim=to_k.shape[1], num_tokens=(tokens,), scale=ref.scale
            )
            processor.load_state_dict({"to_k_ip.0.weight": to_k, "to_v_ip.0.weight": to_v})
            processors[name] = processor.to(param.device, param.dtype)
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(parts["image_proj"], low_cpu_mem_usage=False)
        # Hold what we replace, then install: processors on attn2 only, the projection, the config value.
        self._processors = {name: attn.processor for name, attn in layers}
        self._hid_type = unet.config.get("encoder_hid_dim_type")
        for name, attn in layers:
            attn.set_processor(processors[name])
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection]).to(param.device, param.dtype)
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
        self.encoder: Any = encoder.to(param.device, param.dtype).eval().requires_grad_(False)

    @property
    def layers(self) -> list[str]:
        return list(self._processors)

    @property
    def modules(self) -> list[nn.Module]:
        """Models of its own on the device (counted in the memory budget beside the UNet)."""
        return [self.encoder]

    def begin_job(self, job: JobSpec, device: torch.device) -> None:
        """The reference image's CLIP embedding, once for every stage of the job: [negative, positive] with
        classifier-free guidance (the negative is zeros, or the encoding of a black image for the hidden-state
        variants, as diffusers does), else the positive alone."""
        from ..engine.memory import place_text_encoders
        from ..io.images import load_rgb

        if not job.ip_image:
            raise UsageError("--ip-adapter needs --ip-image: the reference image it reads")
        place_text_encoders([self.encoder], device, on_device=True)
        pixels = _preprocess(load_rgb(job.ip_image), int(self.encoder.config.image_size))
        positive, negative = self._encode(pixels.to(device, next(self.encoder.parameters()).dtype))
        if job.low_vram:
            place_text_encoders([self.encoder], device, on_device=False)
        self.image = job.ip_image
        guided = job.guidance > 1.0  # text.encode_prompt's rule: one row without guidance
        embeds = torch.cat([negative, positive]) if guided else positive
        self._embeds = embeds[:, None]  # (rows, 1 image, ...)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.hidden_states:
            positive = self.encoder(pixels).image_embeds  # (1, E)
            return positive, torch.zeros_like(positive)
        both = self.encoder(torch.cat([pixels, torch.zeros_like(pixels)]), output_hidden_states=True)
        penultimate = both.hidden_states[-2]  # (2, T, H)
        return penultimate[:1], penultimate[1:]

    def stage_extra(self, stage: StagePlan, control: torch.Tensor | None) -> UNetExtra | None:
        embeds = self._embeds
        if embeds is None:
            raise RuntimeError("IPAdapter.stage_extra before begin_job")

        def extra(
            sample: torch.Tensor,
            t: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            added_cond_kwargs: dict[str, Any] | None,
            rows: slice,
        ) -> dict[str, Any]:
            return {"added_cond_kwargs": {"image_embeds": [embeds[rows].to(sample.device, sample.dtype)]}}

        return extra

    def describe(self) -> dict[str, Any]:
        info = {
            "kind": KIND,
            "source": self.ref.source,
            "scale": self.ref.scale,
            "weights": self.weights_name,
            "image_encoder": self.encoder_name,
            "layers": len(self._processors),
        }
        return info if self.image is None else {**info, "image": self.image}  # the last job's reference image

    def remove(self) -> None:
        """Every `attn2` processor, the UNet's encoder_hid_proj and its config value back as they were."""
        for name, processor in self._processors.items():
            self.unet.get_submodule(name).set_processor(processor)
        self._processors = {}
        self.unet.encoder_hid_proj = None
        self.unet.register_to_config(encoder_hid_dim_type=self._hid_type)
        self._embeds = None


def _check_layers(source: str, model: str, weights: dict[str, torch.Tensor], layers: list[tuple[str, Any]]) -> None:
    """The weights fit the UNet: the same text width and one (to_k_ip, to_v_ip) pair per `attn2`, of its size."""
    model_width = int(layers[0][1].to_k.in_features) if layers else -1
    check_fits(source, model, cross_width({k: tuple(v.shape) for k, v in weights.items()}), model_width)
    pairs = sum(1 for key in weights if key.endswith(".to_k_ip.weight"))
    if pairs != len(layers):
        raise UsageError(
            f"IP-Adapter '{source}' has weights for {pairs} cross-attention layers; the model '{model}' has "
            f"{len(layers)}: it was made for another architecture"
        )
    for i, (name, attn) in enumerate(layers):
        want = (int(attn.to_q.out_features), int(attn.to_k.in_features))
        for key in (f"{2 * i + 1}.to_k_ip.weight", f"{2 * i + 1}.to_v_ip.weight"):
            got = tuple(weights[key].shape) if key in weights else None
            if got != want:
                raise UsageError(
                    f"IP-Adapter '{source}': {name} needs ip_adapter.{key} of shape {want}, the file has "
                    f"{got or 'none'}: it was made for another architecture"
                )


def _preprocess(pixels: Any, size: int) -> torch.Tensor:
    """CLIP's preprocessing (shortest side to `size`, centre crop, CLIP mean/std), as diffusers' pipelines feed
    their image encoder: (1, 3, size, size)."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    out: torch.Tensor = processor(images=pixels, return_tensors="pt").pixel_values
    return out


# --- building: from files, or the built-in tiny one ---------------------------------------------------------
def load(comps: Components, ref: AdapterRef) -> IPAdapter:
    from .loading import quiet_libraries

    if ref.source == TINY:
        parts, encoder = tiny_parts(comps.unet)
        return IPAdapter(comps, ref, parts, encoder, TINY, TINY)
    weights = find_weights(ref.source, comps.family)
    parts = read_weights(weights, comps.allow_pickle)
    hidden_states, _ = _variant(parts["image_proj"], ref.source)
    want = _proj_input_width(parts["image_proj"])
    with quiet_libraries():
        encoder, encoder_path = _load_encoder(ref.source, weights, want, hidden_states)
    return IPAdapter(comps, ref, parts, encoder, weights.name, str(encoder_path))


def _load_encoder(source: str, weights: Path, want: int, hidden_states: bool) -> tuple[nn.Module, Path]:
    """The CLIP image encoder beside the weights whose output width the projection reads."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    looked = _encoder_paths(str(weights))
    for folder in map(Path, looked):
        config_file = folder / "config.json"
        if not config_file.is_file():
            continue
        try:
            config = CLIPVisionConfig.from_dict(json.loads(config_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"IP-Adapter '{source}': {config_file} is not a CLIP vision config ({exc})") from exc
        if _encoder_width(config, hidden_states) != want:
            continue
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"IP-Adapter '{source}': could not load the image encoder in {folder} ({exc}); it must be a "
                "CLIPVisionModelWithProjection folder with safetensors weights"
            ) from exc
        return model, folder
    raise UsageError(
        f"IP-Adapter '{source}': no image encoder of width {want} for {weights.name} (looked in "
        f"{', '.join(looked)}); put its image_encoder/ folder (config.json + model.safetensors) beside the file"
    )


def tiny_parts(unet: nn.Module, seed: int = TINY_SEED) -> tuple[dict[str, dict[str, torch.Tensor]], nn.Module]:
    """A random-weight IP-Adapter that fits `unet` (its text width and attn2 sizes), in h94's layout, and a tiny
    CLIP image encoder: seeded, built on the CPU, the same everywhere."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    layers = cross_attention_layers(unet)
    width = int(layers[0][1].to_k.in_features)
    embed = int(TINY_ENCODER["projection_dim"])
    generator = torch.Generator("cpu").manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    image_proj = {
        "proj.weight": linear(width * BASIC_TOKENS, embed),
        "proj.bias": torch.zeros(width * BASIC_TOKENS),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    ip_adapter: dict[str, torch.Tensor] = {}
    for i, (_, attn) in enumerate(layers):
        for key in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * i + 1}.{key}.weight"] = linear(int(attn.to_q.out_features), width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER))
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}, encoder


# --- before any model loads ---------------------------------------------------------------------------------
# The image encoders h94/IP-Adapter pairs with each family's file, GiB in fp16: ViT-H (models/image_encoder,
# 632M parameters) and ViT-bigG (sdxl_models/image_encoder, 1.84B).
ENCODER_GIB_FP16: dict[str, float] = {"sd1": 1.26, "sdxl": 3.69}


def job_refs(job: JobSpec) -> list[AdapterRef]:
    from ..core.config import AdapterRef

    return [AdapterRef.parse(r) for r in job.ip_adapter or ()]


def planned_gib_fp16(job: JobSpec, family: Family | None) -> float:
    """The weights a job's IP-Adapter adds on the device, for plans made before anything loads: the family's h94
    image encoder (none for the built-in tiny models and the tiny adapter)."""
    refs = [r for r in job_refs(job) if r.source != TINY]
    if not refs or family is None or family.linfusion_repo is None:
        return 0.0
    return ENCODER_GIB_FP16.get(family.configs, ENCODER_GIB_FP16["sd1"])


def preflight(job: JobSpec, family: Family | None, allow_pickle: bool = False) -> None:
    """What can be refused before the model loads: no --ip-image, an unreadable one, a weight file that is not
    there, or made for another family than the model's (where both configs can be read locally)."""
    from ..io.images import open_image

    refs = job_refs(job)
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
            raise _pickle_refused(weights)
        if weights is None or family is None or weights.suffix.lower() != SAFETENSORS:
            continue  # a pickle's width is known once it is read (with --allow-pickle)
        check_fits(ref.source, job.model, cross_width(safetensors_shapes(weights)), family.cross_attention_dim)


def hub_files(job: JobSpec, family: Family | None) -> list[tuple[str, str, str]]:
    """(what, repo, file) of the hub weight files the job's IP-Adapter needs, for offline checks."""
    wanted = []
    for ref in job_refs(job):
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
    from huggingface_hub import try_to_load_from_cache

    repo, inside = hub
    cached = try_to_load_from_cache(repo, inside or "/".join(_default_weights(source, family)))
    return Path(cached) if isinstance(cached, str) else None
