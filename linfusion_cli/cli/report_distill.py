"""Drawing `linfusion distill`'s events: a rich bar with the loss parts, steps/s and ETA on a terminal, a plain
line every N steps in logs, JSON lines every N steps with --json; and the end-of-run tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..train.events import CheckpointSaved, DistillStarted, TrainStep
from .report import Reporter


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def loss_text(event: TrainStep) -> str:
    return f"loss {event.loss:.4f} (noise {event.noise:.4f}, kd {event.kd:.4f}, feat {event.feat:.4f})"


class DistillReporter(Reporter):
    """An event sink for `distill`: mode "rich", "plain" or "quiet"; `on_json` gets a dict every `every` steps."""

    def __init__(
        self, console: Console, mode: str, every: int = 10, on_json: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        super().__init__(console, mode)
        self.every = max(1, every)
        self.on_json = on_json

    def __enter__(self) -> DistillReporter:
        if self.mode == "rich":
            self.progress = Progress(
                TextColumn("distill"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[losses]}"),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        return self

    def __call__(self, event: Any) -> None:
        if isinstance(event, TrainStep):
            self._step(event)
        elif isinstance(event, DistillStarted):
            self._started(event)
        elif isinstance(event, CheckpointSaved):
            self.note(f"step {event.step}: checkpoint saved to {event.path}")
            if self.on_json is not None:
                self.on_json({"event": "checkpoint", **asdict(event)})
        else:
            super().__call__(event)

    def _started(self, event: DistillStarted) -> None:
        self.note(
            f"distilling {event.layers} attn1 layers of {event.model} ({event.family}; "
            f"{event.trainable_params:,} trainable parameters, init {event.init}) on {event.samples} samples "
            f"({event.held_out} held out) at {event.resolution} px; global batch {event.global_batch} over "
            f"{event.world_size} process(es), mixed precision {event.mixed_precision}; steps {event.start_step} -> "
            f"{event.total_steps}"
        )
        if self.progress is not None:
            self._tasks["steps"] = self.progress.add_task(
                "distill", total=event.total_steps, completed=event.start_step, rate="", losses=""
            )

    def _step(self, event: TrainStep) -> None:
        logged = event.step % self.every == 0 or event.step == event.total
        if self.on_json is not None and logged:
            self.on_json({"event": "step", **asdict(event)})
        if self.mode == "plain" and logged:
            self._line(  # timestamped, like every plain line
                f"step {event.step}/{event.total}  {loss_text(event)}  {event.steps_per_second:.2f} steps/s  "
                f"ETA {_duration(event.eta_seconds)}"
            )
        elif self.progress is not None and "steps" in self._tasks:
            self.progress.update(
                self._tasks["steps"],
                completed=event.step,
                rate=f"{event.steps_per_second:.2f} steps/s",
                losses=loss_text(event),
            )


def distill_table(result: dict[str, Any]) -> Table:
    """Steps, time and the loss parts at the first and the last step of this run."""
    table = Table(
        title=escape(f"distilled: steps {result['start_step']} -> {result['steps']}, {result['out']}"),
        min_width=100,
        title_justify="left",
        caption=(
            f"setup {result['setup_seconds']:.1f} s, training {result['train_seconds']:.1f} s "
            f"({result['steps_per_second'] or 0:.2f} steps/s), {result['world_size']} process(es); "
            f"{len(result['skipped_images'])} undecodable images skipped"
        ),
        caption_justify="left",
    )
    for name in ("loss", "total", "noise", "kd (x0.5)", "feat (x0.5)"):
        table.add_column(name, justify="left" if name == "loss" else "right")
    for label, key in (("first step", "first_losses"), ("last step", "last_losses")):
        parts = result[key]
        if parts:
            table.add_row(label, *(f"{parts[k]:.5f}" for k in ("loss", "noise", "kd", "feat")))
    return table


def eval_table(report: dict[str, Any]) -> Table:
    """Per-layer attn1 MSE and the noise-prediction MSE against the teacher, init vs distilled."""
    table = Table(
        title=f"LinFusion vs original attention on {report['samples']} held-out samples x "
        f"{len(report['timesteps'])} timesteps",
        title_justify="left",
        caption=escape(f"init: {report['init']}; distilled: {report['final']}"),
        caption_justify="left",
    )
    for name in ("layer", "init MSE", "distilled MSE", "change"):
        table.add_column(name, justify="left" if name == "layer" else "right")

    def row(name: str, before: float, after: float, style: str | None = None) -> None:
        change = f"{(after - before) / before * 100:+.1f}%" if before else "-"
        table.add_row(name, f"{before:.3e}", f"{after:.3e}", change, style=style)

    for layer in report["layers"]:
        row(layer["layer"], layer["init"], layer["final"])
    row("attn1 features, mean", report["feature_mse"]["init"], report["feature_mse"]["final"], "bold")
    row("noise prediction", report["noise_mse"]["init"], report["noise_mse"]["final"], "bold")
    return table
