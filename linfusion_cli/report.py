"""Drawing the core's events: rich progress bars on a terminal, one plain line per event in farm logs,
nothing but errors with --quiet; and the end-of-run table. Everything goes to stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .events import Event, Note, StageFinished, StageStarted, StepDone, TilesDone

PLAIN_STEP_EVERY = 0.25  # plain mode: a line per quarter of a stage's steps
TILE_KINDS = {"decode": "VAE decode tiles", "encode": "VAE encode tiles", "stats": "VAE statistics"}


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


class Reporter:
    """An EventSink. mode: "rich" (bars), "plain" (lines), "quiet" (errors only)."""

    def __init__(self, console: Console, mode: str) -> None:
        self.console = console
        self.mode = mode
        self.progress: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._stage_count = 0
        self._last_plain: dict[str, float] = {}

    # lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> Reporter:
        if self.mode == "rich":
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self._tasks.clear()

    # events --------------------------------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        if self.mode == "quiet":
            return
        if isinstance(event, Note):
            self.note(event.message, event.level)
        elif isinstance(event, StageStarted):
            self._stage_started(event)
        elif isinstance(event, StepDone):
            self._update("steps", event.step, event.total, f"  steps (stage {event.stage + 1})")
        elif isinstance(event, TilesDone):
            self._update(
                f"tiles-{event.kind}",
                event.done,
                event.total,
                f"  {TILE_KINDS.get(event.kind, event.kind)} (stage {event.stage + 1})",
            )
        elif isinstance(event, StageFinished):
            self._stage_finished(event)

    def note(self, message: str, level: str = "info") -> None:
        if self.mode == "quiet":
            return
        style = "yellow" if level == "warning" else "dim"
        prefix = "warning: " if level == "warning" else ""
        if self.mode == "plain":
            self.console.print(f"{prefix}{message}", markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.print(f"[{style}]{prefix}[/]{message}", highlight=False, soft_wrap=True)

    def _stage_started(self, event: StageStarted) -> None:
        self._stage_count = event.count
        strength = "" if event.strength is None else f", strength {event.strength:g}"
        text = (
            f"stage {event.index + 1}/{event.count}: {event.kind} {event.size}{strength}, {event.steps} steps"
            f" [{event.settings.get('name', '')}]"
        )
        if self.mode == "plain":
            self.console.print(text, markup=False, highlight=False)
            return
        assert self.progress is not None
        if "stages" not in self._tasks:
            self._tasks["stages"] = self.progress.add_task("stages", total=event.count)
        self.progress.update(self._tasks["stages"], description=text)
        for key in [k for k in self._tasks if k != "stages"]:
            self.progress.remove_task(self._tasks.pop(key))

    def _stage_finished(self, event: StageFinished) -> None:
        if self.mode == "plain":
            self.console.print(
                f"stage {event.index + 1}/{self._stage_count} done in {event.seconds:.2f} s",
                markup=False,
                highlight=False,
            )
            return
        if self.progress is not None and "stages" in self._tasks:
            self.progress.update(self._tasks["stages"], completed=event.index + 1)

    def _update(self, key: str, done: int, total: int, description: str) -> None:
        if self.mode == "plain":
            step = max(1, int(total * PLAIN_STEP_EVERY))
            if done == total or done % step == 0:
                self.console.print(f"{description.strip()}: {done}/{total}", markup=False, highlight=False)
            return
        assert self.progress is not None
        if key not in self._tasks:
            self._tasks[key] = self.progress.add_task(description, total=total)
        self.progress.update(self._tasks[key], completed=done, total=total, description=description)


def stage_table(sidecar: dict[str, Any], title: str | None = None) -> Table:
    """Per-stage size, steps, seconds and peak memory, then totals; load and write time in the caption."""
    stages = sidecar.get("stages", [])
    on_gpu = any(s.get("peak_vram_allocated_gib") is not None for s in stages)
    secs = sidecar.get("seconds", {})
    caption = f"model load {secs.get('model_load', 0):.1f} s, file write {secs.get('write', 0):.1f} s"
    if sidecar.get("dtypes"):
        caption += "; " + ", ".join(f"{part.replace('_', ' ')} {name}" for part, name in sidecar["dtypes"].items())
    if not on_gpu:
        caption += "; VRAM: not applicable (CPU run), RSS is the process's resident memory"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    columns = ["stage", "size", "strength", "steps", "seconds"]
    columns += ["VRAM alloc GiB", "VRAM reserved GiB"] if on_gpu else []
    columns += ["peak RSS GiB", "memory"]
    for name in columns:
        table.add_column(name, justify="left" if name in ("stage", "size", "memory") else "right")
    for s in stages:
        row = [
            f"{s['index'] + 1} {s['kind']}",
            s["size"],
            "-" if s["strength"] is None else f"{s['strength']:g}",
            str(s["steps"]),
            f"{s['seconds']:.2f}",
        ]
        row += [_gib(s["peak_vram_allocated_gib"]), _gib(s["peak_vram_reserved_gib"])] if on_gpu else []
        row += [_gib(s["peak_rss_gib"]), s["memory_settings"]["name"] + (" (retried)" if s.get("retried") else "")]
        table.add_row(*row)
    totals = [
        "total",
        f"{sidecar.get('width')}x{sidecar.get('height')}",
        "",
        str(sum(s["steps"] for s in stages)),
        f"{sum(s['seconds'] for s in stages):.2f}",
    ]
    if on_gpu:
        totals += [
            _gib(max(s["peak_vram_allocated_gib"] or 0 for s in stages)),
            _gib(max(s["peak_vram_reserved_gib"] or 0 for s in stages)),
        ]
    totals += [_gib(max((s["peak_rss_gib"] or 0 for s in stages), default=0)), ""]
    table.add_row(*totals, style="bold")
    return table


def batch_table(summary: Any) -> Table:
    """Counts, then every failed job with its reason (a farm log should say what to rerun)."""
    failed = [o for o in summary.outcomes if o.status == "failed"]
    table = Table(title=f"batch: {summary.shard.describe()}", title_justify="left")
    for name in ("jobs", "done", "skipped", "failed", "seconds"):
        table.add_column(name, justify="right")
    table.add_row(
        str(summary.total_jobs),
        str(summary.count("done")),
        str(summary.count("skipped")),
        str(len(failed)),
        f"{sum(o.seconds for o in summary.outcomes):.1f}",
    )
    if failed:
        table.caption = (
            "failed: "
            + "; ".join(f"#{o.index}: {o.error}" for o in failed[:20])
            + (f" (+{len(failed) - 20} more)" if len(failed) > 20 else "")
        )
        table.caption_justify = "left"
    return table
