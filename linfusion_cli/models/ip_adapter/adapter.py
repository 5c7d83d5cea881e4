"""IP-Adapter: a reference image as a prompt, through extra keys and values in every cross-attention (`attn2`).

The weights come in the layout users download (h94/IP-Adapter): a `.safetensors` file holding `image_proj.*`
(a CLIP image embedding -> a few tokens of the text width) and `ip_adapter.{k}.to_k_ip/to_v_ip.weight`, where k
counts every attention processor in diffusers' module order, so the i-th `attn2` owns k = 2i + 1; beside it an
`image_encoder/` folder (a CLIPVisionModelWithProjection).

It is installed as diffusers installs it (its IP-Adapter processor on each `attn2`, run over chunks of query
tokens at high resolution: attention.py; the projection as the UNet's `encoder_hid_proj`; image embeddings
in `added_cond_kwargs`), but on the `attn2` modules by name only: LinFusion's `attn1` modules are not diffusers
`Attention`s and are never looked at. The CLIP embedding is made once per job (`begin_job`); `remove()` puts
back every processor, the projection and the config value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...base.errors import ModelLoadError, UsageError
from ...base.job import Job
from ...base.settings import AdapterRef
from ...io.images import load_rgb
from ..devices import place_text_encoders
from ..hub import PICKLE_SUFFIXES
from ..loading import check_weights_only, quiet_libraries
from ..modules import cross_attention_layers
from .attention import ChunkedIPAdapterAttnProcessor
from .kind import KIND, TINY, check_fits, cross_width, encoder_paths, find_weights, pickle_refused

if TYPE_CHECKING:
    from ...base.plan import StagePlan
    from ..adapter_kind import UNetCall, UNetExtra
    from ..loading import Components

log = logging.getLogger(__name__)

TINY_SEED = 0  # the built-in IP-Adapter is the same on every run and every machine
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


# --- reading and checking the weights -----------------------------------------------------------------------
def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """A weight file split into its `image_proj` and `ip_adapter` parts (h94's two state dicts): flat keys
    `image_proj.*` / `ip_adapter.*` in a .safetensors file, or the two dicts pickled in a .bin (read only with
    --allow-pickle, by torch's weights-only loader, as models.py reads pickled checkpoints)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise pickle_refused(path)
        state = check_weights_only(path)
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

    def begin_job(self, job: Job, device: torch.device) -> None:
        """The reference image's CLIP embedding, once for every stage of the job: [negative, positive] with
        classifier-free guidance (the negative is zeros, or the encoding of a black image for the hidden-state
        variants, as diffusers does), else the positive alone."""
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

        def extra(call: UNetCall) -> dict[str, Any]:
            image_embeds = embeds[call.rows].to(call.sample.device, call.sample.dtype)
            return {"added_cond_kwargs": {"image_embeds": [image_embeds]}}

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

    looked = encoder_paths(str(weights))
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


# The image encoders h94/IP-Adapter ships (image_encoder/config.json of its `models` and `sdxl_models` folders):
# OpenCLIP ViT-H/14 for SD-1.x and its SDXL "vit-h" files, ViT-bigG/14 for SDXL.
VIT_H: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
VIT_BIGG: dict[str, Any] = {
    **VIT_H,
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "projection_dim": 1280,
}


def build_meta(comps: Components, ref: AdapterRef) -> IPAdapter:
    """The IP-Adapter `ref` names, of the shape h94's basic one for the model's family has, on the UNet's (meta)
    device, for a memory simulation: the image encoder's config beside a local weight file where there is one,
    else h94's (ViT-H; ViT-bigG for SDXL); the built-in tiny one for `tiny`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    device = next(comps.unet.parameters()).device
    if ref.source == TINY:
        config = dict(TINY_ENCODER)
    else:
        config = VIT_BIGG if comps.is_sdxl else VIT_H
        for folder in map(Path, encoder_paths(ref.source)):
            if (folder / "config.json").is_file():
                config = json.loads((folder / "config.json").read_text())
                break
    with quiet_libraries(), device:
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        parts = shaped_parts(comps.unet, int(config["projection_dim"]), lambda *shape: torch.empty(shape))
        return IPAdapter(comps, ref, parts, encoder, "simulated", "simulated")


def shaped_parts(unet: nn.Module, embed: int, make: Callable[..., torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """h94's basic IP-Adapter for `unet` (its text width and attn2 sizes, an image embedding of `embed`) in its
    two state dicts, every weight made by `make(*shape)`; biases and norms zeros and ones."""
    layers = cross_attention_layers(unet)
    width = int(layers[0][1].to_k.in_features)
    image_proj = {
        "proj.weight": make(width * BASIC_TOKENS, embed),
        "proj.bias": torch.zeros(width * BASIC_TOKENS),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    ip_adapter: dict[str, torch.Tensor] = {}
    for i, (_, attn) in enumerate(layers):
        for key in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * i + 1}.{key}.weight"] = make(int(attn.to_q.out_features), width)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def tiny_parts(unet: nn.Module, seed: int = TINY_SEED) -> tuple[dict[str, dict[str, torch.Tensor]], nn.Module]:
    """A random-weight IP-Adapter that fits `unet` (its text width and attn2 sizes), in h94's layout, and a tiny
    CLIP image encoder: seeded, built on the CPU, the same everywhere."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    embed = int(TINY_ENCODER["projection_dim"])
    generator = torch.Generator("cpu").manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    parts = shaped_parts(unet, embed, linear)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER))
    return parts, encoder
