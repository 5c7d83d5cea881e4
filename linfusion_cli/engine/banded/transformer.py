"""diffusers' Transformer2DModel run in row bands, its output written over its input band by band (the caller's
input is not needed afterwards), so that only one whole tensor of the level exists (two with several transformer
blocks: their token stream between blocks).

    tokens = proj_in(norm(x))                     norm: the whole input's statistics, streamed over bands first
    for each block: tokens = block(tokens)        attn1 (LinFusion): the whole image's K^T V, summed over bands
    out = proj_out(tokens) + x                    first, then every band's tokens attend to it (`Given`)

Everything else in a block (LayerNorms, cross-attention, feed-forward) is per token: each band runs the stock
block. With one block per transformer (SD-1.x/2.x) the tokens never exist whole: each band goes from its input
rows to its output rows. Results equal the whole transformer up to fp32 reduction order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ...linfusion.attention import LinFusionAttention
from ..parallel.ops import ConvSpec
from ..parallel.stats import normalize_groups
from .banding import Banding, Block, group_moments
from .resnet import plain_conv
from .rows import Whole

Tokens = Callable[[int, int], torch.Tensor]  # rows [a, b) -> their tokens (B, (b - a) W, C)


class Given:
    """LinFusionAttention's reducer while a band runs: the whole image's token count and summaries, computed
    over every band beforehand (so the layer does not compute its band's own)."""

    def __init__(self, kv: torch.Tensor, k_sum: torch.Tensor, tokens: int) -> None:
        self.kv, self.k_sum, self.tokens = kv, k_sum, tokens

    def whole_tokens(self, tokens: int) -> int:
        return self.tokens

    def summaries(self, layer: LinFusionAttention, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv, self.k_sum


def bandable_transformer(module: Block) -> bool:
    """Whether this is a continuous-input Transformer2DModel whose blocks are plain BasicTransformerBlocks with
    LinFusion self-attention (softmax attention needs every key: it runs whole)."""
    if type(module).__name__ != "Transformer2DModel" or not getattr(module, "is_input_continuous", False):
        return False
    projections_plain = all(isinstance(p, nn.Linear) or plain_conv(p) for p in (module.proj_in, module.proj_out))
    return projections_plain and all(_bandable_block(block) for block in module.transformer_blocks)


def _bandable_block(block: Block) -> bool:
    return (
        type(block).__name__ == "BasicTransformerBlock"
        and block.norm_type == "layer_norm"
        and block.pos_embed is None
        and not block.only_cross_attention
        and isinstance(block.attn1, LinFusionAttention)
    )


def transformer_forward(module: Block, x: torch.Tensor, banding: Banding, **kwargs: Any) -> torch.Tensor:
    """module(x, **kwargs)[0] for a banded level, written into x (see the module docstring). kwargs: the block
    arguments diffusers' transformer takes (encoder_hidden_states, cross_attention_kwargs...)."""
    batch, channels, height, width = x.shape
    bands = banding.bands(x.shape, channels, x.element_size())
    stats = group_moments(banding, Whole(x), module.norm.num_groups, bands)

    def first_tokens(a: int, b: int) -> torch.Tensor:
        xs = normalize_groups(module.norm, *stats, x[:, :, a:b])
        if isinstance(module.proj_in, nn.Linear):
            return module.proj_in(xs.permute(0, 2, 3, 1).reshape(batch, -1, channels))  # (B, n, C')
        xs = ConvSpec.of(module.proj_in).run(xs, 0)
        return xs.permute(0, 2, 3, 1).reshape(batch, -1, xs.shape[1])

    tokens: Tokens = first_tokens
    stream: torch.Tensor | None = None  # the tokens between blocks, whole, when there are several blocks
    blocks = list(module.transformer_blocks)
    for index, block in enumerate(blocks):
        summaries = _summaries(block, tokens, banding.share.whole_tokens(height * width), bands, banding)
        with _given(block.attn1, summaries):
            for a, b in banding.each(bands):
                out = block(tokens(a, b), **kwargs)  # (B, n, C')
                if index == len(blocks) - 1:
                    x[:, :, a:b] = _output(module, out, b - a, width) + x[:, :, a:b]
                    continue
                if stream is None:
                    stream = out.new_empty((batch, height * width, out.shape[-1]))
                stream[:, a * width : b * width] = out
        if stream is not None:
            tokens = _rows_of(stream, width)
    return x


def _summaries(block: Block, tokens: Tokens, whole: int, bands: list[tuple[int, int]], banding: Banding) -> Given:
    """The block's attn1 summaries of the whole image (`whole` tokens), summed band by band (on a split image, then
    over the processes)."""
    attn: LinFusionAttention = block.attn1
    scale = whole**-0.5
    kv = k_sum = None
    for a, b in banding.each(bands):
        part_kv, part_sum = attn.summaries(block.norm1(tokens(a, b)), scale)
        kv = part_kv if kv is None else kv.add_(part_kv)
        k_sum = part_sum if k_sum is None else k_sum.add_(part_sum)
    assert kv is not None and k_sum is not None
    return Given(*banding.share.reduced(kv, k_sum, attn.heads), whole)


@contextlib.contextmanager
def _given(attn: LinFusionAttention, given: Given) -> Iterator[None]:
    """attn reads the given summaries inside the block; its own reducer (a split image's) is back after."""
    had, saved = "reducer" in vars(attn), vars(attn).get("reducer")
    attn.reducer = given
    try:
        yield
    finally:
        if had:
            attn.reducer = saved
        else:
            del attn.reducer


def _rows_of(stream: torch.Tensor, width: int) -> Tokens:
    return lambda a, b: stream[:, a * width : b * width]


def _output(module: Block, tokens: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """proj_out of a band's tokens, back to (B, C, rows, W), as the transformer lays them out."""
    batch = tokens.shape[0]
    if isinstance(module.proj_out, nn.Linear):
        out = module.proj_out(tokens)
        return out.reshape(batch, rows, width, out.shape[-1]).permute(0, 3, 1, 2).contiguous()
    spatial = tokens.reshape(batch, rows, width, tokens.shape[-1]).permute(0, 3, 1, 2).contiguous()
    return ConvSpec.of(module.proj_out).run(spatial, 0)
