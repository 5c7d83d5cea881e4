"""ControlNets on the tiny models: they steer the image, come off bit for bit, run with linear self-attention
patched from the UNet's LinFusion layers, and load from a diffusers folder and from a single file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from linfusion_cli.base.settings import EngineSpec
from linfusion_cli.base.sizes import resolve_target
from linfusion_cli.core.jobspec import JobSpec
from linfusion_cli.core.planning import make_plan
from linfusion_cli.engine.pipeline import Engine
from linfusion_cli.linfusion.attention import LinFusionAttention
from linfusion_cli.models.adapters import engine_spec
from linfusion_cli.models.controlnet.load import build_tiny
from linfusion_cli.models.controlnet.patch import ControlNetPatch
from linfusion_cli.models.modules import self_attention_layers

CPU = torch.device("cpu")
STEPS = 4


@pytest.fixture(scope="module")
def control_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("control") / "edges.png"
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[16:48, 16:48] = 255  # a white square: what a canny map of a box looks like
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(EngineSpec("tiny"), device=CPU, dtype=torch.float32)


def _job(model: str = "tiny", **control: object) -> JobSpec:
    return JobSpec(prompt="a box", model=model, steps=STEPS, **control)  # type: ignore[arg-type]


def _render(engine: Engine, job: JobSpec) -> np.ndarray:
    engine.use(engine_spec(job))
    plan = make_plan(resolve_target(256), native=128, schedule_steps=STEPS)
    return engine.run_plan(job, plan, seed=3).image


def test_controlnet_steers_and_removing_it_restores_bit_for_bit(engine: Engine, control_png: Path) -> None:
    plain = _render(engine, _job())
    steered = _render(engine, _job(controlnet=["tiny:1"], control_image=[str(control_png)]))
    assert np.abs(plain.astype(int) - steered.astype(int)).mean() > 1.0
    assert engine.adapters[0].describe()["linfusion_layers"] == 3  # 2 down blocks + mid of the tiny encoder
    assert np.array_equal(_render(engine, _job()), plain)
    assert engine.adapters == []


def test_stage_scales_and_guidance_window(engine: Engine, control_png: Path) -> None:
    image = [str(control_png)]
    plain = _render(engine, _job())
    full = _render(engine, _job(controlnet=["tiny:1"], control_image=image))
    off = _render(engine, _job(controlnet=["tiny:1"], control_image=image, control_stages=[0.0]))
    assert np.array_equal(off, plain)  # scale 0 in every stage: the ControlNet is not even called
    late = _render(engine, _job(controlnet=["tiny:1"], control_image=image, control_start=0.5))
    assert not np.array_equal(late, plain) and not np.array_equal(late, full)
    base_only_off = _render(engine, _job(controlnet=["tiny:1"], control_image=image, control_stages=[0.0, 1.0]))
    assert not np.array_equal(base_only_off, plain) and not np.array_equal(base_only_off, full)


def test_previous_image_skips_the_base_stage(engine: Engine) -> None:
    plain = _render(engine, _job())
    tile = _render(engine, _job(controlnet=["tiny"], control_image=["previous"]))
    assert not np.array_equal(tile, plain)
    assert engine.adapters[0].describe()["image"] == "previous"
    engine.use(EngineSpec("tiny"))


def test_attn1_layers_patched_from_the_unets_linfusion_and_removed_exactly(engine: Engine) -> None:
    model = build_tiny(engine.comps)
    names = [n for n, _ in self_attention_layers(model)]
    originals = [model.get_submodule(n) for n in names]
    assert engine.patch is not None
    # A ControlNet trained away from the UNet: its own training survives as W_cn + (W_linfusion - W_unet).
    with torch.no_grad():
        model.get_submodule(names[0]).to_q.weight.add_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch = ControlNetPatch.apply(model, engine.patch)
    assert patch.layers == names and patch.kept == [] and patch.source == engine.patch.source
    for name in names:
        mine, unets = model.get_submodule(name), engine.comps.unet.get_submodule(name)
        assert isinstance(mine, LinFusionAttention) and mine is not unets
        expected = unets.to_q.weight + (0.5 if name == names[0] else 0.0)
        assert torch.allclose(mine.to_q.weight, expected) and torch.equal(mine.to_k_[0].weight, unets.to_k_[0].weight)
    patch.remove()
    assert [model.get_submodule(n) for n in names] == originals
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_linfusion_off_leaves_the_controlnet_quadratic() -> None:
    engine = Engine.load(EngineSpec("tiny", "none"), device=CPU, dtype=torch.float32)
    engine.use(EngineSpec("tiny", "none", adapters=engine_spec(_job(controlnet=["tiny"])).adapters))
    info = engine.adapters[0].describe()
    assert info["linfusion_layers"] == 0 and info["quadratic_layers"] == 3


def test_folder_and_single_file_load_the_same_weights(engine: Engine, control_png: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_tiny(engine.comps)
    folder = tmp_path / "tiny-controlnet"
    model.save_pretrained(folder)  # diffusers' layout: config.json + diffusion_pytorch_model.safetensors
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    single = tmp_path / "tiny-controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    image = [str(control_png)]
    built = _render(engine, _job(controlnet=["tiny:0.7"], control_image=image))
    from_folder = _render(engine, _job(controlnet=[f"{folder}:0.7"], control_image=image))
    assert engine.adapters[0].describe()["model"] == "tiny-controlnet"
    from_file = _render(engine, _job(controlnet=[f"{single}:0.7"], control_image=image))
    assert np.array_equal(from_folder, built) and np.array_equal(from_file, built)
    engine.use(EngineSpec("tiny"))


def test_single_file_with_missing_tensors_is_refused(engine: Engine, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from linfusion_cli.base.errors import CheckpointError

    state = {k: v.contiguous() for k, v in build_tiny(engine.comps).state_dict().items()}
    del state["controlnet_mid_block.weight"]
    path = tmp_path / "cut.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"controlnet_mid_block\.weight"):
        engine.use(engine_spec(_job(controlnet=[str(path)])))
    engine.use(EngineSpec("tiny"))


def test_sdxl_controlnet_gets_the_size_conditioning(tmp_path: Path) -> None:
    xl = Engine.load(EngineSpec("tiny-sdxl"), device=CPU, dtype=torch.float32)
    plan = make_plan(resolve_target(128), native=128, schedule_steps=2)
    job = JobSpec(prompt="a box", model="tiny-sdxl", steps=2)
    plain = xl.run_plan(job, plan, seed=1).image
    job.controlnet, job.control_image = ["tiny"], [str(_write_png(tmp_path))]
    xl.use(engine_spec(job))
    assert xl.adapters[0].describe()["linfusion_layers"] == 5  # 1 + 2 transformer blocks down, 2 in the mid block
    assert not np.array_equal(xl.run_plan(job, plan, seed=1).image, plain)


def _write_png(folder: Path) -> Path:
    from PIL import Image

    path = folder / "grey.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


# --- through the CLI ------------------------------------------------------------------------------------------

FAST = ("--model", "tiny", "--size", "256", "--steps", "4", "--seed", "5")


def test_cli_records_the_controlnet_and_replay_reproduces_it(runner, tmp_path: Path, control_png: Path) -> None:
    import json

    from PIL import Image

    from linfusion_cli.cli.commands import app

    args = ["--controlnet", "tiny:0.8", "--control-image", str(control_png), "--control-end", "0.5"]
    made = runner.invoke(app, ["generate", "a box", *FAST, *args, "--out", str(tmp_path), "--json"])
    assert made.exit_code == 0, made.stderr
    report = json.loads(made.stdout)
    unit = report["adapters"][0]
    assert unit["kind"] == "controlnet" and unit["linfusion_layers"] == 3 and unit["guidance_end"] == 0.5
    assert report["settings"]["controlnet"] == ["tiny:0.8"] and report["settings"]["control_end"] == 0.5
    with Image.open(report["path"]) as image:
        parameters, pixels = image.text["parameters"], image.tobytes()
    assert 'ControlNet 0: "Module: none, Model: tiny, Weight: 0.8, Guidance Start: 0, Guidance End: 0.5"' in parameters
    again = runner.invoke(app, ["replay", report["sidecar"], "--out", str(tmp_path / "again"), "--json"])
    assert again.exit_code == 0, again.stderr
    with Image.open(json.loads(again.stdout)["path"]) as image:
        assert image.tobytes() == pixels


def test_batch_switches_controlnets_without_reloading_the_model(
    runner, tmp_path: Path, control_png: Path, model_loads: list[str]
) -> None:
    import json

    from PIL import Image

    from linfusion_cli.cli.commands import app

    loads = model_loads
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "defaults: {model: tiny, size: 256, steps: 3, seed: 2}\n"
        "jobs:\n"
        "  - {prompt: a box, name: plain1}\n"
        f"  - {{prompt: a box, name: edges, controlnet: 'tiny:1', control_image: '{control_png}'}}\n"
        "  - {prompt: a box, name: tile, controlnet: tiny, control_image: previous, control_stages: [0, 1]}\n"
        "  - {prompt: a box, name: plain2}\n"
    )
    result = runner.invoke(app, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert len(loads) == 1
    paths = {Path(json.loads(line)["path"]).stem: json.loads(line)["path"] for line in result.stdout.splitlines()}
    pixels = {}
    for name, path in paths.items():
        with Image.open(path) as image:
            pixels[name] = image.tobytes()
    assert pixels["plain1"] == pixels["plain2"]
    assert len({pixels["plain1"], pixels["edges"], pixels["tile"]}) == 3


def test_sdxl_controlnet_on_an_sd15_model_exits_2_naming_both(
    runner, tmp_path: Path, control_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from linfusion_cli.cli.commands import app
    from linfusion_cli.engine import pipeline

    xl = Engine.load(EngineSpec("tiny-sdxl"), device=CPU, dtype=torch.float32)
    folder = tmp_path / "xl-controlnet"
    build_tiny(xl.comps).save_pretrained(folder)
    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))
    result = runner.invoke(
        app, ["generate", "x", *FAST, "--controlnet", str(folder), "--control-image", str(control_png)]
    )
    assert result.exit_code == 2, result.stderr
    assert "made for tiny SDXL-shaped" in result.stderr and "the model is tiny SD-1.x-shaped" in result.stderr


def test_sdxl_single_file_controlnet_is_refused_on_a_loaded_sd15_engine(engine: Engine, tmp_path: Path) -> None:
    """Through the library (no CLI preflight): the file's header is checked before its tensors are read."""
    from safetensors.torch import save_file

    from linfusion_cli.base.errors import UsageError

    xl = Engine.load(EngineSpec("tiny-sdxl"), device=CPU, dtype=torch.float32)
    path = tmp_path / "xl.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny(xl.comps).state_dict().items()}, str(path))
    with pytest.raises(UsageError, match=r"made for tiny SDXL-shaped, but the model is tiny SD-1\.x-shaped"):
        engine.use(engine_spec(_job(controlnet=[str(path)])))
    assert engine.adapters == []
    engine.use(EngineSpec("tiny"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--controlnet", "tiny", "--control-image", "no-such.png"], "no-such.png"),
        (["--controlnet", "tiny"], "1 ControlNet but 0 control images"),
        (["--controlnet", "tiny:strong", "--control-image", "previous"], "'strong' is not a number"),
        (["--control-image", "previous"], "needs a --controlnet"),
        (
            ["--controlnet", "tiny", "--control-image", "previous", "--control-start", "0.7", "--control-end", "0.5"],
            "below",
        ),
        (["--controlnet", "tiny", "--controlnet", "tiny:0.5", "--control-image", "a", "--control-image", "b"], "twice"),
        (["--controlnet", "tiny", "--control-image", "previous", "--control-stages", "1,x"], "--control-stages"),
    ],
)
def test_bad_controlnet_input_exits_2(runner, tmp_path: Path, args: list[str], message: str) -> None:
    from linfusion_cli.cli.commands import app

    result = runner.invoke(app, ["generate", "x", *FAST, *args, "--out", str(tmp_path)])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- memory ---------------------------------------------------------------------------------------------------


