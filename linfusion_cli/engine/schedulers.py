"""Samplers: one row each (AUTOMATIC1111's name, our short name, the diffusers scheduler and its options, whether
it draws fresh noise at each step), and the noise source a stochastic one draws from.

The rows follow the mapping in diffusers' scheduler overview (docs/samplers.md has it, with its source): every
sampler of A1111's list that diffusers has a scheduler for, with the Karras and exponential sigma schedules where
the scheduler takes them. A1111's names that diffusers has no scheduler for are listed too, so that asking for one
says so instead of suggesting another sampler. No torch at import: names are checked before any model loads.

A stochastic sampler's fresh noise comes from the noise source the stage hands its steps (noise.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..base.errors import UsageError
from ..base.registry import Registry, did_you_mean

Options = dict[str, Any]
KARRAS: Options = {"use_karras_sigmas": True}
EXPONENTIAL: Options = {"use_exponential_sigmas": True, "timestep_spacing": "linspace"}  # as diffusers' overview says
# A1111's word for a sigma schedule -> (our suffix, the scheduler's options)
SCHEDULES: dict[str, tuple[str, Options]] = {"Karras": ("karras", KARRAS), "Exponential": ("exp", EXPONENTIAL)}
DPM_PP: Options = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPM_PP_SDE: Options = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}


@dataclass(frozen=True)
class Sampler:
    """One sampler: `name` is ours (what job files store), `a1111` how AUTOMATIC1111 writes it in its UI and its
    images' `Sampler:` field."""

    name: str
    a1111: str
    scheduler: str  # the diffusers class
    options: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    stochastic: bool = False  # draws fresh noise at each step (from the stage's NoiseSource)
    max_steps: int | None = None  # the most schedule steps the scheduler can make (LCM: its 50 original steps)
    needs: tuple[str, ...] = ()  # modules the scheduler imports besides diffusers (LMS: scipy)

    def problem(self, steps: int) -> str | None:
        """Why this sampler cannot run a job of `steps` schedule steps here, or None."""
        if self.max_steps is not None and steps > self.max_steps:
            return f"the {self.a1111} sampler makes at most {self.max_steps} steps; got --steps {steps}"
        missing = [name for name in self.needs if importlib.util.find_spec(name) is None]
        if missing:
            return f"the {self.a1111} sampler needs {', '.join(missing)}: pip install {' '.join(missing)}"
        return None

    def make(self, base_config: dict[str, Any]) -> Any:
        """A fresh scheduler (they hold per-run state) from the model's scheduler config."""
        import diffusers  # lazy: keeps diffusers (and torch) out of CLI start-up

        config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        return getattr(diffusers, self.scheduler).from_config(config, **self.options)


def _row(
    name: str,
    a1111: str,
    scheduler: str,
    options: dict[str, Any] | None = None,
    *,
    stochastic: bool = False,
    schedules: Iterable[str] = (),
    max_steps: int | None = None,
    needs: tuple[str, ...] = (),
) -> list[Sampler]:
    """A sampler and its variants on other sigma schedules (`Karras`, `Exponential`), as A1111 lists them."""
    rows = [Sampler(name, a1111, scheduler, MappingProxyType(dict(options or {})), stochastic, max_steps, needs)]
    for schedule in schedules:
        suffix, extra = SCHEDULES[schedule]
        variant = MappingProxyType({**(options or {}), **extra})
        variant_name = f"{a1111} {schedule}"
        rows.append(Sampler(f"{name}-{suffix}", variant_name, scheduler, variant, stochastic, max_steps, needs))
    return rows


