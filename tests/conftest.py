"""Shared fixtures: no network, isolated user state, fixed widths, tiny models written to tmp dirs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import Processes

# Before anything imports huggingface_hub / rich: no network, fixed-width output, quiet libraries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("COLUMNS", "120")
os.environ["DIFFUSERS_VERBOSITY"] = "error"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LINFUSION_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("LINFUSION_INJECT_OOM", raising=False)
    for var in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    import torch

    # OMP_NUM_THREADS, where set, wins; under pytest-xdist each worker takes one thread (the workers share the
    # cores); otherwise up to two.
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model saved as a diffusers folder: tests load it through the real folder path."""
    from linfusion_cli.models.loading import build_random, save_components

    folder = tmp_path_factory.mktemp("tiny-model")
    save_components(build_random("tiny"), folder)
    return folder


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache for this test (huggingface_hub reads the constant at call time)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


_COMMANDS: dict[int, tuple[Any, Any, Any]] = {}  # id(app) -> (app, the settings table it was built from, command)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch):
    """Typer's CliRunner, building each app's Click command once per settings table instead of at every invoke
    (Typer reads every command's signature each time: ~0.1 s; a toy setting makes a new table, so a new build)."""
    import typer.testing
    from typer.main import get_command

    from linfusion_cli.core.settings import table

    def cached(app: Any) -> Any:
        current = table()
        built = _COMMANDS.get(id(app))
        if built is None or built[0] is not app or built[1] is not current:
            built = _COMMANDS[id(app)] = (app, current, get_command(app))
        return built[2]

    monkeypatch.setattr(typer.testing, "_get_command", cached)
    return typer.testing.CliRunner()


# --- model loads ------------------------------------------------------------------------------------------------


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model this test loads (the engine's `load_components` calls), by name, in order."""
    import linfusion_cli.engine.pipeline as pipeline

    loads: list[str] = []
    real = pipeline.load_components

    def counting(model: str, **kwargs: Any) -> Any:
        loads.append(model)
        return real(model, **kwargs)

    monkeypatch.setattr(pipeline, "load_components", counting)
    return loads


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: for what must be refused, or planned, before anything loads."""
    import linfusion_cli.engine.pipeline as pipeline

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline.Engine, "load", classmethod(boom))


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """run.run_job and the checks before it replaced by recorders: what the CLI hands the core, and nothing run
    (the flags name models and files that are not here)."""
    import linfusion_cli.core.preflight as preflight
    import linfusion_cli.core.run as runner
    from linfusion_cli.core.result import Result

    calls: dict[str, Any] = {}

    def fake_run_job(job: Any, options: Any, **kwargs: Any) -> Any:
        calls.update(job=job, options=options, **kwargs)
        return Result([{"path": "out.png", "width": 8, "height": 8, "stages": [], "seconds": {}}])

    monkeypatch.setattr(runner, "run_job", fake_run_job)
    monkeypatch.setattr(preflight, "check_run", lambda job, options, world=1: calls.update(checked=job))
    return calls


# --- linfusion in a fresh process, as a farm runs it ------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.kill_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (order kept otherwise): the workers then finish together instead of one of them running a
    long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
