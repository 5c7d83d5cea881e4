"""A1111 metadata fields that image browsers and Civitai read: Model hash and Denoising strength."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from linfusion_cli.core.metadata import a1111_parameters
from linfusion_cli.io.hashing import cache_path, model_hash


def _meta(**extra) -> dict:
    settings = {"prompt": "a fox", "negative": "", "steps": 50, "scheduler": "dpm++2m-karras", "guidance": 7.5}
    meta = {
        "settings": settings,
        "seed": 7,
        "width": 2048,
        "height": 1024,
        "model": "models/dreamshaper.safetensors",
        "linfusion": "Yuanshi/LinFusion-1-5",
        "versions": {"linfusion": "0.1.0"},
        "stages": [
            {"size": "1024x512", "strength": None},
            {"size": "2048x1024", "strength": 0.4},
        ],
    }
    meta.update(extra)
    return meta


def test_model_hash_is_a1111s_short_sha256(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert model_hash(str(checkpoint)) == expected[:10]
    cached = json.loads(cache_path().read_text())  # LINFUSION_HOME is a tmp dir in tests
    assert list(cached.values()) == [expected]


def test_hash_cache_follows_the_file(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"one")
    first = model_hash(str(checkpoint))
    checkpoint.write_bytes(b"other bytes")  # size (and mtime) change: hashed again
    assert model_hash(str(checkpoint)) == hashlib.sha256(b"other bytes").hexdigest()[:10] != first


def test_no_hash_for_hub_ids_folders_and_builtins(tmp_path: Path) -> None:
    assert model_hash("stable-diffusion-v1-5/stable-diffusion-v1-5") is None
    assert model_hash(str(tmp_path)) is None
    assert model_hash("tiny") is None


def test_parameters_carry_hash_and_denoising_strength() -> None:
    text = a1111_parameters(_meta(model_hash="0123456789"))
    fields = text.splitlines()[-1]
    assert "Size: 2048x1024, Model hash: 0123456789, Model: models/dreamshaper.safetensors, " in fields
    assert "Denoising strength: 0.4, " in fields
    assert "Sampler: DPM++ 2M Karras" in fields


def test_no_denoising_strength_without_refinement() -> None:
    fields = a1111_parameters(_meta(stages=[{"size": "512x512", "strength": None}]))
    assert "Denoising strength" not in fields and "Model hash" not in fields
