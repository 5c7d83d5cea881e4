"""The model being distilled: one UNet that is both student (LinFusion attn1 layers) and teacher (its original
attn1 swapped back in for a no-grad pass), and the losses between them:

    loss = MSE(student, noise-or-v target) + 0.5 MSE(student, teacher) + 0.5 mean_layers MSE(attn1_s, attn1_t)

Only the LinFusion modules train; with mixed precision the frozen weights are cast to half precision and the
trained ones stay fp32 masters.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..base.errors import UsageError
from ..engine.text import encode_prompt
from ..linfusion.patching import LinFusionPatch, apply_linfusion
from ..models.devices import vae_dtype
from ..models.loading import Components
from .config import DistillConfig
from .group import Dist

KD_WEIGHT = 0.5  # teacher's noise prediction
FEAT_WEIGHT = 0.5  # mean per-layer attn1 output
MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # config.MIXED_PRECISION_NAMES


class FeatureTap:
    """The outputs of some modules, by their index in the given list, while `recording` (forward hooks; a
    checkpointed recompute during backward happens with recording off)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        self.recording = False
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.recording:
                self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    @contextmanager
    def record(self) -> Iterator[dict[int, torch.Tensor]]:
        self.outputs = {}
        self.recording = True
        try:
            yield self.outputs
        finally:
            self.recording = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class Losses:
    """One micro-batch's weighted total and its parts (`per_layer`: the attn1 MSE of each patched layer)."""

    total: torch.Tensor
    noise: torch.Tensor
    kd: torch.Tensor
    feat: torch.Tensor
    per_layer: list[torch.Tensor]

    def parts(self) -> list[float]:
        return [float(t.detach()) for t in (self.total, self.noise, self.kd, self.feat)]


