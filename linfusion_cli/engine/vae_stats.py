"""GroupNorm with external statistics: every GroupNorm of the VAE collects (count, mean, M2) over tile cores and
normalises with the whole image's, so tiles show no seams or tone steps (see vae.py)."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .vae_tiles import Pool, Window


@dataclass
class Stats:
    count: float = 0.0
    mean: torch.Tensor | None = None  # (G,) fp32
    m2: torch.Tensor | None = None  # (G,) fp32, sum of squared deviations

    def add(self, count: float, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan et al.'s parallel combination of (count, mean, M2)."""
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean.clone(), m2.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        assert self.m2 is not None
        return self.m2 / max(self.count, 1.0)


@dataclass
class NormControl:
    """Swaps every GroupNorm's forward for one that collects or applies whole-image statistics.

    Modes: "stream" collects into `collected` and normalises with it (running statistics: a batch normalises
    with everything seen so far, itself included); "refine" collects afresh but normalises with the previous
    round's `stats` pooled with what it collected so far; "apply" only normalises with `stats`. Statistics are keyed by the
    norm's qualified name, so an fp32 copy of the VAE shares them.

    `pool` (a split image's processes, each running its own windows of a batch, `peers` every process's windows
    of it): every GroupNorm's batch statistics are combined with the other processes' before they are used, so
    each process normalises with the statistics of the whole batch, as one process running all of it would.
    Every process's count comes from the windows' geometry; only means and M2 travel.
    """

    mode: str = "stream"
    windows: list[Window] = field(default_factory=list)  # the batch now running (stream/refine)
    window_hw: tuple[int, int] = (1, 1)  # the input grid size of one window
    stats: dict[str, Stats] = field(default_factory=dict)  # what "refine"/"apply" normalise with
    collected: dict[str, Stats] = field(default_factory=dict)
    pool: Pool | None = None
    peers: list[list[Window]] = field(default_factory=list)  # the batch's windows on every process, in rank order

    def forward(self, name: str, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "apply":
            return self._normalize(norm, x, self.stats[name])
        batch = self._collect(norm, x)
        if self.pool is not None:
            counts = [self._count(norm, x, windows) for windows in self.peers]
            mean, m2 = self.pool(counts, batch.mean, batch.m2)  # type: ignore[arg-type]
            batch = Stats(sum(counts), mean.float(), m2.float())
        collected = self.collected.setdefault(name, Stats())
        collected.add(batch.count, batch.mean, batch.m2)  # type: ignore[arg-type]
        if self.mode == "stream" or name not in self.stats:
            return self._normalize(norm, x, collected)
        prior = self.stats[name]
        pooled = Stats(prior.count, prior.mean, prior.m2)
        pooled.add(collected.count, collected.mean, collected.m2)  # type: ignore[arg-type]
        return self._normalize(norm, x, pooled)

    def next_round(self, mode: str) -> None:
        self.stats, self.collected, self.mode = self.collected, {}, mode

    def tensors(self) -> list[torch.Tensor]:
        """Every mean and M2 held (to check that they are finite)."""
        held = (*self.stats.values(), *self.collected.values())
        return [t for s in held for t in (s.mean, s.m2) if t is not None]

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, N) inputs (attention's group_norm) back to (B, C, h, w) of this level."""
        if x.ndim == 4:
            return x
        win_h, win_w = self.window_hw
        scale = math.sqrt(x.shape[-1] / (win_h * win_w))
        h, w = round(win_h * scale), round(win_w * scale)
        if h * w != x.shape[-1]:
            raise RuntimeError(f"cannot map {x.shape[-1]} tokens onto a {win_h}x{win_w} window")
        return x.unflatten(-1, (h, w))

    def _count(self, norm: nn.GroupNorm, x: torch.Tensor, windows: list[Window]) -> float:
        """Elements per group that `windows`' cores hold at x's level."""
        scale = self._grid(x).shape[-2] / self.window_hw[0]
        cores = (w.core_slices(scale) for w in windows)
        return float(
            sum((ys.stop - ys.start) * (xs.stop - xs.start) for ys, xs in cores) * x.shape[1] // norm.num_groups
        )

    def _collect(self, norm: nn.GroupNorm, x: torch.Tensor) -> Stats:
        grid = self._grid(x)  # (B, C, h, w)
        scale = grid.shape[-2] / self.window_hw[0]
        if not self.windows:  # this process has no window in the batch: it adds nothing to the pool
            empty = torch.zeros(norm.num_groups, device=x.device)
            return Stats(0.0, empty, empty.clone())
        pooled = Stats()
        for b, window in enumerate(self.windows):
            ys, xs = window.core_slices(scale)
            core = grid[b, :, ys, xs].reshape(norm.num_groups, -1).float()  # (G, n)
            var, mean = torch.var_mean(core, dim=1, correction=0)
            pooled.add(float(core.shape[1]), mean, var * core.shape[1])
        return pooled

    @staticmethod
    def _normalize(norm: nn.GroupNorm, x: torch.Tensor, stats: Stats) -> torch.Tensor:
        assert stats.mean is not None
        channels = x.shape[1]
        per_group = channels // norm.num_groups
        rstd = torch.rsqrt(stats.variance() + norm.eps).repeat_interleave(per_group)  # (C,) fp32
        mean = stats.mean.repeat_interleave(per_group)
        scale = rstd * norm.weight.float() if norm.weight is not None else rstd
        shift = (norm.bias.float() if norm.bias is not None else 0.0) - mean * scale
        shape = (1, channels) + (1,) * (x.ndim - 2)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))

    @contextlib.contextmanager
    def installed(self, module: nn.Module) -> Iterator[None]:
        norms = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.GroupNorm)]
        for name, norm in norms:
            norm.forward = functools.partial(self.forward, name, norm)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for _, norm in norms:
                del norm.forward
