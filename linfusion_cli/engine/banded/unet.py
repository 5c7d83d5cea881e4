"""UNet2DConditionModel's forward with its high-resolution levels run in row bands on one device.

diffusers' forward, block by block, with the same embeddings (its own methods), but at every level more than one
band tall: resnets and transformers run banded (resnet.py, transformer.py), an up block's skip concatenation is
made per band (the resnet reads hidden state and skip side by side), an upsampler feeding a banded level is
computed per band inside the next resnet (rows.Upsampled: the upsampled tensor never exists whole), skips may be
parked in CPU memory (skips.py), and the output norm and conv run per band. Levels one band tall, the mid-block,
downsamplers and anything not plainly bandable run as diffusers runs them, on whole tensors.

What it does not reproduce it refuses (a T2I-Adapter's intrablock residuals, attention masks, GLIGEN, FreeU,
image-hint embeddings) rather than computing it wrong.
"""

from __future__ import annotations

from typing import Any

import torch

from ...base.errors import UsageError
from ..parallel.ops import ConvSpec
from ..parallel.stats import normalize_groups
from .banding import Banding, Block, group_moments
from .resnet import bandable_resnet, plain_conv, resnet_forward
from .rows import Concat, Convolved, Nearest, Rows, Upsampled, Whole, clip, padded
from .skips import Remade, SkipStore
from .transformer import bandable_transformer, transformer_forward

FREEU_ATTRIBUTES = ("s1", "s2", "b1", "b2")


