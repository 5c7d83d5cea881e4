"""The demofusion refine method: schedules, the dilated global branch, restoring the UNet, and end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from linfusion_cli.base.sizes import resolve_target
from linfusion_cli.core.jobs import resolve_job
from linfusion_cli.core.planning import make_plan
from linfusion_cli.engine.latent_ops import WHOLE_IMAGE
from linfusion_cli.engine.noise import NoiseSource
from linfusion_cli.engine.refine import RefineStage
from linfusion_cli.engine.refine.demofusion import demofusion_steps, demofusion_strengths
from linfusion_cli.engine.refine.demofusion_ops import (
    DemoFusionGuide,
    DemoFusionParams,
    blur_matched,
    cos_factor,
    dilated,
    gaussian_kernel,
)
from linfusion_cli.engine.sampling import StageInputs, denoise, stage_timesteps
from linfusion_cli.engine.schedulers import make_scheduler


def test_schedules_follow_the_official_formulas() -> None:
    params = DemoFusionParams(cosine_scale_1=3.0, cosine_scale_2=1.5, cosine_scale_3=2.0, gaussian_sigma=0.8)
    for t in (999, 750, 500, 261, 1):
        factor = 0.5 * (1 + np.cos(np.pi * (1000 - t) / 1000))
        assert cos_factor(t, 1000) == pytest.approx(factor, abs=1e-12)
        assert params.c1(cos_factor(t, 1000)) == pytest.approx(factor**3.0)
        assert params.c2(cos_factor(t, 1000)) == pytest.approx(factor**1.5)
        assert params.c3(cos_factor(t, 1000)) == pytest.approx(0.99 * factor**2.0 + 0.01)
    assert cos_factor(1000, 1000) == 1.0 and cos_factor(0, 1000) == pytest.approx(0.0)


def test_strengths_and_steps_as_the_official_pipeline() -> None:
    for count in (1, 3, 4, 5):
        expected = np.linspace(0.32, 0, count + 1)[:-1]
        assert demofusion_strengths(count, 0.32) == pytest.approx(expected, abs=1e-4)
    assert [demofusion_steps(50, s) for s in (0.32, 0.24, 0.16, 0.08)] == [16, 12, 8, 4]
    assert demofusion_steps(50, 0.2133) == math.ceil(50 * 0.2133)  # ceil, where sdedit's int() gives 10
    plan = make_plan(resolve_target(16384, "1:1"), native=1024, refine="demofusion")
    assert [s.strength for s in plan.stages[1:]] == [0.32, 0.24, 0.16, 0.08]
    assert [plan.unet_passes(s) for s in plan.stages] == [50, 32, 24, 16, 8]


def test_gaussian_kernel_and_blur_keep_statistics() -> None:
    kernel = gaussian_kernel(7, 1.3)
    assert kernel.sum().item() == pytest.approx(1.0) and torch.equal(kernel, kernel.T)
    x = torch.randn(1, 4, 64, 48, generator=torch.Generator().manual_seed(0)) * 3 + 1
    blurred = blur_matched(WHOLE_IMAGE, x, ratio=4, sigma=1.0)
    assert torch.allclose(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(blurred.std(dim=(2, 3)), x.std(dim=(2, 3)), atol=1e-4)
    assert blurred.diff(dim=-1).abs().mean() < x.diff(dim=-1).abs().mean()  # smoother, same statistics
    assert torch.equal(blur_matched(WHOLE_IMAGE, x, ratio=1, sigma=1.0), x)  # a 1-wide kernel is the identity


def test_blur_is_finite_on_a_huge_half_precision_latent() -> None:
    """A 16K-sized latent in fp16 with values whose plain fp16 sums overflow: statistics are taken in fp32."""
    x = (torch.rand(1, 4, 2048, 2048, generator=torch.Generator().manual_seed(1)) * 3e4).half()
    assert not torch.isfinite(x.sum(dim=(2, 3), dtype=torch.float16)).all()  # the hazard is real
    out = blur_matched(WHOLE_IMAGE, x, ratio=2, sigma=0.8)
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())


def _toy_unet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 1, 3, padding=1))


def test_dilation_widens_the_receptive_field() -> None:
    """A pixel 8 away cannot reach the centre through two 3x3 convs, but can with dilation 4: the global
    branch sees far more of the image."""
    net = _toy_unet()
    x = torch.zeros(1, 1, 33, 33)
    far = x.clone()
    far[0, 0, 16, 24] = 1.0
    with torch.no_grad():
        assert net(far)[0, 0, 16, 16] == net(x)[0, 0, 16, 16]
        with dilated(net, 4):
            assert net(far)[0, 0, 16, 16] != net(x)[0, 0, 16, 16]
            assert net(x).shape == x.shape  # padding scaled with dilation: same size out


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_dilation_is_restored_after_a_failure(error: BaseException) -> None:
    net = _toy_unet()
    before = [(m.dilation, m.padding) for m in net.modules() if isinstance(m, nn.Conv2d)]
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        reference = net(x)
        with pytest.raises(type(error)), dilated(net, 8):
            net(x)
            raise error
        assert torch.equal(net(x), reference)
    assert [(m.dilation, m.padding) for m in net.modules() if isinstance(m, nn.Conv2d)] == before


def _stage_denoise(comps, cond, guide_params: DemoFusionParams | None):
    scheduler = make_scheduler("ddim", comps.scheduler_config)
    timesteps = stage_timesteps(scheduler, 10, 4, torch.device("cpu"), img2img=True)
    encoded = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    latents = scheduler.add_noise(encoded, noise, timesteps[:1])
    guide = None
    if guide_params is not None:
        guide = DemoFusionGuide(guide_params, RefineStage(2, encoded, noise, 1000, comps.unet, WHOLE_IMAGE))
    calls = []

    def on_step(done: int, total: int) -> None:
        calls.append((done, total))

    out = denoise(
        comps.unet,
        scheduler,
        latents,
        timesteps,
        StageInputs(cond, 7.5, (128, 128)),
        NoiseSource(torch.Generator()),
        on_step,
        guide,
    )
    return out, calls


@pytest.fixture(scope="module")
def tiny():
    from linfusion_cli.engine.text import encode_prompt
    from linfusion_cli.linfusion.patching import apply_linfusion
    from linfusion_cli.models.loading import build_random

    comps = build_random("tiny")
    apply_linfusion(comps.unet, "random")
    return comps, encode_prompt(comps, "a castle", "", 7.5, torch.device("cpu"))


def test_limiting_case_is_plain_sdedit(tiny) -> None:
    """With c1 = c2 = 0 at every step (huge exponents) the guide changes nothing: the same latents, bit for bit."""
    comps, cond = tiny
    plain, plain_calls = _stage_denoise(comps, cond, None)
    limit, limit_calls = _stage_denoise(comps, cond, DemoFusionParams(cosine_scale_1=1e6, cosine_scale_2=1e6))
    assert torch.equal(plain, limit)
    assert plain_calls == limit_calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # steps, each with all its passes
    guided, _ = _stage_denoise(comps, cond, DemoFusionParams())
    assert not torch.allclose(guided, plain, atol=1e-4)


def test_unet_is_bit_identical_after_a_failed_global_step(tiny) -> None:
    """An error inside the dilated global pass (here: raised by the first conv while dilated) leaves every
    convolution and weight as it was; the next plain run is bit-identical to one before."""
    comps, cond = tiny
    state = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    convs = [(m.dilation, m.padding) for m in comps.unet.modules() if isinstance(m, nn.Conv2d)]
    plain, _ = _stage_denoise(comps, cond, None)

    def fail_when_dilated(module: nn.Module, args: object) -> None:
        if module.dilation != (1, 1):
            raise RuntimeError("cancelled")

    hook = comps.unet.conv_in.register_forward_pre_hook(fail_when_dilated)
    try:
        with pytest.raises(RuntimeError, match="cancelled"):
            _stage_denoise(comps, cond, DemoFusionParams())
    finally:
        hook.remove()
    assert [(m.dilation, m.padding) for m in comps.unet.modules() if isinstance(m, nn.Conv2d)] == convs
    assert all(torch.equal(v, state[k]) for k, v in comps.unet.state_dict().items())
    assert torch.equal(_stage_denoise(comps, cond, None)[0], plain)


def test_global_branch_runs_dilated(tiny) -> None:
    comps, cond = tiny
    seen: list[tuple[int, int]] = []
    first_conv = comps.unet.conv_in
    hook = first_conv.register_forward_pre_hook(lambda m, a: seen.append(m.dilation))
    try:
        _stage_denoise(comps, cond, DemoFusionParams(cosine_scale_2=0.5))
    finally:
        hook.remove()
    assert (1, 1) in seen and (2, 2) in seen  # local passes undilated, global passes at the stage's ratio


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_demofusion_changes_the_image_and_reports_itself(model: str, tmp_path) -> None:
    from linfusion_cli.core.metadata import a1111_parameters
    from linfusion_cli.core.prepare import RunOptions
    from linfusion_cli.core.run import run_job

    def run(refine: str) -> dict:
        job = resolve_job(
            {"prompt": "a castle", "model": model, "size": 512, "steps": 6, "seed": 5, "refine": refine, "name": refine}
        )
        return run_job(job, RunOptions(out=tmp_path)).report

    from PIL import Image

    sdedit, demo = run("sdedit"), run("demofusion")
    with Image.open(sdedit["path"]) as a, Image.open(demo["path"]) as b:
        pixels_a, pixels_b = np.asarray(a), np.asarray(b)
    assert pixels_a.shape == pixels_b.shape
    assert np.abs(pixels_a.astype(int) - pixels_b.astype(int)).mean() > 1.0
    assert demo["settings"]["refine"] == "demofusion" and demo["settings"]["gaussian_sigma"] == 1.0
    assert [s["strength"] for s in demo["stages"][1:]] == pytest.approx(
        list(np.linspace(0.32, 0, len(demo["stages"]))[:-1]), abs=1e-4
    )
    assert 'Refine: "demofusion (cosine scales 3/1/1, sigma 1)"' in a1111_parameters(demo)


def test_cli_flags_reach_the_job_and_replay_reproduces_demofusion(runner, tmp_path) -> None:
    import json

    from PIL import Image

    from linfusion_cli.cli.commands import app

    made = runner.invoke(
        app,
        [
            "generate", "a tower", "--model", "tiny", "--size", "256", "--steps", "5", "--seed", "3",
            "--refine", "demofusion", "--cosine-scale-1", "2", "--cosine-scale-2", "0.5", "--cosine-scale-3", "1.5",
            "--gaussian-sigma", "0.8", "--strength", "0.5", "--out", str(tmp_path / "a"), "--json",
        ],
        catch_exceptions=False,
    )  # fmt: skip
    assert made.exit_code == 0, made.stderr
    report = json.loads(made.stdout)
    settings = report["settings"]
    assert (settings["refine"], settings["cosine_scale_1"], settings["cosine_scale_2"]) == ("demofusion", 2.0, 0.5)
    assert (settings["cosine_scale_3"], settings["gaussian_sigma"], settings["strength"]) == (1.5, 0.8, 0.5)
    assert [s["strength"] for s in report["stages"][1:]] == [0.5]
    again = runner.invoke(app, ["replay", report["sidecar"], "--out", str(tmp_path / "b"), "--json"])
    assert again.exit_code == 0, again.stderr
    with Image.open(report["path"]) as a, Image.open(json.loads(again.stdout)["path"]) as b:
        assert a.tobytes() == b.tobytes()
