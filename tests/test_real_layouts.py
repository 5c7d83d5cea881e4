"""Models laid out exactly as users bring them (tests/layouts.py), offline: a hub id from the Hugging Face cache,
a local folder, and a single file with an empty cache, for SD-1.x, SD-2.x (epsilon and v) and SDXL shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from layouts import FAMILY, build_repo, into_hub_cache, write_single_file
from processes import Processes

from linfusion_cli.cli.commands import app
from linfusion_cli.models.loading import load_components
from linfusion_cli.models.shipped import BPE_DIR, CONFIG_ROOT

REPO_IDS = {"tiny": "test-org/tiny-sd15", "tiny-sd2": "test-org/tiny-sd21", "tiny-sdxl": "test-org/tiny-sdxl"}


@pytest.fixture(scope="session")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """One repo per family shape, built once: SD-1.x with fp16 variant files, SD-2.x (v-prediction), SDXL."""
    root = tmp_path_factory.mktemp("repos")
    return {key: (root / key, build_repo(key, root / key, variants=key == "tiny")) for key in REPO_IDS}


def _single_file(
    repos: dict[str, Any], key: str, folder: Path, yaml_text: str | None = None, flat_clip: bool = False
) -> Path:
    repo, states = repos[key]
    path = write_single_file(repo, states, folder / f"{key}-model.safetensors", flat_clip=flat_clip)
    if yaml_text is not None:
        path.with_suffix(".yaml").write_text(yaml_text)
    return path


def _same(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    mine = module.state_dict()
    if type(module).__name__ == "CLIPTextModel" and not hasattr(module, "text_model"):  # flattened in transformers 5
        mine = {
            (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in mine.items()
        }
    return all(torch.equal(mine[k].float(), v.float()) for k, v in state.items())


def test_shipped_configs_build_the_real_models() -> None:
    """The shipped configs are the real repos' (parameter counts of SD-1.5, SD-2.1 and SDXL, built on the meta
    device), with the keys the real files lack still lacking, and CLIP's real BPE vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def load(name: str) -> dict[str, Any]:
        return json.loads((CONFIG_ROOT / name).read_text())

    with torch.device("meta"):
        assert count(UNet2DConditionModel.from_config(load("sd1/unet/config.json"))) == 859_520_964
        assert count(UNet2DConditionModel.from_config(load("sd2/unet/config.json"))) == 865_910_724
        assert count(UNet2DConditionModel.from_config(load("sdxl/unet/config.json"))) == 2_567_463_684
        assert count(AutoencoderKL.from_config(load("sd1/vae/config.json"))) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**load("sd1/text_encoder/config.json")))) == 123_060_480
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(**load("sdxl/text_encoder_2/config.json")))
        assert count(bigg) == 694_659_840
    assert "scaling_factor" not in load("sd1/vae/config.json") and "force_upcast" not in load("sd1/vae/config.json")
    assert load("sdxl/vae/config.json")["force_upcast"] is True
    assert load("sd2/scheduler/scheduler_config.json")["prediction_type"] == "v_prediction"
    assert [load(f"{f}/tokenizer/tokenizer_config.json")["pad_token"] for f in ("sd1", "sd2")] == ["<|endoftext|>", "!"]
    tokenizer = CLIPTokenizer.from_pretrained(BPE_DIR)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize(
    ("key", "yaml_text", "prediction", "pads"),
    [
        ("tiny", None, "epsilon", ["<|endoftext|>"]),
        ("tiny-sd2", None, "v_prediction", ["!"]),  # SD-2.x-768, diffusers' own guess without a config
        ("tiny-sd2", 'model:\n  params:\n    parameterization: "v"\n', "v_prediction", ["!"]),
        ("tiny-sd2", "model:\n  params:\n    linear_start: 0.00085\n", "epsilon", ["!"]),  # v2-inference.yaml
        ("tiny-sdxl", None, "epsilon", ["<|endoftext|>", "!"]),
        ("tiny", "flat", "epsilon", ["<|endoftext|>"]),  # CLIP-L as transformers 5 names it
        ("tiny-sdxl", "flat", "epsilon", ["<|endoftext|>", "!"]),
    ],
)
def test_single_file_loads_exact_weights_with_an_empty_cache(
    repos: dict[str, Any],
    hub_cache: Path,
    tmp_path: Path,
    key: str,
    yaml_text: str | None,
    prediction: str,
    pads: list[str],
) -> None:
    flat = yaml_text == "flat"
    path = _single_file(repos, key, tmp_path, None if flat else yaml_text, flat_clip=flat)
    comps = load_components(str(path), device="cpu", dtype=torch.float32)
    _, states = repos[key]
    assert comps.family == FAMILY[key]
    assert _same(comps.unet, states["unet"]) and _same(comps.vae, states["vae"])
    for i, encoder in enumerate(comps.text_encoders):
        assert _same(encoder, states["text_encoder" if i == 0 else "text_encoder_2"])
    assert comps.scheduler_config["prediction_type"] == prediction
    assert [t.pad_token for t in comps.tokenizers] == pads
    assert comps.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert comps.vae.config.scaling_factor == (0.13025 if key == "tiny-sdxl" else 0.18215)
    assert list(hub_cache.iterdir()) == []  # nothing fetched, nothing cached