def test_estimates_count_each_controlnets_residuals_and_image() -> None:
    from linfusion_cli.engine.memory_model import StageShape
    from linfusion_cli.engine.memory_plan import MemoryPlanner, VaeModel
    from linfusion_cli.models.archs import ARCHS
    from linfusion_cli.models.controlnet.kind import activation_channels, residual_channels

    sd15 = ARCHS["sd15"].unet
    # conv_in 320, 2 x 320 + 320/4, (2 x 640 + 640/4)/4, (2 x 1280 + 1280/4)/16, 2 x 1280/64, mid 1280/64
    assert residual_channels(sd15) == 320 + 720 + 360 + 180 + 40 + 20
    assert activation_channels(sd15, 0) == 0.0
    assert activation_channels(sd15, 2) == 3 * residual_channels(sd15) + 2 * 3 * 64  # two sets + their sum

    def unet_phase(count: int, memory: str) -> float:
        planner = MemoryPlanner.for_job(
            low_vram=False, max_vram=None, guidance=7.5, budget=None, arch="sd15", top_width=320, dtype_bytes=2,
            weights=0, vae=VaeModel(ARCHS["sd15"].vae, 2), control_channels=activation_channels(sd15, count),
            controlnets=count, memory=memory,
        )  # fmt: skip
        return planner.phases(planner.ladder[0], StageShape(16384, 8192, previous=(8192, 4096)))["unet"]

    tokens = 2048 * 1024  # 16384x8192 px
    per_token = residual_channels(sd15) * 2  # fp16
    for memory, batch in (("fast", 2), ("split", 1)):
        none, one, two = (unet_phase(count, memory) for count in (0, 1, 2))
        # the step holds each ControlNet's residuals (and their sum) besides the UNet's own activations
        assert one - none == tokens * batch * activation_channels(sd15, 1) * 2
        assert two - none == tokens * batch * activation_channels(sd15, 2) * 2
        assert two - one > tokens * batch * per_token  # a second set of residuals at least