def banded_forward(
    unet: Block,
    banding: Banding,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    *,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
    down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    return_dict: bool = True,
) -> Any:
    """unet(...) as diffusers' UNet2DConditionModel.forward takes it (see the module docstring)."""
    _refuse(unet, attention_mask, encoder_attention_mask, down_intrablock_additional_residuals, cross_attention_kwargs)
    if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
        raise UsageError("a banded UNet takes a ControlNet's down and mid residuals together")
    # 1. Embeddings, as diffusers makes them.
    upsample_sizes = any(dim % 2**unet.num_upsamplers for dim in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = _embedding(unet, sample, timestep, timestep_cond, class_labels, encoder_hidden_states, added_cond_kwargs)
    text = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    block_kwargs = {"encoder_hidden_states": text, "cross_attention_kwargs": cross_attention_kwargs}
    run = _Run(banding, emb, block_kwargs)

    # 2. Down path: every block's outputs become skips.
    skips = SkipStore(banding, down_block_additional_residuals)
    sample = _down(unet, sample, run, skips)
    if down_block_additional_residuals is not None and len(down_block_additional_residuals) != len(skips):
        raise UsageError(f"{len(down_block_additional_residuals)} ControlNet residuals for {len(skips)} skips")

    # 3. Mid block, whole.
    if unet.mid_block is not None:
        sample = _mid(unet.mid_block, sample, run)
    if mid_block_additional_residual is not None:
        sample = sample + mid_block_additional_residual

    # 4. Up path: hidden state and skip side by side; an upsampler feeding a banded level made per band.
    hidden = _up(unet, Whole(sample), run, skips, upsample_sizes)

    # 5. Output norm, activation and conv.
    sample = _out(unet, hidden, run)
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput  # with the model, not at import

    return UNet2DConditionOutput(sample=sample)


def _down(unet: Block, sample: torch.Tensor, run: _Run, skips: SkipStore) -> torch.Tensor:
    """The down path from the UNet's input: every block's outputs become skips; the lowest level's output. Where
    the top level bands, the skips that conv_in and the attention-free resnets after it make are made again when
    the up path reads them, not kept (skips.py)."""
    first = _conv_in(unet, sample, run)
    chain: list[Block] | None = [] if isinstance(first, Convolved) and not run.banding.park else None
    skips.push(first)
    hidden: Rows = first
    for block in unet.down_blocks:
        for resnet, attention in _pairs(block):
            out = run.resnet(resnet, hidden)
            hidden = Whole(out)  # the block's input goes before its transformer runs
            if attention is not None:
                out = run.transformer(attention, out)
                hidden = Whole(out)
                chain = None
            elif chain is not None:
                chain = [*chain, resnet]
            skips.push(out if chain is None else _remade(first, chain, run, out.shape))
        for downsampler in block.downsamplers or []:
            out = downsampler(hidden.rows(0, hidden.shape[2]))
            hidden, chain = Whole(out), None
            skips.push(out)
    return hidden.rows(0, hidden.shape[2])


def _conv_in(unet: Block, sample: torch.Tensor, run: _Run) -> Rows:
    """conv_in's output: made per band wherever it is read when the top level bands (rows.Convolved), else
    whole."""
    conv = unet.conv_in
    shape = (sample.shape[0], int(conv.out_channels), *sample.shape[-2:])
    if plain_conv(conv) and tuple(conv.stride) == (1, 1) and run.banded(shape, shape[1], conv.weight.element_size()):
        spec = ConvSpec.of(conv)
        return Convolved(spec, run.banding.share.halo(Whole(sample), spec.rows))
    return Whole(conv(sample))


def _remade(first: Rows, chain: list[Block], run: _Run, shape: torch.Size) -> Remade:
    """A top-level skip made again when read: the resnets `chain` on conv_in's output, as the down path ran them."""

    def make() -> torch.Tensor:
        hidden = first
        for resnet in chain:
            hidden = Whole(run.resnet(resnet, hidden))
        return hidden.rows(0, shape[2])

    batch, channels, height, width = shape
    return Remade((batch, channels, height, width), make)


def _up(unet: Block, hidden: Rows, run: _Run, skips: SkipStore, upsample_sizes: bool) -> Rows:
    """The up path: hidden state and skip side by side; an upsampler feeding a banded level made per band."""
    for index, block in enumerate(unet.up_blocks):
        for resnet, attention in _pairs(block):
            out = run.resnet(resnet, Concat([hidden, skips.pop()]))
            if attention is not None:
                out = run.transformer(attention, out)
            hidden = Whole(out)
        last = index == len(unet.up_blocks) - 1
        size = skips.peek_shape()[-2:] if not last and upsample_sizes else None
        hidden = _upsampled(block, hidden, size, run)
    return hidden


class _Run:
    """One UNet call's banding, time embedding and block arguments: runs each module banded or as diffusers
    does."""

    def __init__(self, banding: Banding, emb: torch.Tensor, block_kwargs: dict[str, Any]) -> None:
        self.banding, self.emb, self.block_kwargs = banding, emb, block_kwargs

    def banded(self, shape: tuple[int, ...], channels: int, itemsize: int) -> bool:
        return self.banding.banded(shape, channels, itemsize)

    def resnet(self, resnet: Block, x: Rows) -> torch.Tensor:
        itemsize = resnet.conv1.weight.element_size()
        wide = max(x.shape[1], int(resnet.conv2.out_channels))
        if bandable_resnet(resnet) and self.banded(x.shape, wide, itemsize):
            return resnet_forward(resnet, x, self.emb, self.banding)
        out: torch.Tensor = resnet(x.rows(0, x.shape[2]), self.emb)
        return out

    def transformer(self, module: Block, x: torch.Tensor) -> torch.Tensor:
        if bandable_transformer(module) and self.banded(x.shape, x.shape[1], x.element_size()):
            return transformer_forward(module, x, self.banding, **self.block_kwargs)
        out: torch.Tensor = module(x, **self.block_kwargs, return_dict=False)[0]
        return out


def _pairs(block: Block) -> list[tuple[Block, Block | None]]:
    """A block's (resnet, transformer or None) pairs, in order."""
    attentions = list(getattr(block, "attentions", None) or [])
    return [(r, attentions[i] if attentions else None) for i, r in enumerate(block.resnets)]


def _mid(mid: Block, sample: torch.Tensor, run: _Run) -> torch.Tensor:
    """The mid-block: diffusers' cross-attention one module by module (each banded where it can be), another
    whole."""
    if type(mid).__name__ != "UNetMidBlock2DCrossAttn":
        out: torch.Tensor = mid(sample, run.emb)
        return out
    sample = run.resnet(mid.resnets[0], Whole(sample))
    for attention, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        sample = run.resnet(resnet, Whole(run.transformer(attention, sample)))
    return sample


def _upsampled(block: Block, hidden: Rows, size: tuple[int, int] | None, run: _Run) -> Rows:
    """A block's upsampler on its output: per band inside the next level's first resnet when that level is banded
    and the upsampler is diffusers' plain nearest + conv, else whole."""
    upsamplers = list(getattr(block, "upsamplers", None) or [])
    if not upsamplers:
        return hidden
    low = hidden.rows(0, hidden.shape[2])
    (upsampler,) = upsamplers
    height, width = size if size is not None else (2 * low.shape[-2], 2 * low.shape[-1])
    shape = (low.shape[0], low.shape[1], height, width)
    if _plain_upsampler(upsampler) and run.banded(shape, 3 * low.shape[1], low.element_size()):
        conv = ConvSpec.of(upsampler.conv)
        return Upsampled(conv, run.banding.share.halo(Nearest(low, height, width), conv.rows))
    return Whole(upsampler(low, size))


def _plain_upsampler(module: Block) -> bool:
    return (
        type(module).__name__ == "Upsample2D"
        and module.use_conv
        and not module.use_conv_transpose
        and module.interpolate
        and module.norm is None
        and module.name == "conv"
        and plain_conv(module.conv)
    )


def _out(unet: Block, hidden: Rows, run: _Run) -> torch.Tensor:
    """conv_out(act(norm_out(x))): per band on a banded level (the norm's statistics streamed first)."""
    norm, conv = unet.conv_norm_out, unet.conv_out
    batch, channels, height, width = hidden.shape
    itemsize = conv.weight.element_size()
    if norm is None or not run.banded(hidden.shape, channels, itemsize):
        x = hidden.rows(0, height)
        if norm is not None:
            x = unet.conv_act(norm(x))
        out: torch.Tensor = conv(x)
        return out
    bands = run.banding.bands(hidden.shape, channels, itemsize)
    stats = group_moments(run.banding, hidden, norm.num_groups, bands)
    spec = ConvSpec.of(conv)
    source = run.banding.share.halo(hidden, spec.rows)
    result = None
    for a, b in run.banding.each(bands):
        first, end, top, bottom = clip(*spec.rows.needs(a, b), source.extent)
        x = unet.conv_act(normalize_groups(norm, *stats, source.rows(first, end)))
        band = spec.run(padded(x, top, bottom), 0)
        if result is None:
            result = band.new_empty((batch, band.shape[1], height, width))
        result[:, :, a:b] = band
    assert result is not None
    return result


def _embedding(
    unet: Block,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    timestep_cond: torch.Tensor | None,
    class_labels: torch.Tensor | None,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """The time embedding with the class and added embeddings, as diffusers' forward makes it."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def _refuse(
    unet: Block,
    attention_mask: torch.Tensor | None,
    encoder_attention_mask: torch.Tensor | None,
    intrablock: tuple[torch.Tensor, ...] | None,
    cross_attention_kwargs: dict[str, Any] | None,
) -> None:
    """What the banded forward does not reproduce, named (see the module docstring)."""
    what = None
    if attention_mask is not None or encoder_attention_mask is not None:
        what = "attention masks"
    elif intrablock is not None:
        what = "a T2I-Adapter's intrablock residuals"
    elif cross_attention_kwargs and "gligen" in cross_attention_kwargs:
        what = "GLIGEN"
    elif unet.config.addition_embed_type == "image_hint":
        what = "image-hint embeddings"
    elif any(getattr(b, key, None) is not None for b in unet.up_blocks for key in FREEU_ATTRIBUTES):
        what = "FreeU"
    if what is not None:
        raise UsageError(f"the banded UNet forward does not run {what}; use a memory setting without bands")
