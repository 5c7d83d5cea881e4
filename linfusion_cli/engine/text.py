"""Prompt -> text-encoder embeddings (SD-1/2: one CLIP; SDXL: two, with the pooled embedding), computed once
per image and reused by every stage.

Prompts are read the way AUTOMATIC1111 reads them, since that is what its users' prompts are written for:

- Weights: `(word)` x1.1, `[word]` /1.1, `(word:1.3)` x1.3, nested brackets multiply; `\\(` is a literal
  bracket; an unclosed bracket weights the rest of the prompt. A weighted chunk's embeddings are multiplied
  token by token, then rescaled so their mean is what it was unweighted (A1111's "original" emphasis).
- Length: tokens are cut into chunks of 75 (a chunk that fills up within 20 tokens of a comma breaks after
  that comma; `BREAK` starts a new chunk), each chunk gets its own start/end tokens and padding (77 ids),
  is encoded alone, and the chunks' embeddings are concatenated along the sequence: (1, 77 * chunks, D).
  SDXL's pooled embedding comes from the first chunk. Negative and positive are padded to the same number
  of chunks with the empty prompt's chunk.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base.errors import UsageError
from ..base.text import plural
from ..models.loading import Components
from .embeddings import Embedding, EmbeddingLibrary

CHUNK_TOKENS = 75  # tokens per chunk, without the start and end tokens (CLIP's window is 77)
COMMA_BACKTRACK = 20  # a full chunk breaks after its last comma if that is at most this many tokens back
EMPHASIS = 1.1  # (word) multiplies by this, [word] divides by it

_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: literal
    | \(                    # open round
    | \[                    # open square
    | :\s*([+-]?[.\d]+)\s*\)  # :weight) closes a round bracket with that weight
    | \)                    # close round
    | \]                    # close square
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that is not a weight
    | \\                    # a lone backslash
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
BREAK = None  # the fragment weight that marks a chunk break


@dataclass
class Conditioning:
    """Text conditioning for classifier-free guidance: row 0 negative, row 1 positive (or positive only)."""

    embeds: torch.Tensor  # (R, 77 * chunks, D)
    pooled: torch.Tensor | None  # (R, P) for SDXL
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a user may want to know (chunking), not a problem


def parse_weights(text: str) -> list[tuple[str, float | None]]:
    """`a (red:1.3) fox` -> [("a ", 1.0), ("red", 1.3), (" fox", 1.0)]; weight None marks a BREAK."""
    pieces: list[list[Any]] = []  # [text, weight]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", None])
                pieces.append([part, 1.0])
    for start in round_open:  # unclosed brackets weight the rest
        multiply(start, EMPHASIS)
    for start in square_open:
        multiply(start, 1 / EMPHASIS)
    merged: list[tuple[str, float | None]] = []
    for piece_text, piece_weight in pieces:
        if merged and piece_weight is not None and merged[-1][1] == piece_weight:
            merged[-1] = (merged[-1][0] + piece_text, piece_weight)
        elif piece_text or piece_weight is None:
            merged.append((piece_text, piece_weight))
    return merged or [("", 1.0)]


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)  # (position, embedding) of its vectors

    def cut(self, at: int) -> _Chunk:
        """The tokens from `at` on, taken out into a chunk of their own (with the embeddings among them)."""
        moved = _Chunk(self.tokens[at:], self.weights[at:], [(p - at, e) for p, e in self.fixes if p >= at])
        self.tokens, self.weights = self.tokens[:at], self.weights[:at]
        self.fixes = [(p, e) for p, e in self.fixes if p < at]
        return moved


def chunk_tokens(tokenizer: Any, text: str, embeddings: EmbeddingLibrary | None = None) -> list[_Chunk]:
    """The prompt's tokens with their weights, in chunks of at most 75 (A1111's rules, see the module doc); an
    embedding's name in the tokens takes one position per vector, in one chunk (embeddings.py)."""
    comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
    chunks: list[_Chunk] = []
    chunk = _Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = _Chunk(), -1

    for fragment, weight in parse_weights(text):
        if weight is None:
            close()
            continue
        tokens = tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False).input_ids
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK_TOKENS and last_comma >= CHUNK_TOKENS - COMMA_BACKTRACK:
                moved = chunk.cut(last_comma + 1)  # break after the comma; the words after it start the next chunk
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK_TOKENS:
                close()
            found = embeddings.match(tokenizer, tokens, position) if embeddings is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            embedding, length = found
            if len(chunk.tokens) + embedding.count > CHUNK_TOKENS:  # an embedding is never split over chunks
                close()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [token] * embedding.count  # stand-ins: their embeddings are replaced by its vectors
            chunk.weights += [weight] * embedding.count
            position += length
    if chunk.tokens or not chunks:
        close()
    return chunks


def _chunk_ids(tokenizer: Any, chunk: _Chunk) -> tuple[list[int], list[float]]:
    """[start] + tokens + [end] + padding to 77, and the weight of each position (1 off the prompt)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill = CHUNK_TOKENS - len(chunk.tokens)
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id] + [pad] * fill
    return ids, [1.0, *chunk.weights, 1.0] + [1.0] * fill


def _emphasize(hidden: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Scale each token's embedding by its weight, then restore the chunk's mean (A1111's original emphasis)."""
    if all(w == 1.0 for w in weights):
        return hidden
    original_mean = hidden.float().mean()
    scale = torch.tensor(weights, device=hidden.device, dtype=hidden.dtype)[None, :, None]  # (1, 77, 1)
    weighted = hidden * scale
    return weighted * (original_mean / weighted.float().mean()).to(hidden.dtype)


