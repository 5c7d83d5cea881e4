"""`linfusion distill`: make LinFusion weights for any checkpoint (thin: flags -> DistillConfig -> core)."""

from __future__ import annotations

import os

from ..base.events import CancelToken
from ..core.plan_report import check_device
from ..train.config import DistillConfig
from .boundary import (
    boundary,
    emit_json,
    output_mode,
    say_stopping,
    setup_logging,
    stderr,
)
from .distill_options import (
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    EvalDataOpt,
    EvalOnlyOpt,
    GradAccumOpt,
    GradientCheckpointingOpt,
    HoldoutOpt,
    InitOpt,
    JsonOutOpt,
    LogEveryOpt,
    LrOpt,
    MixedPrecisionOpt,
    ModelOpt,
    OutOpt,
    ResolutionOpt,
    ResumeOpt,
    SaveEveryOpt,
    SeedOpt,
    StepsOpt,
)
from .options import AllowPickleOpt, QuietOpt
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
    model: ModelOpt,
    out: OutOpt,
    data: DataOpt = None,
    steps: StepsOpt = 1000,
    batch_size: BatchSizeOpt = 1,
    grad_accum: GradAccumOpt = 1,
    lr: LrOpt = 1e-4,
    resolution: ResolutionOpt = None,
    mixed_precision: MixedPrecisionOpt = "auto",
    init: InitOpt = "auto",
    save_every: SaveEveryOpt = 500,
    resume: ResumeOpt = None,
    seed: SeedOpt = 0,
    gradient_checkpointing: GradientCheckpointingOpt = False,
    holdout: HoldoutOpt = None,
    eval_only: EvalOnlyOpt = False,
    eval_data: EvalDataOpt = None,
    log_every: LogEveryOpt = 10,
    device: DeviceOpt = "auto",
    json_out: JsonOutOpt = False,
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
