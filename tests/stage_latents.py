"""Each stage's denoised latents as this process holds them, recorded for same-seed comparisons (the stage loop
hands them to ImageSplit.held: a band while a stage runs split, else the whole)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from linfusion_cli.engine.splitting import ImageSplit


def record_stage_latents(patch: pytest.MonkeyPatch, firsts: list[int] | None = None) -> list[torch.Tensor]:
    """Patch ImageSplit.held (undone with `patch`) so that each stage's latents are appended to the list returned
    (and to `firsts`, when given, the first latent row of the whole that they are)."""
    stages: list[torch.Tensor] = []
    held = ImageSplit.held

    def recording(self: ImageSplit, latents: torch.Tensor) -> Any:
        rows = held(self, latents)
        stages.append(rows.tensor)
        if firsts is not None:
            firsts.append(rows.span[0])
        return rows

    patch.setattr(ImageSplit, "held", recording)
    return stages