@pytest.mark.parametrize(
    ("key", "source"),
    [
        ("tiny", "hub"),
        ("tiny", "folder"),
        ("tiny", "file"),
        ("tiny-sd2", "hub"),
        ("tiny-sd2", "file"),
        ("tiny-sdxl", "hub"),
        ("tiny-sdxl", "file"),
    ],
)
def test_generate_offline_through_real_layouts(
    runner, repos: dict[str, Any], hub_cache: Path, tmp_path: Path, key: str, source: str
) -> None:
    repo, _ = repos[key]
    if source == "hub":
        into_hub_cache(repo, hub_cache, REPO_IDS[key])
        model = REPO_IDS[key]
    elif source == "folder":
        model = str(shutil.copytree(repo, tmp_path / "my model"))
    else:
        model = str(_single_file(repos, key, tmp_path))
    args = ["generate", "a lighthouse", "--model", model, "--size", "256", "--steps", "2", "--seed", "5"]
    plan = runner.invoke(app, ["plan", *args[2:], "--json"])
    assert plan.exit_code == 0, plan.stderr
    assert json.loads(plan.stdout)["family"] == FAMILY[key].label  # known before loading, for every source
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == FAMILY[key].label and len(report["stages"]) == 2
    assert report["dtypes"] == {"unet": "fp32", "vae": "fp32", "text_encoder": "fp32"}
    assert Path(report["path"]).is_file()


def test_fp16_run_reads_the_fp16_variant_files(repos: dict[str, Any], hub_cache: Path, tmp_path: Path) -> None:
    """The fp16 files hold other weights than the fp32 ones: what was loaded shows which were read."""
    repo, states = repos["tiny"]
    into_hub_cache(repo, hub_cache, REPO_IDS["tiny"])
    half = load_components(REPO_IDS["tiny"], device="cpu", dtype=torch.float16)
    assert _same(half.unet, states["unet.fp16"]) and _same(half.text_encoders[0], states["text_encoder.fp16"])
    assert half.dtypes() == {"unet": "fp16", "vae": "fp16", "text_encoder": "fp16"}  # SD-1.x's VAE: not upcast
    full = load_components(REPO_IDS["tiny"], device="cpu", dtype=torch.float32)
    assert _same(full.unet, states["unet"])
    # A repo without variants: the fp32 files, converted.
    plain = shutil.copytree(repo, tmp_path / "plain")
    for variant in plain.rglob("*.fp16.safetensors"):
        variant.unlink()
    converted = load_components(str(plain), device="cpu", dtype=torch.float16)
    assert _same(converted.unet, {k: v.half() for k, v in states["unet"].items()})