def _hidden(encoder: Any, batch: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """SD-1.x/2.x conditioning: CLIP's last hidden state, or with clip skip N (A1111's `Clip skip`) the hidden
    state N - 1 layers before the last, through the final layer norm as the last one is (A1111's
    `FrozenCLIPEmbedderWithCustomWords.encode_with_transformers`; diffusers' `clip_skip` counts one less)."""
    if clip_skip <= 1:
        return encoder(batch)[0]
    states = encoder(batch, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    if clip_skip >= len(states):
        raise UsageError(f"--clip-skip {clip_skip}: this model's text encoder has {len(states) - 1} layers")
    return getattr(encoder, "text_model", encoder).final_layer_norm(states[-clip_skip])


@contextlib.contextmanager
def _vectors_in(encoder: Any, fixes: list[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """While the block runs, the encoder's token embeddings at each fix's positions (after the start token) are the
    fix's vectors: how an embedding's vectors enter CLIP, as A1111's EmbeddingsWithFixes puts them."""
    if not fixes:
        yield
        return

    def replace(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for position, vectors in fixes:
            output[:, 1 + position : 1 + position + vectors.shape[0]] = vectors.to(output)
        return output

    handle = getattr(encoder, "text_model", encoder).embeddings.token_embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def _encode_chunks(
    comps: Components, text: str, device: torch.device, chunks_wanted: int, options: TextOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, 77 * chunks_wanted, D) embeddings and the pooled embedding (SDXL). A prompt with fewer chunks is
    padded with the empty prompt's chunk; one with more is cut."""
    per_encoder: list[torch.Tensor] = []
    pooled = None
    for i, (encoder, tokenizer) in enumerate(zip(comps.text_encoders, comps.tokenizers, strict=True)):
        chunks = chunk_tokens(tokenizer, text, options.embeddings)[:chunks_wanted]
        chunks += [_Chunk()] * (chunks_wanted - len(chunks))
        pieces = []
        for c, chunk in enumerate(chunks):
            ids, weights = _chunk_ids(tokenizer, chunk)
            batch = torch.tensor([ids], device=device)
            with _vectors_in(encoder, [(p, e.vectors[i]) for p, e in chunk.fixes]):
                if comps.is_sdxl:
                    # SDXL conditions on the penultimate hidden layer of both encoders, pooled from the second.
                    out = encoder(batch, output_hidden_states=True)
                    hidden = out.hidden_states[-2]
                    if c == 0 and i == len(comps.text_encoders) - 1:
                        pooled = out[0]
                else:
                    hidden = _hidden(encoder, batch, options.clip_skip)
            pieces.append(_emphasize(hidden, weights))
        per_encoder.append(torch.cat(pieces, dim=1))  # (1, 77 * chunks, D_i)
    return torch.cat(per_encoder, dim=-1), pooled


def count_chunks(comps: Components, text: str, embeddings: EmbeddingLibrary | None = None) -> int:
    return len(chunk_tokens(comps.tokenizers[0], text, embeddings))


@dataclass(frozen=True)
class TextOptions:
    """How prompts are read besides their text: A1111's clip skip, and the embeddings a prompt may name."""

    clip_skip: int = 1
    embeddings: EmbeddingLibrary | None = None


@torch.no_grad()
def encode_prompt(
    comps: Components,
    prompt: str,
    negative: str,
    guidance: float,
    device: torch.device,
    max_chunks: int | None = None,
    options: TextOptions = TextOptions(),
) -> Conditioning:
    """Embeddings for the prompt (and the negative, with guidance). max_chunks=1 keeps CLIP's single window
    (training batches need one length); the cut is then reported as a warning. `options.clip_skip`: see `_hidden`
    (SDXL conditions on its penultimate layer whatever it says, as A1111 does)."""
    library, clip_skip = options.embeddings, options.clip_skip
    found = max(count_chunks(comps, prompt, library), count_chunks(comps, negative, library) if guidance > 1.0 else 1)
    chunks = found if max_chunks is None else min(found, max_chunks)
    positive, pooled = _encode_chunks(comps, prompt, device, chunks, options)
    notes, warnings = [], []
    if comps.is_sdxl and clip_skip > 1:
        notes.append(f"clip skip {clip_skip}: SDXL conditions on its penultimate layer whatever it says, as A1111 does")
    if chunks < found:
        warnings.append(f"prompt is longer than {plural(chunks * CHUNK_TOKENS, 'token')}: the rest is ignored")
    elif chunks > 1:
        notes.append(
            f"prompt is longer than {CHUNK_TOKENS} tokens: encoded as {plural(chunks, 'chunk')} of up to "
            f"{CHUNK_TOKENS}, as AUTOMATIC1111 does"
        )
    if guidance <= 1.0:
        return Conditioning(positive, pooled, warnings, notes)
    if comps.is_sdxl and not negative:
        # SDXL's pipeline default (force_zeros_for_empty_prompt): an empty negative prompt is all zeros.
        neg, neg_pooled = torch.zeros_like(positive), (torch.zeros_like(pooled) if pooled is not None else None)
    else:
        neg, neg_pooled = _encode_chunks(comps, negative, device, chunks, options)
    both_pooled = torch.cat([neg_pooled, pooled]) if pooled is not None and neg_pooled is not None else None
    return Conditioning(torch.cat([neg, positive]), both_pooled, warnings, notes)
