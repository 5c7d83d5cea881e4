"""`linfusion distill` on the built-in tiny model (random weights) with a handful of generated images, on the CPU."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from parallel_harness import launch, ok_results
from PIL import Image
from processes import Processes, read_line

from linfusion_cli.base.errors import Interrupted, OutputError
from linfusion_cli.base.events import CancelToken
from linfusion_cli.cli.commands import app
from linfusion_cli.train.distill import DistillConfig, TrainStep, distill
from linfusion_cli.train.distill_ckpt import STATE_JSON, STATE_PT

RES = 64  # the tiny UNet at 8x8 latents: every level still runs


def make_images(folder: Path, count: int = 6, captions: str = "kohya") -> Path:
    """Smooth gradients with stripes, sizes that need a resize and a crop; captions the kohya way."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i in range(count):
        width, height = 96 + 16 * (i % 3), 80
        yy, xx = np.mgrid[:height, :width]
        base = np.array([(i * 40) % 255, (i * 90) % 255, (i * 150) % 255])
        pixels = base * (xx / width)[..., None] + 40 * np.sin(yy / (3 + i))[..., None]
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
        if captions == "kohya":
            (folder / f"img{i}.txt").write_text(f"a {colours[i % 6]} gradient with stripes {i}\n")
    return folder


def config(data: Path, out: Path, **overrides) -> DistillConfig:
    settings = {"steps": 6, "resolution": RES, "save_every": 3, "init": "random", **overrides}
    return DistillConfig(model="tiny", data=str(data), out=out, **settings)


def weights(patch) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(patch.modules) for k, v in m.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(images: Path, tmp_path_factory: pytest.TempPathFactory):
    """30 steps from random LinFusion weights (their features are far from the teacher's: learning shows)."""
    out = tmp_path_factory.mktemp("run")
    steps: list[TrainStep] = []
    result = distill(
        config(images, out, steps=30, save_every=30),
        events=lambda e: steps.append(e) if isinstance(e, TrainStep) else None,
    )
    return result, steps, out


# --- the recipe ----------------------------------------------------------------------------------------------
def test_loss_falls_and_features_move_towards_the_teacher(trained, images: Path) -> None:
    from linfusion_cli.train.distill_eval import evaluate

    _, steps, out = trained
    assert [s.step for s in steps] == list(range(1, 31))
    for s in steps:  # total = noise + 0.5 kd + 0.5 feat, as logged
        assert s.loss == pytest.approx(s.noise + 0.5 * s.kd + 0.5 * s.feat, rel=1e-5)
    distill_part = [s.kd + s.feat for s in steps]
    assert np.mean(distill_part[-10:]) < 0.85 * np.mean(distill_part[:10])
    assert np.mean([s.loss for s in steps[-10:]]) < np.mean([s.loss for s in steps[:10]])

    report = evaluate(config(images, out, eval_data=str(images)))
    assert report["final"].endswith("step-00000030")
    assert report["feature_mse"]["final"] < 0.9 * report["feature_mse"]["init"]
    assert report["noise_mse"]["final"] < report["noise_mse"]["init"]
    assert sum(layer["final"] < layer["init"] for layer in report["layers"]) >= 6  # of 7


def test_only_linfusion_trains_and_the_teacher_is_the_same_unet(images: Path, tmp_path: Path) -> None:
    from linfusion_cli.models.loading import build_random
    from linfusion_cli.train.distill import build_student, dist_from_env

    comps = build_random("tiny")
    frozen = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        plain = comps.unet(sample, t, encoder_hidden_states=embeds).sample
    student = build_student(config(images, tmp_path), comps, torch.device("cpu"), dist_from_env(), "random", "no")
    trainable = {n for n, p in comps.unet.named_parameters() if p.requires_grad}
    assert trainable and all(
        ".attn1." in n and n.split(".attn1.")[1].startswith(("to_", "to_q_", "to_k_")) for n in trainable
    )
    assert {id(p) for p in student.params} == {id(p) for p in comps.unet.parameters() if p.requires_grad}
    with torch.no_grad(), student.patch.original_attention():
        teacher = comps.unet(sample, t, encoder_hidden_states=embeds).sample
    assert torch.equal(teacher, plain)  # the teacher pass is the original UNet, exactly
    assert all(type(m).__name__ == "LinFusionAttention" for m in student.patch.modules)
    student.patch.remove()
    assert all(torch.equal(v, frozen[k]) for k, v in comps.unet.state_dict().items())


