"""Textual-inversion embeddings as A1111 users bring them, written in each tool's layout (A1111's .safetensors
`emb_params` and pickled .pt `string_to_param`, diffusers' learned_embeds, SDXL's clip_l/clip_g): a prompt word equal
to a file's name uses its vectors, exactly as diffusers' own `load_textual_inversion` puts them in; weights apply to
them; a file made for another model is refused naming both; the image records A1111's TI hashes."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from linfusion_cli.base.errors import UsageError
from linfusion_cli.engine.embeddings import embedding_library
from linfusion_cli.engine.text import TextOptions, chunk_tokens, encode_prompt

CPU = torch.device("cpu")
G = torch.Generator().manual_seed(3)


def vectors(n: int, width: int) -> torch.Tensor:
    return torch.randn(n, width, generator=G)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedding folder for the tiny SD-1.x model (text width 32) and the tiny SDXL one (16 + 48)."""
    root = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": vectors(2, 32)}, str(root / "EasyNegative.safetensors"))  # A1111 .safetensors
    a1111_pt = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(3, 32)}, "name": "bad-hands-5"}
    torch.save(a1111_pt | {"step": 1500, "sd_checkpoint_name": "v1-5"}, root / "bad-hands-5.pt")  # A1111 .pt
    save_file({"<cat-toy>": vectors(1, 32)[0]}, str(root / "cat-toy.safetensors"))  # diffusers learned_embeds
    (root / "sdxl").mkdir()
    save_file({"clip_l": vectors(2, 16), "clip_g": vectors(2, 48)}, str(root / "sdxl" / "pony-style.safetensors"))
    save_file({"emb_params": vectors(1, 48)}, str(root / "sd2-only.safetensors"))
    return root


@pytest.fixture(scope="module")
def tiny():
    from linfusion_cli.models.loading import build_random

    return build_random("tiny")


def _library(comps, folder: Path, allow_pickle: bool = True):
    widths = [int(e.config.hidden_size) for e in comps.text_encoders]
    return embedding_library([folder], widths, allow_pickle)


def _ours(comps, folder: Path, prompt: str) -> torch.Tensor:
    return encode_prompt(comps, prompt, "", 1.0, CPU, options=TextOptions(embeddings=_library(comps, folder))).embeds


def _pipeline(comps):
    """diffusers' own pipeline around copies of the tiny model's text encoders (its loader changes them)."""
    import diffusers

    parts = {"vae": comps.vae, "unet": comps.unet, "scheduler": diffusers.DDIMScheduler()}
    parts |= {"text_encoder": copy.deepcopy(comps.text_encoders[0]), "tokenizer": copy.deepcopy(comps.tokenizers[0])}
    if comps.is_sdxl:
        parts |= {"text_encoder_2": copy.deepcopy(comps.text_encoders[1])}
        parts |= {"tokenizer_2": copy.deepcopy(comps.tokenizers[1])}
        return diffusers.StableDiffusionXLPipeline(**parts)
    parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return diffusers.StableDiffusionPipeline(**parts)


@torch.no_grad()
@pytest.mark.parametrize("name", ["EasyNegative", "bad-hands-5", "cat-toy"])
def test_an_embedding_equals_diffusers_loader_and_changes_the_conditioning(tiny, folder: Path, name: str) -> None:
    # diffusers' prompt rewrite matches its token's case; CLIP (and A1111, and this tool) read any case alike
    prompt = f"a photo of {name.lower()}, blurry"
    pipe = _pipeline(tiny)
    file = next(p for p in folder.iterdir() if p.stem == name)
    pipe.load_textual_inversion(str(file), token=name.lower())
    theirs, _ = pipe.encode_prompt(prompt, CPU, 1, False)
    ours = _ours(tiny, folder, prompt)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(_ours(tiny, folder, f"a photo of {name}, blurry"), ours)
    assert not torch.allclose(ours, _ours(tiny, folder / "sdxl", prompt))  # a folder without it: the words


@torch.no_grad()
def test_sdxl_pairs_go_to_both_encoders_as_diffusers_puts_them(folder: Path) -> None:
    from safetensors.torch import load_file

    from linfusion_cli.models.loading import build_random

    comps = build_random("tiny-sdxl")
    pipe = _pipeline(comps)
    pair = load_file(str(folder / "sdxl" / "pony-style.safetensors"))
    pipe.load_textual_inversion(
        pair["clip_l"], token="pony-style", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        pair["clip_g"], token="pony-style", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    theirs = pipe.encode_prompt("pony-style, a fox", device=CPU, do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(_ours(comps, folder / "sdxl", "pony-style, a fox"), theirs)


def test_vectors_take_one_position_each_and_weights_apply_to_them(tiny, folder: Path) -> None:
    library = _library(tiny, folder)
    (chunk,) = chunk_tokens(tiny.tokenizers[0], "a (bad-hands-5:1.2) fox", library)
    ((position, embedding),) = chunk.fixes
    assert embedding.name == "bad-hands-5" and embedding.count == 3
    assert chunk.weights[position : position + 3] == [1.2] * 3 and chunk.weights[position + 3] == 1.0


def test_an_embedding_for_another_model_or_a_pickle_without_leave_is_refused(tiny, folder: Path) -> None:
    with pytest.raises(UsageError, match=r"'sd2-only' \(sd2-only.safetensors\) has vectors of width 48.*takes 32"):
        _ours(tiny, folder, "sd2-only cat")
    with pytest.raises(UsageError, match=r"'bad-hands-5' is a pickle .*--allow-pickle"):
        encode_prompt(tiny, "bad-hands-5", "", 1.0, CPU, options=TextOptions(embeddings=_library(tiny, folder, False)))


def test_the_image_differs_records_ti_hashes_and_is_named_apart(runner, tmp_path: Path, folder: Path) -> None:
    from linfusion_cli.cli.commands import app

    args = ["generate", "a fox", "--negative", "EasyNegative", "--model", "tiny", "--size", "64", "--steps", "1"]
    args += ["--seed", "2", "--json", "-q", "--out", str(tmp_path)]
    used = json.loads(runner.invoke(app, [*args, "--embeddings", str(folder)]).stdout)
    plain = json.loads(runner.invoke(app, args).stdout)
    assert used["path"] != plain["path"]
    with Image.open(used["path"]) as a, Image.open(plain["path"]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    digest = hashlib.sha256((folder / "EasyNegative.safetensors").read_bytes()).hexdigest()[:12]
    assert used["settings"]["ti_hashes"] == [f"EasyNegative: {digest}"]
    assert f'TI hashes: "EasyNegative: {digest}"' in runner.invoke(app, ["info", used["path"]]).stdout
