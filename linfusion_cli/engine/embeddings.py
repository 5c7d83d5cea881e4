"""Textual-inversion embeddings, used as AUTOMATIC1111 uses them: a file in the embedding folders whose name (its
file name without extension) appears in a prompt stands for its vectors there, one token position per vector.
A1111 finds the name by its tokens (the prompt's token ids hold the name's), and so does this.

Files come in the layouts users download (docs/embeddings.md): A1111's `.safetensors` (`emb_params`, (n, dim)) and
`.pt` (a pickle: `string_to_param["*"]`, read weights-only and only with --allow-pickle), diffusers'
`learned_embeds` ({token: vector}), and SDXL pairs (`clip_l` (n, 768), `clip_g` (n, 1280)), one per text encoder.
Vectors of another width than the model's text encoder takes are refused, naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import UsageError
from ..io.folders import files_by_name, search_folders
from ..io.hashing import content_digest

EMBEDDINGS_ENV = "LINFUSION_EMBEDDINGS"
EMBEDDINGS_DEFAULT = "embeddings"  # ~/.config/linfusion/embeddings
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
PICKLE_SUFFIXES = (".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")  # one per text encoder, in the order the model holds them
A1111_KEY = "emb_params"
HASH_CHARS = 12  # A1111's TI hash: the file's sha256, first 12 hex digits

if TYPE_CHECKING:
    import torch


def embedding_folders(given: list[str] | None) -> list[Path]:
    return search_folders(given, EMBEDDINGS_ENV, EMBEDDINGS_DEFAULT)


def ti_hash(path: Path) -> str:
    return content_digest(path)[:HASH_CHARS]


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: list[torch.Tensor]  # per text encoder, (n, dim)

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])


def _vectors(name: str, data: Any) -> list[torch.Tensor]:
    """The vectors in a loaded file (a dict of tensors, or A1111's pickle), one (n, dim) tensor per encoder."""
    import torch  # lazy: the settings table reads this module's names at CLI start-up

    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        data = data["string_to_param"]  # A1111's .pt: {"*": tensor}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}
    if all(key in tensors for key in SDXL_KEYS):
        found = [tensors[key] for key in SDXL_KEYS]
    elif A1111_KEY in tensors:
        found = [tensors[A1111_KEY]]
    elif len(tensors) == 1:  # A1111's {"*": ...}, diffusers' {token: vector}
        found = list(tensors.values())
    else:
        keys = ", ".join(sorted(map(str, data))[:6]) if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"embedding '{name}': not a textual-inversion file this tool can read (it holds {keys})")
    return [t.detach().float().reshape(-1, t.shape[-1]) for t in found]


def load_embedding(name: str, path: Path, allow_pickle: bool) -> Embedding:
    import torch  # lazy, as in _vectors

    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UsageError(
                f"embedding '{name}' is a pickle ({path}); give --allow-pickle to read it (weights only), or use a "
                ".safetensors copy"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights-only unpickling refuses anything but tensors and plain data
            raise UsageError(f"embedding '{name}' ({path}) cannot be read weights-only ({exc})") from None
    else:
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise UsageError(f"embedding '{name}' ({path}): not a readable .safetensors file ({exc})") from None
    return Embedding(name, path, _vectors(name, data))


@dataclass
class EmbeddingLibrary:
    """The embeddings in a job's folders, loaded when a prompt uses one; `widths` are the model's text encoders'
    (what each embedding is checked against)."""

    files: dict[str, Path]
    widths: list[int]
    allow_pickle: bool = False
    used: dict[str, Embedding] = field(default_factory=dict)
    _names: dict[int, list[tuple[list[int], str]]] = field(default_factory=dict)  # id(tokenizer) -> names' ids

    def _by_first_token(self, tokenizer: Any) -> list[tuple[list[int], str]]:
        if id(tokenizer) not in self._names:
            ids = [(tokenizer(name, add_special_tokens=False).input_ids, name) for name in self.files]
            self._names[id(tokenizer)] = sorted((p for p in ids if p[0]), key=lambda p: -len(p[0]))
        return self._names[id(tokenizer)]

    def match(self, tokenizer: Any, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at `position` (the longest such), and how many tokens it took."""
        for ids, name in self._by_first_token(tokenizer):
            if tokens[position : position + len(ids)] == ids:
                return self.get(name), len(ids)
        return None

    def get(self, name: str) -> Embedding:
        if name not in self.used:
            embedding = load_embedding(name, self.files[name], self.allow_pickle)
            self._check(embedding)
            self.used[name] = embedding
        return self.used[name]

    def _check(self, embedding: Embedding) -> None:
        theirs = [int(v.shape[-1]) for v in embedding.vectors]
        if len(theirs) != len(self.widths) or theirs != self.widths:
            made = "+".join(map(str, theirs))
            ours = "+".join(map(str, self.widths))
            raise UsageError(
                f"embedding '{embedding.name}' ({embedding.path.name}) has vectors of width {made}, for another "
                f"model; this model's text encoder{'s take' if len(self.widths) > 1 else ' takes'} {ours}"
            )
        if len({int(v.shape[0]) for v in embedding.vectors}) > 1:
            raise UsageError(f"embedding '{embedding.name}': its clip_l and clip_g hold different numbers of vectors")


def embedding_library(folders: list[Path], widths: list[int], allow_pickle: bool) -> EmbeddingLibrary:
    return EmbeddingLibrary(files_by_name(folders, EMBEDDING_SUFFIXES), widths, allow_pickle)
