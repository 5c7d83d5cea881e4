"""Drawing the core's events: rich progress bars on a terminal, one timestamped plain line per event in farm
logs, nothing but errors with --quiet; and the end-of-run tables. Everything goes to stderr.

Every string that comes from the user or the data (prompts, paths, sizes, memory names) is escaped before rich
sees it: `[fast]` or a prompt with brackets would otherwise be read as markup and vanish.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from ..base.events import CancelToken, Event, Note, StageFinished, StageStarted, StepDone, TilesDone, Working
from ..base.text import plural
from .boundary import stderr
from .render import FieldLines, lines_if_wider

if TYPE_CHECKING:
    from ..core.batch import BatchSummary

WIDE_ENOUGH = 90  # columns a progress row needs with its ETA and s/step; narrower terminals get the ETA alone
PLAIN_EVERY = 0.25  # plain mode: a line per quarter of a stage's steps or tiles
PLAIN_TIME = "%Y-%m-%d %H:%M:%S"
TILE_KINDS = {"encode": "VAE encode", "decode": "VAE decode", "stats": "VAE statistics"}


def stderr_width() -> int:
    """The width tables on stderr fit: COLUMNS, the terminal's, or a log's 120 (boundary.output_width)."""
    return stderr.width


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def memory_text(settings: dict[str, Any]) -> str:
    """`split (guidance 2 x 1, FF chunks 16384)`: a stage's memory settings, short enough for one line."""
    parts = ["guidance 2 x 1" if settings.get("cfg_split") else "guidance batch 2"]
    if settings.get("ff_chunk"):
        parts.append(f"FF chunks {settings['ff_chunk']}")
    if settings.get("attn_chunk"):
        parts.append(f"attention chunks {settings['attn_chunk']}")
    if settings.get("band_mib"):
        parts.append(f"UNet in bands of {settings['band_mib']} MiB")
    if settings.get("park_skips"):
        parts.append("skips in CPU memory")
    if settings.get("vae_budget_gib"):
        parts.append(f"VAE within {settings['vae_budget_gib']:g} GiB")
    return f"{settings.get('name', '?')} ({', '.join(parts)})"


def stage_headline(event: StageStarted) -> str:
    strength = "" if event.strength is None else f", strength {event.strength:g}"
    return (
        f"stage {event.index + 1}/{event.count}: {event.kind} {event.size}{strength}, "
        f"{plural(event.steps, 'step')}; memory {memory_text(event.settings)}"
    )


class _Counter(ProgressColumn):
    """`3/20 steps`, or the task's own `counter` text (the stages row says which stage it is on)."""

    def render(self, task: Task) -> Text:
        if "counter" in task.fields:
            return Text(task.fields["counter"])
        if task.total is None:
            return Text("...")
        unit = task.fields.get("unit", "")
        unit = unit.removesuffix("s") if task.total == 1 else unit
        return Text(f"{task.completed:.0f}/{task.total:.0f} {unit}".rstrip())


class _Rate(ProgressColumn):
    """ETA and seconds per item (s/step is what a 16K user compares between runs). In a narrow terminal the ETA
    alone: the row must not wrap, and a number is never cut (the stage's summary line gives s/step)."""

    def __init__(self, compact: bool) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.compact = compact

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit")
        if not unit or not task.speed or task.finished:
            return Text("")
        rate = f"{1 / task.speed:.2f} s/{unit.rstrip('s')}"
        if task.time_remaining is None:
            return Text("" if self.compact else rate, style="cyan")
        eta = f"ETA {_duration(task.time_remaining)}"
        return Text(eta if self.compact else f"{eta}, {rate}", style="cyan")


class _StageProgress(Progress):
    """Bars under a headline that names the stage, its memory settings and the VRAM it has used so far."""

    headline: Text = Text("")

    def get_renderables(self) -> Iterable[RenderableType]:
        if self.headline:
            yield self.headline
        yield self.make_tasks_table(self.tasks)


