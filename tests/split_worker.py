"""One job through the Python API, split over the processes torchrun started (or whole, without torchrun): the
image and sidecar go to OUT, and each stage's latents, put together after denoising, to OUT/latents-RANK.pt.
Used by tests/test_split.py."""

from __future__ import annotations

import json
import os
import sys

import torch

from linfusion_cli.core.api import LinFusionPipeline
from linfusion_cli.engine.splitting import ImageSplit

torch.set_num_threads(1)
out, settings = sys.argv[1], json.loads(sys.argv[2])
stages: list[torch.Tensor] = []
whole = ImageSplit.whole


def recording(self: ImageSplit, band: torch.Tensor) -> torch.Tensor:
    latents = whole(self, band)
    stages.append(latents.detach().cpu().clone())
    return latents


ImageSplit.whole = recording  # type: ignore[method-assign]
prompt = settings.pop("prompt")
with LinFusionPipeline(out=out, split=True, timeout_s=float(os.environ.get("SPLIT_TIMEOUT", "60")), **settings) as gen:
    result = gen.generate(prompt)
torch.save(stages, os.path.join(out, f"latents-{os.environ.get('RANK', '0')}.pt"))
print(json.dumps({"rank": os.environ.get("RANK", "0"), "path": str(result.path) if result.path else None}))
