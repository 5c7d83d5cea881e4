"""`--gpus N`: start the N processes of a split image on this machine with torch's own launcher (what torchrun
runs), so a user need not type torchrun. Each process then runs the same command without `--gpus`; the launcher
gives them RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous, and ends them all when one fails."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..base.errors import UsageError

GPUS_FLAG = "--gpus"
SIGNAL_EXIT_BASE = 128  # a process stopped by signal N exits 128 + N, as shells report it
LAUNCHED = "WORLD_SIZE"  # set by torchrun and by us for every process: a launched process never relaunches


def launched() -> bool:
    return LAUNCHED in os.environ


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
