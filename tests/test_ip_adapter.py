"""IP-Adapter: installed on attn2 beside LinFusion's attn1, removed exactly, the image embedded once per job, and
read from h94/IP-Adapter's layout (written here with tiny sizes, independently of the loader)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from linfusion_cli.base.settings import AdapterRef
from linfusion_cli.base.sizes import resolve_target
from linfusion_cli.core.jobspec import JobSpec
from linfusion_cli.core.planning import make_plan
from linfusion_cli.engine.memory_model import ALLOCATOR_FACTOR
from linfusion_cli.engine.pipeline import Engine
from linfusion_cli.models.adapters import engine_spec
from linfusion_cli.models.loading import build_random

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
    engine.use(engine_spec(job))
    plan = make_plan(resolve_target(job.size), native=128, schedule_steps=job.steps)
    return engine.run_plan(job, plan, seed).image


def _attn2_processors(unet: torch.nn.Module) -> dict[str, Any]:
    return {n: m.processor for n, m in unet.named_modules() if n.endswith(".attn2")}


@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_changes_the_image_and_removing_restores_it_bit_for_bit(tmp_path: Path, arch: str) -> None:
    from linfusion_cli.linfusion.attention import LinFusionAttention

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
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    assert all(isinstance(p, IPAdapterAttnProcessor2_0) for p in _attn2_processors(unet).values())
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
    loaded = engine.adapters[0]
    other_image = _generate(engine, _job(_ref_image(tmp_path / "b.png", 2)))
    assert engine.adapters[0] is loaded  # same IP-Adapter, another image: kept, only the embedding is redone
    weaker = _generate(engine, _job(str(tmp_path / "a.png"), ip="tiny:0.3"))
    assert not np.array_equal(one, other_image)
    assert not np.array_equal(one, weaker)
    assert engine.adapters[0].ref == AdapterRef("tiny", 0.3)


def test_embedding_is_computed_once_per_job_across_stages(tmp_path: Path) -> None:
    image = _ref_image(tmp_path / "ref.png")
    engine = _engine()
    job = _job(image, size=512, steps=4)  # base 128 px + 2 refine stages
    engine.use(engine_spec(job))
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
    engine.run_plan(job, plan, 5)
    assert calls == [(1, 3, 32, 32)]
    assert len(seen_embeds) == sum(s.steps for s in plan.stages)
    first = seen_embeds[0][0]
    assert first.shape == (2, 1, 32)  # [negative, positive] x 1 image x embedding width
    assert torch.equal(first[0], torch.zeros_like(first[0]))  # diffusers' negative: zeros
    assert all(torch.equal(e[0], first) for e in seen_embeds)
    engine.run_plan(job, plan, 6)  # a second job: embedded again, once
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
    from linfusion_cli.engine.sampling import Guided, StageInputs
    from linfusion_cli.engine.text import encode_prompt

    engine = _engine()
    job = _job(_ref_image(tmp_path / "ref.png"))
    engine.use(engine_spec(job))
    adapter = engine.adapters[0]
    adapter.begin_job(job, CPU)
    plan = make_plan(resolve_target(128), native=128, schedule_steps=2)
    extras = (adapter.stage_extra(plan.stages[0], None),)
    cond = encode_prompt(engine.comps, job.prompt, "", job.guidance, CPU)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    unet = engine.comps.unet
    joined = Guided(unet, StageInputs(cond, job.guidance, (128, 128), extras=extras))(x, t)
    split = Guided(unet, StageInputs(cond, job.guidance, (128, 128), cfg_split=True, extras=extras))(x, t)
    assert torch.allclose(joined, split, atol=1e-5)


# --- h94/IP-Adapter's layout, written independently of the loader ---------------------------------------------
ENCODER = {
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 40,
    "patch_size": 10,
    "projection_dim": 20,
}


def _h94_weights(unet: torch.nn.Module, embed_dim: int, seed: int = 11) -> dict[str, torch.Tensor]:
    """Flat safetensors keys as h94's files have them: image_proj.* and ip_adapter.{1,3,5...}.to_k_ip/to_v_ip."""
    gen = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    out = {
        "image_proj.proj.weight": torch.randn(cross * 4, embed_dim, generator=gen) * 0.2,
        "image_proj.proj.bias": torch.randn(cross * 4, generator=gen) * 0.1,
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key = 1
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            hidden = module.to_out[0].in_features
            out[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=gen) * 0.2
            out[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=gen) * 0.2
            key += 2
    return out


def _full_face(unet: torch.nn.Module, hidden: int, seed: int = 12) -> dict[str, torch.Tensor]:
    """h94's Full Face projection: penultimate hidden states (B, 257, hidden) -> Linear, GELU, Linear, LayerNorm."""
    gen = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    return {
        "image_proj.proj.0.weight": torch.randn(hidden, hidden, generator=gen) * 0.2,
        "image_proj.proj.0.bias": torch.zeros(hidden),
        "image_proj.proj.2.weight": torch.randn(cross, hidden, generator=gen) * 0.2,
        "image_proj.proj.2.bias": torch.zeros(cross),
        "image_proj.proj.3.weight": torch.ones(cross),
        "image_proj.proj.3.bias": torch.zeros(cross),
    }


def _write_h94(root: Path, arch: str, full_face: bool = False) -> Path:
    """root/models/ip-adapter_sd15.safetensors (SD-1.x) or root/sdxl_models/ip-adapter_sdxl.safetensors, each with
    its image_encoder/ (CLIPVisionModelWithProjection: config.json + model.safetensors); `full_face`: h94's
    models/ip-adapter-full-face_sd15.safetensors instead."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    xl = "xl" in arch
    sub, name = ("sdxl_models", "ip-adapter_sdxl.safetensors") if xl else ("models", "ip-adapter_sd15.safetensors")
    if full_face:
        name = "ip-adapter-full-face_sd15.safetensors"
    torch.manual_seed(5)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER))
    encoder.save_pretrained(root / sub / "image_encoder", safe_serialization=True)
    unet = build_random(arch).unet
    weights = _h94_weights(unet, ENCODER["projection_dim"])
    if full_face:
        weights = {k: v for k, v in weights.items() if not k.startswith("image_proj.")}
        weights.update(_full_face(unet, ENCODER["hidden_size"]))
    save_file(weights, str(root / sub / name), metadata={"format": "pt"})
    return root / sub / name


def test_loads_h94_folder_and_matches_diffusers_own_loader(tmp_path: Path) -> None:
    """Our install (by attn2 name, LinFusion-safe) gives the UNet diffusers' own IP-Adapter loader gives."""
    from safetensors.torch import load_file

    from linfusion_cli.models.ip_adapter import adapter as ip_adapter

    weights = _write_h94(tmp_path / "IP-Adapter", "tiny")
    ours = build_random("tiny")
    adapter = ip_adapter.load(ours, AdapterRef(str(tmp_path / "IP-Adapter"), 0.7))
    assert adapter.describe()["weights"] == "ip-adapter_sd15.safetensors"
    assert adapter.encoder.config.projection_dim == ENCODER["projection_dim"]

    theirs = build_random("tiny").unet
    flat = load_file(str(weights))
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    theirs._load_ip_adapter_weights([parts])
    for proc in theirs.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.7]
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    embeds = [torch.randn(2, 1, ENCODER["projection_dim"], generator=gen)]
    with torch.no_grad():
        a = ours.unet(x, 400, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds}).sample
        b = theirs(x, 400, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds}).sample
    assert torch.equal(a, b)


