"""Device memory and work of real code run on the `meta` device: the bytes of live tensors and their peak, and the
floating-point operations, attributed to named phases.

`MemoryTrace` is a TorchDispatchMode: every op's outputs that are new storages (not views of an input) add their
bytes, rounded up as the device's allocator rounds a block (`rounding`), and a storage's bytes come off when
Python frees it (a weak reference's callback). On the meta device ops only compute shapes, so a 16K UNet step
traces in seconds on a CPU; the running maximum is the peak of live tensors a GPU would hold (weights made before
tracing are not counted here: the caller adds them). `FlopTrace` reads torch's FlopCounterMode at phase edges.

Phases nest ("unet" inside "stage 3"); each keeps the live bytes when it was entered (what it inherited), its
peak, and its FLOPs, summed over every time it ran.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class PhaseRecord:
    """One named phase: the most it held on entry, its peak, how often it ran and its FLOPs (work counted once
    per item of every `Host.each` loop, scaled to all of them)."""

    name: str
    entry: int = 0  # live bytes when it started (the largest over its runs)
    peak: int = 0
    runs: int = 0
    flops: float = 0.0

    @property
    def own(self) -> int:
        """What the phase itself added on top of what it inherited."""
        return max(0, self.peak - self.entry)


class MemoryTrace(TorchDispatchMode):
    """Live bytes of the tensors ops create, their peak, and per-phase records (see the module docstring)."""

    def __init__(self, rounding: Callable[[int], int] = lambda n: n) -> None:
        super().__init__()
        self.rounding = rounding
        self.live = 0
        self.peak = 0
        self.host_live = 0  # bytes moved to (simulated) CPU memory
        self.host_peak = 0
        self.phases: dict[str, PhaseRecord] = {}
        self._stack: list[PhaseRecord] = []
        self._flops_at: list[float] = []
        self._counted: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [bytes, on host]
        self.flops: FlopTrace | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self._add(t.untyped_storage())
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        if storage in self._counted:
            return
        size = self.rounding(storage.nbytes())
        entry = [size, False]
        self._counted[storage] = entry
        weakref.finalize(storage, self._free, entry)
        self._grow(size)

    def _grow(self, size: int) -> None:
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
        for record in self._stack:
            record.peak = max(record.peak, self.live)

    def _free(self, entry: list[Any]) -> None:
        if entry[1]:
            self.host_live -= entry[0]
        else:
            self.live -= entry[0]

    def to_host(self, tensor: torch.Tensor) -> None:
        """Count this tensor's storage as CPU memory from now on (a simulated copy to the host)."""
        storage = tensor.untyped_storage()
        self._add(storage)
        entry = self._counted[storage]
        if not entry[1]:
            entry[1] = True
            self.live -= entry[0]
            self.host_live += entry[0]
            self.host_peak = max(self.host_peak, self.host_live)

    def begin(self, name: str) -> PhaseRecord:
        """Open a named phase, nested in the phases open now (its path: "stage 3/unet")."""
        path = "/".join([*(r.name for r in self._stack), name])
        record = self.phases.setdefault(path, PhaseRecord(name))
        record.entry = max(record.entry, self.live)
        record.peak = max(record.peak, self.live)
        record.runs += 1
        self._stack.append(record)
        self._flops_at.append(self.flops.total() if self.flops else 0.0)
        return record

    def end(self) -> None:
        """Close the innermost open phase."""
        record, start = self._stack.pop(), self._flops_at.pop()
        if self.flops:
            record.flops += self.flops.total() - start

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseRecord]:
        record = self.begin(name)
        try:
            yield record
        finally:
            self.end()

    @contextlib.contextmanager
    def scaled(self, times: float) -> Iterator[None]:
        """The block's work stands for `times` as much (one item run for a whole loop of them): FLOPs counted in
        it are scaled, in the total and in every phase that ran meanwhile."""
        before = {path: r.flops for path, r in self.phases.items()}
        start = self.flops.total() if self.flops else 0.0
        yield
        if self.flops is None:
            return
        self.flops.extra += (self.flops.total() - start) * (times - 1)
        open_now = {id(r) for r in self._stack}
        for path, record in self.phases.items():
            if id(record) not in open_now:  # open phases get it when they close
                record.flops += (record.flops - before.get(path, 0.0)) * (times - 1)

    @property
    def depth(self) -> int:
        """How many phases are open."""
        return len(self._stack)

    def reset_peak(self) -> None:
        self.peak = self.live

    def records(self, prefix: str) -> dict[str, PhaseRecord]:
        """The phases under `prefix` ("stage 3"), by their path below it."""
        start = prefix + "/"
        return {path[len(start) :]: r for path, r in self.phases.items() if path.startswith(start)}


class FlopTrace:
    """FLOPs counted by torch's FlopCounterMode, plus `extra`: work that ran once on behalf of many
    (MemoryTrace.scaled)."""

    def __init__(self) -> None:
        self.counter = FlopCounterMode(display=False)
        self.extra = 0.0

    def total(self) -> float:
        return float(self.counter.get_total_flops()) + self.extra
