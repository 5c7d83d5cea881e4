"""`linfusion distill`: train LinFusion's attention modules on any checkpoint, the paper's way (REFERENCE.md 3).

Student = the UNet with LinFusion attn1 layers; teacher = the same UNet with its original attn1 swapped back in
for a no-grad pass (one UNet in memory). Only the LinFusion modules train:

    loss = MSE(student, noise-or-v target) + 0.5 MSE(student, teacher) + 0.5 mean_layers MSE(attn1_s, attn1_t)

AdamW (lr 1e-4, no weight decay), uniform timesteps, optional bf16/fp16 autocast with fp32 master weights.
Data parallel through torch DDP when launched by torchrun / accelerate launch (they set RANK, WORLD_SIZE,
LOCAL_RANK); only rank 0 writes and reports. Noise, timesteps and VAE samples come from generators seeded by
(seed, step, rank) and the data order from (seed, epoch), so a resumed run sees exactly what it would have.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import EXIT_SIGTERM, Interrupted, UsageError
from ..base.events import CancelToken, Note
from ..linfusion.patching import LinFusionPatch, apply_linfusion
from ..models.loading import Components, load_components
from .distill_data import DataStream, Prefetcher, Sample, find_samples, micro_batches, split_holdout

log = logging.getLogger(__name__)

KD_WEIGHT = 0.5  # teacher's noise prediction
FEAT_WEIGHT = 0.5  # mean per-layer attn1 output
WEIGHT_DECAY = 0.0
DEFAULT_LR = 1e-4
MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTO_HOLDOUT_SHARE = 20  # --holdout auto: one sample in 20, at most AUTO_HOLDOUT_MAX
AUTO_HOLDOUT_MAX = 16


@dataclass
class DistillConfig:
    """Everything a distillation run needs; the CLI fills it from flags, Python callers directly."""

    model: str
    data: str | None
    out: Path
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = DEFAULT_LR
    resolution: int | None = None  # None: the family's native size
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none elsewhere) | no | fp16 | bf16
    init: str = "auto"  # auto | init | random | a LinFusion checkpoint (folder or hub id)
    save_every: int = 500
    resume: Path | None = None  # None: resume from --out when it holds a run of this model
    seed: int = 0
    gradient_checkpointing: bool = False
    holdout: int | None = None  # None: auto
    device: str = "auto"
    allow_pickle: bool = False
    eval_data: str | None = None

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.seed < 0:
            raise UsageError(f"--seed must be 0 or more, got {self.seed}")
        if self.mixed_precision not in ("auto", *MIXED_PRECISION):
            raise UsageError(f"--mixed-precision {self.mixed_precision!r}: must be auto, no, fp16 or bf16")
        if self.holdout is not None and self.holdout < 0:
            raise UsageError(f"--holdout must be 0 or more, got {self.holdout}")


# --- events (drawn by report_distill.py) ------------------------------------------------------------------
@dataclass(frozen=True)
class DistillStarted:
    model: str
    family: str
    layers: int
    trainable_params: int
    samples: int
    held_out: int
    start_step: int
    total_steps: int
    world_size: int
    global_batch: int
    resolution: int
    mixed_precision: str
    init: str


@dataclass(frozen=True)
class TrainStep:
    step: int  # optimizer steps done
    total: int
    loss: float
    noise: float
    kd: float
    feat: float
    steps_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str
    reason: str  # "every" | "final" | "signal"


DistillEvent = DistillStarted | TrainStep | CheckpointSaved | Note
DistillSink = Callable[[Any], None]


def drop(_: object) -> None:
    """The event sink of ranks other than 0 (and of callers that want no events)."""


@dataclass
class DistillResult:
    out: Path
    start_step: int
    steps: int
    setup_seconds: float  # loading the model and data, before the first step
    train_seconds: float  # the steps and checkpoint saves
    first_losses: dict[str, float]
    last_losses: dict[str, float]
    skipped_images: list[str]
    rank: int
    world_size: int
    patch: LinFusionPatch = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        done = self.steps - self.start_step
        return {
            "out": str(self.out),
            "start_step": self.start_step,
            "steps": self.steps,
            "setup_seconds": round(self.setup_seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
            "steps_per_second": round(done / self.train_seconds, 4) if self.train_seconds > 0 else None,
            "first_losses": self.first_losses,
            "last_losses": self.last_losses,
            "skipped_images": self.skipped_images,
            "world_size": self.world_size,
        }


# --- distributed ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    world: int
    rank: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """What torchrun / accelerate launch / srun+torchrun set; one process otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise UsageError(f"RANK / WORLD_SIZE / LOCAL_RANK must be whole numbers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return Dist(world, rank, local)


@contextmanager
def process_group(dist: Dist, device: torch.device) -> Iterator[None]:
    """Join the launcher's process group (NCCL on CUDA, gloo on the CPU) for the run, if there are peers."""
    import torch.distributed as td

    owned = dist.world > 1 and not td.is_initialized()
    if owned:
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owned and td.is_initialized():
            td.destroy_process_group()


def process_device(name: str, dist: Dist) -> torch.device:
    """This process's device: under a launcher, `cuda` (or auto) means cuda:LOCAL_RANK, one GPU per process."""
    from ..engine.memory import resolve_device

    device = resolve_device(name, dist.local_rank)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def _all_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    if dist.world == 1:
        return values
    import torch.distributed as td

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(tensor)
    return tensor.tolist()


# --- the model: one UNet, student and teacher --------------------------------------------------------------
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

    def amp(self) -> Any:
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def encode(
        self, pixels: np.ndarray, captions: list[str], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]:
        """Latents (B, 4, r, r), text embeddings (B, 77, D) and SDXL's added conditioning, all without grad."""
        from ..engine.text import encode_prompt

        vae = self.comps.vae
        vae_dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            image = torch.from_numpy(pixels).to(self.device, vae_dtype)  # (B, 3, R, R)
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
    import hashlib

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
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if name == "fp16" and device.type not in ("cuda", "mps"):
        raise UsageError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU")
    return name


def check_resolution(resolution: int, comps: Components) -> int:
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
        from ..models.devices import vae_dtype

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
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(unet, device_ids=ids, broadcast_buffers=False)
    from diffusers import DDPMScheduler

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


def holdout_size(cfg: DistillConfig, count: int) -> int:
    if cfg.holdout is not None:
        return cfg.holdout
    return min(AUTO_HOLDOUT_MAX, count // AUTO_HOLDOUT_SHARE)


def load_samples(cfg: DistillConfig) -> list[Sample]:
    if cfg.data is None:
        raise UsageError("--data is required: a folder of images with captions, or a .jsonl/.csv")
    return find_samples(cfg.data)


# --- the run ----------------------------------------------------------------------------------------------
def distill(cfg: DistillConfig, *, events: DistillSink = drop, cancel: CancelToken | None = None) -> DistillResult:
    """Train LinFusion for `cfg.model` on `cfg.data` up to `cfg.steps` optimizer steps, resuming where a saved
    run of the same model left off. Raises Interrupted (after saving) when `cancel` is triggered."""
    from . import distill_ckpt as ckpt

    # 1. Inputs, launcher, device; a saved run to continue (--resume, or one already in --out).
    cfg.check()
    dist = dist_from_env()
    events = events if dist.main else drop
    samples = load_samples(cfg)
    saved = ckpt.find_resume(cfg.resume, cfg.out)
    seed, holdout = cfg.seed, holdout_size(cfg, len(samples))
    if saved is not None:  # the saved run's seed and held-out split keep its data order
        seed, holdout = int(saved.state["seed"]), int(saved.state["holdout"])
        if seed != cfg.seed:
            events(Note("warning", f"--seed {cfg.seed} ignored: the run being resumed uses seed {seed}"))
        if saved.state.get("samples") != len(samples):
            events(Note("warning", f"the data now has {len(samples)} samples, {saved.state.get('samples')} when saved"))
    train, held_out = split_holdout(samples, holdout, seed)
    device = process_device(cfg.device, dist)
    mixed = resolve_mixed_precision(cfg.mixed_precision, device)
    start = time.perf_counter()

    with process_group(dist, device):
        # 2. Model, LinFusion (the init weights or the saved ones), optimizer.
        comps = load_components(cfg.model, device=device, dtype=torch.float32, allow_pickle=cfg.allow_pickle)
        init_source = resolve_init(cfg.init, comps)
        if saved is not None:
            ckpt.check_compatible(saved, cfg, comps, unet_fingerprint(comps.unet))
            init_source = str(saved.state.get("init", init_source))
        student = build_student(cfg, comps, device, dist, str(saved.folder) if saved else init_source, mixed)
        student.init_source = init_source
        optimizer = torch.optim.AdamW(student.params, lr=cfg.lr, weight_decay=WEIGHT_DECAY)
        scaler = torch.amp.GradScaler(device.type, enabled=mixed == "fp16")
        step, position = 0, 0
        if saved is not None:
            step, position, _ = ckpt.restore(saved, optimizer, scaler, cfg.lr)
            events(Note("info", f"resuming from {saved.folder} at step {step}"))
            if step >= cfg.steps:
                events(Note("warning", f"the run is already at step {step} of --steps {cfg.steps}; raise --steps"))
        stream = DataStream(train, seed, student.resolution)
        start_step = step
        global_batch = cfg.batch_size * cfg.grad_accum * dist.world
        events(
            DistillStarted(
                cfg.model,
                comps.family_label,
                len(student.patch.layers),
                sum(p.numel() for p in student.params),
                len(train),
                len(held_out),
                start_step,
                cfg.steps,
                dist.world,
                global_batch,
                student.resolution,
                mixed,
                init_source,
            )
        )
        writer = ckpt.CheckpointWriter(cfg.out, dist.main)
        meta = ckpt.run_meta(cfg, comps, student, seed, holdout, len(samples), mixed)

        def save(reason: str) -> None:
            skipped = _skipped(stream, dist, device)  # every rank takes part in the gather
            state = {**meta, "step": step, "position": position, "skipped_images": skipped}
            path = writer.save(student.patch, optimizer, scaler, state)
            if path is not None:
                events(CheckpointSaved(step, str(path), reason))

        # 3. Optimizer steps.
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        loop_start = time.perf_counter()
        saved_step = step
        batches = micro_batches(position, dist.world, dist.rank, cfg.batch_size, cfg.grad_accum)
        with Prefetcher(stream, batches) as data:
            while step < cfg.steps:
                sums = [0.0, 0.0, 0.0, 0.0]
                for micro in range(cfg.grad_accum):
                    pixels, captions = data.get()
                    generator = step_generator(seed, step, dist.rank, micro)
                    latents, embeds, added = student.encode(pixels, captions, generator)
                    sync = nullcontext()
                    if dist.world > 1 and micro < cfg.grad_accum - 1:
                        sync = student.model.no_sync()  # type: ignore[operator]
                    with sync:
                        losses = student.losses(latents, embeds, added, generator)
                        scaler.scale(losses.total / cfg.grad_accum).backward()
                    sums = [a + b / cfg.grad_accum for a, b in zip(sums, losses.parts(), strict=True)]
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                position += global_batch
                # One small all-reduce a step: the mean losses, and whether any rank was asked to stop.
                reduced = _all_sum([*sums, 1.0 if cancel is not None and cancel.requested else 0.0], dist, device)
                parts = dict(zip(("loss", "noise", "kd", "feat"), (v / dist.world for v in reduced[:4]), strict=True))
                first = first or parts
                last = parts
                rate = (step - start_step) / max(time.perf_counter() - loop_start, 1e-9)
                eta = (cfg.steps - step) / rate
                events(TrainStep(step, cfg.steps, parts["loss"], parts["noise"], parts["kd"], parts["feat"], rate, eta))
                if reduced[4] > 0:  # SIGTERM/SIGINT on any rank: all save (rank 0 writes) and stop at this step
                    if step > saved_step:
                        save("signal")
                    _barrier(dist)
                    name, code = cancel.reason if cancel is not None and cancel.reason else ("SIGTERM", EXIT_SIGTERM)
                    raise Interrupted(name, code, resumable=True)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    save("final" if step == cfg.steps else "every")
                    saved_step = step
        _barrier(dist)
        skipped = _skipped(stream, dist, device)
    student.student_tap.close()
    student.teacher_tap.close()
    return DistillResult(
        cfg.out,
        start_step,
        step,
        loop_start - start,
        time.perf_counter() - loop_start,
        first,
        last,
        skipped,
        dist.rank,
        dist.world,
        student.patch,
    )


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


def _skipped(stream: DataStream, dist: Dist, device: torch.device) -> list[str]:
    """Undecodable images seen by any rank (each rank reads its own share)."""
    mine = {str(stream.samples[i].image) for i in stream.skipped.copy()}  # the prefetch thread may add to it
    if dist.world == 1:
        return sorted(mine)
    import torch.distributed as td

    gathered: list[Any] = [None] * dist.world
    td.all_gather_object(gathered, sorted(mine))
    return sorted({path for part in gathered for path in part})
