"""One image's resolved settings as the engine, adapters and refine methods read them: every built-in setting an
attribute with its type. Written by `python -m linfusion_cli.core.job_types` from the settings table: do not edit
by hand."""

from __future__ import annotations

from typing import Any


class Job:
    """The types of a job's settings; `core.settings.JobSpec` holds the values."""

    prompt: str
    negative: str
    seed: int | None
    size: int | None
    aspect: str
    width: int | None
    height: int | None
    steps: int
    guidance: float
    clip_skip: int
    embeddings: list[str] | None
    ti_hashes: list[str] | None
    source_image: str | None
    strengths: list[float] | None
    size_cond: str
    scheduler: str
    format: str
    name: str | None
    base_size: int | None
    model: str
    linfusion: str
    vae: str | None
    vae_tile: int | None
    low_vram: bool
    memory: str | None
    max_vram: float | None
    image: str | None
    strength: float | None
    refine: str
    preset: str | None
    cosine_scale_1: float
    cosine_scale_2: float
    cosine_scale_3: float
    gaussian_sigma: float
    lora: list[str] | None
    lora_dir: list[str] | None
    controlnet: list[str] | None
    control_image: list[str] | None
    control_start: float
    control_end: float
    control_stages: list[float] | None
    ip_adapter: list[str] | None
    ip_image: str | None

    def value(self, name: str) -> Any:
        """A setting by name: one a plug-in declared, which this view does not list."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Every setting's value (for reports, sidecars, replay)."""
        raise NotImplementedError