def test_plan_includes_controlnets(runner, control_png: Path) -> None:
    import json

    from linfusion_cli.cli.commands import app

    base = ["plan", "--model", "tiny", "--size", "8k", "--max-vram", "1000", "--json"]
    plain = json.loads(runner.invoke(app, base).stdout)
    result = runner.invoke(app, [*base, "--controlnet", "tiny:0.5", "--control-image", str(control_png)])
    assert result.exit_code == 0, result.stderr
    steered = json.loads(result.stdout)
    assert steered["controlnets"] == [{"source": "tiny", "scale": 0.5, "image": str(control_png)}]
    last, before = steered["stages"][-1], plain["stages"][-1]
    assert last["memory"] == before["memory"] == "fast"
    assert last["estimated_peak_gib"] > before["estimated_peak_gib"]


def test_memory_settings_chunk_the_controlnet_like_the_unet(engine: Engine) -> None:
    from linfusion_cli.engine import memory
    from linfusion_cli.engine.memory_plan import settings_ladder

    engine.use(engine_spec(_job(controlnet=["tiny"])))
    frugal = settings_ladder(low_vram=True)[0]
    memory.apply_settings(engine.comps.unet, frugal, *engine.adapter_modules())
    model = engine.adapters[0].model
    attention = [m for m in model.modules() if isinstance(m, LinFusionAttention)]
    assert len(attention) == 3 and all(m.token_chunk == frugal.attn_chunk for m in attention)
    assert all("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "FeedForward")
    memory.apply_settings(engine.comps.unet, settings_ladder()[0], *engine.adapter_modules())
    assert all(m.token_chunk is None for m in attention)
    engine.use(EngineSpec("tiny"))


def test_offline_plan_names_a_controlnet_not_in_the_cache(runner) -> None:
    import json

    from linfusion_cli.cli.commands import app

    args = ["plan", "--model", "tiny", "--size", "256", "--json", "--controlnet", "someone/controlnet-x:0.5"]
    result = runner.invoke(app, [*args, "--control-image", "previous"])
    assert result.exit_code == 0, result.stderr
    warnings = json.loads(result.stdout)["warnings"]
    assert any("ControlNet 'someone/controlnet-x' is not in the local Hugging Face cache" in w for w in warnings)


def _to_original_keys(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers' ControlNet key names -> the original (LDM) ones that A1111-style single files use, under
    `control_model.`: the inverse of diffusers' own converter, written out for an SD-1.x-shaped ControlNet."""
    import re

    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}
    resnet.update({"norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"})
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "controlnet_mid_block": "middle_block_out.0",
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        "controlnet_cond_embedding.conv_out": "input_hint_block.14",
    }
    out = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if head in fixed:
            new = f"{fixed[head]}.{param}"
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)$", head):
            new = f"input_hint_block.{2 * (int(m[1]) + 1)}.{param}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)$", head):
            new = f"zero_convs.{m[1]}.0.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", head):
            new = f"input_blocks.{1 + int(m[1]) * (layers + 1) + int(m[2])}.0.{resnet[m[3]]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", head):
            new = f"input_blocks.{1 + int(m[1]) * (layers + 1) + int(m[2])}.1.{m[3]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", head):
            new = f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{param}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(\w+)$", head):
            new = f"middle_block.{2 * int(m[1])}.{resnet[m[2]]}.{param}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)$", head):
            new = f"middle_block.1.{m[1]}.{param}"
        else:
            raise AssertionError(f"no original name for {key}")
        out[f"control_model.{new}"] = value.contiguous()
    return out