def test_v_prediction_models_learn_the_v_target(images: Path, tmp_path: Path) -> None:
    import torch.nn.functional as F

    from linfusion_cli.models.loading import build_random
    from linfusion_cli.train.distill import build_student, dist_from_env

    comps = build_random("tiny-sd2")
    assert comps.prediction_type == "v_prediction"
    cfg = DistillConfig(model="tiny-sd2", data=str(images), out=tmp_path, resolution=RES, init="random")
    student = build_student(cfg, comps, torch.device("cpu"), dist_from_env(), "random", "no")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    embeds, t = torch.randn(2, 77, 48, generator=gen), torch.tensor([100, 900])
    losses = student.losses_at(latents, noise, t, embeds, None, train=False)
    noisy = student.scheduler.add_noise(latents, noise, t)
    with torch.no_grad():
        pred = comps.unet(noisy, t, encoder_hidden_states=embeds).sample
    velocity = student.scheduler.get_velocity(latents, noise, t)
    assert float(losses.noise) == pytest.approx(float(F.mse_loss(pred, velocity)), rel=1e-5)
    assert float(losses.noise) != pytest.approx(float(F.mse_loss(pred, noise)), rel=1e-3)


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-sdxl"])
def test_other_families_train(model: str, images: Path, tmp_path: Path) -> None:
    result = distill(DistillConfig(model=model, data=str(images), out=tmp_path, steps=2, resolution=RES, init="init"))
    assert result.steps == 2 and np.isfinite(result.last_losses["loss"])
    assert json.loads((tmp_path / "step-00000002" / STATE_JSON).read_text())["model"] == model


# --- output, resume, signals ----------------------------------------------------------------------------------
def test_saved_folder_loads_with_apply_linfusion_and_generate(trained, runner, tmp_path: Path) -> None:
    from linfusion_cli.linfusion.patching import apply_linfusion
    from linfusion_cli.models.loading import build_random

    result, _, out = trained
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["_class_name"] == "LinFusion" and len(config_json["modules_list"]) == 7
    for folder in (out, out / "step-00000030"):
        patch = apply_linfusion(build_random("tiny").unet, str(folder))
        assert_same(weights(patch), weights(result.patch))
    state = json.loads((out / "step-00000030" / STATE_JSON).read_text())
    assert (state["step"], state["position"], state["seed"]) == (30, 30, 0)

    args = ["generate", "a red gradient", "-m", "tiny", "--linfusion", str(out), "--size", "128", "--steps", "2"]
    outcome = runner.invoke(app, [*args, "--seed", "1", "--out", str(tmp_path), "--json"])
    assert outcome.exit_code == 0, outcome.output
    sidecar = json.loads(outcome.stdout.strip().splitlines()[-1])
    assert sidecar["settings"]["linfusion"] == str(out)


def test_resume_after_a_stop_ends_where_an_unbroken_run_does(images: Path, tmp_path: Path) -> None:
    straight = distill(config(images, tmp_path / "straight"))

    cancel = CancelToken()
    seen: list[int] = []

    def stop_at_4(event: object) -> None:
        if isinstance(event, TrainStep):
            seen.append(event.step)
            if event.step == 3:  # a signal during step 4: the run saves and stops once step 4 is done
                cancel.request("SIGTERM", 143)

    with pytest.raises(Interrupted) as stopped:
        distill(config(images, tmp_path / "broken"), events=stop_at_4, cancel=cancel)
    assert stopped.value.exit_code == 143 and seen == [1, 2, 3, 4]
    state = json.loads((tmp_path / "broken" / "step-00000004" / STATE_JSON).read_text())
    assert (state["step"], state["position"]) == (4, 4)

    resumed_steps: list[int] = []
    resumed = distill(
        config(images, tmp_path / "broken"),
        events=lambda e: resumed_steps.append(e.step) if isinstance(e, TrainStep) else None,
    )
    assert resumed.start_step == 4 and resumed_steps == [5, 6]
    assert_same(weights(resumed.patch), weights(straight.patch))  # same data order, noise and optimizer state

    elsewhere = distill(config(images, tmp_path / "copy", resume=tmp_path / "broken" / "step-00000004"))
    assert elsewhere.start_step == 4
    assert_same(weights(elsewhere.patch), weights(straight.patch))  # --resume DIR continues into another --out
    assert (tmp_path / "copy" / "step-00000006" / STATE_PT).is_file()


@pytest.mark.slow
def test_sigterm_saves_and_exits_143_then_the_same_command_resumes(
    processes: Processes, runner, images: Path, tmp_path: Path
) -> None:
    """Stopped in its own process; the same command then resumes (in this process: it reads only the checkpoint)."""
    import signal

    out = tmp_path / "out"
    cmd = ["distill", "-m", "tiny", "--data", str(images), "-o", str(out)]
    cmd += ["--resolution", str(RES), "--init", "random", "--save-every", "1000", "--log-every", "1", "--json"]
    proc = processes.start(*cmd, "--steps", "100000")
    while (line := read_line(proc, 120)) and json.loads(line)["event"] != "step":
        pass
    assert line, "distill ended before its first step"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    saved = sorted(out.glob("step-*"))
    assert len(saved) == 1 and (saved[0] / STATE_PT).is_file()
    step = json.loads((saved[0] / STATE_JSON).read_text())["step"]

    rerun = runner.invoke(app, [*cmd, "--steps", str(step + 2)])
    assert rerun.exit_code == 0, rerun.stderr
    lines = [json.loads(line) for line in rerun.stdout.splitlines()]
    assert [e["step"] for e in lines if e["event"] == "step"] == [step + 1, step + 2]
    assert f"resuming from {saved[0]} at step {step}" in rerun.stderr


def test_resume_from_another_model_exits_2_naming_both(images: Path, runner, tmp_path: Path) -> None:
    distill(config(images, tmp_path / "run", steps=1))
    base = ["distill", "--data", str(images), "--resolution", str(RES), "--steps", "2"]
    for args in (
        ["-m", "tiny-sd2", "-o", str(tmp_path / "run")],
        ["-m", "tiny-sd2", "-o", "x", "--resume", str(tmp_path / "run")],
    ):
        outcome = runner.invoke(app, [*base, *args])
        assert outcome.exit_code == 2, outcome.output
        assert "model 'tiny'" in outcome.output and "'tiny-sd2'" in outcome.output
        assert "tiny SD-1.x-shaped" in outcome.output and "tiny SD-2.x-shaped" in outcome.output


def test_a_failed_save_leaves_the_previous_checkpoint_intact(images: Path, tmp_path: Path, monkeypatch) -> None:
    from linfusion_cli.train import distill_ckpt

    real_save = torch.save
    calls = {"n": 0}

    def disk_fills_up(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(distill_ckpt.torch, "save", disk_fills_up)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as failed:
        distill(config(images, out))
    message = str(failed.value)
    assert "No space left on device" in message and "step-00000003 is intact" in message
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "step-00000003",
    ]
    assert json.loads((out / "step-00000003" / STATE_JSON).read_text())["step"] == 3
    monkeypatch.setattr(distill_ckpt.torch, "save", real_save)
    resumed = distill(config(images, out))
    assert resumed.start_step == 3 and resumed.steps == 6


# --- data ---------------------------------------------------------------------------------------------------
def test_data_layouts_give_the_same_samples(tmp_path: Path) -> None:
    from linfusion_cli.train.distill_data import find_samples

    kohya = make_images(tmp_path / "kohya", 3)
    expected = [(p.name, p.with_suffix(".txt").read_text().strip()) for p in sorted(kohya.glob("*.png"))]

    folder = make_images(tmp_path / "imagefolder", 3, captions="none")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": name, "text": text}) + "\n" for name, text in expected)
    )
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"kohya/{n}", "caption": c}) + "\n" for n, c in expected))
    table = tmp_path / "list.csv"
    table.write_text("path,text\n" + "".join(f'kohya/{n},"{c}"\n' for n, c in expected))
    for source in (kohya, folder, jsonl, table):
        assert [(s.image.name, s.caption) for s in find_samples(source)] == expected, source


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "holds no images with captions"),
        ("missing", "does not exist"),
        ("no-caption", "1 of 3 images"),
        ("jsonl-no-caption", "caption missing"),
        ("jsonl-broken", "list.jsonl:2: not valid JSON"),
        ("other-file", "must be .jsonl or .csv"),
    ],
)
def test_bad_data_exits_2_before_loading_a_model(setup: str, message: str, runner, tmp_path: Path, monkeypatch) -> None:
    from linfusion_cli.train import distill as core

    monkeypatch.setattr(core, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    data = tmp_path / "data"
    if setup == "empty":
        data.mkdir()
    elif setup == "no-caption":
        make_images(data, 3)
        (data / "img1.txt").unlink()
    elif setup == "jsonl-no-caption":
        make_images(data, 1)
        data = tmp_path / "list.jsonl"
        data.write_text(json.dumps({"file_name": "data/img0.png"}) + "\n")
    elif setup == "jsonl-broken":
        data = tmp_path / "list.jsonl"
        data.write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": \n')
    elif setup == "other-file":
        data = tmp_path / "images.zip"
        data.write_bytes(b"PK")
    outcome = runner.invoke(app, ["distill", "-m", "tiny", "--data", str(data), "-o", str(tmp_path / "out")])
    assert outcome.exit_code == 2, outcome.output
    assert message in outcome.output


def test_resize_and_centre_crop(tmp_path: Path) -> None:
    from linfusion_cli.train.distill_data import load_square

    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, 40:80] = 255  # the middle third white: the centre crop of a 3:1 image
    Image.fromarray(wide).save(tmp_path / "wide.png")
    crop = load_square(tmp_path / "wide.png", 16)
    assert crop.shape == (3, 16, 16) and crop.dtype == np.float32
    assert crop[:, :, 2:-2].min() > 0.95 and crop.max() <= 1.0


def test_undecodable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", 4)
    (data / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = distill(config(data, tmp_path / "out", steps=4, save_every=100))
    assert result.skipped_images == [str(data / "img2.png")]
    state = json.loads((tmp_path / "out" / "step-00000004" / STATE_JSON).read_text())
    assert state["skipped_images"] == [str(data / "img2.png")]


# --- precision and memory options ---------------------------------------------------------------------------
def test_bf16_mixed_precision_keeps_fp32_masters(images: Path, tmp_path: Path) -> None:
    result = distill(config(images, tmp_path, steps=2, mixed_precision="bf16"))
    assert all(p.dtype == torch.float32 for m in result.patch.modules for p in m.parameters())
    frozen = [p.dtype for n, p in result.patch.unet.named_parameters() if not p.requires_grad]
    assert frozen and set(frozen) == {torch.bfloat16}
    assert np.isfinite(result.last_losses["loss"])


def test_gradient_checkpointing_gives_the_same_update(images: Path, tmp_path: Path) -> None:
    plain = distill(config(images, tmp_path / "a", steps=2))
    checkpointed = distill(config(images, tmp_path / "b", steps=2, gradient_checkpointing=True))
    for key, value in weights(plain.patch).items():
        assert torch.allclose(value, weights(checkpointed.patch)[key], atol=1e-6), key


# --- data parallel --------------------------------------------------------------------------------------------
def ddp_rank(comm: Any, data: Path, out: Path, dump: Path) -> None:
    """One rank of a data-parallel distillation, in a process forked with torchrun's environment and its gloo group
    up (the run joins it as it joins torchrun's); its weights at the end go to DUMP/rankR.pt (a file: tensors on
    the harness's queue would travel as shared memory, which a process that exits takes with it)."""
    cfg = DistillConfig(
        model="tiny", data=str(data), out=out, steps=3, grad_accum=2, resolution=64, init="random", save_every=2
    )
    torch.save(weights(distill(cfg).patch), dump / f"rank{comm.rank}.pt")


@pytest.mark.slow
def test_two_process_gloo_run_ends_with_identical_weights_and_one_writer(images: Path, tmp_path: Path) -> None:
    """Two processes forked from this one (tests/parallel_harness.py: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT as torchrun sets them, all a run reads of its launcher), not torchrun's fresh interpreters."""
    from linfusion_cli.linfusion.patching import apply_linfusion
    from linfusion_cli.models.loading import build_random

    ok_results(launch(2, ddp_rank, images, tmp_path / "out", tmp_path, deadline_s=300))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same(rank0, rank1)
    start = weights(apply_linfusion(build_random("tiny").unet, "random"))
    assert any(not torch.equal(rank0[k], start[k]) for k in start)  # it trained
    assert_same(weights(apply_linfusion(build_random("tiny").unet, str(tmp_path / "out"))), rank0)
    state = json.loads((tmp_path / "out" / "step-00000003" / STATE_JSON).read_text())
    assert state["position"] == 12  # 3 steps x batch 1 x accum 2 x 2 ranks: every micro-batch reads new samples
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "step-00000002",
        "step-00000003",
    ]


