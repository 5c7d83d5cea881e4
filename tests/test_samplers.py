"""Samplers: one row each, found by the names AUTOMATIC1111 writes; every row runs (text-to-image and img2img);
a stochastic one takes its noise from the stage's noise source, so the bands of a split image get the rows of the
whole image's noise (the same image), whichever way the scheduler draws it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from linfusion_cli.base.errors import UsageError
from linfusion_cli.core.settings import FLAGS, coerce
from linfusion_cli.engine.noise import NoiseSource
from linfusion_cli.engine.sampling import stage_timesteps
from linfusion_cli.engine.schedulers import SAMPLERS, Sampler
from linfusion_cli.models.archs import ARCHS

# A training schedule of 100 steps instead of 1000: the rows behave alike, and KDPM2's schedulers, which map
# every training step to a sigma when made, are made 10x faster
CONFIG = dict(ARCHS["tiny"].scheduler) | {"num_train_timesteps": 100}
ROWS = 8  # latent rows of the test image; split into bands of 3 and 5 (ragged, as a split's last band may be)
# As A1111 (and Civitai's pages of its images) write them, odd spellings included.
A1111_NAMES = {
    "DPM++ 2M Karras": "dpm++2m-karras",
    "DPM++ SDE Karras": "dpm++sde-karras",
    "DPM++ 2M SDE (Karras)": "dpm++2m-sde-karras",
    "DPM++ 2M SDE Heun Exponential": "dpm++2m-sde-heun-exp",
    "DPM++ 3M SDE": "dpm++3m-sde",
    "Heun": "heun",
    "LMS": "lms",
    "LMS Karras": "lms-karras",
    "DPM2 a": "dpm2-a",
    "DPM2 Karras": "dpm2-karras",
    "Euler a": "euler-a",
    "euler A": "euler-a",
    "LCM": "lcm",
    "PLMS": "plms",
    "UniPC": "unipc",
    "DDIM": "ddim",
}


@pytest.mark.parametrize("written", list(A1111_NAMES))
def test_a1111_names_find_their_sampler(written: str) -> None:
    assert coerce("scheduler", written, where=FLAGS, from_text=True) == A1111_NAMES[written]


def test_a_sampler_diffusers_lacks_is_named_as_such_and_a_typo_gets_the_near_one() -> None:
    with pytest.raises(UsageError, match=r"'DPM fast' is an AUTOMATIC1111 sampler that diffusers has no scheduler"):
        coerce("scheduler", "dpm FAST", where=FLAGS, from_text=True)
    with pytest.raises(UsageError, match=r"did you mean DPM\+\+ SDE Karras\?"):
        coerce("scheduler", "DPM++ SDE Karas", where=FLAGS, from_text=True)


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in for the UNet that keeps rows apart (each output element from its own input element)."""
    return 0.3 * x * (float(t) / 1000.0) + 0.05


def _run(made: Any, start: torch.Tensor, img2img: bool, band: slice | None) -> tuple[torch.Tensor, int]:
    """A stage of 6 schedule steps (4 in img2img) on `start` (or on its rows `band`, with noise drawn for the
    whole image's rows and cut to the band, as a split image's process draws it), with a fresh copy of the
    scheduler `made` (made once per test)."""
    scheduler = copy.deepcopy(made)
    timesteps = stage_timesteps(scheduler, 6, 4, torch.device("cpu"), img2img=img2img)
    generator = torch.Generator().manual_seed(11)
    noise = NoiseSource(generator) if band is None else NoiseSource(generator, ROWS, lambda whole: whole[..., band, :])
    latents = start if band is None else start[..., band, :].contiguous()
    for t in timesteps:
        latents = noise.step(scheduler, _model(scheduler.scale_model_input(latents, t), t), t, latents)
    return latents, noise.draws


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_runs_and_split_bands_get_the_whole_images_noise(name: str) -> None:
    sampler = SAMPLERS.get(name)
    if sampler.problem(6):  # LMS where scipy is not installed: refused before loading, saying what to install
        assert sampler.needs and "pip install" in str(sampler.problem(6))
        return
    made = sampler.make(CONFIG)
    start = torch.randn(1, 4, ROWS, 6, generator=torch.Generator().manual_seed(2))
    for img2img in (False, True):
        whole, draws = _run(made, start, img2img, None)
        assert bool(torch.isfinite(whole).all())
        assert (draws > 0) == sampler.stochastic  # the row says truly whether it draws noise
        top, _ = _run(made, start, img2img, slice(0, 3))
        bottom, _ = _run(made, start, img2img, slice(3, ROWS))
        assert torch.equal(torch.cat([top, bottom], dim=-2), whole)


class _OwnDraws:
    """A scheduler that draws its noise its own way (`torch.randn(size=..., generator=...)`, no diffusers helper)."""

    order = 1
    init_noise_sigma = 1.0

    def set_timesteps(self, steps: int, device: Any = None) -> None:
        self.timesteps = torch.arange(steps - 1, -1, -1) * 100

    def scale_model_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return x

    def step(self, out: torch.Tensor, t: Any, x: torch.Tensor, generator: Any = None, return_dict: bool = True) -> Any:
        return (x - 0.1 * out + 0.5 * torch.randn(size=x.shape, generator=generator),)


@dataclass(frozen=True)
class _ToySampler(Sampler):
    def make(self, base_config: dict[str, Any]) -> Any:
        return _OwnDraws()


def test_a_sampler_registered_from_outside_is_a_setting_value_and_splits_alike() -> None:
    toy = _ToySampler("toy-own-draws", "Toy Own Draws", "_OwnDraws", stochastic=True)
    SAMPLERS.register(toy)
    try:
        assert coerce("scheduler", "toy own draws", where=FLAGS, from_text=True) == "toy-own-draws"
        start = torch.randn(1, 4, ROWS, 6, generator=torch.Generator().manual_seed(2))
        whole, draws = _run(toy.make(CONFIG), start, False, None)
        assert draws == 6
        split = [_run(toy.make(CONFIG), start, False, rows)[0] for rows in (slice(0, 3), slice(3, ROWS))]
        assert torch.equal(torch.cat(split, dim=-2), whole)
    finally:
        SAMPLERS.unregister(toy.name)


def test_lcm_refuses_more_steps_than_it_makes(runner, no_model_loads) -> None:
    from linfusion_cli.cli.commands import app

    result = runner.invoke(app, ["generate", "a fox", "--model", "tiny", "--sampler", "LCM", "--steps", "60"])
    assert result.exit_code == 2 and "the LCM sampler makes at most 50 steps" in result.stderr


def test_samplers_lists_every_row(runner) -> None:
    import json

    from linfusion_cli.cli.commands import app

    listed = json.loads(runner.invoke(app, ["samplers", "--json"]).stdout)
    assert [row["name"] for row in listed["samplers"]] == list(SAMPLERS.names())
    assert "DPM fast" in listed["not_in_diffusers"]