def test_a1111_style_single_file_loads_through_the_converter(engine: Engine, control_png: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_tiny(engine.comps)
    path = tmp_path / "control_tiny_canny.safetensors"
    save_file(_to_original_keys(model.state_dict(), layers=1), str(path))
    image = [str(control_png)]
    built = _render(engine, _job(controlnet=["tiny"], control_image=image))
    from_file = _render(engine, _job(controlnet=[str(path)], control_image=image))
    assert engine.adapters[0].describe()["model"] == "control_tiny_canny"
    assert np.array_equal(from_file, built)
    engine.use(EngineSpec("tiny"))


def test_a_control_image_of_another_shape_gets_a_note(runner, control_png: Path) -> None:
    import json

    from linfusion_cli.cli.commands import app

    args = ["plan", "--model", "tiny", "--size", "512", "--aspect", "2:1", "--json", "--controlnet", "tiny"]
    result = runner.invoke(app, [*args, "--control-image", str(control_png)])
    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any("edges.png is 64x64, another shape than the 512x256 output" in n for n in notes), notes


def test_a_preset_carries_controlnet_settings(tmp_path: Path, runner, control_png: Path) -> None:
    from linfusion_cli.cli.commands import app
    from linfusion_cli.core.jobs import resolve_job

    preset = tmp_path / "tile.yaml"
    preset.write_text(
        "description: tile ControlNet on the refine stages only\n"
        "controlnet: ['tiny:0.6']\ncontrol_image: [previous]\ncontrol_stages: [0, 1]\ncontrol_end: 0.8\n"
    )
    job = resolve_job({"prompt": "p", "preset": str(preset)})
    assert (job.controlnet, job.control_image, job.control_stages, job.control_end) == (
        ["tiny:0.6"],
        ["previous"],
        [0.0, 1.0],
        0.8,
    )
    assert job.sources["controlnet"] == "preset tile"
    shown = runner.invoke(app, ["plan", "--model", "tiny", "--size", "256", "--preset", str(preset)])
    assert shown.exit_code == 0 and "ControlNet tiny at scale 0.6 on previous" in shown.stdout


def test_demofusions_global_pass_dilates_the_controlnet_with_the_unet(engine: Engine) -> None:
    job = _job(controlnet=["tiny"], control_image=["previous"], refine="demofusion")
    engine.use(engine_spec(job))
    model = engine.adapters[0].model
    seen: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.conv_in.dilation))
    try:
        plan = make_plan(resolve_target(256), native=128, schedule_steps=STEPS, refine="demofusion")
        engine.run_plan(job, plan, seed=3)
    finally:
        hook.remove()
        engine.use(EngineSpec("tiny"))
    assert (1, 1) in seen and (2, 2) in seen  # local and global passes of the 2x stage
    assert model.conv_in.dilation == (1, 1)


