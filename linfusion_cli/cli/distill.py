"""`linfusion distill`: make LinFusion weights for any checkpoint (thin: flags -> DistillConfig -> core)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..base.events import CancelToken
from ..base.settings import DEVICE_PANEL, MODEL_PANEL, OUTPUT_PANEL
from ..core.plan_report import check_device
from ..train.config import DistillConfig
from .boundary import (
    CHECKPOINT_PANEL,
    EVAL_PANEL,
    TRAIN_PANEL,
    boundary,
    emit_json,
    output_mode,
    say_stopping,
    setup_logging,
    stderr,
)
from .options import FLAG, AllowPickleOpt, QuietOpt
from .report_distill import DistillReporter, distill_table, eval_table
from .startup import started

DISTILL_EXAMPLES = """[bold]Examples[/]
  linfusion distill --model ./my-sd15-finetune --data ./images --out ./linfusion-mine --steps 5000
  linfusion generate "a lighthouse" --model ./my-sd15-finetune --linfusion ./linfusion-mine --size 8k
  [dim]# how close the distilled attention is to the model's own, on held-out images:[/]
  linfusion distill --model ./my-sd15-finetune --data ./images --out ./linfusion-mine --eval-only
  [dim]# 8 GPUs:[/]
  torchrun --nproc-per-node 8 --no-python linfusion distill --model ./ft --data data.jsonl --out ./lf"""


def distill(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="The model to distil for: hub id, diffusers folder, .safetensors file, or tiny.",
            rich_help_panel=MODEL_PANEL,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Checkpoint folder (official LinFusion format + training state); rerun to resume.",
            rich_help_panel=CHECKPOINT_PANEL,
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="Images with captions: a folder (metadata.jsonl, or name.txt beside name.png) or a .jsonl/.csv "
            "\\[required; --eval-only can take --eval-data instead].",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Total optimizer steps (a resumed run continues to this).", rich_help_panel=TRAIN_PANEL)
    ] = 1000,
    batch_size: Annotated[
        int, typer.Option(help="Images per process per micro-batch.", rich_help_panel=TRAIN_PANEL)
    ] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=TRAIN_PANEL)] = 1,
    lr: Annotated[
        float, typer.Option(help="AdamW learning rate (no weight decay).", rich_help_panel=TRAIN_PANEL)
    ] = 1e-4,
    resolution: Annotated[
        int | None,
        typer.Option(help="Training crop side, px \\[default: the model's native size].", rich_help_panel=MODEL_PANEL),
    ] = None,
    mixed_precision: Annotated[
        str,
        typer.Option(
            help="auto (bf16 on CUDA, off elsewhere), no, fp16 or bf16; trained weights stay fp32.",
            rich_help_panel=TRAIN_PANEL,
        ),
    ] = "auto",
    init: Annotated[
        str,
        typer.Option(
            help="Start from: auto (the family's official LinFusion weights, else init), init (copy the UNet's "
            "attention, zero the feature maps), random, or a LinFusion checkpoint.",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = "auto",
    save_every: Annotated[
        int, typer.Option(help="Save a checkpoint every N steps (and at the end).", rich_help_panel=CHECKPOINT_PANEL)
    ] = 500,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue from this checkpoint folder \\[default: the run already in --out, if any].",
            rich_help_panel=CHECKPOINT_PANEL,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the data order, noise and timesteps.", rich_help_panel=TRAIN_PANEL)
    ] = 0,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="Recompute activations in the backward pass: less memory, slower steps.",
            rich_help_panel=TRAIN_PANEL,
            **FLAG,
        ),
    ] = False,
    holdout: Annotated[
        int | None,
        typer.Option(
            help="Samples of --data kept aside for --eval-only \\[default: 1 in 20, at most 16].",
            rich_help_panel=EVAL_PANEL,
        ),
    ] = None,
    eval_only: Annotated[
        bool,
        typer.Option(
            "--eval-only",
            help="Report per-layer feature MSE and noise MSE vs the teacher, init vs distilled.",
            rich_help_panel=EVAL_PANEL,
            **FLAG,
        ),
    ] = False,
    eval_data: Annotated[
        str | None,
        typer.Option(
            help="Held-out images with captions for --eval-only \\[default: the --holdout].", rich_help_panel=EVAL_PANEL
        ),
    ] = None,
    log_every: Annotated[
        int, typer.Option(help="Plain log line and --json line every N steps.", rich_help_panel=OUTPUT_PANEL)
    ] = 10,
    device: Annotated[
        str,
        typer.Option(help="auto (cuda:LOCAL_RANK, mps, cpu), cuda, cuda:N, mps or cpu.", rich_help_panel=DEVICE_PANEL),
    ] = "auto",
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="JSON lines on stdout: progress every --log-every steps, then the summary.",
            rich_help_panel=OUTPUT_PANEL,
            **FLAG,
        ),
    ] = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Distill LinFusion for a model (e.g. a fine-tune): trains only the attention modules; torchrun for many GPUs."""
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, only the first process prints
    mode = output_mode(quiet) if main_rank else "quiet"
    json_lines = json_out and main_rank
    setup_logging(mode)
    with boundary():
        check_device(device)
        cfg = DistillConfig(
            model=model,
            data=data,
            out=out,
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            resolution=resolution,
            mixed_precision=mixed_precision,
            init=init,
            save_every=save_every,
            resume=resume,
            seed=seed,
            gradient_checkpointing=gradient_checkpointing,
            holdout=holdout,
            device=device,
            allow_pickle=allow_pickle,
            eval_data=eval_data,
        )
        if eval_only:
            _evaluate(cfg, mode, json_lines)
        else:
            _train(cfg, mode, json_lines, log_every)


def _train(cfg: DistillConfig, mode: str, json_out: bool, log_every: int) -> None:
    """The run, stopped cleanly by SIGTERM/SIGINT (it saves, then exits with the signal's code); rank 0 sums up."""
    from ..train.distill import distill as run_distill  # here, not at the top: keeps torch out of CLI start-up

    started()

    cancel = CancelToken(on_request=say_stopping)
    restore = cancel.install()
    try:
        with DistillReporter(stderr, mode, log_every, emit_json if json_out else None) as reporter:
            result = run_distill(cfg, events=reporter, cancel=cancel)
    finally:
        restore()
    if result.rank != 0:
        return
    summary = result.as_dict()
    if mode != "quiet":
        stderr.print(distill_table(summary))
    if json_out:
        emit_json({"event": "done", **summary})


def _evaluate(cfg: DistillConfig, mode: str, json_out: bool) -> None:
    """--eval-only: the init and distilled weights against the teacher on held-out samples."""
    from ..train.distill_eval import evaluate  # here, not at the top: keeps torch out of CLI start-up

    started()

    with DistillReporter(stderr, mode) as reporter:
        report = evaluate(cfg, events=reporter)
    if mode != "quiet":
        stderr.print(eval_table(report))
    if json_out:
        emit_json(report)
