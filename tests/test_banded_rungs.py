"""The banded rungs in the real pipeline: a job run with `--memory banded` or `banded+host` (bands made a few rows
tall here, so that every level of the tiny UNets bands) gives the image of the same job run `frugal` within 1/255
and the same latents after every stage to fp32 reduction order: sdedit with a ControlNet, a LoRA and an
IP-Adapter, SD-2.x-shaped, and SDXL-shaped with demofusion's dilated global pass (its top-level skips made again).
A stage that parks takes the previous image back from CPU memory. And a 16K stage of SD-1.5, simulated on the meta
device, fits a 12 GB card only banded with skips in CPU memory, under its target."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from parallel_harness import launch, ok_results
from stage_latents import record_stage_latents

from linfusion_cli.core.api import LinFusionPipeline
from linfusion_cli.engine import memory_plan
from linfusion_cli.engine.banded import unet as banded_module
from linfusion_cli.engine.memory_model import StageShape
from linfusion_cli.engine.memory_plan import GIB, MemoryPlanner, VaeModel
from linfusion_cli.engine.parallel import Comm
from linfusion_cli.models.archs import ARCHS

LATENT_TOLERANCE = 1e-5  # relative to the latents' largest value: fp32 reduction order

CASES = {
    # 3:2 at 256 px: 32x48 latents; bands of 40000 bytes are 3-10 rows (fp32, batch 1), ragged at every level
    "tiny-controlnet-lora-ip-adapter": (
        "banded+host",
        40_000,
        {"model": "tiny", "size": 256, "aspect": "3:2", "controlnet": ["tiny"], "control_image": ["previous"]}
        | {"lora": ["tiny:0.7"], "ip_adapter": ["tiny"]},
    ),
    "tiny-sd2": ("banded", 25_000, {"model": "tiny-sd2", "size": 256}),
    "tiny-sdxl-demofusion": ("banded", 100_000, {"model": "tiny-sdxl", "size": 256, "refine": "demofusion"}),
}


Run = tuple[Any, list[torch.Tensor]]  # a job's result and its latents after each stage


@pytest.fixture(scope="module")
def pipe() -> Iterator[LinFusionPipeline]:
    with LinFusionPipeline(device="cpu", dtype="fp32") as pipeline:  # models loaded once for every case
        yield pipeline


def _run(pipe: LinFusionPipeline, settings: dict[str, Any], memory: str, monkeypatch: pytest.MonkeyPatch) -> Run:
    """The job's image and its latents after each stage (as the stage loop puts them together)."""
    with monkeypatch.context() as patch:
        stages = record_stage_latents(patch)
        result = pipe.generate("a lighthouse", save=False, steps=2, seed=3, memory=memory, **settings)
    return result, stages


@pytest.fixture(scope="module")
def ip_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An IP-Adapter's reference image: noise, fixed seed."""
    from PIL import Image

    path = tmp_path_factory.mktemp("ip") / "reference.png"
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def settings_of(ip_image: str) -> Callable[[str], dict[str, Any]]:
    """A case's job settings, with the IP-Adapter's reference image where it has one."""
    return lambda case: CASES[case][2] | ({"ip_image": ip_image} if "ip_adapter" in CASES[case][2] else {})


@pytest.fixture(scope="module")
def frugal(pipe: LinFusionPipeline, settings_of: Callable[[str], dict[str, Any]]) -> Callable[[str], Run]:
    """A case's job run `frugal` (the reference), made once for the module's tests."""
    made: dict[str, Run] = {}

    def run(case: str) -> Run:
        if case not in made:
            with pytest.MonkeyPatch.context() as patch:
                made[case] = _run(pipe, settings_of(case), "frugal", patch)
        return made[case]

    return run


