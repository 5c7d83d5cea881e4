"""One process of a split image out of memory, survived by all: every process steps down the memory ladder together
and runs the stage again, as one process does alone.

A process that runs out of memory mid-stage cannot take part in the rest of the stage's exchanges, and the others
are waiting in one of them. So it says why in the group's store (the rendezvous key-value store every process
reaches, kept by `joined`) and leaves the group; the others' exchanges with it then fail (gloo: its connections
close at once; NCCL: each process's watch on the store aborts its communicator), each finds the reason in the
store and leaves too. Then all of them meet in the store, join a fresh group (a new prefix of the same store), and
retry the stage with the next more frugal settings. A failure that is not such a step-down (a process died, a
real timeout) ends the job as before.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as td

from .comm import STORE_PREFIX, Comm, ParallelError

WATCH_SECONDS = 0.5  # NCCL: how often a process looks in the store for a step-down while a stage runs
MEET_POLL_SECONDS = 0.01


def step_down_key(comm: Comm) -> str:
    return f"{STORE_PREFIX}/step-down/{comm.generation}"


def can_regroup(comm: Comm) -> bool:
    """A group joined by `joined` (it keeps the store); a group made by the caller cannot be rebuilt here."""
    return comm.world > 1 and comm.store is not None


def give_up_stage(comm: Comm, why: str) -> None:
    """This process cannot finish the stage: say why in the store, then leave the group, so that the others'
    exchanges with it fail now rather than after the timeout."""
    assert comm.store is not None
    comm.store.set(step_down_key(comm), f"process {comm.rank}: {why}")
    leave(comm)


def stepping_down(comm: Comm) -> str | None:
    """Why the group is stepping down (a process ran out of memory), or None: a real failure."""
    if not can_regroup(comm):
        return None
    assert comm.store is not None
    key = step_down_key(comm)
    try:
        return comm.store.get(key).decode() if comm.store.check([key]) else None
    except (RuntimeError, ValueError):  # the store itself is gone: the group's first process died
        return None


def leave(comm: Comm) -> None:
    """Leave the group as it is, exchanges pending or not."""
    if not td.is_initialized():
        return
    if comm.backend == "nccl":  # pending NCCL kernels wait for the missing process until aborted
        td.distributed_c10d._abort_process_group()
    else:
        td.destroy_process_group()


def regroup(comm: Comm) -> None:
    """Every process, after a step-down: leave the old group, meet the others in the store, join a fresh group."""
    assert comm.store is not None
    leave(comm)
    arrived = f"{STORE_PREFIX}/regroup/{comm.generation}"
    comm.store.add(arrived, 1)
    deadline = time.monotonic() + comm.timeout_s
    while int(comm.store.add(arrived, 0)) < comm.world:
        if time.monotonic() > deadline:
            raise ParallelError(f"process {comm.rank}: the others did not come back after a step-down")
        time.sleep(MEET_POLL_SECONDS)
    comm.generation += 1
    td.init_process_group(
        comm.backend,
        store=td.PrefixStore(f"{STORE_PREFIX}/{comm.generation}", comm.store),
        rank=comm.rank,
        world_size=comm.world,
        timeout=timedelta(seconds=comm.timeout_s),
        device_id=comm.device if comm.backend == "nccl" else None,
    )
    comm.barrier()


@contextlib.contextmanager
def watched(comm: Comm) -> Iterator[None]:
    """While a stage runs on NCCL, a thread that aborts this process's communicator as soon as another process
    gives up the stage (its kernels would otherwise wait for the missing process until the timeout). gloo needs
    none: a process that leaves closes its connections, and the others' exchanges fail at once."""
    if comm.backend != "nccl" or not can_regroup(comm):
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(WATCH_SECONDS):
            if stepping_down(comm) is not None:
                leave(comm)
                return

    thread = threading.Thread(target=watch, name="step-down-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
