"""Model loading: built-in, folder (through the real loader), hub ids offline, pickles refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from linfusion_cli.base.errors import ModelLoadError, ModelNotFoundError, UnsafeFileError
from linfusion_cli.models.families import peek_family
from linfusion_cli.models.loading import build_random, load_components


def test_builtin_tiny_is_deterministic() -> None:
    a, b = build_random("tiny"), build_random("tiny")
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.native_size == 128 and a.family is not None and a.family.key == "tiny"


def test_folder_round_trip(tiny_model_dir: Path) -> None:
    comps = load_components(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    ref = build_random("tiny")
    assert comps.family is not None and comps.family.key == "tiny"
    sa, sb = comps.unet.state_dict(), ref.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = comps.tokenizers[0]("a red fox", return_tensors="pt").input_ids
    assert torch.equal(ids, ref.tokenizers[0]("a red fox", return_tensors="pt").input_ids)


def test_hub_id_offline_names_model_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"not-a-real/model.*not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        load_components("not-a-real/model", device="cpu", dtype=torch.float32)


def test_missing_local_path() -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        peek_family("./no/such/model")


def test_not_a_diffusers_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a diffusers Stable Diffusion folder"):
        load_components(str(tmp_path), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFileError, match=r"pickle.*--allow-pickle"):
        load_components(str(path), device="cpu", dtype=torch.float32)


def test_peek_family_reads_folder_config(tiny_model_dir: Path) -> None:
    family, note = peek_family(str(tiny_model_dir))
    assert family is not None and family.key == "tiny" and note is None