KARRAS_EXP = ("Karras", "Exponential")
SAMPLER_ROWS: tuple[Sampler, ...] = (
    *_row("ddim", "DDIM", "DDIMScheduler"),
    *_row("euler", "Euler", "EulerDiscreteScheduler", schedules=KARRAS_EXP),
    *_row("euler-a", "Euler a", "EulerAncestralDiscreteScheduler", stochastic=True),
    *_row("heun", "Heun", "HeunDiscreteScheduler", schedules=KARRAS_EXP),
    *_row("lms", "LMS", "LMSDiscreteScheduler", schedules=KARRAS_EXP, needs=("scipy",)),
    *_row("dpm2", "DPM2", "KDPM2DiscreteScheduler", schedules=KARRAS_EXP),
    *_row("dpm2-a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", stochastic=True, schedules=KARRAS_EXP),
    *_row("dpm++2m", "DPM++ 2M", "DPMSolverMultistepScheduler", DPM_PP, schedules=KARRAS_EXP),
    *_row(
        "dpm++2m-sde",
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        DPM_PP_SDE,
        stochastic=True,
        schedules=KARRAS_EXP,
    ),
    *_row(
        "dpm++2m-sde-heun",
        "DPM++ 2M SDE Heun",
        "DPMSolverMultistepScheduler",
        {**DPM_PP_SDE, "solver_type": "heun"},
        stochastic=True,
        schedules=KARRAS_EXP,
    ),
    *_row(
        "dpm++3m-sde",
        "DPM++ 3M SDE",
        "DPMSolverMultistepScheduler",
        {**DPM_PP_SDE, "solver_order": 3},
        stochastic=True,
        schedules=KARRAS_EXP,
    ),
    *_row(
        "dpm++sde",
        "DPM++ SDE",
        "DPMSolverSinglestepScheduler",
        DPM_PP_SDE,
        stochastic=True,
        schedules=KARRAS_EXP,
    ),
    *_row("unipc", "UniPC", "UniPCMultistepScheduler"),
    *_row("plms", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    *_row("lcm", "LCM", "LCMScheduler", stochastic=True, max_steps=50),
)
SAMPLERS: Registry[Sampler] = Registry("sampler", SAMPLER_ROWS)
DEFAULT_SAMPLER = "ddim"
# A1111 samplers diffusers has no scheduler for (its overview marks them N/A): named as such when asked for.
NOT_IN_DIFFUSERS = (
    "DPM++ 2S a",
    "DPM++ 2S a Karras",
    "DPM fast",
    "DPM adaptive",
    "Restart",
    "DDIM CFG++",
    "Euler a Karras",
    "Euler a Exponential",
)


def _folded(text: str) -> str:
    """A sampler name as compared: any case, spaces and brackets (`DPM++ 2M SDE (Karras)`) ignored."""
    return " ".join(text.lower().replace("(", " ").replace(")", " ").split())


def scheduler_name(value: str) -> str:
    """Our name for a sampler as a person types it: ours or AUTOMATIC1111's, in any case and spacing, A1111's
    schedule type in brackets or not. A sampler diffusers lacks is a ValueError saying so; any other unknown
    name is returned as typed (the setting's check names the choices)."""
    wanted = _folded(value)
    for sampler in SAMPLERS:
        if wanted in (_folded(sampler.name), _folded(sampler.a1111)):
            return sampler.name
    missing = {_folded(name): name for name in NOT_IN_DIFFUSERS}
    if wanted in missing:
        raise ValueError(
            f"'{missing[wanted]}' is an AUTOMATIC1111 sampler that diffusers has no scheduler for, so this tool "
            f"cannot run it; pick another (`linfusion samplers` lists them)"
        )
    return value


def sampler_problem(value: str) -> str | None:
    """What is wrong with a sampler name that `scheduler_name` did not know, with the closest of our names and
    A1111's."""
    if value in SAMPLERS:
        return None
    hint = did_you_mean(value, [*SAMPLERS.names(), *(s.a1111 for s in SAMPLERS)])
    return f"must be a sampler `linfusion samplers` lists, by our name or AUTOMATIC1111's{hint}"


def with_schedule(sampler: str, schedule: str | None) -> str:
    """A1111 1.9+ writes the sigma schedule apart (`Sampler: DPM++ 2M, Schedule type: Karras`): the one name."""
    if not schedule or schedule.strip().lower() in ("automatic", "uniform"):
        return sampler
    return f"{sampler} {schedule.strip()}"


def a1111_name(name: str) -> str:
    """How A1111 writes our sampler (a name this build does not know, as it is)."""
    return SAMPLERS.get(name).a1111 if name in SAMPLERS else name


def check_sampler(name: str, steps: int) -> None:
    """A sampler that cannot run here (LCM asked for more than its 50 steps, LMS without scipy), refused before
    the model loads."""
    problem = SAMPLERS.get(name).problem(steps)
    if problem:
        raise UsageError(problem)


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A fresh scheduler for the sampler `name` (ours) from the model's scheduler config."""
    return SAMPLERS.get(name).make(base_config)
