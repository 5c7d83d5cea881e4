"""The memory and work simulator (`plan --simulate`): the real code on the meta device reproduces the H200 peaks
measured for this project, holds what the same stage holds when run for real, counts FLOPs as a hand count does,
reports per stage, and leaves real runs exactly as they were."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from linfusion_cli import LinFusionPipeline
from linfusion_cli.cli.commands import app
from linfusion_cli.cli.render import render_plan
from linfusion_cli.core.plan_report import memory_planner
from linfusion_cli.core.prepare import plan_for
from linfusion_cli.engine import memory_plan as memory
from linfusion_cli.engine.placement import Placement
from linfusion_cli.engine.simulate import (
    ALLOCATOR_FACTOR,
    FlopTrace,
    MemoryTrace,
    resident_bytes,
    simulate_job,
    simulate_unet_step,
)
from linfusion_cli.engine.simulate.cuda import PLAIN_SDPA
from linfusion_cli.linfusion.attention import LinFusionAttention
from linfusion_cli.linfusion.patching import apply_linfusion
from linfusion_cli.models.adapters import ADAPTER_KINDS
from linfusion_cli.models.families import FAMILIES
from linfusion_cli.models.loading import build_random
from linfusion_cli.models.meta import meta_components
from linfusion_cli.models.shipped import CONFIG_ROOT

DOCS = Path(__file__).parent.parent / "docs" / "memory.md"
REPRODUCED_WITHIN = 0.12


def measured_h200_peaks() -> list[tuple[int, int, int, bool, float]]:
    """(width, height, batch, feed-forward chunked, GiB) from docs/memory.md's table of H200 measurements."""
    rows = []
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"(\d+)x(\d+)", cells[0]) if len(cells) >= 4 else None
        if match and cells[2] in ("whole", "chunked"):
            rows.append((int(match[1]), int(match[2]), int(cells[1]), cells[2] == "chunked", float(cells[3])))
    return rows


def test_reproduces_the_h200_unet_peaks() -> None:
    """The project's SD-1.5 UNet (shipped configs, LinFusion patched, fp16) traced for one step at each measured
    size, batch and feed-forward chunking, with the CUDA model's allocator factor: within 12% of every peak."""
    rows = measured_h200_peaks()
    assert len(rows) == 7
    config = json.loads((CONFIG_ROOT / FAMILIES[0].configs / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).half()
    apply_linfusion(unet, "random")
    weights = resident_bytes(unet)
    assert abs(weights / 2**30 - 1.69) < 0.01  # 859.5M UNet parameters + LinFusion's, in fp16
    chunked = memory.settings_ladder()[1]
    for width, height, batch, ff_chunked, measured in rows:
        step = simulate_unet_step(unet, width, height, batch, chunked if ff_chunked else None)
        simulated = (weights + step.inputs + step.activations) * ALLOCATOR_FACTOR / 2**30
        assert abs(simulated / measured - 1) <= REPRODUCED_WITHIN, (width, height, batch, simulated, measured)
        if (width, height, batch) == (16384, 8192, 2):
            assert step.flops / 1e12 == pytest.approx(772.8, abs=0.1)


def _tiny_job(**settings):
    gen = LinFusionPipeline(model="tiny", device="cpu")
    job = gen.job("a red fox", size=256, steps=2, seed=7, **settings)
    prep = plan_for(job, gen.options, seed=7)
    return job, prep


def test_a_simulated_stage_holds_what_the_same_stage_holds_for_real() -> None:
    """The same tiny job (with a ControlNet) traced twice by the same dispatch mode: on the meta device, and with
    real tensors on the CPU; every stage's and every phase's peak agree within 5%."""
    job, prep = _tiny_job(controlnet=["tiny"], control_image=["previous"])
    planner = memory_planner(prep, Placement("cpu", "fp32"))
    controlnet = ADAPTER_KINDS.get("controlnets")
    runs = []
    for comps in (meta_components("tiny", prep.family, torch.float32)[0], build_random("tiny")):
        refs = controlnet.refs(job)

        def adapters(meta, refs=refs):
            return [controlnet.simulated(meta, r) for r in refs]

        sim = simulate_job(comps, job, prep.plan, 7, planner, adapters=adapters, count_flops=False)
        runs.append(sim)
    meta, real = runs
    assert [s.size for s in meta.stages] == ["128x128", "256x256"]
    for simulated, measured in zip(meta.stages, real.stages, strict=True):
        assert simulated.traced_peak == pytest.approx(measured.traced_peak, rel=0.05)
        assert set(simulated.phases) == set(measured.phases)
        for path, record in measured.phases.items():
            assert simulated.phases[path].peak == pytest.approx(record.peak, rel=0.05, abs=64 << 10), path
    refine = meta.stages[1]
    assert {"upscale", "vae encode", "unet/unet pass 1", "unet/ControlNet", "vae decode"} <= set(refine.phases)


def test_flops_of_a_conv_and_a_linfusion_layer_are_the_hand_count() -> None:
    batch, channels, side, heads = 2, 320, 32, 8
    tokens = side * side
    meta = torch.device("meta")
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, device=meta)
    layer = LinFusionAttention(channels, heads).to(meta)
    counted = []
    for module, x in ((conv, (batch, channels, side, side)), (layer, (batch, tokens, channels))):
        flops = FlopTrace()
        with torch.no_grad(), flops.counter:
            module(torch.empty(x, device=meta))
        counted.append(flops.total())
    assert counted[0] == 2 * batch * channels * side * side * channels * 3 * 3
    mlps = 2 * 2 * (2 * batch * tokens * channels * channels)  # f_q, f_k: Linear(C, C) -> ... -> Linear(C, C)
    projections = 4 * 2 * batch * tokens * channels * channels  # W_q, W_k, W_v, W_out
    summaries = 2 * batch * channels * tokens * channels  # phi(K)^T V
    queries = 2 * batch * tokens * channels * (channels + heads)  # phi(Q) [kv | k_mean]
    assert counted[1] == mlps + projections + summaries + queries


