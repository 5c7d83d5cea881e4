"""What a prompt names besides its words, found once per job before anything reads it:

- AUTOMATIC1111's extra-network tags (`<lora:NAME:WEIGHT>`, `<lyco:...>`): taken out of the text CLIP sees (and
  the name of the output), each handed to the adapter kind that owns its tag name, which adds the adapter it names
  to the job as if it had been given as a flag. A tag of a kind this tool does not have (`<hypernet:...>`) is taken
  out too, with a warning, as A1111 skips an unknown one.
- Textual-inversion embeddings: the files in the embedding folders whose names the prompt or negative uses, with
  A1111's hashes (`ti_hashes`: what the image records and its name is keyed by; the engine puts their vectors in).
"""

from __future__ import annotations

import re

from ..base.errors import UsageError
from ..base.events import Note
from ..base.text import quote
from ..engine.embeddings import EMBEDDING_SUFFIXES, embedding_folders, ti_hash
from ..io.folders import files_by_name
from ..models.adapter_kind import AdapterKind
from ..models.adapters import ADAPTER_KINDS
from .jobspec import JobSpec

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's own pattern (modules/extra_networks.py)
DEFAULT_WEIGHT = 1.0  # A1111's, for a tag without one
COMPOSABLE = re.compile(r"\bAND\b")  # A1111 splits a prompt into several at a capital AND (prompt_parser.py)
RECORDED = ("image ", "sidecar ")  # where-labels of settings read from an image (image_settings.py)


def _weight(tag: str, args: list[str]) -> float:
    if len(args) == 1:
        return DEFAULT_WEIGHT
    if len(args) > 2:
        raise UsageError(
            f"{quote(tag)}: separate text-encoder and UNet weights (or named arguments) are not supported; "
            "give one weight: <lora:NAME:0.8>"
        )
    try:
        return float(args[1])
    except ValueError:
        raise UsageError(f"{quote(tag)}: the weight '{args[1]}' is not a number (<lora:NAME:0.8>)") from None


def expand_prompt_tags(job: JobSpec) -> list[Note]:
    """Take the job's tags out of its prompt and add what they name (see the module docstring); what is worth
    telling (an unknown kind, a tag in the negative prompt) comes back as notes."""
    notes: list[Note] = []
    found: dict[str, list[tuple[str, float]]] = {}
    kinds: dict[str, AdapterKind] = {name: kind for kind in ADAPTER_KINDS for name in kind.tag_names}

    def take(match: re.Match[str]) -> str:
        tag, kind = match.group(0), kinds.get(match.group(1).lower())
        if kind is None:
            notes.append(Note("warning", f"{tag} ignored: this tool has no '{match.group(1)}' networks"))
            return ""
        args = [arg.strip() for arg in match.group(2).split(":")]
        found.setdefault(kind.name, []).append((args[0], _weight(tag, args)))
        return ""

    job.prompt = EXTRA_NETWORK.sub(take, job.prompt)
    negative = EXTRA_NETWORK.findall(job.negative or "")
    if negative:
        job.negative = EXTRA_NETWORK.sub("", job.negative)
        notes.append(
            Note("warning", f"{len(negative)} tag(s) in the negative prompt ignored: <lora:...> tags go in the prompt")
        )
    for where, text in (("prompt", job.prompt), ("negative prompt", job.negative or "")):
        if COMPOSABLE.search(text):
            notes.append(Note("warning", f"'AND' in the {where} is read as a word: A1111's composable prompts are not"))
    recorded = str(job.sources.get("prompt", "")).startswith(RECORDED)
    for kind in ADAPTER_KINDS:
        if not recorded:
            kind.resolve(job, found.get(kind.name, []))
            continue
        kind.resolve(job, [])
        for tag in found.get(kind.name, []):  # a prompt read from an image may name what you do not have
            try:
                kind.resolve(job, [tag])
            except UsageError as exc:
                notes.append(Note("warning", f"{exc}: left out (the image's prompt names it)"))
    return notes


def record_embeddings(job: JobSpec) -> None:
    """`job.ti_hashes`: `NAME: HASH` of each embedding the prompt or negative names (as a word: A1111 finds it by its
    tokens, which a word's are), in the order they first appear."""
    files = files_by_name(embedding_folders(job.embeddings), EMBEDDING_SUFFIXES)
    text = f"{job.prompt}\n{job.negative or ''}".casefold()
    at = {name: _word_at(text, name.casefold()) for name in files}
    used = sorted((name for name, where in at.items() if where >= 0), key=lambda name: at[name])
    job.ti_hashes = [f"{name}: {ti_hash(files[name])}" for name in used] or None


def _word_at(text: str, word: str) -> int:
    found = re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text)
    return found.start() if found else -1