# --- the command ------------------------------------------------------------------------------------------------
def test_command_progress_table_json_and_eval_on_held_out_samples(runner, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", 6)
    out = tmp_path / "out"
    base = ["distill", "-m", "tiny", "--data", str(data), "-o", str(out), "--resolution", str(RES), "--init", "random"]
    trained = runner.invoke(app, [*base, "--steps", "4", "--log-every", "2", "--holdout", "2"])
    assert trained.exit_code == 0, trained.output
    assert "on 4 samples (2 held out)" in trained.output
    assert (
        "step 2/4  loss " in trained.output and "step 4/4  loss " in trained.output and "steps/s  ETA" in trained.output
    )
    assert "step 3/4" not in trained.output  # a line every --log-every steps
    assert "distilled: steps 0 -> 4" in trained.output and "last step" in trained.output

    more = runner.invoke(app, [*base, "--steps", "6", "--log-every", "2", "--holdout", "2", "--json"])
    assert more.exit_code == 0, more.output
    lines = [json.loads(line) for line in more.stdout.splitlines()]
    assert [(e["event"], e.get("step")) for e in lines] == [
        ("step", 6),
        ("checkpoint", 6),
        ("done", None),
    ]
    assert (lines[-1]["start_step"], lines[-1]["steps"]) == (4, 6) and set(lines[0]) >= {
        "loss",
        "noise",
        "kd",
        "feat",
        "eta_seconds",
    }

    evaluated = runner.invoke(app, [*base, "--eval-only", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["samples"] == 2 and report["init"] == "random" and report["final"].endswith("step-00000006")
    assert len(report["layers"]) == 7 and {"init", "final"} <= set(report["noise_mse"])
    assert "attn1 features, mean" in evaluated.output and "noise prediction" in evaluated.output

    no_holdout = runner.invoke(app, ["distill", "-m", "tiny", "-o", str(tmp_path / "none"), "--eval-only"])
    assert no_holdout.exit_code == 2 and "no distilled weights" in no_holdout.output


def test_each_launched_process_gets_its_own_gpu(monkeypatch) -> None:
    from linfusion_cli.train.distill import Dist, process_device

    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert process_device("cuda", Dist(8, 13, 5)) == torch.device("cuda", 5)
    assert process_device("auto", Dist(8, 13, 5)) == torch.device("cuda", 5)
    assert process_device("cuda:2", Dist(8, 13, 5)) == torch.device("cuda", 2)  # an explicit index is kept
    assert chosen == [torch.device("cuda", 5), torch.device("cuda", 5), torch.device("cuda", 2)]
    assert process_device("cpu", Dist(2, 1, 1)) == torch.device("cpu")


def test_help_groups_the_flags(runner) -> None:
    text = runner.invoke(app, ["distill", "--help"]).stdout
    panels = [line.split("─ ", 1)[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
    expected = ["Options", "Model and adapters", "Training", "Checkpoints and resume", "Evaluation", "Output"]
    assert panels == [*expected, "Device"]
    assert "--no-gradient-checkpointing" not in text and "--gradient-checkpointing" in text
