"""Run by torchrun from test_distill.py: one rank of a data-parallel distillation; dumps this rank's weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from linfusion_cli.train.distill import DistillConfig, distill

if __name__ == "__main__":
    data, out, dump = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    cfg = DistillConfig(
        model="tiny", data=data, out=out, steps=3, grad_accum=2, resolution=64, init="random", save_every=2
    )
    result = distill(cfg)
    state = {f"{i}.{k}": v for i, m in enumerate(result.patch.modules) for k, v in m.state_dict().items()}
    torch.save(state, dump / f"rank{os.environ['RANK']}.pt")
