"""The Python API as a diffusers user meets it: PIL images out, nothing written until asked, a list of prompts,
upscale of an image in memory, errors that name the argument (and know diffusers' names), and a diffusers
pipeline already loaded used as it is."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linfusion_cli import LinFusionPipeline
from linfusion_cli.base.errors import UsageError

FAST = {"model": "tiny", "size": 128, "steps": 2}  # one stage at the tiny model's native size


def test_images_stay_in_memory_until_saved_and_a_list_of_prompts_makes_a_list(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with LinFusionPipeline(out=out, **FAST) as pipe:
        kept = pipe.generate(["a fox", "a hare"], seed=5, save=False)
        assert not out.exists()  # no folder, no image, no sidecar
        assert [type(i) for i in kept.images] == [Image.Image, Image.Image] and kept.image.size == (128, 128)
        assert kept.arrays[0].shape == (128, 128, 3) and kept.arrays[0].dtype == np.uint8
        assert [r["seed"] for r in kept.reports] == [5, 6] and kept.path is None and not kept.saved
        paths = kept.save()
        assert [p.parent for p in paths] == [out, out] and kept.saved and kept.save() == paths  # once
        sidecar = json.loads(Path(kept.reports[1]["sidecar"]).read_text())
        assert sidecar["seed"] == 6 and sidecar["complete"]
        with Image.open(paths[1]) as written:
            assert np.array_equal(np.asarray(written), kept.arrays[1])

        bigger = pipe.upscale(kept.images[0], size=256, seed=1, save=False)  # a PIL image
        assert bigger.image.size == (256, 256) and bigger.report["settings"]["image"].startswith("in-memory-")
        again = pipe.upscale(kept.arrays[0].astype(np.float32) / 255, size=256, seed=1, save=False)  # floats
        assert np.array_equal(again.arrays[0], bigger.arrays[0])  # the same pixels in: the same image
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [*(p.name for p in paths), *(f"{p.name}.json" for p in paths)]
        )


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"num_inference_steps": 20}, "unknown argument 'num_inference_steps' (did you mean steps?)"),
        ({"guidance_scale": 5.0}, "unknown argument 'guidance_scale' (did you mean guidance?)"),
        ({"generator": 3}, "unknown argument 'generator' (did you mean seed?)"),
        ({"scheduler": "eular"}, "scheduler: must be a sampler"),
        ({"base_size": "huge"}, "base_size: "),
        ({"ip_image": "x.png"}, "ip_image is the IP-Adapter's reference image: give ip_adapter too"),
    ],
)
def test_errors_name_the_argument(given: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        LinFusionPipeline(out=tmp_path, model="tiny").generate("a fox", dry_run=True, **given)
    assert message in str(caught.value) and "--" not in str(caught.value)


def test_every_setting_is_documented_and_options_are_keyword_only() -> None:
    from linfusion_cli.core.settings import table

    doc = (LinFusionPipeline.__doc__ or "").split("Settings (keyword")[1]
    assert all(f"{name} (" in doc for name, s in table().items() if s.help)
    assert "base_size (int or text like '8k')" in doc and "--" not in doc
    assert "steps (int): " in (LinFusionPipeline.generate.__doc__ or "")  # help(pipe.generate) lists them too
    with pytest.raises(TypeError):
        LinFusionPipeline("outputs")  # type: ignore[misc]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from linfusion_cli import Generator

        assert isinstance(Generator(model="tiny"), LinFusionPipeline)
    assert any(issubclass(w.category, DeprecationWarning) and "LinFusionPipeline" in str(w.message) for w in caught)


def test_from_pipe_runs_the_diffusers_pipelines_own_components(tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from linfusion_cli.models.loading import build_random

    comps = build_random("tiny")  # the same seeded weights as --model tiny
    sd = StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoders[0],
        tokenizer=comps.tokenizers[0],
        unet=comps.unet,
        scheduler=DDIMScheduler.from_config(comps.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    attn1 = sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with LinFusionPipeline.from_pipe(sd, out=tmp_path, steps=2) as pipe:
        mine = pipe.generate("a fox", size=256, seed=3, save=False)
        patched = sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        assert patched is not attn1 and type(patched).__name__ == "LinFusionAttention"  # its own UNet, swapped
        assert mine.report["model"].startswith("pipe:")
    assert sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1 is attn1  # given back on close
    with LinFusionPipeline(out=tmp_path, **FAST) as pipe:
        loaded = pipe.generate("a fox", seed=3, size=256, save=False)
    assert np.array_equal(mine.arrays[0], loaded.arrays[0])  # the same weights: the same image