def test_plan_simulate_reports_each_stage(runner, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "x", "--model", "tiny", "--size", "256", "--steps", "4", "--refine", "demofusion"]
    args += ["--simulate", "--gpu", "4090"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["device"] == "cuda" and plan["memory_budget_gib"] == 23.0  # the card's 24 GiB less its context
    assert plan["simulation"]["card"] == {"name": "NVIDIA GeForce RTX 4090", "tflops_fp16": 165.2}
    for stage in plan["stages"]:
        sim = stage["simulated"]
        assert sim["peak_gib"] >= sim["traced_peak_gib"] > sum(sim["weights_gib"].values()) > 0
        assert sim["estimate_over_simulated"] == pytest.approx(
            stage["estimated_peak_bytes"] / sim["peak_bytes"], abs=0.001
        )
        assert sim["floor_seconds"] == pytest.approx(sim["tflop_stage"] / 165.2, abs=0.002)
        assert sim["phases"][sim["peak_phase"]]["peak_gib"] == pytest.approx(sim["traced_peak_gib"], abs=0.002)
        assert sim["tflop_step"] * stage["steps"] <= sim["tflop_stage"]
    assert "unet/unet pass 2" in plan["stages"][1]["simulated"]["phases"]  # demofusion's global branch
    render_plan(plan, json_out=False)
    text = capsys.readouterr().out
    assert "simulated on the meta device as a CUDA GPU, time floor on an NVIDIA GeForce RTX 4090" in text
    assert "est./sim." in text and "configs: built-in configs" in text


def test_a_simulation_leaves_real_runs_as_they_were(tmp_path: Path) -> None:
    def image() -> np.ndarray:
        with LinFusionPipeline(model="tiny", out=tmp_path, overwrite=True, device="cpu") as gen:
            result = gen.generate("a red fox", size=128, steps=2, seed=3)
        assert result.image is not None
        return result.image

    before = image()
    LinFusionPipeline(model="tiny").plan("a red fox", size=128, steps=2, simulate=True)
    assert F.scaled_dot_product_attention is PLAIN_SDPA
    assert np.array_equal(image(), before)


def test_a_trace_counts_views_once_and_frees() -> None:
    trace = MemoryTrace()
    with trace:
        a = torch.empty(1024, device="meta")  # 4 KiB
        view = a[:10]
        b = a * 2
        del b
    assert trace.peak == 8192 and trace.live == 4096
    del a, view
    assert trace.live == 0
