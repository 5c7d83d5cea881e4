"""What the core tells its caller while it works: plain data, drawn only by report.py (or ignored)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted


@dataclass(frozen=True)
class StageStarted:
    index: int
    count: int
    kind: str
    size: str
    steps: int
    strength: float | None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepDone:
    stage: int
    step: int
    total: int
    vram_gib: float | None = None  # peak VRAM allocated in this stage so far (None off CUDA)


@dataclass(frozen=True)
class TilesDone:
    stage: int
    kind: str  # "encode" | "decode" | "stats"
    done: int
    total: int


@dataclass(frozen=True)
class StageFinished:
    index: int
    seconds: float
    usage: dict[str, Any]


@dataclass(frozen=True)
class Working:
    """A stretch of work with no count to show (loading a model, writing a file); ends at the next event."""

    what: str


@dataclass(frozen=True)
class Note:
    level: str  # "info" | "warning" | "error" (shown even with --quiet)
    message: str


Event = StageStarted | StepDone | TilesDone | StageFinished | Note | Working
EventSink = Callable[[Event], None]


def ignore(_: Event) -> None:
    return None


class CancelToken:
    """Set by a signal handler; the core calls `check()` at safe points (between steps and tiles)."""

    def __init__(self, on_request: Callable[[str], None] | None = None) -> None:
        self.reason: tuple[str, int] | None = None
        self._lock = threading.Lock()
        # said at once when a signal asks to stop: the next safe point may be seconds away (a model loading)
        self.on_request = on_request

    def request(self, name: str, exit_code: int) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = (name, exit_code)

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def check(self) -> None:
        if self.reason is not None:
            raise Interrupted(*self.reason)

    def install(self) -> Callable[[], None]:
        """Route SIGINT/SIGTERM here (main thread only); returns a function that restores the old handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        names = {signal.SIGINT: ("SIGINT", EXIT_SIGINT), signal.SIGTERM: ("SIGTERM", EXIT_SIGTERM)}
        previous = {}
        for sig, (name, code) in names.items():
            previous[sig] = signal.getsignal(sig)

            def handler(signum: int, frame: Any, _name: str = name, _code: int = code) -> None:
                if self.requested:  # a second signal: stop now
                    raise Interrupted(_name, _code)
                self.request(_name, _code)
                if self.on_request is not None:
                    self.on_request(_name)

            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore
