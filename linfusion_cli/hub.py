"""Hugging Face Hub look-ups with one behaviour everywhere: cache first, `HF_HUB_OFFLINE` honoured, and a
clear message (model named, the fix spelled out) when a repo is neither reachable nor cached."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelLoadError, ModelNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in _TRUE


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` that is not an existing local path and does not look like one."""
    if text.startswith((".", "/", "~")) or text.endswith((".safetensors", ".ckpt", ".pt", ".bin", ".pth")):
        return False
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


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
