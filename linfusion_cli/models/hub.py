"""Hugging Face Hub look-ups with one behaviour everywhere: cache first, `HF_HUB_OFFLINE` honoured, and a
clear message (model named, the fix spelled out) when a repo is neither reachable nor cached."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from ..base.errors import ModelLoadError, ModelNotFoundError
from ..base.registry import did_you_mean
from .archs import BUILTIN_MODELS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in _TRUE


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` that is not an existing local path and does not look like one."""
    if text.startswith((".", "/", "~")) or text.endswith((".safetensors", ".ckpt", ".pt", ".bin", ".pth")):
        return False
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


ModelSource = Literal["builtin", "memory", "folder", "file", "hub"]
# Models already loaded by the caller, by the name jobs give them (`LinFusionPipeline.from_pipe`): their
# components (models.loading.Components), used as they are instead of being loaded.
IN_MEMORY: dict[str, Any] = {}


def model_source(model: str) -> ModelSource:
    """What kind of source a --model string names: the one place this is decided.

    Raises ModelNotFoundError for a local path that does not exist (and does not look like a hub id).
    """
    if model in BUILTIN_MODELS:
        return "builtin"
    if model in IN_MEMORY:
        return "memory"
    path = Path(model).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if looks_like_hub_id(model):
        return "hub"
    hint = did_you_mean(model, BUILTIN_MODELS)
    raise ModelNotFoundError(
        f"model '{model}' does not exist{hint}: give an existing diffusers folder or .safetensors file, a hub id "
        f"(owner/name), or {' / '.join(BUILTIN_MODELS)}"
    )


def resolve_local_or_hub(source: str, *, what: str, allow_patterns: list[str]) -> Path:
    """A local path as is, or a hub repo fetched (or found in the cache) as a local snapshot folder."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(source):
        raise ModelNotFoundError(f"{what} '{source}' does not exist: give an existing folder or file, or a hub id")
    return fetch_snapshot(source, what=what, allow_patterns=allow_patterns)


def fetch_snapshot(repo_id: str, *, what: str, allow_patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = hub_offline()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=offline))
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"{what} '{repo_id}' is gated on the Hugging Face Hub: accept its licence on huggingface.co and log in "
            "(`hf auth login`), or point at a local copy"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"{what} '{repo_id}' was not found on the Hugging Face Hub (misspelt, private or removed): check the id, "
            "or point at a local folder"
        ) from exc
    except LocalEntryNotFoundError as exc:
        cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached (no network?)"
        raise ModelLoadError(
            f"{what} '{repo_id}' is not in the local Hugging Face cache ({cache}) and {why}. Fix: download it on a "
            f"machine with network (`hf download {repo_id}`) and copy the cache (set HF_HOME to it), or point at a "
            "local folder or file instead"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"could not fetch {what} '{repo_id}' from the Hugging Face Hub: {exc}") from exc


def download_command(repo_id: str) -> str:
    return f"hf download {repo_id}"


def missing_from_cache(wanted: list[tuple[str, str, str]]) -> list[str]:
    """Of (what, source, file) triples, one line for each hub repo whose `file` is not in the local cache, with
    the command that fetches it; local paths, and strings that are no hub id, are not looked up."""
    from huggingface_hub import try_to_load_from_cache

    lines = []
    for what, source, filename in wanted:
        if not looks_like_hub_id(source):
            continue
        if not isinstance(try_to_load_from_cache(source, filename), str):
            lines.append(
                f"{what} '{source}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: run "
                f"`{download_command(source)}` on a machine with network and copy the cache here (HF_HOME), or point "
                "at a local copy"
            )
    return lines


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