def test_fp16_fetch_asks_for_one_precision() -> None:
    from fnmatch import fnmatch

    from linfusion_cli.models.loading import hub_patterns

    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/vocab.json",
        "safety_checker/pytorch_model.bin",
        "v1-5-pruned.safetensors",
    ]

    def fetched(variant: str | None) -> list[str]:
        return [f for f in files if any(fnmatch(f, p) for p in hub_patterns(variant))]

    common = ["model_index.json", "unet/config.json", "tokenizer/vocab.json"]
    assert fetched("fp16") == [
        *common[:2],
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        common[2],
    ]
    assert fetched(None) == [
        *common[:2],
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        common[2],
    ]


def test_official_linfusion_checkpoint_from_the_cache(
    runner, repos: dict[str, Any], hub_cache: Path, tmp_path: Path
) -> None:
    from linfusion_cli.linfusion.patching import apply_linfusion
    from linfusion_cli.models.loading import build_random

    repo, _ = repos["tiny"]
    into_hub_cache(repo, hub_cache, REPO_IDS["tiny"])
    patch = apply_linfusion(build_random("tiny").unet, "random")
    into_hub_cache(patch.save(tmp_path / "linfusion"), hub_cache, "test-org/LinFusion-tiny")
    config = json.loads((tmp_path / "linfusion" / "config.json").read_text())
    assert config["_class_name"] == "LinFusion" and config["modules_list"][0]["module_name"].endswith(".attn1")
    args = ["generate", "a fox", "--model", REPO_IDS["tiny"], "--linfusion", "test-org/LinFusion-tiny", "--size", "128"]
    result = runner.invoke(app, [*args, "--steps", "2", "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["linfusion_layers"] == 7 and report["linfusion"] == "test-org/LinFusion-tiny"


def test_what_is_not_cached_is_named_before_loading(
    runner, hub_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loaded: list[Any] = []
    monkeypatch.setattr("linfusion_cli.models.loading.load_components", lambda *a, **k: loaded.append(a))
    model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    plan = json.loads(runner.invoke(app, ["plan", "--model", model, "--json"]).stdout)
    assert any(f"`hf download {model}`" in n for n in plan["warnings"])  # what to mind: a warning, said once
    assert any("`hf download Yuanshi/LinFusion-1-5`" in n for n in plan["warnings"])
    assert not any("hf download" in n for n in plan["notes"])
    result = runner.invoke(app, ["generate", "a fox", "--model", model, "--out", str(tmp_path)])
    assert result.exit_code == 1 and loaded == []
    assert "HF_HUB_OFFLINE is set" in result.stderr and "Traceback" not in result.stderr


def test_batch_names_what_is_not_cached_before_loading(
    runner, hub_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loaded: list[Any] = []
    monkeypatch.setattr("linfusion_cli.models.loading.load_components", lambda *a, **k: loaded.append(a))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    result = runner.invoke(app, ["batch", str(prompts), "--model", model, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and loaded == []
    assert f"`hf download {model}`" in result.stderr.replace("\n", "")


def test_quiet_single_file_run_on_an_empty_cache_prints_nothing(
    processes: Processes, repos: dict[str, Any], tmp_path: Path
) -> None:
    """As the farm runs it: a fresh process, an empty HF_HOME, HF_HUB_OFFLINE=1, --quiet: files and no output."""
    path = _single_file(repos, "tiny-sdxl", tmp_path)
    env = processes.env(HF_HOME=str(tmp_path / "empty-hf"))
    for noisy in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        env.pop(noisy, None)
    args = ["generate", "a fox", "--model", str(path), "--size", "128", "--steps", "2", "--quiet", "--json"]
    done = processes.run(*args, "--out", str(tmp_path / "out"), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    report = json.loads(done.stdout)
    assert report["dtypes"] == {"unet": "fp32", "vae": "fp32", "text_encoder": "fp32"}
    assert Path(report["path"]).is_file()
