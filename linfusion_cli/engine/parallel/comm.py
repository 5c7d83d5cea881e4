"""The process group that splits one image, and every message it sends, counted.

`joined(timeout_s)` joins torchrun's group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on CUDA, gloo
on the CPU, every operation bounded by the timeout so that a dead process makes the others fail instead of
waiting forever. Without WORLD_SIZE (or with 1) it yields a one-process `Comm` that sends nothing, so the same
code runs unsplit.

Accounting counts logical payload, not wire traffic: a point-to-point message counts once on each side; an
all-reduce of n bytes counts n sent and n received; an all-gather counts this process's part sent and everyone
else's received. Seconds are wall time inside communication calls: exact on gloo; on NCCL, calls return once
queued unless `precise_timing` synchronises the device around each (which costs overlap: measurements only).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as td

from ...base.errors import DEFAULT_TIMEOUT_S, LinFusionError, UsageError
from ..bands import Bands

GATHER_ROOT = 0
STORE_PREFIX = "linfusion"  # the keys of our groups and step-downs in the rendezvous store (regroup.py)


class ParallelError(LinFusionError):
    """A process of a split image failed, died or timed out; the others stop instead of waiting forever."""


@dataclass
class CommStats:
    """Calls, bytes and seconds per kind of message ("conv", "norm", "attention", "gather", ...)."""

    calls: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, kind: str, sent: int, received: int) -> None:
        self.calls[kind] += 1
        self.sent[kind] += sent
        self.received[kind] += received

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": sum(self.sent.values()),
            "received": sum(self.received.values()),
            "by_kind": {
                kind: {"calls": self.calls[kind], "sent": self.sent[kind], "received": self.received[kind]}
                for kind in sorted(self.calls)
            },
        }


class Comm:
    """One process's place in the group splitting one image: rank, world, backend, the current stage's bands,
    and counters of everything it sent. `bands` is set per stage (sizes change between stages)."""

    def __init__(
        self,
        rank: int = 0,
        world: int = 1,
        backend: str = "local",
        device: torch.device | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        bands: Bands | None = None,
        precise_timing: bool = False,
        store: td.Store | None = None,
    ) -> None:
        self.rank = rank
        self.world = world
        self.backend = backend
        self.device = device or torch.device("cpu")
        self.timeout_s = timeout_s
        self.bands = bands
        self.precise_timing = precise_timing
        self.stats = CommStats()
        self.store = store  # the rendezvous store, kept to rebuild the group after a step-down (regroup.py)
        self.generation = 0  # how many times the group was rebuilt

    def geometry(self) -> Bands:
        if self.bands is None:
            raise UsageError("no bands set on this Comm: set comm.bands = Bands.split(...) for the stage first")
        if self.bands.world != self.world:
            raise UsageError(f"bands for {self.bands.world} processes, but the group has {self.world}")
        return self.bands

    def band(self, whole: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """This process's rows of a whole-image tensor at any scale, as a view: the noise every process draws
        whole from the seed, an upscaled image, a ControlNet's conditioning image."""
        return self.geometry().take(whole, self.rank, dim)

    @property
    def writes(self) -> bool:
        """Whether this process writes the job's files: the first of the group (the only one, alone)."""
        return self.rank == GATHER_ROOT

    def agree(self, value: int, kind: str = "agree") -> int:
        """The first process's `value`, on every process: what they must agree on (a seed drawn at random,
        whether a batch job is theirs to make)."""
        return value if self.world == 1 else self.agree_all(value, kind)[GATHER_ROOT]

    def agree_all(self, value: int, kind: str = "agree") -> list[int]:
        """Every process's `value`, in rank order."""
        if self.world == 1:
            return [value]
        parts = self.all_gather(torch.tensor([value], dtype=torch.int64, device=self.device), kind)
        return [int(p.item()) for p in parts]

    def report(self, split: bool = True, stages_run_whole: int = 0) -> dict[str, object]:
        """The `parallel` section of a run report: the group, the bands of its last stage (latent rows per
        process; None when that stage ran whole on every process, `split` False), and what this process sent
        and received over the whole job."""
        return {
            "world_size": self.world,
            "rank": self.rank,
            "backend": self.backend,
            "bands": self.bands.heights() if self.bands and split else None,
            "stages_run_whole": stages_run_whole,
            "comm_bytes": self.stats.as_dict(),
            "comm_seconds": round(self.stats.seconds, 3),
        }

    # --- operations ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, kind: str) -> Iterator[None]:
        sync = self.precise_timing and self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
            if sync:
                torch.cuda.synchronize(self.device)
        except RuntimeError as exc:  # gloo/NCCL errors (DistBackendError is one): a peer died or timed out
            raise ParallelError(
                f"process {self.rank} of {self.world}: the {kind} exchange failed ({_first_line(exc)}); another "
                f"process probably died or stalled (timeout {self.timeout_s:g} s)"
            ) from exc
        finally:
            self.stats.seconds += time.perf_counter() - start

    def exchange(self, sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor], kind: str) -> None:
        """Point-to-point: send each `sends[peer]`, fill each `receives[peer]` buffer, all at once (one batch, so
        the order of peers cannot deadlock). With nothing to send or receive it returns at once."""
        self.stats.add(kind, sum(t.nbytes for t in sends.values()), sum(t.nbytes for t in receives.values()))
        if not sends and not receives:
            return
        with self._timed(kind):
            self._send_receive(sends, receives)

    def all_reduce_(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum over processes, in place."""
        if self.world == 1:
            self.stats.add(kind, 0, 0)
            return tensor
        self.stats.add(kind, tensor.nbytes, tensor.nbytes)
        with self._timed(kind):
            self._sum(tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor, kind: str) -> list[torch.Tensor]:
        """Every process's `tensor` (all the same shape), in rank order."""
        if self.world == 1:
            self.stats.add(kind, 0, 0)
            return [tensor]
        self.stats.add(kind, tensor.nbytes, tensor.nbytes * (self.world - 1))
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        with self._timed(kind):
            self._gather(parts, tensor.contiguous())
        return parts

    def barrier(self) -> None:
        if self.world > 1:
            with self._timed("barrier"):
                td.barrier()

    # --- the transport (torch.distributed); a simulated group (engine/simulate) sends nothing -----------------
    def _send_receive(self, sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
        ops = [td.P2POp(td.isend, t.contiguous(), peer) for peer, t in sorted(sends.items())]
        ops += [td.P2POp(td.irecv, t, peer) for peer, t in sorted(receives.items())]
        for work in td.batch_isend_irecv(ops):
            work.wait()

    def _sum(self, tensor: torch.Tensor) -> None:
        td.all_reduce(tensor)

    def _gather(self, parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        td.all_gather(parts, tensor)


def gather_bands(comm: Comm, band: torch.Tensor, dim: int = 0) -> torch.Tensor | None:
    """The whole image on rank 0 (None elsewhere) from every process's band along `dim`, bands of unequal heights
    allowed: e.g. uint8 (h, W, 3) image bands, at any scale of the latent bands. Transfers on `comm.device`."""
    bands = comm.geometry()
    edges = bands.at(bands.scale_of(comm.rank, band.shape[dim]))
    band = band.to(comm.device)
    if comm.rank != GATHER_ROOT:
        comm.exchange({GATHER_ROOT: band}, {}, "gather")
        return None
    shape = list(band.shape)
    shape[dim] = edges[-1]
    whole = torch.empty(shape, dtype=band.dtype, device=band.device)
    buffers = {
        peer: torch.empty_like(whole.narrow(dim, edges[peer], edges[peer + 1] - edges[peer]))
        for peer in range(comm.world)
        if peer != GATHER_ROOT
    }
    comm.exchange({}, buffers, "gather")
    for peer in range(comm.world):
        piece = band if peer == GATHER_ROOT else buffers[peer]
        whole.narrow(dim, edges[peer], edges[peer + 1] - edges[peer]).copy_(piece)
    return whole


# --- the process group ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or any launcher) said about this process."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise UsageError(f"RANK / WORLD_SIZE / LOCAL_RANK must be whole numbers: {exc}") from None
        if world < 1 or not 0 <= rank < world:
            raise UsageError(f"RANK {rank} is not within WORLD_SIZE {world}")
        if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise UsageError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (start the processes with torchrun)")
        return cls(rank, world, local)


@contextlib.contextmanager
def joined(
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: torch.device | None = None,
    *,
    blocking_wait: bool = False,
    precise_timing: bool = False,
) -> Iterator[Comm]:
    """Join the launcher's process group for the block, and leave it afterwards (also on errors); a group that
    is already up (the caller's) is used and left up.

    device: "cuda" (or None with CUDA available) means cuda:LOCAL_RANK and NCCL; otherwise the CPU and gloo.
    timeout_s bounds every operation. On NCCL a timed-out operation is aborted by the watchdog
    (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, as torchrun sets); `blocking_wait` makes the waiting call raise a
    ParallelError instead, at the cost of a host synchronisation per message.
    """
    launch = LaunchEnv.read()
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", launch.local_rank)
    if launch.world == 1:
        yield Comm(device=device, timeout_s=timeout_s, precise_timing=precise_timing)
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if blocking_wait:
            os.environ["TORCH_NCCL_BLOCKING_WAIT"] = "1"
        torch.cuda.set_device(device)
    owned = not td.is_initialized()
    store: td.Store | None = None
    try:
        if owned:  # env:// as init_process_group reads it, the store kept: a step-down rebuilds the group on it
            timeout = timedelta(seconds=timeout_s)
            store, _, _ = next(td.rendezvous("env://", launch.rank, launch.world, timeout=timeout))
            td.init_process_group(
                backend,
                store=td.PrefixStore(f"{STORE_PREFIX}/0", store),
                rank=launch.rank,
                world_size=launch.world,
                timeout=timeout,
                device_id=device if backend == "nccl" else None,
            )
    except (RuntimeError, ValueError) as exc:
        raise ParallelError(
            f"process {launch.rank} of {launch.world} could not join the group ({_first_line(exc)})"
        ) from exc
    comm = Comm(launch.rank, launch.world, backend, device, timeout_s, precise_timing=precise_timing, store=store)
    try:
        comm.barrier()  # NCCL: the first operation must involve everyone before point-to-point messages
        comm.stats = CommStats()
        yield comm
    finally:
        if owned and td.is_initialized():
            td.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