def test_upscale_with_a_tile_controlnet_on_the_upscaled_input(runner, tmp_path: Path, control_png: Path) -> None:
    import json

    from PIL import Image

    from linfusion_cli.cli.commands import app

    base = ["upscale", str(control_png), "--model", "tiny", "--size", "128", "--steps", "4", "--seed", "1", "--json"]
    plain = runner.invoke(app, [*base, "--out", str(tmp_path / "plain")])
    tiled = runner.invoke(
        app, [*base, "--out", str(tmp_path / "tile"), "--controlnet", "tiny:0.5", "--control-image", "previous"]
    )
    assert plain.exit_code == 0 and tiled.exit_code == 0, tiled.stderr
    report = json.loads(tiled.stdout)
    assert report["adapters"][0]["image"] == "previous" and report["adapters"][0]["scale"] == 0.5
    with Image.open(json.loads(plain.stdout)["path"]) as a, Image.open(report["path"]) as b:
        assert a.tobytes() != b.tobytes()  # the first refine stage already follows the upscaled input


def test_folder_with_only_fp16_weights_loads_and_bin_only_is_named(engine: Engine, tmp_path: Path) -> None:
    from linfusion_cli.base.errors import ModelLoadError

    model = build_tiny(engine.comps)
    half = tmp_path / "half"
    model.save_pretrained(half, variant="fp16")
    assert (half / "diffusion_pytorch_model.fp16.safetensors").is_file()
    engine.use(engine_spec(_job(controlnet=[str(half)])))
    loaded = engine.adapters[0].model
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(loaded.controlnet_mid_block.weight, model.controlnet_mid_block.weight)
    old = tmp_path / "old"
    model.save_pretrained(old, safe_serialization=False)
    with pytest.raises(ModelLoadError, match="only safetensors weights are read"):
        engine.use(engine_spec(_job(controlnet=[str(old)])))
    engine.use(EngineSpec("tiny"))


