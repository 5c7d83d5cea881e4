"""Run a function on several gloo processes on 127.0.0.1, bounded in time; used by tests/test_parallel_*.py.

Processes are forked from the test process, so they inherit its imports and any models and references it built
(no re-import of torch and diffusers per process: that would cost ~6 s of CPU each). Every process joins the
group through `parallel.joined`, i.e. torchrun's environment variables, with one torch thread. A process that
does not report back before the deadline is killed and the launch fails: a hang fails the test instead of
blocking the suite.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from linfusion_cli.engine.parallel import Comm, joined

POLL_S = 0.5  # a process that exited is only declared dead after its queue stayed empty this long
Target = Callable[..., Any]  # (comm, *args) -> picklable result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(rank: int, world: int, port: int, timeout_s: float, target: Target, args: tuple, out: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        with joined(timeout_s, torch.device("cpu")) as comm:
            start = time.monotonic()
            out.put((rank, "ok", target(comm, *args), time.monotonic() - start))
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        out.put((rank, type(exc).__name__, error, time.monotonic() - start))
    finally:
        out.close()
        out.join_thread()
        os._exit(0)  # skip the forked parent's atexit handlers (pytest's, xdist's)


def launch(world: int, target: Target, *args: Any, deadline_s: float = 60.0, timeout_s: float = 30.0) -> list[Any]:
    """Run `target(comm, *args)` on `world` processes; returns [(status, result, seconds)] by rank, where status
    is "ok" or the exception's class name (result is then its message). Raises if a process hangs or vanishes."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, timeout_s, target, args, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    results: dict[int, tuple[str, Any, float]] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(results) < world:
            try:
                rank, status, result, seconds = out.get(timeout=POLL_S)
                results[rank] = (status, result, seconds)
                continue
            except queue.Empty:
                pass
            for rank, proc in enumerate(procs):  # exited without a word (os._exit, a crash): say so
                if rank not in results and not proc.is_alive():
                    results[rank] = ("died", f"exit code {proc.exitcode}", 0.0)
            if time.monotonic() > end:
                missing = sorted(set(range(world)) - set(results))
                raise TimeoutError(f"processes {missing} did not report within {deadline_s} s")
    finally:
        for proc in procs:
            proc.join(timeout=max(0.1, end - time.monotonic()))
            if proc.is_alive():
                proc.kill()  # only the processes this launch started
                proc.join()
        with contextlib.suppress(Exception):
            out.close()
    return [results[r] for r in range(world)]


def ok_results(runs: list[Any]) -> list[Any]:
    """The results of a launch where every process must have succeeded."""
    failed = [f"rank {r}: {result}" for r, (status, result, _) in enumerate(runs) if status != "ok"]
    assert not failed, "\n".join(failed)
    return [result for _, result, _ in runs]


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float | bool]:
    """Exactness of a band against the reference's same rows: equal bits, max abs and relative error."""
    diff = (ours.double() - ref.double()).abs().max().item() if ours.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 1.0
    return {"equal": bool(torch.equal(ours, ref)), "max_abs": diff, "rel": diff / max(scale, 1e-30)}


def band_of(comm: Comm, whole: torch.Tensor, dim: int = -2) -> torch.Tensor:
    return comm.band(whole, dim)
