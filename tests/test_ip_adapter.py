"""IP-Adapter: installed on attn2 beside LinFusion's attn1, removed exactly, the image embedded once per job, and
read from h94/IP-Adapter's layout (written here with tiny sizes, independently of the loader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from linfusion_cli.config import AdapterRef, EngineSpec, JobSpec, resolve_target
from linfusion_cli.models import build_random
from linfusion_cli.pipeline import Engine
from linfusion_cli.planning import make_plan

CPU = torch.device("cpu")


def _ref_image(path: Path, seed: int = 3) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _job(image: str | None, ip: str | None = "tiny", **kw: Any) -> JobSpec:
    return JobSpec(
        prompt="a fox",
        model=kw.pop("model", "tiny"),
        steps=kw.pop("steps", 4),
        size=kw.pop("size", 256),
        ip_adapter=[ip] if ip else None,
        ip_image=image,
        **kw,
    )


def _engine(arch: str = "tiny", linfusion: str = "auto") -> Engine:
    return Engine.from_components(build_random(arch), linfusion, CPU, torch.float32)


def _generate(engine: Engine, job: JobSpec, seed: int = 7) -> np.ndarray:
    engine.use(EngineSpec.of(job))
    plan = make_plan(resolve_target(job.size), native=128, schedule_steps=job.steps)
    return engine.generate(job, plan, seed).image


def _attn2_processors(unet: torch.nn.Module) -> dict[str, Any]:
    return {n: m.processor for n, m in unet.named_modules() if n.endswith(".attn2")}


@pytest.mark.parametrize("arch", ["tiny", "tiny-sdxl"])
def test_changes_the_image_and_removing_restores_it_bit_for_bit(tmp_path: Path, arch: str) -> None:
    from linfusion_cli.attention import LinFusionAttention

    image = _ref_image(tmp_path / "ref.png")
    engine = _engine(arch)
    unet = engine.comps.unet
    linfusion_layers = [id(m) for m in unet.modules() if isinstance(m, LinFusionAttention)]
    before_procs = _attn2_processors(unet)
    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = _generate(engine, _job(None, ip=None, model=arch))

    with_ip = _generate(engine, _job(image, model=arch))
    assert (with_ip != plain).mean() > 0.05
    # LinFusion untouched (same modules), every attn2 runs the IP processor.
    assert [id(m) for m in unet.modules() if isinstance(m, LinFusionAttention)] == linfusion_layers
    assert len(linfusion_layers) == len(engine.patch.layers) > 0
    kinds = {type(p).__name__ for p in _attn2_processors(unet).values()}
    assert kinds == {"IPAdapterAttnProcessor2_0"}
    assert len(engine.adapters[0].layers) == len(before_procs)

    again = _generate(engine, _job(None, ip=None, model=arch))  # Engine.use without it: removed
    assert engine.adapters == []
    assert np.array_equal(again, plain)
    assert _attn2_processors(unet) == before_procs
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert unet.state_dict().keys() == before_state.keys()


def test_scale_and_image_matter(tmp_path: Path) -> None:
    engine = _engine()
    one = _generate(engine, _job(_ref_image(tmp_path / "a.png", 1)))
    other_image = _generate(engine, _job(_ref_image(tmp_path / "b.png", 2)))
    weaker = _generate(engine, _job(str(tmp_path / "a.png"), ip="tiny:0.3"))
    assert not np.array_equal(one, other_image)
    assert not np.array_equal(one, weaker)
    assert engine.adapters[0].ref == AdapterRef("tiny", 0.3)


def test_embedding_is_computed_once_per_job_across_stages(tmp_path: Path) -> None:
    image = _ref_image(tmp_path / "ref.png")
    engine = _engine()
    job = _job(image, size=512, steps=4)  # base 128 px + 2 refine stages
    engine.use(EngineSpec.of(job))
    adapter = engine.adapters[0]
    calls: list[tuple[int, ...]] = []
    adapter.encoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    seen_embeds: list[list[torch.Tensor]] = []
    unet = engine.comps.unet
    unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen_embeds.append(kwargs["added_cond_kwargs"]["image_embeds"]), with_kwargs=True
    )
    plan = make_plan(resolve_target(512), native=128, schedule_steps=4)
    assert len(plan.stages) == 3
    engine.generate(job, plan, 5)
    assert calls == [(1, 3, 32, 32)]
    assert len(seen_embeds) == sum(s.steps for s in plan.stages)
    first = seen_embeds[0][0]
    assert first.shape == (2, 1, 32)  # [negative, positive] x 1 image x embedding width
    assert torch.equal(first[0], torch.zeros_like(first[0]))  # diffusers' negative: zeros
    assert all(torch.equal(e[0], first) for e in seen_embeds)
    engine.generate(job, plan, 6)  # a second job: embedded again, once
    assert len(calls) == 2


def test_without_guidance_only_the_positive_row(tmp_path: Path) -> None:
    engine = _engine()
    job = _job(_ref_image(tmp_path / "ref.png"), guidance=1.0, steps=2)
    rows: list[int] = []
    engine.comps.unet.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["added_cond_kwargs"]["image_embeds"][0].shape[0]),
        with_kwargs=True,
    )
    _generate(engine, job)
    assert rows and set(rows) == {1}


def test_guidance_split_into_two_calls_gets_one_row_each(tmp_path: Path) -> None:
    from linfusion_cli.sampling import StageInputs, _predict
    from linfusion_cli.text import encode_prompt

    engine = _engine()
    job = _job(_ref_image(tmp_path / "ref.png"))
    engine.use(EngineSpec.of(job))
    adapter = engine.adapters[0]
    adapter.begin_job(job, CPU)
    plan = make_plan(resolve_target(128), native=128, schedule_steps=2)
    extras = (adapter.stage_extra(plan.stages[0], None),)
    cond = encode_prompt(engine.comps, job.prompt, "", job.guidance, CPU)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    unet = engine.comps.unet
    joined = _predict(unet, x, t, StageInputs(cond, job.guidance, (128, 128), extras=extras))
    split = _predict(unet, x, t, StageInputs(cond, job.guidance, (128, 128), cfg_split=True, extras=extras))
    assert torch.allclose(joined, split, atol=1e-5)
