"""Whole models split by bands (engine.parallel.split_image) equal the one-process forward's band.

Tiny UNets with LinFusion (SD-1.x- and SDXL-shaped), demofusion's dilated global branch and blur, a ControlNet
with its own softmax self-attention, and the VAE. Each world size is one launch of gloo processes forked after
the models and references were built here; `plan.unet_comm_plan` is checked against the counted forward.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from parallel_harness import band_of, compare, launch, ok_results
from torch import nn

from linfusion_cli.base.errors import UsageError
from linfusion_cli.engine.latent_ops import WHOLE_IMAGE
from linfusion_cli.engine.parallel import Bands, Comm, CommStats, band_upscale, split_image
from linfusion_cli.engine.parallel.plan import Op, unet_comm_plan, unet_ops
from linfusion_cli.engine.refine.demofusion_ops import blur_matched, dilated
from linfusion_cli.engine.splitting import BandOps
from linfusion_cli.linfusion.patching import apply_linfusion
from linfusion_cli.models.archs import ARCHS
from linfusion_cli.models.tensors import upscale

MULTIPLE = 4  # the tiny UNets' total downsampling (3 levels)
T = torch.tensor(500)


@dataclass
class Case:
    """One forward to split: `run(band)` computes this band's output given `band(whole tensor)`."""

    name: str
    heights: list[int]
    models: tuple[nn.Module, ...]
    run: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
    dilation: int = 1
    plan: tuple[str, int, int] | None = None  # a lone UNet: (arch, latent height, width) for unet_comm_plan
    width: int | None = None  # latent columns, which a ragged split (height no multiple of 4) needs


def build_unet(name: str, linfusion: bool = True) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(ARCHS[name].unet).eval()
    if linfusion:
        apply_linfusion(unet, "random")
    return unet