@pytest.mark.parametrize("case", list(CASES))
def test_banded_rungs_make_the_frugal_image(
    pipe: LinFusionPipeline,
    frugal: Callable[[str], Run],
    settings_of: Callable[[str], dict[str, Any]],
    case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rung, band_bytes, _ = CASES[case]
    settings = settings_of(case)
    reference, reference_latents = frugal(case)
    calls = {"resnet": 0}
    real = banded_module.resnet_forward

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["resnet"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(banded_module, "resnet_forward", counted)
    monkeypatch.setattr(memory_plan, "BAND_BYTES", band_bytes)
    banded, latents = _run(pipe, settings, rung, monkeypatch)
    assert calls["resnet"] > 0  # the UNet did run in bands
    assert [s["memory_settings"]["name"] for s in banded.report["stages"]] == [rung] * len(latents)
    a, b = reference.array.astype(int), banded.array.astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # within 1/255 per pixel
    assert len(latents) == len(reference_latents) > 1
    for ref, out in zip(reference_latents, latents, strict=True):
        assert (ref - out).abs().max() <= LATENT_TOLERANCE * ref.abs().max()


def _split_banded(
    comm: Comm, case: str, settings: dict[str, Any]
) -> tuple[Any, list[int], list[np.ndarray], list[str], int]:
    """One process of a split image (parallel_harness) runs the case's job on its rung: the image (the first
    process's; None on the others), each stage's first latent row and latents held, the rung of each stage, and
    how many resnets ran banded."""
    rung, band_bytes, _ = CASES[case]
    firsts: list[int] = []
    resnets = {"banded": 0}
    real = banded_module.resnet_forward

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        resnets["banded"] += 1
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, LinFusionPipeline(device="cpu", dtype="fp32", split=True) as pipe:
        patch.setattr(banded_module, "resnet_forward", counted)
        patch.setattr(memory_plan, "BAND_BYTES", band_bytes)
        latents = record_stage_latents(patch, firsts)
        result = pipe.generate("a lighthouse", save=False, steps=2, seed=3, memory=rung, **settings)
        image = result.array if comm.writes else None
        rungs = [s["memory_settings"]["name"] for s in result.report.get("stages", [])]
    # arrays, not tensors: a tensor crosses the harness's queue as a handle to shared memory, which dies with this
    # process
    return image, firsts, [t.numpy().copy() for t in latents], rungs, resnets["banded"]


def test_a_split_image_bands_each_share(
    frugal: Callable[[str], Run], settings_of: Callable[[str], dict[str, Any]]
) -> None:
    """Two processes split the image and each runs its share in bands of a few rows (ragged: the last stage's
    shares are 8 and 13 latent rows, its bands 3 to 10), the ControlNet, LoRA and IP-Adapter on: the one-process
    image within 1/255, and every process's rows of each stage's latents to fp32 reduction order."""
    case = "tiny-controlnet-lora-ip-adapter"
    reference, reference_latents = frugal(case)
    ranks = ok_results(launch(2, _split_banded, case, settings_of(case), deadline_s=120))
    image, _, _, rungs, _ = ranks[0]
    assert rungs == ["banded+host"] * len(reference_latents)
    a, b = reference.array.astype(int), image.astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    for _, firsts, latents, _, banded in ranks:
        assert banded > 0  # its share did run in bands
        assert any(t.shape[-2] < whole.shape[-2] for t, whole in zip(latents, reference_latents, strict=True))
        for first, mine, whole in zip(firsts, latents, reference_latents, strict=True):
            rows = whole[:, :, first : first + mine.shape[-2]]
            error = (rows - torch.from_numpy(mine)).abs().max() if rows.shape == mine.shape else float("inf")
            assert error <= LATENT_TOLERANCE * whole.abs().max()


def test_a_16k_stage_fits_a_12_gb_card_banded_with_skips_in_cpu_memory() -> None:
    """SD-1.5 at 16384x16384 with --max-vram 11 (a 12 GB card less its context and some headroom), simulated: the
    planner takes `banded+host`, the simulated peak is under 11 GiB and the estimate above it; the parked skips are
    planned as CPU memory."""
    plan = LinFusionPipeline().plan(
        "a harbour",
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        size=16384,
        base_size=16384,  # the recipe's last stage alone, without guidance: one UNet call of batch 1, as cfg_split
        steps=1,  # runs each of its two (the simulation runs a loop's first item)
        guidance=1.0,
        max_vram=11,
        simulate=True,
    )
    (stage,) = plan["stages"]
    simulated = stage["simulated"]
    assert stage["memory"] == simulated["memory"] == "banded+host" and stage["fits"]
    assert simulated["peak_bytes"] <= 11 * GIB <= plan["memory_budget_gib"] * GIB
    assert 1.0 <= stage["estimated_peak_bytes"] / simulated["peak_bytes"] <= 1.15
    # ~10.2 GiB of skips: all but conv_in's output, which is made again per band from the UNet's input
    assert stage["estimated_host_gib"] >= simulated["host_peak_gib"] - 0.5 > 9


@pytest.mark.parametrize(
    ("budget_gib", "rows", "rung", "fits"),
    [
        (60, None, "frugal", True),
        (20, None, "banded", True),
        (11, None, "banded+host", True),
        (4, None, "banded+host", False),
        (11, 8192, "banded", True),
        (8, 8192, "banded+host", True),
    ],
)
def test_low_vram_takes_the_first_rung_from_frugal_down_that_fits(
    budget_gib: float, rows: int | None, rung: str, fits: bool
) -> None:
    """--low-vram: frugal where it fits, else the UNet banded, else its skips parked too, else the lowest; on a
    split image (rows < height: one process's share) the same ladder for the share, which needs less (half the
    image fits 11 GiB banded, where the whole needs its skips parked)."""
    planner = MemoryPlanner.for_job(
        low_vram=True,
        max_vram=budget_gib,
        guidance=7.5,
        budget=int(budget_gib * GIB),
        arch="sd15",
        top_width=320,
        dtype_bytes=2,
        weights=2 * GIB,
        vae=VaeModel(ARCHS["sd15"].vae, 2),
    )
    assert [s.name for s in planner.ladder] == ["frugal", "banded", "banded+host"]
    choice = planner.choose(StageShape(16384, 16384, rows, previous=(8192, 8192), last=True))
    assert (choice.settings.name, choice.fits) == (rung, fits)
    assert (planner.host_estimate(choice.settings, StageShape(16384, 16384)) > 10 * GIB) == (rung == "banded+host")


def test_out_of_memory_at_frugal_steps_down_to_banded(pipe: LinFusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The out-of-memory fallback steps down the same ladder: a stage that fails `frugal` runs `banded`, and the
    report says so."""
    monkeypatch.setenv("LINFUSION_INJECT_OOM", "0")
    result = pipe.generate("a lighthouse", save=False, steps=2, seed=3, model="tiny", size=128, memory="frugal")
    (stage,) = result.report["stages"]
    assert stage["memory_settings"]["name"] == "banded" and stage["memory_settings"]["band_mib"] == 64
    assert "retried with banded (" in stage["retried"]


def test_a_stage_that_parks_takes_the_previous_image_from_cpu_memory(
    pipe: LinFusionPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage run with skips in CPU memory parks the previous stage's image there too (and demofusion's skip
    residual): out of memory at `banded`, the refine stage runs again `banded+host` from the parked image, and the
    image is the one the stage makes at `banded` (within 1/255)."""
    from linfusion_cli.engine import stages

    settings = {"model": "tiny-sdxl", "size": 256, "refine": "demofusion", "memory": "banded"}
    reference = pipe.generate("a lighthouse", save=False, steps=2, seed=5, **settings)
    parked: list[tuple[int, ...]] = []
    real = stages.Handoff.park

    def recorded(handoff: stages.Handoff, host: Any) -> None:
        real(handoff, host)
        parked.append(tuple(handoff._image.tensor.shape) if handoff._image is not None else ())

    monkeypatch.setattr(stages.Handoff, "park", recorded)
    monkeypatch.setenv("LINFUSION_INJECT_OOM", "1")
    retried = pipe.generate("a lighthouse", save=False, steps=2, seed=5, **settings)
    names = [s["memory_settings"]["name"] for s in retried.report["stages"]]
    assert names == ["banded", "banded+host"] and "retried with banded+host" in retried.report["stages"][1]["retried"]
    assert parked == [(128, 1, 3, 128)]  # the base image, rows first in CPU memory
    a, b = reference.array.astype(int), retried.array.astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
