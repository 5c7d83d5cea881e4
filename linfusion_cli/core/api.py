"""linfusion from Python, in the shape of a diffusers pipeline. The `linfusion` commands are clients of this: the
same setting names as the flags and job files (`--base-size` is `base_size=`), the same validation and errors
(naming the argument, not the flag).

    from linfusion_cli import LinFusionPipeline

    pipe = LinFusionPipeline(model="tiny", out="outputs")      # settings here apply to every call
    result = pipe.generate("a red fox", size=1024, seed=1)     # plans, loads the model once, runs, saves
    result.images  # PIL images, as a diffusers pipeline's output (result.image: the first; result.arrays: numpy)
    result.path    # the image file; its sidecar (what `replay` reads) beside it
    result.report  # what `generate --json` prints

    kept = pipe.generate(["a fox", "a hare"], seed=1, save=False)   # two images, nothing written...
    kept.save()                                                      # ... until now
    big = pipe.upscale(kept.images[0], size=2048)                    # a path, a PIL image or an array

The model loads on the first call that needs it and stays loaded for every later call naming the same model,
LinFusion weights and VAE; LoRAs, ControlNets and IP-Adapters switch between calls without reloading it.
`LinFusionPipeline.from_pipe(pipe)` starts from a diffusers pipeline already loaded: its own components run.
Importing this costs no torch: a plan, a dry run and every check of a job run without it, and the engine (torch,
diffusers: seconds) is imported when a job is about to load its model.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..base.errors import DEFAULT_TIMEOUT_S, UsageError
from ..base.events import CancelToken, EventSink, ignore
from ..base.precision import dtype_flag
from ..base.sizes import DEFAULT_MAX_PIXELS
from ..engine.placement import world_from_env
from ..io.images import load_rgb, pixels_of
from ..models.hub import IN_MEMORY
from . import preflight
from .arguments import python_names, settings_doc
from .batch_plan import EVERY_JOB, BatchPlan, batch_dry_run, plan_batch
from .jobs import flags_layer, resolve_job
from .jobspec import JobSpec
from .plan_report import placement, plan_anywhere
from .prepare import Prepared, RunOptions, pick_seed, plan_for
from .replay import job_from_sidecar
from .result import Result
from .settings import RANDOM_SEED
from .shards import resolve_shard

if TYPE_CHECKING:
    from ..engine.parallel import Comm
    from .batch import BatchSummary
    from .run import EngineCache

ImageInput = str | Path | np.ndarray | Any  # a file, an (H, W, 3) array or a PIL image


class LinFusionPipeline:
    """Settings given here apply to every call (a call's own override them); run-level options (where files go,
    the device) are fixed for the pipeline. See the module docstring; every setting is listed below.

    Run-level options (keyword-only):
        out: the folder files are written to ("outputs").
        device: auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu.  dtype: auto, fp16, bf16 or fp32.
        overwrite: replace existing outputs.  save_stages: also save each stage's image.
        allow_pickle: allow .ckpt/.bin pickle weights.  max_input_pixels: the largest image `upscale` reads.
        split: split each image over the processes torchrun started.  timeout_s: how long they wait for each other.
        events: a callable given progress events (base.events).
        names: "python" (errors name arguments, `base_size`) or "flags" (the command line's `--base-size`).

    Settings (keyword arguments of the constructor and of every call):
    """

    def __init__(
        self,
        *,
        out: str | Path = "outputs",
        device: str = "auto",
        dtype: str = "auto",
        overwrite: bool = False,
        save_stages: bool = False,
        allow_pickle: bool = False,
        max_input_pixels: int = DEFAULT_MAX_PIXELS,
        split: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        events: EventSink = ignore,
        names: Literal["python", "flags"] = "python",
        **settings: Any,
    ) -> None:
        self.python = names == "python"
        with python_names(self.python):
            self.defaults = flags_layer(settings)  # checked now: a misspelt setting fails here, not later
        self.options = RunOptions(
            out=Path(out),
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            save_stages=save_stages,
            allow_pickle=allow_pickle,
            max_input_pixels=max_input_pixels,
            split=split,
            timeout_s=timeout_s,
        )
        self.events = events
        self._engines: EngineCache | None = None
        self._group = contextlib.ExitStack()  # the process group of a split image, joined on first use
        self._joined: Comm | None = None
        self._in_memory: str | None = None  # the model name `from_pipe` gave the caller's components

    @classmethod
    def from_pipe(cls, pipe: Any, **options_and_settings: Any) -> LinFusionPipeline:
        """A pipeline over a diffusers Stable Diffusion pipeline already loaded (SD-1.x, SD-2.x, SDXL): its own
        UNet, VAE, text encoders, tokenizers and scheduler config run, on the device and dtype they are on
        unless `device`/`dtype` say otherwise. LinFusion is swapped into its UNet (`linfusion=`, auto by
        default) until `close()`, which gives the UNet back as it was."""
        from ..models.loading import components_of_pipe  # lazy: torch, which a plan never needs

        name = f"pipe:{getattr(pipe, 'name_or_path', None) or type(pipe).__name__}"
        comps = components_of_pipe(pipe, name)
        weights = next(comps.unet.parameters())
        options_and_settings.setdefault("device", str(weights.device))
        options_and_settings.setdefault("dtype", dtype_flag(weights.dtype))
        IN_MEMORY[name] = comps
        try:
            made = cls(model=name, **options_and_settings)
        except BaseException:
            IN_MEMORY.pop(name, None)
            raise
        made._in_memory = name
        return made

    def job(self, prompt: str = "", *, require_prompt: bool = True, **settings: Any) -> JobSpec:
        """The job these settings make (preset, this pipeline's settings, the call's), validated."""
        with python_names(self.python):
            given = flags_layer({"prompt": prompt or None, **settings})
            return resolve_job({**self.defaults, **given}, require_prompt=require_prompt)

    def plan(
        self, prompt: str = "", *, world_size: int = 1, simulate: bool = False, gpu: str | None = None, **settings: Any
    ) -> dict[str, Any]:
        """The plan `linfusion plan` prints, as data: stages, memory, files (with `world_size` processes
        splitting the image, each stage's bands and one process's memory); nothing loads.

        simulate: also run the job on PyTorch's meta device as a CUDA GPU would (core/simulation.py): each stage's
        simulated peak, its parts and its TFLOP, beside the estimate (tens of seconds at 16K). gpu: a card
        (`h200`, `4090`...) or its fp16 TFLOPS, for the time floor; its memory is the budget unless max_vram
        is given."""
        job = self.job(prompt, require_prompt=False, **settings)
        options = self.options
        if simulate or gpu:
            from .simulation import card_budget

            if gpu and job.max_vram is None:
                job.max_vram = card_budget(gpu)
            if options.device in ("auto", "cpu"):  # a simulation is of a GPU: plan for one
                options = replace(options, device="cuda")
        with python_names(self.python):
            prep = plan_for(job, options, seed=pick_seed(job))
            summary = plan_anywhere(prep, options, world_size)
        if simulate:
            from .simulation import simulate_plan

            simulate_plan(prep, summary, world_size, gpu)
        return summary

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        save: bool = True,
        dry_run: bool = False,
        cancel: CancelToken | None = None,
        **settings: Any,
    ) -> Result:
        """Plan, run and (unless `save` is False) save one image per prompt (`linfusion generate`). A list of
        prompts makes a list of images; a `seed` given is the first's, the next prompt's is seed + 1, and so on.
        With save=False nothing is written (no folder, no sidecar) until `result.save()`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        result = Result()
        for job in self._jobs(prompts, settings):
            result.extend(self.run(job, save=save, dry_run=dry_run, cancel=cancel))
        return result

    def upscale(
        self,
        image: ImageInput,
        prompt: str = "",
        *,
        save: bool = True,
        dry_run: bool = False,
        cancel: CancelToken | None = None,
        **settings: Any,
    ) -> Result:
        """Upscale an image to the target size (`linfusion upscale`): a file, a PIL image (any mode: alpha over
        white) or an (H, W, 3) array (uint8, or floats in [0, 1]). An image in memory is named by a digest of its
        pixels in the output's name and metadata."""
        with python_names(self.python):
            if isinstance(image, str | Path):
                source, pixels = str(image), None
            else:
                pixels = pixels_of(image, self.options.max_input_pixels)
                source = f"in-memory-{hashlib.sha256(pixels.tobytes()).hexdigest()[:12]}"
        job = self.job(prompt, require_prompt=False, image=source, **settings)
        return self.run(job, save=save, dry_run=dry_run, cancel=cancel, pixels=pixels)

    def replay(
        self, sidecar: str | Path, *, save: bool = True, cancel: CancelToken | None = None, **settings: Any
    ) -> Result:
        """Make an image again from its sidecar: the same settings and seed (`linfusion replay`); `settings`
        (model=... where the model moved) replace the recorded ones."""
        with python_names(self.python):
            job, _ = job_from_sidecar(Path(sidecar), settings)
        return self.run(job, save=save, cancel=cancel)

    def check(self, job: JobSpec, *, world: int | None = None) -> Prepared:
        """Everything a run of `job` checks before its model loads, loading and writing nothing: bad input raises
        here (the commands check before importing the engine, and `--gpus` before starting its processes).
        `world`: the processes that will split the image (default: those that started this one)."""
        with python_names(self.python):
            return preflight.check_run(job, self.options, world or self._world())

    def run(
        self,
        job: JobSpec,
        *,
        save: bool = True,
        dry_run: bool = False,
        cancel: CancelToken | None = None,
        pixels: np.ndarray | None = None,
    ) -> Result:
        """One resolved job: its input image read (an upscale, unless `pixels` are given), then planned, run
        and saved; or (`dry_run`) its plan in `report["plan"]`, nothing loaded."""
        size = None if pixels is None else (pixels.shape[1], pixels.shape[0])
        with python_names(self.python):
            if dry_run:
                plan = preflight.dry_run(job, self.options, self._world(), size=size)
                return Result([{"dry_run": True, "plan": plan}], [], [None])
            from . import run as runner  # lazy: the engine imports torch, which a plan or a refused job never needs

            if pixels is None and job.image is not None:
                pixels = load_rgb(job.image, self.options.max_input_pixels)
            return runner.run_job(
                job,
                self.options,
                events=self.events,
                cancel=cancel,
                save=save,
                init_image=pixels,
                engines=self.engines(),
                group=self.group(),
            )

    def runs(
        self, job: JobSpec, count: int, *, dry_run: bool = False, cancel: CancelToken | None = None
    ) -> Iterator[Result]:
        """`count` images of one job, as AUTOMATIC1111's batch count makes them: seeds counting up from the job's
        (or from one drawn at random, once, when it has none)."""
        if count == 1 or dry_run:
            yield self.run(job, dry_run=dry_run, cancel=cancel)
            return
        from ..engine.parallel import Comm  # lazy: as in `run` (these images are about to load the engine)

        first = (self.group() or Comm()).agree(pick_seed(job), "seed")
        for index in range(count):
            job.seed = first + index
            yield self.run(job, cancel=cancel)

    def batch(
        self,
        file: str | Path,
        *,
        base_seed: int | None = None,
        shard: str | None = None,
        fail_fast: bool = False,
        on_line: Callable[[dict[str, Any]], None] | None = None,
        cancel: CancelToken | None = None,
        checked: BatchPlan | None = None,
    ) -> BatchSummary:
        """A prompt file's jobs (`linfusion batch`), this pipeline's settings as the command line's flags.
        `checked`: the file as `check_batch` checked it with the same arguments (else it is checked here)."""
        plan = checked or self.check_batch(file, base_seed=base_seed, shard=shard)
        from .batch import run_batch  # lazy: as in `run`

        with python_names(self.python):
            return run_batch(
                plan,
                self.options,
                fail_fast=fail_fast,
                events=self.events,
                on_line=on_line,
                cancel=cancel,
                engines=self.engines(),
                group=self.group(),
            )

    def plan_batch(
        self, file: str | Path, *, base_seed: int | None = None, shard: str | None = None
    ) -> list[dict[str, Any]]:
        """`linfusion batch --dry-run`: every job of the file checked, this shard's planned; nothing loads."""
        with python_names(self.python):
            return batch_dry_run(Path(file), self.defaults, self.options, base_seed, resolve_shard(shard))

    def group(self) -> Comm | None:
        """With `split` (one image split across the processes torchrun or `--gpus` started), this process's place
        in their group, joined once and kept until `close`; None otherwise."""
        if not self.options.split:
            return None
        if self._joined is None:
            from ..engine.parallel import joined  # lazy: as in `run`

            self._joined = self._group.enter_context(joined(self.options.timeout_s, self.engines().device))
        return self._joined

    def _world(self) -> int:
        """How many processes a split image of this pipeline is made by (torchrun's or --gpus', from WORLD_SIZE),
        known before joining their group: what a plan and the checks count with."""
        return world_from_env() if self.options.split else 1

    def check_batch(self, file: str | Path, *, base_seed: int | None = None, shard: str | None = None) -> BatchPlan:
        """Every job of a prompt file checked (bad input raises here), this task's jobs planned and named, nothing
        loaded: what `batch` runs. A split image's processes (`split`) make every job together."""
        every = self.options.split and self._world() > 1
        with python_names(self.python):
            return plan_batch(
                Path(file), self.defaults, self.options, base_seed, EVERY_JOB if every else resolve_shard(shard)
            )

    def engines(self) -> EngineCache:
        """The loaded model this pipeline keeps between calls (none loaded until a job needs it)."""
        if self._engines is None:
            from .run import EngineCache  # lazy: as in `run`

            self._engines = EngineCache(*placement(self.options), self.options.allow_pickle)
        return self._engines

    def close(self) -> None:
        """Let go of the loaded model (and the device memory it holds); a `from_pipe` UNet is given back as it
        was before LinFusion and the adapters were applied to it."""
        if self._engines is not None:
            self._engines.close()
        if self._in_memory is not None:
            IN_MEMORY.pop(self._in_memory, None)
            self._in_memory = None
        self._group.close()
        self._joined = None

    def __enter__(self) -> LinFusionPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _jobs(self, prompts: list[str], settings: dict[str, Any]) -> list[JobSpec]:
        """One checked job per prompt (all checked before the first runs); a given seed counts up from the first."""
        if not prompts:
            raise UsageError("prompt: give a prompt, or a list of at least one")
        seed = settings.get("seed")
        if len(prompts) == 1 or seed is None or seed == RANDOM_SEED:
            return [self.job(p, **settings) for p in prompts]
        first = self.job(prompts[0], **settings).seed
        return [self.job(p, **{**settings, "seed": (first or 0) + i}) for i, p in enumerate(prompts)]


LinFusionPipeline.__doc__ = (LinFusionPipeline.__doc__ or "") + settings_doc(" " * 8) + "\n"
for _call in (LinFusionPipeline.generate, LinFusionPipeline.upscale, LinFusionPipeline.plan):
    _call.__doc__ = f"{_call.__doc__}\n\n        Settings (keyword arguments):\n{settings_doc(' ' * 12)}\n"


class Generator(LinFusionPipeline):
    """Deprecated: the earlier name of `LinFusionPipeline` (it shadowed `torch.Generator`, which diffusers users
    pass as `generator=`). It works as before, and warns."""

    def __init__(self, **options_and_settings: Any) -> None:
        warnings.warn(
            "linfusion_cli.Generator is renamed LinFusionPipeline (it shadowed torch.Generator); the old name will "
            "go in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(**options_and_settings)
