"""Component configs for the architectures we can build without downloading anything.

`tiny*` are the built-in smoke-test models (`--model tiny`, `--model tiny-sd2`, `--model tiny-sdxl`): SD-shaped
(same block types, 8x VAE, CLIP text encoders) but a few thousand times smaller, with random weights, so a
CPU makes a noise-like image in seconds. `sd15`, `sd21` and `sdxl` are the real shapes (random weights), for
`linfusion bench`: cost does not depend on weight values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Config = dict[str, Any]

_SD_SCHEDULER: Config = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
_V_SCHEDULER: Config = {**_SD_SCHEDULER, "prediction_type": "v_prediction"}

_SD_VAE: Config = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_SDXL_VAE: Config = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# Three downsamples like SD's VAE (8x): with less, latents get 4x larger and attention explodes.
_TINY_VAE: Config = {
    **_SD_VAE,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
}

_CLIP_L: Config = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_OPENCLIP_H: Config = {
    **_CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_OPENCLIP_BIGG: Config = {
    **_CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def _tiny_clip(hidden: int) -> Config:
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "vocab_size": 1000,
        "hidden_act": "quick_gelu",
        "projection_dim": hidden,
        # ids of the byte-level tokenizer the built-in models use (models.byte_level_tokenizer)
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
    }


_SD15_UNET: Config = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
_SD21_UNET: Config = {
    **_SD15_UNET,
    "sample_size": 96,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
_SDXL_UNET: Config = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size/crop ids x 256 + pooled 1280
    "norm_num_groups": 32,
}
_TINY_UNET: Config = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
_TINY_SD2_UNET: Config = {
    **_TINY_UNET,
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 48,
    "use_linear_projection": True,
}
_TINY_SDXL_UNET: Config = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 96,  # 6 x 8 + pooled 48
    "norm_num_groups": 8,
}


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to build a randomly initialised pipeline of one architecture."""

    name: str
    description: str
    unet: Config
    vae: Config
    text_encoders: tuple[Config, ...]  # one (SD-1/2) or two (SDXL, the second with projection)
    scheduler: Config = field(default_factory=lambda: dict(_SD_SCHEDULER))
    # `text_encoder_2` of SDXL is CLIPTextModelWithProjection; the pooled embedding comes from it.
    pooled_text: bool = False


ARCHS: dict[str, ArchSpec] = {
    "tiny": ArchSpec(
        "tiny", "built-in tiny SD-1.x-shaped model, random weights", _TINY_UNET, _TINY_VAE, (_tiny_clip(32),)
    ),
    "tiny-sd2": ArchSpec(
        "tiny-sd2",
        "built-in tiny SD-2.x-shaped model (v-prediction), random weights",
        _TINY_SD2_UNET,
        _TINY_VAE,
        (_tiny_clip(48),),
        dict(_V_SCHEDULER),
    ),
    "tiny-sdxl": ArchSpec(
        "tiny-sdxl",
        "built-in tiny SDXL-shaped model, random weights",
        _TINY_SDXL_UNET,
        {**_TINY_VAE, "force_upcast": True},
        # Two widths summing to the cross-attention width, the second wider, as CLIP-L (768) and bigG (1280):
        # a single file's loader tells the encoders apart by width.
        (_tiny_clip(16), _tiny_clip(48)),
        pooled_text=True,
    ),
    "sd15": ArchSpec("sd15", "SD-1.5-shaped, random weights", _SD15_UNET, _SD_VAE, (_CLIP_L,)),
    "sd21": ArchSpec("sd21", "SD-2.1-shaped, random weights", _SD21_UNET, _SD_VAE, (_OPENCLIP_H,), dict(_V_SCHEDULER)),
    "sdxl": ArchSpec(
        "sdxl", "SDXL-shaped, random weights", _SDXL_UNET, _SDXL_VAE, (_CLIP_L, _OPENCLIP_BIGG), pooled_text=True
    ),
}
BUILTIN_MODELS = ("tiny", "tiny-sd2", "tiny-sdxl")
