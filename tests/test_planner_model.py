"""The memory planner against the simulator: its coefficients are the simulator's (a fresh fit of the tiny
architecture equals the table), and on a small part of docs/benchmarks.md's grid every stage's estimate is at
least the simulated peak and at most 15% over it."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from linfusion_cli import LinFusionPipeline
from linfusion_cli.bench.planner import GridCase, fit_arch, grid_rows
from linfusion_cli.engine.memory_model import ARCH_COSTS, VAE_COSTS, BandedCost, PassCost, StageShape
from linfusion_cli.engine.memory_plan import MemoryPlanner, VaeModel
from linfusion_cli.models.archs import ARCHS

WITHIN = (1.0, 1.15)


def test_the_tiny_coefficients_are_a_fresh_fit() -> None:
    fitted = fit_arch("tiny")
    assert PassCost(**fitted["unet"]) == ARCH_COSTS["tiny"].unet
    assert PassCost(**fitted["controlnet"]) == ARCH_COSTS["tiny"].controlnet
    assert {key: fitted[key] for key in ("residuals", "ip_adapter") if fitted[key]} == ARCH_COSTS["tiny"].extras
    assert tuple(fitted["vae"]) == VAE_COSTS[tuple(fitted["vae_widths"])]
    assert BandedCost(**fitted["banded"]) == ARCH_COSTS["tiny"].banded


SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize(
    "settings",
    [
        {"model": "tiny-sdxl", "size": 512, "aspect": "3:2", "memory": "frugal", "refine": "demofusion"},
        {"model": SD15, "size": 1024, "memory": "chunked", "world_size": 2},
        {
            "model": SD15,
            "size": 768,
            "memory": "fast",
            "controlnet": ["tiny"],
            "control_image": ["previous"],
            "ip_adapter": ["h94/IP-Adapter"],
            "low_vram": True,  # the text and image encoders wait in CPU memory while the stages run
        },
    ],
    ids=["sdxl-demofusion", "sd15-split", "sd15-adapters-low-vram"],
)
def test_every_stage_estimate_is_just_above_the_simulation(settings: dict, tmp_path: Path) -> None:
    if "ip_adapter" in settings:  # simulated with h94's ViT-H image encoder (nothing is downloaded)
        Image.new("RGB", (32, 32), (90, 60, 30)).save(tmp_path / "ref.png")
        settings = {**settings, "ip_image": str(tmp_path / "ref.png")}
    plan = LinFusionPipeline().plan("a lighthouse", steps=4, simulate=True, **settings)
    for stage in plan["stages"]:
        ratio = stage["estimated_peak_bytes"] / stage["simulated"]["peak_bytes"]
        assert WITHIN[0] <= ratio <= WITHIN[1], (stage["size"], stage["estimated_peak_gib"], stage["simulated"])


def test_a_phase_the_planner_names_is_one_the_simulator_traced() -> None:
    """The planner's phases are the simulator's names (the plan and the simulation can be read side by side)."""
    planner = MemoryPlanner.for_job(
        low_vram=False,
        max_vram=None,
        guidance=7.5,
        budget=None,
        arch="sd15",
        top_width=320,
        dtype_bytes=2,
        weights=0,
        vae=VaeModel(ARCHS["sd15"].vae, 2),
    )
    phases = planner.phases(planner.ladder[0], StageShape(2048, 2048, previous=(1024, 1024)))
    assert set(phases) == {"upscale", "vae encode", "unet", "vae decode"}
    base = planner.phases(planner.ladder[0], StageShape(512, 512, last=True))
    assert set(base) == {"unet", "vae decode"}


def test_a_grid_row_is_a_stage_of_the_plan_with_its_simulation() -> None:
    """`linfusion bench planner`'s rows, as its table in docs/benchmarks.md reads them (guidance off)."""
    rows = grid_rows(GridCase("tiny", "512", aspect="2:1", memory="split", guidance=1.0))
    assert [r["stage"] for r in rows] == [1, 2, 3] and [r["size"] for r in rows] == ["128x64", "256x128", "512x256"]
    for row in rows:
        assert WITHIN[0] <= row["ratio"] <= WITHIN[1] and row["simulated_gib"] > 0, row
