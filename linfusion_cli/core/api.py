"""linfusion from Python. The `linfusion` commands are clients of this: the same setting names as the flags and
job files (`--base-size` is `base_size`), the same validation and the same errors.

    from linfusion_cli import Generator

    gen = Generator(model="tiny", out="outputs")             # settings here apply to every call
    result = gen.generate("a red fox", size=1024, seed=1)     # plans, loads the model once, runs, saves
    result.image   # (H, W, 3) uint8
    result.path    # the image file; its sidecar (what `replay` reads) beside it
    result.report  # what `generate --json` prints

The model loads on the first call that needs it and stays loaded for every later call naming the same model,
LinFusion weights and VAE; LoRAs, ControlNets and IP-Adapters switch between calls without reloading it.
Importing this costs no torch: a plan, a dry run and every check of a job run without it, and the engine (torch,
diffusers: seconds) is imported when a job is about to load its model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import DEFAULT_TIMEOUT_S
from ..base.events import CancelToken, EventSink, ignore
from ..base.sizes import DEFAULT_MAX_PIXELS
from ..engine.placement import world_from_env
from ..io.images import load_rgb
from . import preflight
from .batch_plan import EVERY_JOB, BatchPlan, batch_dry_run, plan_batch
from .jobs import flags_layer, resolve_job
from .plan_report import placement, plan_anywhere
from .prepare import Prepared, RunOptions, pick_seed, plan_for
from .replay import job_from_sidecar
from .settings import JobSpec
from .shards import resolve_shard

if TYPE_CHECKING:
    import numpy as np

    from ..engine.parallel import Comm
    from .batch import BatchSummary
    from .run import EngineCache


@dataclass(frozen=True)
class Result:
    """One image made (or, for a dry run, its plan in `report["plan"]` and no image)."""

    report: dict[str, Any]
    image: np.ndarray | None = None

    @property
    def path(self) -> Path | None:
        return Path(self.report["path"]) if "path" in self.report else None


class Generator:
    """Settings given here apply to every call (a call's own override them); run-level options (where files go,
    the device) are fixed for the generator. See the module docstring."""

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
        **settings: Any,
    ) -> None:
        self.defaults = flags_layer(settings)  # checked now: a misspelt setting fails here, not at the first image
        self.options = RunOptions(
            Path(out), device, dtype, overwrite, save_stages, allow_pickle, max_input_pixels, split, timeout_s
        )
        self.events = events
        self._engines: EngineCache | None = None
        self._group = contextlib.ExitStack()  # the process group of a split image, joined on first use
        self._joined: Comm | None = None

    def job(self, prompt: str = "", *, require_prompt: bool = True, **settings: Any) -> JobSpec:
        """The job these settings make (preset, this generator's settings, the call's), validated."""
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
        prep = plan_for(job, options, seed=pick_seed(job))
        summary = plan_anywhere(prep, options, world_size)
        if simulate:
            from .simulation import simulate_plan

            simulate_plan(prep, summary, world_size, gpu)
        return summary

    def generate(
        self, prompt: str, *, dry_run: bool = False, cancel: CancelToken | None = None, **settings: Any
    ) -> Result:
        """Plan, run and save one image (`linfusion generate`)."""
        return self.run(self.job(prompt, **settings), dry_run=dry_run, cancel=cancel)

    def upscale(
        self, image: str | Path, prompt: str = "", *, cancel: CancelToken | None = None, **settings: Any
    ) -> Result:
        """Upscale an image of yours to the target size (`linfusion upscale`)."""
        job = self.job(prompt, require_prompt=False, image=str(image), **settings)
        return self.run(job, cancel=cancel)

    def replay(self, sidecar: str | Path, *, cancel: CancelToken | None = None, **settings: Any) -> Result:
        """Make an image again from its sidecar: the same settings and seed (`linfusion replay`); `settings`
        (model=... where the model moved) replace the recorded ones."""
        job, _ = job_from_sidecar(Path(sidecar), settings)
        return self.run(job, cancel=cancel)

    def check(self, job: JobSpec, *, world: int | None = None) -> Prepared:
        """Everything a run of `job` checks before its model loads, loading and writing nothing: bad input raises
        here (the commands check before importing the engine, and `--gpus` before starting its processes).
        `world`: the processes that will split the image (default: those that started this one)."""
        return preflight.check_run(job, self.options, world or self._world())

    def run(self, job: JobSpec, *, dry_run: bool = False, cancel: CancelToken | None = None) -> Result:
        """One resolved job: its input image read (an upscale), then planned, run and saved; or (`dry_run`) its
        plan in `report["plan"]`, nothing loaded."""
        if dry_run:
            return Result({"dry_run": True, "plan": preflight.dry_run(job, self.options, self._world())})
        from . import run  # lazy: the engine imports torch, which a plan or a refused job never needs

        pixels = None if job.image is None else load_rgb(job.image, self.options.max_input_pixels)
        done = run.generate(
            job,
            self.options,
            events=self.events,
            cancel=cancel,
            init_image=pixels,
            engines=self.engines(),
            group=self.group(),
        )
        return Result(done.report, done.image)

    def runs(
        self, job: JobSpec, count: int, *, dry_run: bool = False, cancel: CancelToken | None = None
    ) -> Iterator[Result]:
        """`count` images of one job, as AUTOMATIC1111's batch count makes them: seeds counting up from the job's
        (or from one drawn at random, once, when it has none)."""
        if count == 1 or dry_run:
            yield self.run(job, dry_run=dry_run, cancel=cancel)
            return
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
        """A prompt file's jobs (`linfusion batch`), this generator's settings as the command line's flags.
        `checked`: the file as `check_batch` checked it with the same arguments (else it is checked here)."""
        plan = checked or self.check_batch(file, base_seed=base_seed, shard=shard)
        from .batch import run_batch  # lazy: as in `run`

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
        """How many processes a split image of this generator is made by (torchrun's or --gpus', from WORLD_SIZE),
        known before joining their group: what a plan and the checks count with."""
        return world_from_env() if self.options.split else 1

    def check_batch(self, file: str | Path, *, base_seed: int | None = None, shard: str | None = None) -> BatchPlan:
        """Every job of a prompt file checked (bad input raises here), this task's jobs planned and named, nothing
        loaded: what `batch` runs. A split image's processes (`split`) make every job together."""
        every = self.options.split and self._world() > 1
        return plan_batch(
            Path(file), self.defaults, self.options, base_seed, EVERY_JOB if every else resolve_shard(shard)
        )

    def plan_batch(
        self, file: str | Path, *, base_seed: int | None = None, shard: str | None = None
    ) -> list[dict[str, Any]]:
        """`linfusion batch --dry-run`: every job of the file checked, this shard's planned; nothing loads."""
        return batch_dry_run(Path(file), self.defaults, self.options, base_seed, resolve_shard(shard))

    def engines(self) -> EngineCache:
        """The loaded model this generator keeps between calls (none loaded until a job needs it)."""
        if self._engines is None:
            from .run import EngineCache  # lazy: as in `run`

            self._engines = EngineCache(*placement(self.options), self.options.allow_pickle)
        return self._engines

    def close(self) -> None:
        """Let go of the loaded model (and the device memory it holds)."""
        if self._engines is not None:
            self._engines.close()
        self._group.close()
        self._joined = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