def unet_call(unet: nn.Module, x: torch.Tensor, embeds: torch.Tensor, **kwargs: Any) -> Any:
    def run(band: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return unet(band(x), T, embeds, **kwargs).sample

    return run


def controlnet_case(heights: list[int], width: int = 24) -> Case:
    """A ControlNet copied from the unpatched UNet keeps softmax attn1 (gathered K/V); its residuals feed a
    LinFusion UNet. Output convs seeded non-zero (trained ones start at zero and would change nothing)."""
    unet = build_unet("tiny", linfusion=False)
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(unet).eval()
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(std=0.2)
    apply_linfusion(unet, "random")
    x, embeds = torch.randn(2, 4, sum(heights), width), torch.randn(2, 7, 32)
    image = torch.rand(2, 3, sum(heights) * 8, width * 8)

    def run(band: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        down, mid = controlnet(band(x), T, embeds, controlnet_cond=band(image), return_dict=False)
        return unet(band(x), T, embeds, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    name = "controlnet-ragged" if sum(heights) % MULTIPLE else "controlnet"
    return Case(name, heights, (unet, controlnet), run, width=width)


def vae_cases(heights: list[int]) -> list[Case]:
    torch.manual_seed(2)
    vae = AutoencoderKL.from_config(ARCHS["tiny"].vae).eval()
    z, image = torch.randn(1, 4, sum(heights), 12), torch.rand(1, 3, sum(heights) * 8, 96) * 2 - 1
    return [
        Case("vae-decode", heights, (vae,), lambda band: vae.decode(band(z)).sample),
        Case("vae-encode", heights, (vae,), lambda band: vae.encode(band(image)).latent_dist.mean),
    ]


def world_cases(world: int) -> list[Case]:
    if world == 3:  # unequal; at the deepest level the bands are 2, 4, 2 rows and a 4x dilated conv reaches 8
        heights = [8, 16, 8]
        unet = build_unet("tiny")
        x, embeds = torch.randn(2, 4, 32, 20), torch.randn(2, 7, 32)
        # ragged: 31 rows, no multiple of 4; the last band's 7 rows are 4 then 2 at the levels below (31, 16, 8)
        ragged, odd = [8, 16, 7], torch.randn(2, 4, 31, 18)
        return [
            Case("tiny", heights, (unet,), unet_call(unet, x, embeds), plan=("tiny", 32, 20)),
            Case("tiny-dilated-4", heights, (unet,), unet_call(unet, x, embeds), 4, ("tiny", 32, 20)),
            controlnet_case(heights),
            *vae_cases([4, 8, 4]),
            Case("tiny-ragged", ragged, (unet,), unet_call(unet, odd, embeds), plan=("tiny", 31, 18), width=18),
            Case("tiny-ragged-dilated-2", ragged, (unet,), unet_call(unet, odd, embeds), 2, ("tiny", 31, 18), 18),
            controlnet_case([8, 8, 5], width=14),
        ]
    unet, sdxl = build_unet("tiny"), build_unet("tiny-sdxl")
    x, embeds = torch.randn(2, 4, 64, 64), torch.randn(2, 7, 32)
    small, xl_embeds = torch.randn(2, 4, 32, 24), torch.randn(2, 7, 64)
    added = {"text_embeds": torch.randn(2, 48), "time_ids": torch.tensor([[256.0, 192, 0, 0, 256, 192]] * 2)}
    return [
        Case("tiny", [32, 32], (unet,), unet_call(unet, x, embeds), plan=("tiny", 64, 64)),
        Case(
            "tiny-sdxl",
            [16, 16],
            (sdxl,),
            unet_call(sdxl, small, xl_embeds, added_cond_kwargs=added),
            plan=("tiny-sdxl", 32, 24),
        ),
        Case("tiny-dilated-2", [16, 16], (unet,), unet_call(unet, small, embeds), 2, ("tiny", 32, 24)),
        controlnet_case([16, 16]),
        *vae_cases([8, 8]),
        Case(
            "tiny-sdxl-ragged",
            [16, 13],
            (sdxl,),
            unet_call(sdxl, small[:, :, :29], xl_embeds, added_cond_kwargs=added),
            plan=("tiny-sdxl", 29, 24),
            width=24,
        ),
    ]


def references(cases: list[Case]) -> list[torch.Tensor]:
    refs = []
    for case in cases:
        with torch.no_grad(), dilated(nn.ModuleList(case.models), case.dilation):
            refs.append(case.run(lambda t: t))
    return refs


def run_cases(comm: Comm, cases: list[Case], refs: list[torch.Tensor]) -> list[dict[str, Any]]:
    out = []
    for case, ref in zip(cases, refs, strict=True):
        comm.bands, comm.stats = Bands.of_heights(case.heights, MULTIPLE, case.width), CommStats()
        models = nn.ModuleList(case.models)
        with torch.no_grad(), split_image(comm, *case.models) as split, dilated(models, case.dilation):
            band = case.run(functools.partial(band_of, comm))
        stats = comm.stats
        out.append(
            {
                "case": case.name,
                **compare(band, band_of(comm, ref)),
                "ops": dict(split.ops),
                "calls": dict(stats.calls),
                "sent": dict(stats.sent),
                "received": dict(stats.received),
                "seconds": stats.seconds,
            }
        )
    return out


Runs = tuple[list[Case], list[list[dict[str, Any]]]]  # the cases, and per rank their results


@pytest.fixture(scope="module", params=[2, 3])
def split_runs(request: pytest.FixtureRequest) -> Runs:
    cases = world_cases(request.param)
    refs = references(cases)
    return cases, ok_results(launch(request.param, run_cases, cases, refs, deadline_s=120))


def test_split_models_equal_the_whole_forward(split_runs: Runs) -> None:
    """fp32: convs are bit-exact; GroupNorm statistics and attention sums are added in another order, so
    outputs agree to ~1e-6 of their scale."""
    for rank, results in enumerate(split_runs[1]):
        for result in results:
            assert result["rel"] < 1e-5, f"rank {rank}: {result}"


def test_communication_plan_matches_the_counted_forward(split_runs: Runs) -> None:
    """unet_comm_plan, from the config alone, predicts the ops and every rank's bytes per kind exactly, for
    equal and unequal bands, with and without demofusion's dilation."""
    cases, runs = split_runs
    planned = [case for case in cases if case.plan]
    assert len(planned) >= 2
    for case in planned:
        arch, height, width = case.plan  # type: ignore[misc]
        bands = Bands.of_heights(case.heights, MULTIPLE)
        plan = unet_comm_plan(
            ARCHS[arch].unet, height, width, bands.world, dtype_bytes=4, dilation=case.dilation, bands=bands
        )
        for rank, results in enumerate(runs):
            counted = next(r for r in results if r["case"] == case.name)
            assert counted["ops"] == {"conv": plan.ops["conv"], "norm": plan.ops["norm"]}
            assert counted["calls"]["attention"] == plan.ops["attention"]  # one all-reduce per LinFusion layer
            assert counted["sent"] == dict(plan.sent[rank]), case.name
            assert counted["received"] == dict(plan.received[rank]), case.name


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_communication_plan_walks_real_unets_as_diffusers_builds_them(arch: str) -> None:
    """The config walk names every Conv2d (input channels, kernel, stride), GroupNorm (channels, groups) and attn1
    (width, heads) of the real SD-1.5/2.1/SDXL UNets, built on the meta device (no weights, no forward)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ARCHS[arch].unet)
    modules = list(unet.named_modules())
    ops = list(unet_ops(ARCHS[arch].unet))

    def planned(kind: str, key: Callable[[Op], tuple[int, ...]]) -> Counter[tuple[int, ...]]:
        return Counter(key(op) for op in ops if op.kind == kind)

    convs = Counter((m.in_channels, m.kernel_size[0], m.stride[0]) for _, m in modules if isinstance(m, nn.Conv2d))
    norms = Counter((m.num_channels, m.num_groups) for _, m in modules if isinstance(m, nn.GroupNorm))
    attn1 = Counter((m.to_q.in_features, m.heads) for name, m in modules if name.endswith("attn1"))
    assert convs == planned("conv", lambda op: (op.channels, op.kernel, op.stride))
    assert norms == planned("norm", lambda op: (op.channels, op.groups))
    assert attn1 == planned("attention", lambda op: (op.channels, op.groups))


def test_blur_matched_on_bands_equals_the_whole_blur() -> None:
    torch.manual_seed(3)
    latents = torch.randn(1, 4, 32, 20) * 2 + 0.5
    cases = [(2, 0.8), (4, 1.0), (8, 0.6)]  # kernel 3, 7, 15: the last wider than a band at 3-way
    refs = [blur_matched(WHOLE_IMAGE, latents, ratio, sigma) for ratio, sigma in cases]

    def blur_all(comm: Comm) -> list[dict[str, Any]]:
        comm.bands = Bands.of_heights([8, 16, 8], MULTIPLE)
        results = []
        for (ratio, sigma), ref in zip(cases, refs, strict=True):
            blurred = blur_matched(BandOps(comm), band_of(comm, latents), ratio, sigma)
            results.append(compare(blurred, band_of(comm, ref)))
        return results

    for result in itertools.chain(*ok_results(launch(3, blur_all))):
        assert result["rel"] < 1e-5, result


def test_upscale_on_bands_equals_the_whole_upscale() -> None:
    """The stage hand-off: each band's decoded image upscaled 2x with two rows of its neighbours' context."""
    torch.manual_seed(4)
    image = torch.rand(1, 3, 32 * 8, 20 * 8) * 2 - 1
    ref = upscale(image, 40 * 8, 64 * 8)

    def up(comm: Comm) -> dict[str, Any]:
        comm.bands = Bands.of_heights([8, 16, 8], MULTIPLE)
        return compare(band_upscale(comm, band_of(comm, image), 40 * 8, 64 * 8), band_of(comm, ref))

    for result in ok_results(launch(3, up)):
        assert result["equal"], result


# --- installing and restoring -----------------------------------------------------------------------------------


def module_state(model: nn.Module) -> list[tuple[str, list[str], int]]:
    return [(name, sorted(vars(m)), len(m._forward_hooks)) for name, m in model.named_modules()]


def test_split_image_restores_every_module_exactly_also_on_errors() -> None:
    """One process (no group needed): what `split_image` installs is gone afterwards, the outputs are the same
    bits, and refine.dilated composes in either order."""
    unet = build_unet("tiny")
    x, embeds = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    comm = Comm(bands=Bands.split(16, 1, MULTIPLE))
    before = module_state(unet)
    with torch.no_grad():
        ref = unet(x, T, embeds).sample
        with split_image(comm, unet, unet) as split:  # the same model twice: installed once
            with dilated(unet, 2):
                unet(x, T, embeds)
            inside = unet(x, T, embeds).sample
        assert split.installed == {"Conv2d": 49, "GroupNorm": 30, "LinFusionAttention": 7}
        with pytest.raises(RuntimeError, match="boom"), dilated(unet, 2), split_image(comm, unet):
            raise RuntimeError("boom")
        after = unet(x, T, embeds).sample
    assert module_state(unet) == before
    assert all(m.dilation == (1, 1) for m in unet.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(after, ref)
    assert torch.allclose(inside, ref, rtol=0, atol=1e-5)  # one band: only GroupNorm's statistics differ


def test_freeu_is_refused_before_anything_is_installed() -> None:
    unet = build_unet("tiny")
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    before = module_state(unet)
    with pytest.raises(UsageError, match="FreeU"), split_image(Comm(bands=Bands.split(16, 1)), unet):
        pass
    assert module_state(unet) == before
