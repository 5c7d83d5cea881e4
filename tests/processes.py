"""linfusion in fresh processes, as a farm runs it (the `processes` fixture in conftest.py), and reading their
output without ever hanging."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class Processes:
    """Processes a test starts: offline, one torch thread, this checkout first on the path, and every one still
    running when the test ends killed (a failing test leaks none)."""

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
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)


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
