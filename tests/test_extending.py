"""What the house promises a contributor: a setting is one declaration, an adapter kind is one package plus a
registration, a refine method is one module plus a registration; each shows up everywhere with no other change.
Everything here is registered from this file and removed again."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli.base.settings import BATCH, GENERATE, PLAN, AdapterRef, Setting, in_range
from linfusion_cli.cli.commands import app
from linfusion_cli.core.jobs import read_job_file, resolve_job
from linfusion_cli.core.metadata import settings_key
from linfusion_cli.core.settings import add_setting, remove_setting
from linfusion_cli.engine.latent_ops import LatentOps
from linfusion_cli.engine.refine import REFINE_METHODS, JobRefiner, RefineMethod
from linfusion_cli.models.adapter_kind import AdapterKind
from linfusion_cli.models.adapters import ADAPTER_KINDS

TOY_KNOB = Setting(
    "toy_knob",
    "int",
    None,
    "A knob only this test knows.",
    "Sampler",
    (GENERATE, PLAN, BATCH),
    check=in_range(0, 9),
)


@pytest.fixture
def toy_setting() -> Iterator[Setting]:
    add_setting(TOY_KNOB)
    try:
        yield TOY_KNOB
    finally:
        remove_setting(TOY_KNOB.name)


def test_a_new_setting_is_a_flag_a_job_field_and_part_of_the_key(runner, toy_setting, tmp_path: Path) -> None:
    help_text = runner.invoke(app, ["generate", "--help"], terminal_width=200).stdout
    assert "--toy-knob" in help_text and "A knob only this test knows." in help_text

    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("- prompt: a fox\n  toy_knob: 3\n- prompt: a fox\n")
    rows = read_job_file(jobs).rows
    assert rows[0].values["toy_knob"] == 3 and "toy_knob" not in rows[1].values
    with_knob, without = (resolve_job(row.values) for row in rows)
    assert with_knob.toy_knob == 3 and without.toy_knob is None
    key = settings_key(with_knob.settings(), 512, 512, 1)
    assert key != settings_key(without.settings(), 512, 512, 1)  # it decides the pixels: its own name

    bad = runner.invoke(app, ["plan", "--toy-knob", "12", "--model", "tiny"])
    assert bad.exit_code == 2 and "--toy-knob: must be between 0 and 9 (got 12)" in bad.stderr
    plan = runner.invoke(app, ["plan", "x", "--toy-knob", "4", "--model", "tiny", "--seed", "1", "--json"])
    assert plan.exit_code == 0, plan.stderr


class ToyRefiner(JobRefiner):
    """Adds a constant to the latents after every stage: visible in the image, trivially checked."""

    def __init__(self, lift: float) -> None:
        self.lift = lift
        self.stages = 0

    def finished(self, latents: torch.Tensor, ops: LatentOps) -> torch.Tensor:
        self.stages += 1
        return latents + self.lift


class ToyMethod(RefineMethod):
    name = "toy-lift"
    summary = "a test's method"
    settings = (Setting("toy_lift", "float", 0.5, "toy-lift: how much to lift.", when=("refine", "toy-lift")),)
    first_strength = 0.3
    passes_per_step = 3
    extra_bytes_per_token = 10_000_000

    def strengths(self, count: int, first: float) -> list[float]:
        return [first] * count

    def steps(self, schedule_steps: int, strength: float) -> int:
        return 1

    def a1111_fields(self, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [("Refine", f"toy-lift {settings['toy_lift']:g}")]

    def start_job(self, job: Any) -> JobRefiner:
        return ToyRefiner(job.toy_lift)


@pytest.fixture
def toy_method() -> Iterator[ToyMethod]:
    method = REFINE_METHODS.register(ToyMethod())
    try:
        yield method
    finally:
        REFINE_METHODS.unregister(method.name)


def test_a_new_refine_method_plans_costs_records_and_replays(runner, toy_method, tmp_path: Path) -> None:
    args = ["x", "--model", "tiny", "--size", "256", "--refine", "toy-lift", "--toy-lift", "0.25", "--seed", "3"]
    plan = json.loads(runner.invoke(app, ["plan", *args, "--json"]).stdout)
    assert [s["strength"] for s in plan["stages"]] == [None, 0.3]
    assert [s["unet_passes"] for s in plan["stages"]] == [50, 3]  # its steps, and its passes per step
    sdedit = json.loads(runner.invoke(app, ["plan", *args[:5], "--seed", "3", "--json"]).stdout)
    assert plan["stages"][1]["estimated_peak_gib"] > sdedit["stages"][1]["estimated_peak_gib"]  # its latents
    assert "toy-lift (a test's method)" in runner.invoke(app, ["generate", "--help"], terminal_width=300).stdout

    made = runner.invoke(app, ["generate", *args, "--steps", "4", "--out", str(tmp_path / "a"), "--json"])
    assert made.exit_code == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["settings"]["refine"] == "toy-lift" and report["settings"]["toy_lift"] == 0.25
    from linfusion_cli.io.metadata import read_metadata

    assert "Refine: toy-lift 0.25" in read_metadata(Path(report["path"]))["parameters"]
    again = runner.invoke(app, ["replay", report["sidecar"], "--out", str(tmp_path / "b"), "--json"])
    assert again.exit_code == 0, again.stderr
    import numpy as np
    from PIL import Image

    with Image.open(report["path"]) as a, Image.open(json.loads(again.stdout)["path"]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


class ToyAdapter:
    """Adds a constant to every UNet prediction (through the UNet call's extras), and owns a small module."""

    kind = "toy_adapters"

    def __init__(self, ref: AdapterRef) -> None:
        self.ref = ref
        self.module = torch.nn.Linear(4, 4)
        self.image: str | None = None
        self.removed = False

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.module,)

    def begin_job(self, job: Any, device: torch.device) -> None:
        self.image = job.toy_image

    def stage_extra(self, stage: Any, control: torch.Tensor | None) -> Any:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": "toy", "source": self.ref.source, "scale": self.ref.scale, "image": self.image}

    def remove(self) -> None:
        self.removed = True


