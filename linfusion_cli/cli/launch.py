"""`--gpus N`: start the N processes of a split image on this machine with torch's own launcher (what torchrun
runs), so a user need not type torchrun. Each process then runs the same command without `--gpus`; the launcher
gives them RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous, and ends them all when one fails."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import typer

from ..base.errors import UsageError
from .boundary import output_mode

GPUS_FLAG = "--gpus"
SIGNAL_EXIT_BASE = 128  # a process stopped by signal N exits 128 + N, as shells report it
LAUNCHED = "WORLD_SIZE"  # set by torchrun and by us for every process: a launched process never relaunches


def launched() -> bool:
    return LAUNCHED in os.environ


def first_process() -> bool:
    """Whether this process speaks for a group (torchrun's or --gpus'): the others are silent unless they fail."""
    return os.environ.get("RANK", "0") == "0"


def process_mode(quiet: bool) -> str:
    """The output mode of a command that may run in a group: the first process's, quiet for the others."""
    return output_mode(quiet) if first_process() else "quiet"


def relaunch_for(gpus: int | None, *extra: str) -> None:
    """`--gpus N` outside a launcher: run this same command (with `extra` flags) in N processes and exit with
    their result."""
    if gpus is not None and gpus > 1 and not launched():
        raise typer.Exit(relaunch(gpus, [*sys.argv[1:], *extra]))


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


def check_gpus(gpus: int) -> None:
    import torch  # lazy: torch only when --gpus is asked for

    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: give how many processes to split the image over (at least 1)")
    if torch.cuda.is_available() and gpus > torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--gpus {gpus}: this machine has {count} CUDA device{'s' if count != 1 else ''}")


def relaunch(gpus: int, argv: Sequence[str]) -> int:
    """Run `linfusion ARGV` in `gpus` processes on this machine; the exit code is the first failure's (0: all
    succeeded). Their output is this process's: the first prints progress and results, the others errors only."""
    from torch.distributed.elastic.multiprocessing.api import SignalException  # lazy: see check_gpus
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ..engine.parallel.launch import launch_here

    check_gpus(gpus)
    try:
        launch_here(gpus, sys.executable, "-m", "linfusion_cli", *without_gpus(argv))
    except SignalException as exc:  # Ctrl-C or SIGTERM reached the launcher too: exit as one process would
        return SIGNAL_EXIT_BASE + int(exc.sigval)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0
