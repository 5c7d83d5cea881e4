"""One process of a split image, simulated alone: the group's messages are counted as a real one counts them, but
nothing is sent (on the meta device a received buffer only needs its shape), and every question the processes
agree on gets this process's answer."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..parallel import Comm


class SimulatedComm(Comm):
    """Process `rank` of `world` on the meta device (see the module docstring)."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__(rank, world, backend="simulated", device=torch.device("meta"))

    def agree_all(self, value: int, kind: str = "agree") -> list[int]:
        self.stats.add(kind, 8, 8 * (self.world - 1))
        return [value] * self.world

    def barrier(self) -> None:
        return None

    def _send_receive(self, sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
        return None

    def _sum(self, tensor: torch.Tensor) -> None:
        return None

    def _gather(self, parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        return None
