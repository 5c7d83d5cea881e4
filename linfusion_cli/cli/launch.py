"""`--gpus N`: start the N processes of a split image on this machine with torch's own launcher (what torchrun
runs), so a user need not type torchrun. The launching process checks the job first (a bad value is refused once,
before any process starts) and that the machine has N GPUs (or `--device cpu`); each process then runs the same
command without `--gpus`; the launcher gives them RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous, and ends them all
when one fails. A process started by a launcher (ours or torchrun) dies with it, even when it is killed with
SIGKILL: torch's launcher starts its processes in sessions of their own, so nothing else would end them, and an
orphan would hold its GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

import typer

from ..base.errors import UsageError
from ..base.text import plural
from ..engine.placement import gpu_possible
from .boundary import output_mode

GPUS_FLAG = "--gpus"
SIGNAL_EXIT_BASE = 128  # a process stopped by signal N exits 128 + N, as shells report it
LAUNCHED = "WORLD_SIZE"  # set by torchrun and by us for every process: a launched process never relaunches
ELASTIC_WORKER = "TORCHELASTIC_RUN_ID"  # set by torch's launcher (torchrun, --gpus) in each process it starts
PR_SET_PDEATHSIG = 1  # Linux prctl: a signal the kernel sends this process when its parent dies
WATCH_SECONDS = 1.0  # where there is no prctl: how often a process looks whether its launcher is still there


def launched() -> bool:
    return LAUNCHED in os.environ


def first_process() -> bool:
    """Whether this process speaks for a group (torchrun's or --gpus'): the others are silent unless they fail."""
    return os.environ.get("RANK", "0") == "0"


def process_mode(quiet: bool) -> str:
    """The output mode of a command that may run in a group: the first process's, quiet for the others."""
    return output_mode(quiet) if first_process() else "quiet"


def relaunch_for(gpus: int | None, device: str, *extra: str) -> None:
    """`--gpus N` outside a launcher: run this same command (with `extra` flags) in N processes and exit with
    their result. Call it once the job is checked: a bad value is then said once, not by every process."""
    if gpus is not None and gpus > 1 and not launched():
        check_gpus(gpus, device)
        raise typer.Exit(relaunch(gpus, [*sys.argv[1:], *extra]))


def die_with_launcher() -> None:
    """In a process torch's launcher started: end it (SIGKILL) when its launcher dies, however it dies. Linux: the
    kernel's parent-death signal; elsewhere a thread that looks every WATCH_SECONDS."""
    if ELASTIC_WORKER not in os.environ:
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent:  # it died before the signal was armed
                    os.kill(os.getpid(), signal.SIGKILL)
                return
    threading.Thread(target=_watch_launcher, args=(parent,), name="launcher-watch", daemon=True).start()


def _watch_launcher(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def without_gpus(argv: Sequence[str]) -> list[str]:
    """The command line without `--gpus N` (or `--gpus=N`): what each launched process runs."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == GPUS_FLAG:
            skip = True
        elif not arg.startswith(GPUS_FLAG + "="):
            out.append(arg)
    return out


def check_gpus(gpus: int, device: str = "auto") -> None:
    """N processes need N GPUs, one each; with `--device cpu` they are CPU processes (each a share of the cores:
    for testing a farm script, or a machine with more cores than a process uses)."""
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: give how many processes to split the image over (at least 1)")
    if device == "cpu":
        return
    count = cuda_devices()
    if count >= gpus:
        return
    have = (
        "no CUDA device; run it on a machine with GPUs"
        if count == 0
        else (f"only {plural(count, 'CUDA device')}; give --gpus {count} or fewer")
    )
    raise UsageError(f"--gpus {gpus}: this machine has {have}, or add --device cpu to split over {gpus} CPU processes")


def cuda_devices() -> int:
    """The CUDA devices torch can use here (0 without asking torch where no GPU can be: placement.gpu_possible)."""
    if not gpu_possible():
        return 0
    import torch  # lazy: torch only when --gpus is asked for on a machine that may have GPUs

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def relaunch(gpus: int, argv: Sequence[str]) -> int:
    """Run `linfusion ARGV` in `gpus` processes on this machine; the exit code is the first failure's (0: all
    succeeded). Their output is this process's: the first prints progress and results, the others errors only."""
    from torch.distributed.elastic.multiprocessing.api import SignalException  # lazy: see check_gpus
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ..engine.parallel.launch import launch_here

    try:
        launch_here(gpus, sys.executable, "-m", "linfusion_cli", *without_gpus(argv))
    except SignalException as exc:  # Ctrl-C or SIGTERM reached the launcher too: exit as one process would
        return SIGNAL_EXIT_BASE + int(exc.sigval)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0