def test_a_controlnet_of_another_depth_is_refused_before_loading(runner, tmp_path: Path, control_png: Path) -> None:
    """Built independently (diffusers' own constructor), same text width, two blocks instead of the UNet's three."""
    from diffusers import ControlNetModel

    from linfusion_cli.cli.commands import app

    folder = tmp_path / "shallow"
    ControlNetModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 16),
    ).save_pretrained(folder)
    result = runner.invoke(
        app, ["generate", "x", *FAST, "--controlnet", str(folder), "--control-image", str(control_png)]
    )
    assert result.exit_code == 2, result.stderr
    assert "has blocks [32, 64] with 1 layers each, the model's UNet (tiny SD-1.x-shaped) [32, 64, 64]" in result.stderr


def test_an_independently_built_controlnet_folder_runs(runner, tmp_path: Path, control_png: Path) -> None:
    import json

    from diffusers import ControlNetModel

    from linfusion_cli.cli.commands import app
    from linfusion_cli.models.archs import ARCHS

    unet = ARCHS["tiny"].unet
    keys = ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim")
    torch.manual_seed(0)
    model = ControlNetModel(**{k: unet[k] for k in keys}, attention_head_dim=4, norm_num_groups=8)
    with torch.no_grad():
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
            conv.weight.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "mine")
    result = runner.invoke(
        app,
        ["generate", "x", *FAST, "--controlnet", str(tmp_path / "mine"), "--control-image", str(control_png), "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    unit = json.loads(result.stdout)["adapters"][0]
    assert unit["model"] == "mine" and unit["linfusion_layers"] == 3 and unit["quadratic_layers"] == 0


def test_controlnet_composes_with_lora_and_ip_adapter_and_all_come_off(engine: Engine, control_png: Path) -> None:
    plain = _render(engine, _job())
    everything = _job(
        lora=["tiny:0.8"],
        ip_adapter=["tiny:0.7"],
        ip_image=str(control_png),
        controlnet=["tiny:0.9"],
        control_image=["previous"],
    )
    steered = _render(engine, everything)
    assert sorted(a.kind for a in engine.adapters) == ["controlnets", "ip_adapters", "loras"]
    control = next(a for a in engine.adapters if a.kind == "controlnets")
    assert control.describe()["linfusion_layers"] == 3
    only_control = _render(engine, _job(controlnet=["tiny:0.9"], control_image=["previous"]))
    assert len({plain.tobytes(), steered.tobytes(), only_control.tobytes()}) == 3
    assert np.array_equal(_render(engine, _job()), plain)