class Reporter:
    """An EventSink. mode: "rich" (bars), "plain" (timestamped lines), "quiet" (errors only)."""

    def __init__(self, console: Console, mode: str) -> None:
        self.console = console
        self.mode = mode
        self.progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._stage: StageStarted | None = None
        self._headline = ""
        self._vram: float | None = None
        self._steps_since = 0.0  # when this stage's denoising could start (after the VAE encode)
        self._stepped = False
        self._step_seconds: float | None = None

    # lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> Reporter:
        if self.mode == "rich":
            self.progress = _StageProgress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=32),
                _Counter(),
                TimeElapsedColumn(),
                _Rate(compact=self.console.width < WIDE_ENOUGH),
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
        if self.mode == "quiet" and not (isinstance(event, Note) and event.level == "error"):
            return
        if not isinstance(event, (Note, Working)):
            self._work_done()
        if isinstance(event, Note):
            self.note(event.message, event.level)
        elif isinstance(event, Working):
            self._working(event)
        elif isinstance(event, StageStarted):
            self._stage_started(event)
        elif isinstance(event, StepDone):
            self._step_done(event)
        elif isinstance(event, TilesDone):
            self._tiles_done(event)
        elif isinstance(event, StageFinished):
            self._stage_finished(event)

    def stopping(self, signal_name: str) -> None:
        """The first Ctrl-C (or SIGTERM): said at once, though the next safe point may be seconds away. From a
        signal handler: in a log, straight to stderr's file descriptor (the console's print may be the very call
        the signal interrupted, and its buffer would lose the line)."""
        text = f"{signal_name}: stopping at the next safe point (once more: stop at once)"
        if self.mode == "rich":
            self.note(text, "warning")
        elif self.mode == "plain":
            with contextlib.suppress(OSError):
                os.write(2, f"{time.strftime(PLAIN_TIME)} warning: {text}\n".encode())

    def note(self, message: str, level: str = "info") -> None:
        """A line of news; errors (a batch stopped on a full disk) also with --quiet."""
        if self.mode == "quiet" and level != "error":
            return
        prefix = f"{level}: " if level in ("warning", "error") else ""
        if self.mode != "rich":
            self._line(f"{prefix}{message}")
        else:
            style = {"warning": "yellow", "error": "bold red"}.get(level, "dim")
            self.console.print(f"[{style}]{prefix}[/]{escape(message)}", highlight=False)  # wrapped at words

    def _working(self, event: Working) -> None:
        """No dead stretches: an uncounted piece of work (a model load) gets a pulsing bar and a clock."""
        if self.mode == "plain":
            self._line(event.what)
            return
        progress = self._require_progress()
        self._work_done()
        self._tasks["working"] = progress.add_task(f"  {escape(event.what)}", total=None, counter="")

    def _work_done(self) -> None:
        if self.progress is not None and "working" in self._tasks:
            self.progress.remove_task(self._tasks.pop("working"))

    def _line(self, text: str) -> None:
        """Plain mode: one timestamped line (farm logs interleave many processes)."""
        self.console.print(f"{time.strftime(PLAIN_TIME)} {text}", markup=False, highlight=False, soft_wrap=True)

    def _stage_started(self, event: StageStarted) -> None:
        self._stage, self._vram, self._step_seconds, self._stepped = event, None, None, False
        self._steps_since = time.monotonic()
        self._headline = stage_headline(event)
        if self.mode == "plain":
            self._line(self._headline)
            return
        progress = self._require_progress()
        for key in [k for k in self._tasks if k != "stages" or event.index == 0]:
            progress.remove_task(self._tasks.pop(key))  # a new job (index 0) restarts the stages clock too
        counter = f"stage {event.index + 1}/{event.count}"
        if "stages" not in self._tasks:
            self._tasks["stages"] = progress.add_task("  all stages", total=event.count, counter=counter)
        progress.update(self._tasks["stages"], completed=event.index, total=event.count, counter=counter)
        if event.strength is not None:  # a refine stage starts by encoding its upscaled input
            self._tasks["tiles-encode"] = progress.add_task(f"  {TILE_KINDS['encode']}", total=None, unit="tiles")
        self._tasks["steps"] = progress.add_task("  steps", total=max(event.steps, 1), unit="steps")
        self._redraw_headline()

    def _step_done(self, event: StepDone) -> None:
        self._stepped = True
        if event.vram_gib is not None:
            self._vram = event.vram_gib
        if event.step == event.total:
            self._step_seconds = (time.monotonic() - self._steps_since) / max(event.total, 1)
        if self.mode == "plain":
            if self._plain_due(event.step, event.total):
                rate = ""
                if event.step:
                    each = (time.monotonic() - self._steps_since) / event.step
                    eta = "" if event.step == event.total else f", ETA {_duration(each * (event.total - event.step))}"
                    rate = f", {each:.2f} s/step{eta}"
                vram = "" if self._vram is None else f", VRAM peak {self._vram:.2f} GiB"
                self._line(f"  steps {event.step}/{event.total} (stage {event.stage + 1}){rate}{vram}")
            return
        progress = self._require_progress()
        if "steps" in self._tasks:
            progress.update(self._tasks["steps"], completed=event.step, total=event.total)
        self._advance_stages(event.step / max(event.total, 1))
        if event.vram_gib is not None:
            self._redraw_headline()

    def _tiles_done(self, event: TilesDone) -> None:
        label = TILE_KINDS.get(event.kind, event.kind)
        if not self._stepped:
            self._steps_since = time.monotonic()  # the steps' clock starts after the encode
        if self.mode == "plain":
            if (event.total > 1 and self._plain_due(event.done, event.total)) or event.done == event.total:
                self._line(f"  {label} {event.done}/{plural(event.total, 'tile')} (stage {event.stage + 1})")
            return
        progress = self._require_progress()
        key = f"tiles-{event.kind}"
        if key not in self._tasks:
            self._tasks[key] = progress.add_task(f"  {label}", total=event.total, unit="tiles")
        progress.update(self._tasks[key], completed=event.done, total=event.total)

    def _stage_finished(self, event: StageFinished) -> None:
        summary = self._summary(event)
        if self.mode == "plain":
            self._line(summary)
            return
        progress = self._require_progress()
        self._advance_stages(1.0)
        progress.console.print(f"[green]done[/] {escape(summary)}", highlight=False)

    # helpers -------------------------------------------------------------------------------------------------
    def _summary(self, event: StageFinished) -> str:
        """`stage 2/5 refine 1024x1024: 12.3 s, 20 steps at 0.55 s/step, memory split, peak VRAM 3.10 GiB`."""
        stage = self._stage
        head = f"stage {event.index + 1}" if stage is None else f"stage {event.index + 1}/{stage.count}"
        what = "" if stage is None else f" {stage.kind} {stage.size}"
        parts = [f"{event.seconds:.1f} s"]
        if stage is not None:
            rate = "" if self._step_seconds is None else f" at {self._step_seconds:.2f} s/step"
            parts.append(f"{plural(stage.steps, 'step')}{rate}")
            parts.append(f"memory {stage.settings.get('name', '?')}")
        vram = event.usage.get("peak_vram_allocated_gib")
        parts.append(
            f"peak VRAM {vram:.2f} GiB" if vram is not None else f"peak RSS {_gib(event.usage.get('peak_rss_gib'))} GiB"
        )
        return f"{head}{what}: {', '.join(parts)}"

    def _plain_due(self, done: int, total: int) -> bool:
        every = max(1, int(total * PLAIN_EVERY))
        return done == total or done % every == 0

    def _advance_stages(self, fraction: float) -> None:
        if self.progress is not None and "stages" in self._tasks and self._stage is not None:
            self.progress.update(self._tasks["stages"], completed=self._stage.index + min(fraction, 1.0))

    def _redraw_headline(self) -> None:
        if not isinstance(self.progress, _StageProgress):
            return
        vram = "" if self._vram is None else f"; VRAM peak {self._vram:.2f} GiB"
        self.progress.headline = Text.assemble((self._headline, "bold"), (vram, "cyan"))
        self.progress.refresh()

    def _require_progress(self) -> Progress:
        if self.progress is None:
            raise RuntimeError("Reporter in rich mode must be used as a context manager")
        return self.progress


