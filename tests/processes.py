"""linfusion in fresh processes, as a farm runs it (the `processes` fixture in conftest.py), and reading their
output without ever hanging."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class Processes:
    """Processes a test starts: offline, one torch thread, this checkout first on the path, each in a session of
    its own, and every one still running when the test ends killed with all it started (a failing test leaks
    none: not even a torchrun worker whose launcher is gone)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        return {**env, **extra}

    def start(self, *args: str, **popen: Any) -> subprocess.Popen[str]:
        """`linfusion ARGS` (as `python -m linfusion_cli`), stdout and stderr piped."""
        return self.start_python("-m", "linfusion_cli", *args, **popen)

    def start_python(self, *args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
        """`python ARGS` (`-c CODE`, `-m torch.distributed.run ...`)."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        popen.setdefault("start_new_session", True)
        proc = subprocess.Popen([sys.executable, *args], text=True, env=env or self.env(), **popen)
        self.started.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 300, **popen: Any) -> subprocess.CompletedProcess[str]:
        """`linfusion ARGS` to its end (at most `timeout` seconds)."""
        return self.finish(self.start(*args, **popen), timeout)

    def finish(self, proc: subprocess.Popen[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill_all(self) -> None:
        for proc in self.started:
            doomed = [proc.pid, *_descendants(proc.pid)]  # torchrun starts its workers in sessions of their own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its session: the children too, also once it has exited
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)


def _descendants(pid: int) -> list[int]:
    """Every living process below `pid` (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def read_line(proc: subprocess.Popen[str], timeout: float, stream: str = "stdout") -> str:
    """The process's next line on `stream` (stdout or stderr), waiting at most `timeout` seconds (then the test
    fails, it never hangs; the process is killed when the test ends)."""
    stdout = getattr(proc, stream)
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines, f"no output within {timeout:g} s"
    return lines[0]
