"""A stage plan as data: what `plan` prints and the engine runs (made in core/planning.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import Note
from .sizes import Target


@dataclass(frozen=True)
class StagePlan:
    index: int
    width: int
    height: int
    strength: float | None  # None: the base stage (text to image from pure noise)
    steps: int  # denoising steps this stage runs

    @property
    def kind(self) -> str:
        return "base" if self.strength is None else "refine"

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Plan:
    target: Target
    stages: tuple[StagePlan, ...]
    schedule_steps: int
    native: int
    refine: str  # the refine method's name
    from_image: bool = False
    notes: tuple[Note, ...] = field(default_factory=tuple)  # each with its level, given where it is made
    refine_passes: int = 1  # UNet passes per refine step and guidance half (the refine method's)

    @property
    def refine_stages(self) -> list[StagePlan]:
        return [s for s in self.stages if s.strength is not None]

    def unet_passes(self, stage: StagePlan) -> int:
        """UNet passes a stage runs per guidance half: a refine method may run more than one per refine step."""
        return stage.steps * (self.refine_passes if stage.strength is not None else 1)