class ToyKind(AdapterKind):
    name = "toy_adapters"
    label = "Toy"
    described_as = "toy"
    ref_setting = "toy"
    settings = (
        Setting("toy", "refs", help="A toy adapter (repeatable).", metavar="SRC[:SCALE]"),
        Setting("toy_image", "str", help="What the toy adapters read."),
    )
    fields_rank = 9
    loaded: ClassVar[list[ToyAdapter]] = []

    def preflight(self, job: Any, family: Any, allow_pickle: bool) -> None:
        if job.toy_image is None:
            from linfusion_cli.base.errors import UsageError

            raise UsageError("--toy needs --toy-image")

    def hub_files(self, job: Any, family: Any) -> list[tuple[str, str, str]]:
        return [("toy", ref.source, "toy.json") for ref in self.refs(job) if "/" in ref.source]

    def planned_gib_fp16(self, job: Any, family: Any, family_gib: float) -> float:
        return 100.0 * len(self.refs(job))

    def plan_entries(self, job: Any) -> list[dict[str, Any]]:
        return [{"source": r.source, "scale": r.scale, "image": job.toy_image} for r in self.refs(job)]

    def plan_line(self, entry: Mapping[str, Any]) -> str:
        return f"Toy {entry['source']} x{entry['scale']:g} reads {entry['image']}"

    def a1111_fields(self, described: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [("Toy", ", ".join(f"{a['source']}:{a['scale']:g}" for a in described))]

    def load(self, comps: Any, ref: AdapterRef) -> Any:
        adapter = ToyAdapter(ref)
        self.loaded.append(adapter)
        return adapter


@pytest.fixture
def toy_kind() -> Iterator[ToyKind]:
    kind = ADAPTER_KINDS.register(ToyKind())
    kind.loaded.clear()
    try:
        yield kind
    finally:
        ADAPTER_KINDS.unregister(kind.name)


def test_a_new_adapter_kind_plans_loads_records_and_replays(runner, toy_kind, tmp_path: Path, monkeypatch) -> None:
    refused = runner.invoke(app, ["plan", "x", "--model", "tiny", "--toy", "a"])
    assert refused.exit_code == 2 and "--toy needs --toy-image" in refused.stderr
    args = [
        "x",
        "--model",
        "tiny",
        "--size",
        "256",
        "--steps",
        "4",
        "--seed",
        "2",
        "--toy",
        "a:0.5",
        "--toy-image",
        "i",
    ]
    plan = runner.invoke(app, ["plan", *args, "--json"])
    summary = json.loads(plan.stdout)
    assert summary["toy_adapters"] == [{"source": "a", "scale": 0.5, "image": "i"}]
    assert summary["stages"][0]["estimated_peak_gib"] > 100  # its weights counted before anything loads
    assert "Toy a x0.5 reads i" in runner.invoke(app, ["plan", *args]).stdout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = runner.invoke(app, ["generate", *args[:-4], "--toy", "owner/toy", "--toy-image", "i"])
    assert offline.exit_code == 1 and "toy 'owner/toy'" in offline.stderr  # its files checked offline, before loading

    made = runner.invoke(app, ["generate", *args, "--out", str(tmp_path / "a"), "--json"])
    assert made.exit_code == 0, made.stderr
    report = json.loads(made.stdout)
    assert {"kind": "toy", "source": "a", "scale": 0.5, "image": "i"} in report["adapters"]
    assert report["settings"]["toy"] == ["a:0.5"] and len(toy_kind.loaded) == 1
    from linfusion_cli.io.metadata import read_metadata

    assert "Toy: a:0.5" in read_metadata(Path(report["path"]))["parameters"]
    again = runner.invoke(app, ["replay", report["sidecar"], "--out", str(tmp_path / "b"), "--json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["settings"]["toy"] == ["a:0.5"] and len(toy_kind.loaded) == 2


class ToyBlurGuide:
    """Before each step, half of the latents become their 3x3 box blur with the image's statistics given back:
    a filter and statistics that read across rows, through the split-aware ops the engine hands the method."""

    def __init__(self, ops: Any) -> None:
        self.ops = ops
        ToyBlur.ops_seen.append(type(ops).__name__)

    def before_step(self, scheduler: Any, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        blurred = ops.filter2d(latents.float(), torch.full((3, 3), 1 / 9))
        return 0.5 * latents + 0.5 * ops.match_stats(blurred, *ops.channel_stats(latents))

    def wrap(self, denoiser: Any) -> Any:
        return denoiser


class ToyBlurRefiner(JobRefiner):
    def guide(self, stage: Any) -> ToyBlurGuide:
        return ToyBlurGuide(stage.ops)


class ToyBlur(RefineMethod):
    name = "toy-blur"
    summary = "a test's split-aware method"
    ops_seen: ClassVar[list[str]] = []

    def strengths(self, count: int, first: float) -> list[float]:
        return [0.5] * count

    def steps(self, schedule_steps: int, strength: float) -> int:
        return 2

    def start_job(self, job: Any) -> JobRefiner:
        return ToyBlurRefiner()


TOY_BLUR_JOB = {"model": "tiny", "size": 256, "steps": 3, "seed": 4, "refine": "toy-blur", "name": "x"}


def _toy_blur_split(comm: Any, out: Path) -> tuple[Any, Any, list[str]]:
    """One process of the 2-process split (tests/parallel_harness.py): its image (the first's, read from the file
    its rows were streamed into: a split image saved holds no array), its `parallel` record and which ops its
    method was handed."""
    from linfusion_cli import LinFusionPipeline

    with LinFusionPipeline(out=out, split=True) as gen:
        result = gen.generate("a house", **TOY_BLUR_JOB)
    assert result.array is None
    image = None if result.path is None else np.asarray(Image.open(result.path))
    return image, result.report.get("parallel"), ToyBlur.ops_seen


def test_a_new_refine_method_with_a_blur_gives_the_same_image_split_over_two_processes(tmp_path: Path) -> None:
    from parallel_harness import launch, ok_results

    from linfusion_cli import LinFusionPipeline

    method = REFINE_METHODS.register(ToyBlur())
    try:
        with LinFusionPipeline(out=tmp_path / "one") as gen:
            one = gen.generate("a house", **TOY_BLUR_JOB).array
        assert ToyBlur.ops_seen == ["LatentOps"]  # one process: the whole image's ops
        ToyBlur.ops_seen.clear()
        (first, parallel, ops), (other, _, _) = ok_results(launch(2, _toy_blur_split, tmp_path / "two", deadline_s=120))
    finally:
        REFINE_METHODS.unregister(method.name)
    assert ops == ["BandOps"] and other is None  # its refine stage ran on bands; the first process has the image
    assert parallel["world_size"] == 2 and parallel["bands"] == [16, 16] and parallel["comm_bytes"]["sent"] > 0
    assert parallel["comm_bytes"]["by_kind"]["filter"]["calls"] == 2  # the blur crossed the band edge each step
    assert one is not None and first is not None
    diff = np.abs(one.astype(int) - first.astype(int))
    assert diff.max() <= 1, diff.max()  # the one-process image, to fp32 reduction order
    with LinFusionPipeline(out=tmp_path / "plain") as gen:
        with_blur = gen.generate("a house", **{**TOY_BLUR_JOB, "refine": "sdedit"}).array
    assert np.abs(with_blur.astype(int) - one.astype(int)).max() > 8  # and the blur does something
