"""The options of `linfusion distill`, declared apart from the command (cli/distill.py) so that it reads as what
it does: flags -> DistillConfig -> the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..base.settings import DEVICE_PANEL, MODEL_PANEL, OUTPUT_PANEL
from .boundary import CHECKPOINT_PANEL, EVAL_PANEL, TRAIN_PANEL
from .options import FLAG

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="The model to distil for: hub id, diffusers folder, .safetensors file, or tiny.",
        rich_help_panel=MODEL_PANEL,
    ),
]

OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Checkpoint folder (official LinFusion format + training state); rerun to resume.",
        rich_help_panel=CHECKPOINT_PANEL,
    ),
]

DataOpt = Annotated[
    str | None,
    typer.Option(
        help="Images with captions: a folder (metadata.jsonl, or name.txt beside name.png) or a .jsonl/.csv "
        "\\[required; --eval-only can take --eval-data instead].",
        rich_help_panel=MODEL_PANEL,
    ),
]

StepsOpt = Annotated[
    int, typer.Option(help="Total optimizer steps (a resumed run continues to this).", rich_help_panel=TRAIN_PANEL)
]

BatchSizeOpt = Annotated[int, typer.Option(help="Images per process per micro-batch.", rich_help_panel=TRAIN_PANEL)]

GradAccumOpt = Annotated[int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=TRAIN_PANEL)]

LrOpt = Annotated[float, typer.Option(help="AdamW learning rate (no weight decay).", rich_help_panel=TRAIN_PANEL)]

ResolutionOpt = Annotated[
    int | None,
    typer.Option(help="Training crop side, px \\[default: the model's native size].", rich_help_panel=MODEL_PANEL),
]

MixedPrecisionOpt = Annotated[
    str,
    typer.Option(
        help="auto (bf16 on CUDA, off elsewhere), no, fp16 or bf16; trained weights stay fp32.",
        rich_help_panel=TRAIN_PANEL,
    ),
]

InitOpt = Annotated[
    str,
    typer.Option(
        help="Start from: auto (the family's official LinFusion weights, else init), init (copy the UNet's "
        "attention, zero the feature maps), random, or a LinFusion checkpoint.",
        rich_help_panel=MODEL_PANEL,
    ),
]

SaveEveryOpt = Annotated[
    int, typer.Option(help="Save a checkpoint every N steps (and at the end).", rich_help_panel=CHECKPOINT_PANEL)
]

ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        help="Continue from this checkpoint folder \\[default: the run already in --out, if any].",
        rich_help_panel=CHECKPOINT_PANEL,
    ),
]

SeedOpt = Annotated[int, typer.Option(help="Seed of the data order, noise and timesteps.", rich_help_panel=TRAIN_PANEL)]

GradientCheckpointingOpt = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing",
        help="Recompute activations in the backward pass: less memory, slower steps.",
        rich_help_panel=TRAIN_PANEL,
        **FLAG,
    ),
]

HoldoutOpt = Annotated[
    int | None,
    typer.Option(
        help="Samples of --data kept aside for --eval-only \\[default: 1 in 20, at most 16].",
        rich_help_panel=EVAL_PANEL,
    ),
]

EvalOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--eval-only",
        help="Report per-layer feature MSE and noise MSE vs the teacher, init vs distilled.",
        rich_help_panel=EVAL_PANEL,
        **FLAG,
    ),
]

EvalDataOpt = Annotated[
    str | None,
    typer.Option(
        help="Held-out images with captions for --eval-only \\[default: the --holdout].", rich_help_panel=EVAL_PANEL
    ),
]

LogEveryOpt = Annotated[
    int, typer.Option(help="Plain log line and --json line every N steps.", rich_help_panel=OUTPUT_PANEL)
]

DeviceOpt = Annotated[
    str,
    typer.Option(help="auto (cuda:LOCAL_RANK, mps, cpu), cuda, cuda:N, mps or cpu.", rich_help_panel=DEVICE_PANEL),
]

JsonOutOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="JSON lines on stdout: progress every --log-every steps, then the summary.",
        rich_help_panel=OUTPUT_PANEL,
        **FLAG,
    ),
]
