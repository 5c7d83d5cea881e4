"""Devices, precision and budgets as a user meets them: a missing CUDA, fp16 on a CPU, a VAE in the right dtype,
a plan that fits nothing, free memory that cannot be measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from processes import Processes

from linfusion_cli.cli.commands import app
from linfusion_cli.engine import memory, memory_plan, pipeline
from linfusion_cli.engine.memory_model import StageShape
from linfusion_cli.models.archs import ARCHS
from linfusion_cli.models.devices import vae_dtype
from linfusion_cli.models.families import FAMILIES, family_or_none
from linfusion_cli.models.hub import model_source
from linfusion_cli.models.loading import load_components

FAMILY = {f.key: f for f in FAMILIES}


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "a fox", "--model", "tiny", "--dry-run"],
        ["generate", "a fox", "--model", "tiny"],
        ["generate", "a fox", "--model", "tiny", "--device", "cuda:1"],
    ],
)
def test_cuda_without_cuda_is_one_line_exit_2(runner, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = []
    # Where the engine looks it up (patching models.loading's name would also bind it into an engine module
    # imported for the first time during this test, for every later test).
    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: loaded.append(a))
    device = [] if "--device" in args else ["--device", "cuda"]
    result = runner.invoke(app, [*args, *device])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "Traceback" not in result.stderr
    assert loaded == []


def test_fp16_on_cpu_warns_in_plan(runner) -> None:
    result = runner.invoke(
        app, ["plan", "--model", "tiny", "--size", "256", "--device", "cpu", "--dtype", "fp16", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert any("fp16 on the CPU is many times slower" in w for w in plan["warnings"])
    fp32 = runner.invoke(app, ["plan", "--model", "tiny", "--size", "256", "--device", "cpu", "--json"])
    assert json.loads(fp32.stdout)["warnings"] == []


def test_plan_says_when_nothing_fits_and_what_would(runner) -> None:
    """The plan names the first stage over budget, its estimate, the budget, and a size that fits (which,
    planned again, fits)."""
    args = ["plan", "--model", "tiny", "--size", "16384", "--device", "cpu", "--max-vram", "0.5", "--json"]
    plan = json.loads(runner.invoke(app, args).stdout)
    assert plan["fits"] is False
    over = [s for s in plan["stages"] if not s["fits"]]
    assert over and all(s["memory"] == "banded+host" for s in over)
    first = over[0]
    (warning,) = [w for w in plan["warnings"] if "most frugal" in w]
    assert f"stage {first['stage']} ({first['width']}x{first['height']})" in warning and "0.5 GiB budget" in warning
    assert f"{first['estimated_peak_gib']:.2f} GiB" in warning
    size = int(warning.split("--size ")[1].split()[0])
    smaller = json.loads(runner.invoke(app, [*args[:4], str(size), *args[5:]]).stdout)
    assert smaller["fits"] is True and smaller["warnings"] == []


def test_generate_reports_over_budget_before_it_starts(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    args = ["generate", "a fox", "--model", "tiny", "--size", "256", "--steps", "2"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path), "--json", "--seed", "1"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert any("even with the most frugal memory settings" in w for w in report["warnings"])
    assert "not even the model's weights fit" in result.stderr.replace("\n", " ")


def test_unmeasurable_free_memory_is_unknown_not_invented(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*args: object, **kwargs: object) -> None:
        raise OSError("no /proc here")

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.delattr("os.sysconf")
    cpu = torch.device("cpu")
    assert memory.available_bytes(cpu) is None
    assert memory.device_budget(cpu, None) is None
    assert memory.device_budget(cpu, 3.0) == 3 * memory_plan.GIB
    planner = memory_plan.MemoryPlanner.for_job(
        low_vram=False,
        max_vram=None,
        guidance=7.5,
        budget=memory.device_budget(cpu, None),
        arch="sd15",
        top_width=320,
        dtype_bytes=2,
        weights=0,
        vae=memory_plan.VaeModel(ARCHS["sd15"].vae, 2),
    )
    choice = planner.choose(StageShape(16384, 16384))
    chosen = choice.settings
    assert choice.fits and planner.budget is None
    assert chosen.name == "fast"  # unknown: the fastest, with the out-of-memory retry behind it
    assert memory.vae_budget(cpu, None) == memory_plan.VAE_BUDGET_CAP


@pytest.mark.parametrize(
    ("family", "config", "dtype", "expected"),
    [
        ("sd1", {}, torch.float16, torch.float16),  # SD-1.5's real config has no force_upcast
        ("sd2", {"force_upcast": True}, torch.float16, torch.float16),  # SD-1/2 pipelines never upcast
        ("sdxl", {"force_upcast": True}, torch.float16, torch.float32),
        ("sdxl", {}, torch.float16, torch.float32),
        ("sdxl", {"force_upcast": False}, torch.float16, torch.float16),  # the fp16-fix VAE
        ("sdxl", {"force_upcast": True}, torch.bfloat16, torch.bfloat16),  # bf16 has fp32's range
        (None, {}, torch.float16, torch.float32),  # unknown family: its config (default True)
    ],
)
def test_vae_upcast_by_family(family: str | None, config: dict, dtype: torch.dtype, expected: torch.dtype) -> None:
    assert vae_dtype(config, dtype, FAMILY[family] if family else None) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("tiny", {"unet": "fp16", "vae": "fp16", "text_encoder": "fp16"}),
        ("tiny-sdxl", {"unet": "fp16", "vae": "fp32", "text_encoder": "fp16"}),
    ],
)
def test_components_report_the_dtypes_they_run_in(model: str, expected: dict[str, str]) -> None:
    comps = load_components(model, device="cpu", dtype=torch.float16)
    assert comps.dtypes() == expected
    assert next(comps.vae.parameters()).dtype == {"fp16": torch.float16, "fp32": torch.float32}[expected["vae"]]


def test_model_source_decides_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    from linfusion_cli.base.errors import ModelNotFoundError

    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    assert model_source("tiny-sdxl") == "builtin"
    assert model_source(str(tiny_model_dir)) == "folder"
    assert model_source(str(file)) == "file"
    assert model_source("stable-diffusion-v1-5/stable-diffusion-v1-5") == "hub"
    for missing in ("./no/such", str(tmp_path / "gone.safetensors"), "not a model"):
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            model_source(missing)


def test_family_or_none_hides_only_unknown_architectures() -> None:
    assert family_or_none({"cross_attention_dim": 999}) is None
    assert family_or_none({"cross_attention_dim": 768, "block_out_channels": [320, 640, 1280, 1280]}) == FAMILY["sd1"]
    with pytest.raises(AttributeError):  # a bug (not a config) is not swallowed
        family_or_none(None)  # type: ignore[arg-type]


def test_quiet_run_prints_nothing_at_all(processes: Processes, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Through the real loaders (diffusers and transformers from_pretrained, which draw their own bars), in a
    fresh process as a farm runs it: --quiet on success leaves stderr and stdout empty."""
    env = processes.env()
    for noisy in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        env.pop(noisy, None)  # as a user's shell has them: unset
    args = ["generate", "a fox", "--model", str(tiny_model_dir), "--size", "128", "--steps", "2", "--quiet"]
    done = processes.run(*args, "--out", str(tmp_path), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_fp16_on_cpu_warns_in_generate_and_batch(runner, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    common = ["--model", "tiny", "--size", "128", "--steps", "1", "--device", "cpu", "--dtype", "fp16"]
    for args in (["generate", "a fox"], ["batch", str(prompts)]):
        result = runner.invoke(app, [*args, *common, "--out", str(tmp_path / args[0])])
        assert result.exit_code == 0, result.stderr
        assert "fp16 on the CPU is many times slower" in result.stderr.replace("\n", " ")


# --- where a job runs, without torch where no GPU can be ------------------------------------------------------


def test_placement_without_torch_where_no_gpu_can_be(monkeypatch: pytest.MonkeyPatch) -> None:
    from linfusion_cli.base.errors import UsageError
    from linfusion_cli.engine import placement

    monkeypatch.setattr(placement, "gpu_possible", lambda: False)
    cpu = placement.without_gpu("auto", "auto", here_only=True)
    assert cpu is not None and (cpu.device, cpu.precision, cpu.here) == ("cpu", "fp32", True)
    assert cpu.free is not None and cpu.budget(2.0) == 2 * memory_plan.GIB
    farm = placement.without_gpu("cuda:1", "auto", here_only=False)  # a plan for a farm's GPU, from its login node
    assert farm is not None and (farm.device, farm.precision, farm.here, farm.free) == ("cuda:1", "fp16", False, None)
    with pytest.raises(UsageError, match="CUDA is not available here"):
        placement.without_gpu("cuda", "auto", here_only=True)  # a run (or a dry run) needs it here
    assert placement.without_gpu("cpu", "fp16", here_only=True).warnings()  # type: ignore[union-attr]
    monkeypatch.setattr(placement, "gpu_possible", lambda: True)
    assert placement.without_gpu("auto", "auto", here_only=True) is None  # a GPU may be here: torch is asked


def test_version_reads_the_gpus_and_torch_build_without_importing_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from linfusion_cli.cli import version

    build = version.torch_build()
    assert build["__version__"] == torch.__version__ and build["cuda"] == torch.version.cuda  # read as text
    for index, model in enumerate(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"]):
        (tmp_path / f"0000:0{index}:00.0").mkdir()
        (tmp_path / f"0000:0{index}:00.0" / "information").write_text(f"Model: \t\t {model}\nIRQ: 1\n")
    monkeypatch.setattr(version, "NVIDIA_GPUS", tmp_path)
    monkeypatch.setattr(version, "torch_build", lambda: {"__version__": "2.13.0", "cuda": "12.8"})
    lines = version.version_lines()
    assert lines[2].endswith("CUDA: 12.8, 2 GPUs (NVIDIA H100 80GB HBM3)")
    assert lines[3] == "device: cuda:0 (NVIDIA H100 80GB HBM3)"
