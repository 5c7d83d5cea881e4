"""The benchmark commands run end to end on the tiny architecture and print valid JSON."""

from __future__ import annotations

import json

import pytest

from linfusion_cli.bench.units import parse_size
from linfusion_cli.cli.commands import app


def bench(runner, *args: str) -> dict:
    result = runner.invoke(app, ["bench", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_bench_unet_shows_both_attentions(runner) -> None:
    report = bench(runner, "unet", "--arch", "tiny", "--sizes", "128,256", "--repeats", "1")
    assert [r["size"] for r in report["results"]] == ["128x128", "256x256"]
    for row in report["results"]:
        assert row["linfusion"]["finite"] and row["sdpa"]["finite"] and row["sdpa_over_linfusion"] > 0
    assert report["device"].startswith("cpu") and report["versions"]["torch"]


def test_bench_unet_skips_sdpa_with_a_reason(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    import linfusion_cli.bench.units as bench_mod

    real = bench_mod.bench_unet
    monkeypatch.setattr(bench_mod, "bench_unet", lambda *a, **k: real(*a, **{**k, "sdpa_limit": 0.0}))
    report = bench(runner, "unet", "--arch", "tiny", "--sizes", "128,256", "--repeats", "1")
    assert "quadratic" in report["results"][1]["sdpa"]["skipped"]


def test_bench_attention_matches_the_straightforward_form(runner) -> None:
    report = bench(runner, "attention", "--tokens", "512,2048", "--dim", "64", "--heads", "4", "--repeats", "1")
    assert all(r["relative_difference"] < 1e-5 for r in report["results"])
    assert report["schema"] == 1 and report["dtype"] == "fp32"
    assert set(report["results"][0]["ours"]) == {"seconds", "peak_vram_allocated_gib"}  # the shared layout


@pytest.mark.slow
def test_bench_vae_and_fidelity(runner) -> None:
    report = bench(runner, "vae", "--arch", "tiny", "--sizes", "256", "--tile", "128", "--no-diffusers")  # 4 tiles
    row = report["results"][0]
    assert row["tile"] == 128 and row["decode"]["over_floor"] > 0 and row["encode"]["floor_seconds"] > 0
    fidelity = bench(
        runner,
        "vae",
        "--arch",
        "tiny",
        "--fidelity",
        "--fidelity-size",
        "256",
        "--fidelity-tile",
        "64",
        "--seeds",
        "0,1",
    )
    assert [r["seed"] for r in fidelity["results"]] == [0, 1]
    assert all(r["decode_psnr"] > r["diffusers_decode_psnr"] for r in fidelity["results"])


def test_bench_png(runner) -> None:
    report = bench(runner, "png", "--size", "512x256", "--repeats", "1")
    assert report["linfusion"]["seconds"] > 0 and report["speedup"] > 0


def test_bench_pipeline_with_baseline(runner) -> None:
    report = bench(runner, "pipeline", "--arch", "tiny", "--size", "256", "--steps", "4", "--baseline")
    assert [s["size"] for s in report["stages"]] == ["128x128", "256x256"]
    assert report["seconds"]["model_load"] > 0 and report["seconds"]["write"] >= 0
    assert report["schema"] == 1 and report["dtype"] == "fp32"
    assert len(report["baseline"]["stages"]) == 2


@pytest.mark.parametrize("bad", ["0", "12x", "100x7", "abc"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_bench_parallel_stages_sets_each_stage_against_one_process(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    import linfusion_cli.bench.parallel as parallel

    def launch_here(nproc: int, entrypoint, *args):  # type: ignore[no-untyped-def]
        """The processes run here, one after another, each alone: the slower one's time is the split's."""
        ranks = {rank: entrypoint(*args) for rank in range(nproc)}
        for rank, result in ranks.items():
            result["rank"] = rank
            for stage in result["stages"]:
                stage["sent_bytes_per_rank"] = [1 << 20, 2 << 20]
        ranks[1]["stages"][-1]["phases"]["unet"] = 1e3  # the slowest process sets each phase
        return ranks

    monkeypatch.setattr(parallel, "launch_here", launch_here)
    args = ["--size", "128x96", "--steps", "2", "--vae-tile", "64", "--reference-threads", "1"]
    report = bench(runner, "parallel", "--stages", *args)
    assert [s["size"] for s in report["stages"]] == ["128x96"]  # one stage at the tiny model's native size
    stage = report["stages"][0]
    assert stage["split"]["phases"]["unet"] == 1e3 and stage["sent_bytes_per_rank"] == [1 << 20, 2 << 20]
    assert {"unet", "vae decode"} <= set(stage["one_process"]["phases"]) and stage["ratio"] > 0
    assert stage["one_process"]["cpu_seconds"] > 0 and len(stage["split"]["cpu_seconds_per_rank"]) == 2
    assert report["one_process"]["threads"] == 1 and report["job"]["vae_tile"] == 64