@dataclass
class Student:
    """Loaded components with LinFusion applied and frozen except its modules; the teacher is the same UNet."""

    comps: Components
    patch: LinFusionPatch
    device: torch.device
    autocast: torch.dtype | None
    resolution: int
    init_source: str
    fingerprint: str
    scheduler: Any
    student_tap: FeatureTap
    teacher_tap: FeatureTap
    model: nn.Module  # the UNet, or its DDP wrapper

    @property
    def unet(self) -> Any:
        return self.comps.unet

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for m in self.patch.modules for p in m.parameters()]

    def drop_wrapper(self) -> None:
        """Let go of the DDP wrapper while the process group is still up. Its reducer holds the group; were the
        reducer the last holder, the group would be destroyed inside the reducer's destructor, which keeps the GIL
        while waiting for gloo's worker threads, and a worker still releasing a finished collective's tensors needs
        the GIL: both would wait forever (seen at the end of two-process runs under load). Destroyed by
        `destroy_process_group`, the group lets go of the GIL first."""
        if self.model is self.unet:
            return
        self.model = self.unet
        gc.collect()  # DDP's hooks make reference cycles

    def amp(self) -> Any:
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def encode(
        self, pixels: np.ndarray, captions: list[str], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]:
        """Latents (B, 4, r, r), text embeddings (B, 77, D) and SDXL's added conditioning, all without grad."""
        vae = self.comps.vae
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            image = torch.from_numpy(pixels).to(self.device, dtype)  # (B, 3, R, R)
            latents = vae.encode(image).latent_dist.sample(generator=generator) * vae.config.scaling_factor
            # one CLIP window per caption: a batch needs one sequence length
            conds = [encode_prompt(self.comps, c, "", 1.0, self.device, max_chunks=1) for c in captions]
        embeds = torch.cat([c.embeds for c in conds])  # (B, 77, D)
        added = None
        if conds[0].pooled is not None:
            size = self.resolution
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device).repeat(len(conds), 1)
            added = {"text_embeds": torch.cat([c.pooled for c in conds if c.pooled is not None]), "time_ids": time_ids}
        return latents.float(), embeds, added

    def losses(
        self, latents: torch.Tensor, embeds: torch.Tensor, added: dict[str, Any] | None, generator: torch.Generator
    ) -> Losses:
        """Noise the latents at uniform timesteps, run teacher (no grad) then student, and weigh the losses."""
        batch = latents.shape[0]
        train_steps = int(self.scheduler.config.num_train_timesteps)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)  # (B, 4, r, r)
        timesteps = torch.randint(0, train_steps, (batch,), generator=generator).to(self.device)
        return self.losses_at(latents, noise, timesteps, embeds, added, train=True)

    def losses_at(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        added: dict[str, Any] | None,
        *,
        train: bool,
    ) -> Losses:
        """The losses at given noise and timesteps (eval fixes them); `train` runs the student with grad, through DDP."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.comps.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        kwargs = {"encoder_hidden_states": embeds, "added_cond_kwargs": added, "return_dict": False}
        with torch.no_grad(), self.patch.original_attention(), self.teacher_tap.record() as teacher_feats, self.amp():
            teacher = self.unet(noisy, timesteps, **kwargs)[0].float()
        grad = torch.enable_grad() if train else torch.no_grad()
        with grad, self.student_tap.record() as student_feats, self.amp():
            pred = (self.model if train else self.unet)(noisy, timesteps, **kwargs)[0].float()
        layers = len(self.patch.layers)
        if len(student_feats) != layers or len(teacher_feats) != layers:
            raise RuntimeError(f"{layers} layers, but {len(student_feats)}/{len(teacher_feats)} features collected")
        per_layer = [F.mse_loss(student_feats[i].float(), teacher_feats[i].float()) for i in range(layers)]
        noise_loss = F.mse_loss(pred, target.float())
        kd = F.mse_loss(pred, teacher)
        feat = torch.stack(per_layer).mean()
        total = noise_loss + KD_WEIGHT * kd + FEAT_WEIGHT * feat
        return Losses(total, noise_loss, kd, feat, per_layer)


def unet_fingerprint(unet: nn.Module) -> str:
    """A short hash of the frozen weights that tell one checkpoint from another (first and last conv, and the
    first attention's query), taken in fp16 so the same weights loaded in fp32 or fp16 agree."""
    digest = hashlib.sha256()
    state = unet.state_dict()
    first_q = next(k for k in state if k.endswith("attn1.to_q.weight"))
    for key in ("conv_in.weight", "conv_out.weight", first_q):
        digest.update(key.encode())
        digest.update(state[key].detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_init(init: str, comps: Components) -> str:
    """auto: the family's official LinFusion weights (a fine-tune starts from them), else copy the UNet's own."""
    if init == "auto":
        return comps.family.linfusion_repo if comps.family and comps.family.linfusion_repo else "init"
    return init


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    """auto: bf16 where the GPU has it (no loss scaling needed), else fp32; fp16 autocast needs a GPU."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if name == "fp16" and device.type not in ("cuda", "mps"):
        raise UsageError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU")
    return name


def check_resolution(resolution: int, comps: Components) -> int:
    """The crop side, refused unless the VAE's 8x and each UNet level's halving divide it evenly."""
    levels = len(comps.unet.config.block_out_channels)
    multiple = 8 * 2 ** (levels - 1)  # VAE 8x, then each UNet level halves
    if resolution < multiple or resolution % multiple:
        raise UsageError(f"--resolution {resolution}: must be a positive multiple of {multiple} for this model")
    return resolution


def build_student(
    cfg: DistillConfig, comps: Components, device: torch.device, dist: Dist, weights: str, mixed: str
) -> Student:
    """Apply LinFusion (`weights`: the init source or a checkpoint to resume), freeze everything else, cast the
    frozen weights for mixed precision and wrap the UNet for data parallelism."""
    unet = comps.unet
    fingerprint = unet_fingerprint(unet)
    patch = apply_linfusion(unet, weights)
    unet.requires_grad_(False)
    autocast = MIXED_PRECISION[mixed]
    if autocast is not None:  # frozen weights in half precision; trainable ones stay fp32 masters
        with patch.original_attention():
            unet.to(autocast)
        comps.vae.to(vae_dtype(comps.vae.config, autocast, comps.family))
        for encoder in comps.text_encoders:
            encoder.to(autocast)
    for module in patch.modules:
        module.float().requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    model: nn.Module = unet
    if dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # buffers are the same on every process (same weights); no sync before each forward (the newer keyword where torch has it)
        quiet = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync: dict[str, Any] = {"forward_sync_buffers": False} if quiet else {"broadcast_buffers": False}
        model = DistributedDataParallel(unet, device_ids=ids, **no_sync)
    scheduler = DDPMScheduler.from_config({k: v for k, v in comps.scheduler_config.items() if not k.startswith("_")})
    resolution = check_resolution(cfg.resolution or comps.native_size, comps)
    return Student(
        comps,
        patch,
        device,
        autocast,
        resolution,
        weights,
        fingerprint,
        scheduler,
        FeatureTap(list(patch.modules)),
        FeatureTap(patch.originals),
        model,
    )


def step_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """The random stream of one micro-batch: noise, timesteps and VAE samples depend on nothing else."""
    mixed = np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & (2**63 - 1))
