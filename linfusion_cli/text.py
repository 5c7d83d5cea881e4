"""Prompt -> text-encoder embeddings (SD-1/2: one CLIP; SDXL: two, with the pooled embedding), computed once
per image and reused by every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .models import Components


@dataclass
class Conditioning:
    """Text conditioning for classifier-free guidance: row 0 negative, row 1 positive (or positive only)."""

    embeds: torch.Tensor  # (R, 77, D)
    pooled: torch.Tensor | None  # (R, P) for SDXL
    warnings: list[str] = field(default_factory=list)


def _tokenize(tokenizer: Any, text: str, device: torch.device) -> tuple[torch.Tensor, str | None]:
    """Token ids padded/cut to the encoder's window, and a warning naming what was cut, if anything."""
    limit = int(tokenizer.model_max_length)
    ids = tokenizer(text, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    full = tokenizer(text, truncation=False, verbose=False).input_ids
    warning = None
    if len(full) > limit:
        dropped = tokenizer.decode(full[limit - 1 : -1]).strip()
        warning = (
            f"prompt is {len(full) - 2} tokens; the text encoder reads {limit - 2}, so this part is ignored: "
            f"'{dropped[:120]}'. Shorten the prompt or move the important words to the front"
        )
    return ids.to(device), warning


def _encode_one(
    comps: Components, text: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    hidden: list[torch.Tensor] = []
    pooled = None
    warnings: list[str] = []
    for i, (encoder, tokenizer) in enumerate(zip(comps.text_encoders, comps.tokenizers, strict=True)):
        ids, warning = _tokenize(tokenizer, text, device)
        if warning and i == 0:
            warnings.append(warning)
        if comps.is_sdxl:
            # SDXL conditions on the penultimate hidden layer of both encoders, pooled from the second.
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if i == len(comps.text_encoders) - 1:
                pooled = out[0]
        else:
            hidden.append(encoder(ids)[0])
    return torch.cat(hidden, dim=-1), pooled, warnings


@torch.no_grad()
def encode_prompt(comps: Components, prompt: str, negative: str, guidance: float, device: torch.device) -> Conditioning:
    positive, pooled, warnings = _encode_one(comps, prompt, device)
    if guidance <= 1.0:
        return Conditioning(positive, pooled, warnings)
    if comps.is_sdxl and not negative:
        # SDXL's pipeline default (force_zeros_for_empty_prompt): an empty negative prompt is all zeros.
        neg, neg_pooled = torch.zeros_like(positive), (torch.zeros_like(pooled) if pooled is not None else None)
    else:
        neg, neg_pooled, neg_warnings = _encode_one(comps, negative, device)
        warnings += [w.replace("prompt is", "negative prompt is", 1) for w in neg_warnings]
    both_pooled = torch.cat([neg_pooled, pooled]) if pooled is not None and neg_pooled is not None else None
    return Conditioning(torch.cat([neg, positive]), both_pooled, warnings)