def test_weight_file_with_its_encoder_beside_it_through_generate(tmp_path: Path) -> None:
    weights = _write_h94(tmp_path / "IP-Adapter", "tiny-sdxl")
    image = _ref_image(tmp_path / "ref.png")
    engine = _engine("tiny-sdxl")
    plain = _generate(engine, _job(None, ip=None, model="tiny-sdxl", steps=2))
    out = _generate(engine, _job(image, ip=f"{weights}:0.8", model="tiny-sdxl", steps=2))
    assert not np.array_equal(out, plain)
    info = engine.adapters[0].describe()
    assert info["weights"] == "ip-adapter_sdxl.safetensors" and info["scale"] == 0.8
    assert info["image_encoder"].endswith("sdxl_models/image_encoder")


# --- through the CLI ------------------------------------------------------------------------------------------
def _cli(runner: Any, *args: str) -> Any:
    from linfusion_cli.cli.commands import app

    return runner.invoke(app, list(args), catch_exceptions=False)


def test_generate_records_it_and_replay_reproduces(runner: Any, tmp_path: Path) -> None:
    from PIL import Image

    ref = _ref_image(tmp_path / "ref.png")
    args = ["--model", "tiny", "--size", "256", "--steps", "3", "--seed", "9", "--json"]
    result = _cli(
        runner, "generate", "a fox", *args, "--ip-adapter", "tiny:0.6", "--ip-image", ref, "--out", str(tmp_path / "a")
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (adapter,) = report["adapters"]
    assert adapter["kind"] == "ip_adapters" and adapter["source"] == "tiny" and adapter["scale"] == 0.6
    assert adapter["image"] == ref and adapter["layers"] == 7
    assert report["settings"]["ip_adapter"] == ["tiny:0.6"] and report["settings"]["ip_image"] == ref
    with Image.open(report["path"]) as image:
        assert 'IP-Adapter: "tiny, Weight: 0.6"' in image.text["parameters"]
        pixels = np.asarray(image)

    replayed = _cli(runner, "replay", report["sidecar"], "--out", str(tmp_path / "b"), "--json")
    assert replayed.exit_code == 0, replayed.stderr
    with Image.open(json.loads(replayed.stdout)["path"]) as image:
        assert np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ip-adapter", "tiny"], "--ip-adapter needs --ip-image"),
        (["--ip-adapter", "tiny:abc", "--ip-image", "REF"], "the scale 'abc' is not a number"),
        (["--ip-adapter", "tiny:99", "--ip-image", "REF"], "scale must be a number between -10 and 10"),
        (["--ip-adapter", "tiny;tiny:0.5", "--ip-image", "REF"], "--ip-adapter: takes one IP-Adapter"),
        (["--ip-adapter", "tiny", "--ip-image", "nope.png"], "--ip-image: cannot read image 'nope.png'"),
        (["--ip-adapter", "./no/such", "--ip-image", "REF"], "IP-Adapter './no/such' does not exist"),
    ],
)
def test_bad_input_exits_2_before_loading(
    runner: Any, tmp_path: Path, no_model_loads: None, args: list[str], message: str
) -> None:
    ref = _ref_image(tmp_path / "ref.png")
    args = [ref if a == "REF" else a for a in args]
    result = _cli(runner, "generate", "x", "--model", "tiny", "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_family_mismatch_exits_2_before_loading_naming_both(runner: Any, tmp_path: Path, no_model_loads: None) -> None:
    weights = _write_h94(tmp_path / "IP-Adapter", "tiny-sdxl")
    ref = _ref_image(tmp_path / "ref.png")
    for source in (str(weights), str(weights.parent)):
        result = _cli(runner, "generate", "x", "--model", "tiny", "--ip-adapter", source, "--ip-image", ref)
        assert result.exit_code == 2, result.stderr
        assert "made for tiny SDXL-shaped (cross-attention width 64)" in result.stderr
        assert "'tiny' is tiny SD-1.x-shaped (cross-attention width 32)" in result.stderr


def test_pickled_bin_needs_allow_pickle_and_is_read_weights_only(
    runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h94's .bin files (torch.save of {"image_proj": ..., "ip_adapter": ...}): refused before any model loads
    without --allow-pickle; with it, read by torch's weights-only loader (an object inside is still refused)."""
    from safetensors.torch import load_file

    import linfusion_cli.engine.pipeline as pipeline

    weights = _write_h94(tmp_path / "IP-Adapter", "tiny")
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in load_file(str(weights)).items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    binary = weights.with_suffix(".bin")
    torch.save(parts, binary)
    weights.unlink()  # the folder now holds only the .bin, as old downloads do
    ref = _ref_image(tmp_path / "ref.png")
    args = ["generate", "x", "--model", "tiny", "--size", "128", "--steps", "2", "--ip-image", ref]
    real_load = pipeline.Engine.load
    monkeypatch.setattr(pipeline.Engine, "load", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    for source in (str(binary), str(tmp_path / "IP-Adapter")):
        refused = _cli(runner, *args, "--ip-adapter", source, "--out", str(tmp_path / "o"))
        assert refused.exit_code == 2 and "is a pickle" in refused.stderr and "--allow-pickle" in refused.stderr
    monkeypatch.setattr(pipeline.Engine, "load", real_load)

    result = _cli(runner, *args, "--ip-adapter", str(binary), "--allow-pickle", "--out", str(tmp_path / "o"), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["adapters"][0]["weights"] == "ip-adapter_sd15.bin"

    torch.save({"image_proj": parts["image_proj"], "ip_adapter": _Evil()}, binary)
    evil = _cli(runner, *args, "--ip-adapter", str(binary), "--allow-pickle", "--out", str(tmp_path / "e"))
    assert evil.exit_code == 2 and "refused even with --allow-pickle" in evil.stderr


class _Evil:
    """Stands for code a pickle would run."""


def test_batch_switches_ip_adapters_on_one_loaded_model(runner: Any, tmp_path: Path, model_loads: list[str]) -> None:
    loads = model_loads
    ref = _ref_image(tmp_path / "ref.png")
    weights = _write_h94(tmp_path / "IP-Adapter", "tiny")
    jobs = tmp_path / "jobs.jsonl"
    rows = [
        {"prompt": "a fox", "seed": 1, "ip_adapter": "tiny:0.5", "ip_image": ref},
        {"prompt": "a fox", "seed": 1, "name": "plain"},
        {"prompt": "a fox", "seed": 1, "ip_adapter": str(tmp_path / "IP-Adapter"), "ip_image": ref, "name": "h94"},
    ]
    jobs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    result = _cli(
        runner, "batch", str(jobs), "--model", "tiny", "--size", "128", "--steps", "2", "--out", str(out), "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert loads == ["tiny"]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    sidecars = {x["index"]: json.loads(Path(x["sidecar"]).read_text()) for x in lines}
    adapters = {i: [(a["source"], a["scale"]) for a in s["adapters"]] for i, s in sidecars.items()}
    assert adapters == {0: [("tiny", 0.5)], 1: [], 2: [(str(tmp_path / "IP-Adapter"), 1.0)]}
    assert weights.name in json.dumps(sidecars)


def test_hub_id_from_the_cache_offline_picks_the_familys_file(tmp_path: Path, hub_cache: Path, runner: Any) -> None:
    from layouts import into_hub_cache

    from linfusion_cli.models.ip_adapter import adapter as ip_adapter

    _write_h94(tmp_path / "IP-Adapter", "tiny")
    _write_h94(tmp_path / "IP-Adapter", "tiny-sdxl")
    into_hub_cache(tmp_path / "IP-Adapter", hub_cache, "h94/IP-Adapter")
    for arch, name in (("tiny", "ip-adapter_sd15.safetensors"), ("tiny-sdxl", "ip-adapter_sdxl.safetensors")):
        adapter = ip_adapter.load(build_random(arch), AdapterRef("h94/IP-Adapter"))
        assert adapter.describe()["weights"] == name
        adapter.remove()
    # The family check reads the cached file before any model loads.
    ref = _ref_image(tmp_path / "ref.png")
    wrong = "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
    result = _cli(runner, "generate", "x", "--model", "tiny", "--ip-adapter", wrong, "--ip-image", ref, "--dry-run")
    assert result.exit_code == 2 and "made for tiny SDXL-shaped" in result.stderr


def test_hub_id_not_cached_offline_says_how_to_fetch_it(
    tmp_path: Path, hub_cache: Path, runner: Any, no_model_loads: None
) -> None:
    ref = _ref_image(tmp_path / "ref.png")
    args = ["--model", "tiny", "--ip-adapter", "h94/IP-Adapter", "--ip-image", ref, "--out", str(tmp_path / "o")]
    result = _cli(runner, "generate", "x", *args)
    assert result.exit_code == 1
    assert "IP-Adapter 'h94/IP-Adapter' is not in the local Hugging Face cache" in result.stderr
    assert "hf download h94/IP-Adapter" in result.stderr


def test_stacks_with_lora_and_controlnet_and_comes_off_exactly(tmp_path: Path) -> None:
    """LoRA (fused into weights), IP-Adapter (attn2 processors), ControlNet (residuals) on one LinFusion UNet:
    each switch leaves the model as it found it."""
    image = _ref_image(tmp_path / "ref.png")
    engine = _engine()
    ip_only = _job(image, steps=2)
    plain = _generate(engine, _job(None, ip=None, steps=2))
    first = _generate(engine, ip_only)
    stacked = _job(image, steps=2, lora=["tiny"], controlnet=["tiny"], control_image=["previous"])
    everything = _generate(engine, stacked)
    assert [a.ref.source for a in engine.adapters] == ["tiny"] * 3
    assert not np.array_equal(everything, first)
    assert np.array_equal(_generate(engine, ip_only), first)
    assert np.array_equal(_generate(engine, _job(None, ip=None, steps=2)), plain)


def test_flags_presets_and_upscale_fill_the_job(runner: Any, tmp_path: Path, core: dict[str, Any]) -> None:
    ref = _ref_image(tmp_path / "ref.png")
    preset = tmp_path / "style.yaml"
    preset.write_text(f"description: a style image\nip_adapter: tiny:0.4\nip_image: {ref}\n")
    assert _cli(runner, "generate", "a fox", "--preset", str(preset), "--quiet").exit_code == 0
    assert core["job"].ip_adapter == ["tiny:0.4"] and core["job"].ip_image == ref
    assert core["job"].sources["ip_adapter"].startswith("preset")
    assert engine_spec(core["job"]).refs("ip_adapters") == (AdapterRef("tiny", 0.4),)

    result = _cli(runner, "upscale", ref, "--size", "256", "--ip-adapter", "tiny:0.8", "--ip-image", ref, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert core["job"].ip_adapter == ["tiny:0.8"] and core["job"].ip_image == ref


def test_help_lists_the_flags_in_their_panels(runner: Any) -> None:
    for command in ("generate", "upscale", "batch"):
        text = _cli(runner, command, "--help").stdout
        assert "--ip-adapter" in text and "--ip-image" in text
        assert "h94/IP-Adapter" in text


def test_full_face_variant_reads_hidden_states_once_per_job(tmp_path: Path) -> None:
    weights = _write_h94(tmp_path / "IP-Adapter", "tiny", full_face=True)
    image = _ref_image(tmp_path / "ref.png")
    engine = _engine()
    plain = _generate(engine, _job(None, ip=None, steps=2))
    job = _job(image, ip=str(weights), steps=2)
    engine.use(engine_spec(job))
    calls: list[int] = []
    engine.adapters[0].encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    seen: list[torch.Tensor] = []
    engine.comps.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["image_embeds"][0]), with_kwargs=True
    )
    out = _generate(engine, job)
    assert not np.array_equal(out, plain)
    assert calls == [2]  # the image and the black negative, in one pass
    tokens = (ENCODER["image_size"] // ENCODER["patch_size"]) ** 2 + 1
    assert seen[0].shape == (2, 1, tokens, ENCODER["hidden_size"])
    assert not torch.equal(seen[0][0], torch.zeros_like(seen[0][0]))  # the negative is an encoding, not zeros


def _plus(unet: torch.nn.Module, hidden: int, queries: int = 6, width: int = 16, seed: int = 13) -> dict[str, Any]:
    """h94's Plus projection (the original Resampler's keys): 4 layers of perceiver attention over the encoder's
    penultimate hidden states, heads of 64."""
    gen = torch.Generator().manual_seed(seed)
    cross, inner = unet.config.cross_attention_dim, 64

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    out = {
        "image_proj.latents": rand(1, queries, width),
        "image_proj.proj_in.weight": rand(width, hidden),
        "image_proj.proj_in.bias": torch.zeros(width),
        "image_proj.proj_out.weight": rand(cross, width),
        "image_proj.proj_out.bias": torch.zeros(cross),
        "image_proj.norm_out.weight": torch.ones(cross),
        "image_proj.norm_out.bias": torch.zeros(cross),
    }
    for i in range(4):
        p = f"image_proj.layers.{i}"
        for norm in ("0.norm1", "0.norm2", "1.0"):
            out[f"{p}.{norm}.weight"], out[f"{p}.{norm}.bias"] = torch.ones(width), torch.zeros(width)
        out[f"{p}.0.to_q.weight"] = rand(inner, width)
        out[f"{p}.0.to_kv.weight"] = rand(2 * inner, width)
        out[f"{p}.0.to_out.weight"] = rand(width, inner)
        out[f"{p}.1.1.weight"] = rand(4 * width, width)
        out[f"{p}.1.3.weight"] = rand(width, 4 * width)
    return out


def test_plus_variant_loads_and_steers(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = _write_h94(tmp_path / "IP-Adapter", "tiny")
    unet = build_random("tiny").unet
    flat = {k: v for k, v in load_file(str(weights)).items() if k.startswith("ip_adapter.")}
    flat.update(_plus(unet, ENCODER["hidden_size"]))
    plus = weights.with_name("ip-adapter-plus_sd15.safetensors")
    save_file(flat, str(plus))
    image = _ref_image(tmp_path / "ref.png")
    engine = _engine()
    plain = _generate(engine, _job(None, ip=None, steps=2))
    out = _generate(engine, _job(image, ip=str(plus), steps=2))
    assert not np.array_equal(out, plain)
    assert engine.adapters[0].describe()["weights"] == "ip-adapter-plus_sd15.safetensors"


def test_which_weight_file_a_folder_gives(tmp_path: Path) -> None:
    from linfusion_cli.base.errors import UsageError
    from linfusion_cli.models.families import FAMILIES
    from linfusion_cli.models.ip_adapter import kind as ip_kind

    family = {f.key: f for f in FAMILIES}
    weights = _write_h94(tmp_path / "IP-Adapter", "tiny")
    (weights.parent / "ip-adapter-plus_sd15.safetensors").write_bytes(weights.read_bytes())
    for folder in (tmp_path / "IP-Adapter", weights.parent):  # h94's root, or its models/ folder
        assert ip_kind.find_weights(str(folder), family["tiny"]) == weights
    with pytest.raises(UsageError, match=re.escape("no sdxl_models/ip-adapter_sdxl.safetensors")):
        ip_kind.find_weights(str(tmp_path / "IP-Adapter"), family["tiny-sdxl"])
    with pytest.raises(UsageError, match=re.escape("has no weights for tiny SD-2.x-shaped")):
        ip_kind.find_weights(str(tmp_path / "IP-Adapter"), family["tiny-sd2"])
    with pytest.raises(UsageError, match=re.escape("holds 2 .safetensors files")):
        ip_kind.find_weights(str(weights.parent), family["tiny-sd2"])


def test_token_chunks_give_the_same_prediction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At high resolution the IP cross-attention runs over chunks of query tokens: same result, bounded memory."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from linfusion_cli.models.ip_adapter import attention as ip_attention

    engine = _engine()
    job = _job(_ref_image(tmp_path / "ref.png"))
    engine.use(engine_spec(job))
    engine.adapters[0].begin_job(job, CPU)
    embeds = [engine.adapters[0]._embeds]
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 24, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    unet = engine.comps.unet

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, 300, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds}).sample

    calls: list[int] = []
    real = IPAdapterAttnProcessor2_0.__call__

    def spy(self: Any, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(hidden_states.shape[1])
        return real(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(IPAdapterAttnProcessor2_0, "__call__", spy)
    whole = predict()
    assert max(calls) == 24 * 16  # the top level's tokens, in one call
    calls.clear()
    monkeypatch.setattr(ip_attention, "IP_TOKEN_CHUNK", 100)
    chunked = predict()
    assert max(calls) == 100 and calls.count(100) >= 3
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_weights_of_another_architecture_are_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from linfusion_cli.base.errors import UsageError
    from linfusion_cli.models.ip_adapter import adapter as ip_adapter

    weights = _write_h94(tmp_path / "IP-Adapter", "tiny")
    flat = load_file(str(weights))
    fewer = {k: v for k, v in flat.items() if not k.startswith("ip_adapter.13.")}
    save_file(fewer, str(weights))
    with pytest.raises(UsageError, match="has weights for 6 cross-attention layers; the model 'tiny' has 7"):
        ip_adapter.load(build_random("tiny"), AdapterRef(str(weights)))
    flat["ip_adapter.13.to_v_ip.weight"] = flat["ip_adapter.13.to_v_ip.weight"][:, :16].contiguous()
    save_file(flat, str(weights))
    comps = build_random("tiny")
    before = _attn2_processors(comps.unet)
    with pytest.raises(UsageError, match=r"needs ip_adapter\.13\.to_v_ip\.weight of shape \(64, 32\)"):
        ip_adapter.load(comps, AdapterRef(str(weights)))
    assert _attn2_processors(comps.unet) == before and comps.unet.encoder_hid_proj is None  # nothing half-done


def test_plan_lists_it_and_counts_its_image_encoder(runner: Any, tmp_path: Path, no_model_loads: None) -> None:
    ref = _ref_image(tmp_path / "ref.png")
    base = ["plan", "--size", "1024", "--json", "--device", "cpu"]
    plain = json.loads(_cli(runner, *base).stdout)
    result = _cli(runner, *base, "--ip-adapter", "h94/IP-Adapter:0.6", "--ip-image", ref)
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["ip_adapters"] == [{"source": "h94/IP-Adapter", "scale": 0.6, "image": ref}]
    extra = plan["stages"][0]["estimated_peak_gib"] - plain["stages"][0]["estimated_peak_gib"]
    assert extra == pytest.approx(2 * 1.26 * ALLOCATOR_FACTOR, abs=0.02)  # SD-1.5's ViT-H encoder, fp32 on the CPU
    assert any("IP-Adapter 'h94/IP-Adapter' is not in the local Hugging Face cache" in w for w in plan["warnings"])


def test_ip_image_without_ip_adapter_is_refused(runner, tmp_path) -> None:
    from PIL import Image

    from linfusion_cli.cli import app

    Image.new("RGB", (32, 32)).save(tmp_path / "ref.png")
    result = runner.invoke(
        app, ["generate", "x", "--model", "tiny", "--size", "128", "--ip-image", str(tmp_path / "ref.png"), "--dry-run"]
    )
    assert result.exit_code == 2 and "give --ip-adapter too" in result.stderr