def stage_table(sidecar: dict[str, Any], title: str | None = None, width: int | None = None) -> Table | FieldLines:
    """Per-stage size, steps, seconds and peak memory, then totals; load and write time in the caption. In a
    terminal narrower than the table (`width`, default the terminal's), a line per stage (lines_if_wider)."""
    stages = sidecar.get("stages", [])
    on_gpu = any(s.get("peak_vram_allocated_gib") is not None for s in stages)
    columns = _stage_columns(stages, sidecar, on_gpu)
    table = Table(
        title=None if title is None else escape(title),
        title_justify="left",
        caption=_stage_caption(sidecar, on_gpu),
        caption_justify="left",
    )
    for name in columns:
        table.add_column(name, justify="left" if name in ("stage", "size", "memory") else "right")
    rows = list(zip(*columns.values(), strict=True))
    for row in rows[:-1]:
        table.add_row(*map(escape, row))
    table.add_row(*rows[-1], style="bold")
    return lines_if_wider(table, width if width is not None else stderr_width(), stderr)


def _stage_columns(stages: list[dict[str, Any]], sidecar: dict[str, Any], on_gpu: bool) -> dict[str, list[str]]:
    """The table's columns: header -> one cell per stage, then the total."""

    def peak(key: str) -> str:
        return _gib(max((s[key] or 0 for s in stages), default=0))

    columns: dict[str, list[str]] = {
        "stage": [f"{s['index'] + 1} {s['kind']}" for s in stages] + ["total"],
        "size": [s["size"] for s in stages] + [f"{sidecar.get('width')}x{sidecar.get('height')}"],
        "strength": ["-" if s["strength"] is None else f"{s['strength']:g}" for s in stages] + [""],
        "steps": [str(s["steps"]) for s in stages] + [str(sum(s["steps"] for s in stages))],
        "seconds": [f"{s['seconds']:.2f}" for s in stages] + [f"{sum(s['seconds'] for s in stages):.2f}"],
    }
    keys = {"VRAM alloc GiB": "peak_vram_allocated_gib", "VRAM reserved GiB": "peak_vram_reserved_gib"}
    for name, key in [*(keys.items() if on_gpu else []), ("peak RSS GiB", "peak_rss_gib")]:
        columns[name] = [_gib(s[key]) for s in stages] + [peak(key)]
    names = [s["memory_settings"]["name"] + (" (retried)" if s.get("retried") else "") for s in stages]
    columns["memory"] = [*names, ""]
    return columns


