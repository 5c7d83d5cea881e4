"""One job through the Python API, split over the processes torchrun started (or whole, without torchrun): the
image and sidecar go to OUT, and each stage's denoised latents this process held (its band while the stage ran
split, else the whole) with their first row, to OUT/latents-RANK.pt. Used by tests/test_split.py."""

from __future__ import annotations

import json
import os
import sys

import torch

from linfusion_cli.core.api import LinFusionPipeline
from linfusion_cli.engine.rows import Banded
from linfusion_cli.engine.splitting import ImageSplit

torch.set_num_threads(1)
out, settings = sys.argv[1], json.loads(sys.argv[2])
stages: list[tuple[int, torch.Tensor]] = []
held = ImageSplit.held


def recording(self: ImageSplit, latents: torch.Tensor) -> Banded:
    rows = held(self, latents)
    stages.append((rows.span[0], rows.tensor.detach().cpu().clone()))
    return rows


ImageSplit.held = recording  # type: ignore[method-assign]
prompt = settings.pop("prompt")
with LinFusionPipeline(out=out, split=True, timeout_s=float(os.environ.get("SPLIT_TIMEOUT", "60")), **settings) as gen:
    result = gen.generate(prompt)
torch.save(stages, os.path.join(out, f"latents-{os.environ.get('RANK', '0')}.pt"))
print(json.dumps({"rank": os.environ.get("RANK", "0"), "path": str(result.path) if result.path else None}))
