"""Starting the processes of a split image on this machine with torch's own launcher (what torchrun runs), for
`--gpus N` and `bench parallel`: a rendezvous on 127.0.0.1, no restarts, the others ended when one fails."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

MONITOR_SECONDS = 0.5  # how often the launcher looks at its processes (a failure ends the others this soon)


def launch_here(nproc: int, entrypoint: Callable[..., Any] | str, *args: Any) -> dict[int, Any]:
    """Run `entrypoint(*args)` (a function, or a program such as sys.executable) in `nproc` processes with
    RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous set; each rank's return value (a function's), or
    torch's ChildFailedError naming the first failure."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"linfusion-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=MONITOR_SECONDS,
    )
    returned: dict[int, Any] = elastic_launch(config, entrypoint)(*args)
    return returned