def _stage_caption(sidecar: dict[str, Any], on_gpu: bool) -> str:
    secs = sidecar.get("seconds", {})
    caption = f"model load {secs.get('model_load', 0):.1f} s, file write {secs.get('write', 0):.1f} s"
    if sidecar.get("dtypes"):
        caption += "; " + ", ".join(f"{part.replace('_', ' ')} {name}" for part, name in sidecar["dtypes"].items())
    if not on_gpu:
        caption += "; VRAM: not applicable (CPU run), RSS is the process's resident memory"
    return caption


def batch_table(summary: BatchSummary) -> Table:
    """Counts, then every failed job with its reason (a farm log should say what to rerun)."""
    failed = [o for o in summary.outcomes if o.status == "failed"]
    where = "" if summary.out is None else f" -> {summary.out}"
    table = Table(title=escape(f"batch: {summary.shard.describe()}{where}"), title_justify="left")
    statuses = ("done", "skipped", "claimed", "failed", *(("stopped",) if summary.stopped else ()))
    for name in ("jobs", *statuses, "seconds"):
        table.add_column(name, justify="right")
    table.add_row(
        str(summary.total_jobs),
        *(str(summary.count(status)) for status in statuses),
        f"{sum(o.seconds.get('total', 0.0) for o in summary.outcomes):.1f}",
    )
    lines = [f"stopped: {summary.stopped}"] if summary.stopped else []
    if failed:
        lines.append(
            "failed: "
            + "; ".join(f"job {o.index}: {o.error}" for o in failed[:20])
            + (f" (+{len(failed) - 20} more)" if len(failed) > 20 else "")
        )
    if lines:
        table.caption = escape("\n".join(lines))
        table.caption_justify = "left"
    return table


@contextmanager
def progress(mode: str) -> Iterator[tuple[Reporter, CancelToken]]:
    """Progress on stderr while a command runs; SIGINT/SIGTERM stop it at a safe point."""
    cancel = CancelToken()
    restore = cancel.install()
    try:
        with Reporter(stderr, mode) as reporter:
            cancel.on_request = reporter.stopping
            yield reporter, cancel
    finally:
        restore()
