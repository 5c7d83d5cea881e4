"""Prompts read as AUTOMATIC1111 reads them: (word:1.2) weights, 75-token chunks, on the tiny models."""

from __future__ import annotations

import pytest
import torch

from linfusion_cli.engine.text import CHUNK_TOKENS, chunk_tokens, encode_prompt, parse_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["tiny", "tiny-sd2", "tiny-sdxl"])
def comps(request):
    from linfusion_cli.models.loading import build_random

    return build_random(request.param)


def _reference(comps, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain diffusers way for one window: tokenizer padded to 77, each encoder, concatenated."""
    hidden, pooled = [], None
    for i, (encoder, tokenizer) in enumerate(zip(comps.text_encoders, comps.tokenizers, strict=True)):
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        if comps.is_sdxl:
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0] if i == len(comps.text_encoders) - 1 else pooled
        else:
            hidden.append(encoder(ids)[0])
    return torch.cat(hidden, dim=-1), pooled


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a (red:1.3) fox", [("a ", 1.0), ("red", 1.3), (" fox", 1.0)]),
        ("a (red) [blue]", [("a ", 1.0), ("red", 1.1), (" ", 1.0), ("blue", 1 / 1.1)]),
        ("((x))", [("x", pytest.approx(1.21))]),
        ("(a (b:2))", [("a ", 1.1), ("b", pytest.approx(2.2))]),
        (r"\(literal\) x", [("(literal) x", 1.0)]),
        ("(open", [("open", 1.1)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
        ("ratio 16:9", [("ratio 16:9", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_weights_parse_as_a1111(text, expected) -> None:
    assert parse_weights(text) == expected


@torch.no_grad()
def test_a_short_plain_prompt_encodes_as_before(comps) -> None:
    cond = encode_prompt(comps, "a red fox", "blurry", 7.5, CPU)
    positive, pooled = _reference(comps, "a red fox")
    negative, neg_pooled = _reference(comps, "blurry")
    assert cond.embeds.shape[1] == 77
    torch.testing.assert_close(cond.embeds, torch.cat([negative, positive]))
    if comps.is_sdxl:
        torch.testing.assert_close(cond.pooled, torch.cat([neg_pooled, pooled]))
    assert not cond.notes and not cond.warnings


@torch.no_grad()
def test_long_prompts_are_chunked_and_concatenated(comps) -> None:
    prompt = " ".join("abc"[i % 3] for i in range(100))  # one token a word, also in the tiny vocabularies
    tokenizer = comps.tokenizers[0]
    chunks = chunk_tokens(tokenizer, prompt)
    assert [len(c.tokens) for c in chunks] == [CHUNK_TOKENS, 100 - CHUNK_TOKENS]
    first = tokenizer.decode(chunks[0].tokens)
    second = tokenizer.decode(chunks[1].tokens)

    cond = encode_prompt(comps, prompt, "", 7.5, CPU)
    assert cond.embeds.shape[1] == 2 * 77
    positive = cond.embeds[1:]
    first_ref, first_pooled = _reference(comps, first)
    second_ref, _ = _reference(comps, second)
    torch.testing.assert_close(positive[:, :77], first_ref)
    torch.testing.assert_close(positive[:, 77:], second_ref)
    if comps.is_sdxl:
        torch.testing.assert_close(cond.pooled[1:], first_pooled)  # pooled from the first chunk
        assert torch.count_nonzero(cond.embeds[:1]) == 0  # SDXL's empty negative: zeros, as long as the prompt
    else:
        empty, _ = _reference(comps, "")
        torch.testing.assert_close(cond.embeds[:1], torch.cat([empty, empty], dim=1))  # padded with empty chunks
    assert cond.notes == ["prompt is longer than 75 tokens: encoded as 2 chunks of up to 75, as AUTOMATIC1111 does"]


def test_a_full_chunk_breaks_after_a_nearby_comma(comps) -> None:
    tokenizer = comps.tokenizers[0]
    prompt = " ".join(["a"] * 70) + ", " + " ".join(["b"] * 10)
    chunks = chunk_tokens(tokenizer, prompt)
    comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
    assert chunks[0].tokens[-1] == comma and len(chunks[0].tokens) == 71
    assert chunks[1].tokens == tokenizer(" ".join(["b"] * 10), add_special_tokens=False).input_ids


@torch.no_grad()
def test_weights_scale_tokens_and_keep_the_mean(comps) -> None:
    weighted = encode_prompt(comps, "(a:1.5) b", "", 1.0, CPU).embeds
    plain = encode_prompt(comps, "a b", "", 1.0, CPU).embeds
    width = comps.text_encoders[0].config.hidden_size
    for part in (slice(0, width), slice(width, None)) if comps.is_sdxl else (slice(None),):
        w, p = weighted[..., part], plain[..., part]
        k = w[0, 2] / p[0, 2]  # "b": the mean-restoring factor alone
        torch.testing.assert_close(w[0, 2], p[0, 2] * k.mean())
        torch.testing.assert_close(w[0, 1], p[0, 1] * 1.5 * k.mean())  # "a": 1.5 times that
        torch.testing.assert_close(w.mean(), p.mean())


@torch.no_grad()
def test_one_window_when_asked(comps) -> None:
    cond = encode_prompt(comps, " ".join(["a"] * 120), "", 1.0, CPU, max_chunks=1)
    assert cond.embeds.shape[1] == 77 and cond.warnings == ["prompt is longer than 75 tokens: the rest is ignored"]
