"""What one split UNet pass communicates, from the config alone: no weights, no forward.

Walks diffusers' UNet2DConditionModel layout (conv_in; per down block resnets, transformers, a stride-2
downsampler; the cross-attention mid block; per up block one resnet more, transformers, a nearest-2x upsampler
and its conv; conv_norm_out, conv_out) and prices every op that mixes rows with the same halo arithmetic the
split forward uses (`bands.halo_transfers`). For a paper model of SD-1.5/SDXL at 16384^2 on N GPUs; validated
against the counted forward of the tiny models (tests/test_parallel_unet.py).

Accounting is the Comm's: point-to-point halo rows once per side, GroupNorm as an all-gather of fp64
(count, mean, M2) per sample and group, LinFusion attention as an all-reduce of fp32 K^T V and sum phi(k).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ...base.errors import UsageError
from ..bands import Bands, ConvRows, downsampling, halo_transfers

STATS_BYTES = 8  # GroupNorm statistics travel as fp64
SUMMARY_BYTES = 4  # LinFusion's K^T V and sum phi(k) travel as fp32
MOMENTS = 3  # count, mean, M2
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has transformers
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


@dataclass(frozen=True)
class Op:
    """One op of the pass that mixes rows: a conv (its input channels), a GroupNorm, or a LinFusion attn1."""

    kind: str  # "conv", "norm", "attention"
    level: int  # 0 = the latent's resolution, each level half the rows
    channels: int
    kernel: int = 1
    stride: int = 1
    groups: int = 0  # GroupNorm groups, or attention heads


@dataclass
class CommPlan:
    """Counts of ops a pass runs, and bytes each rank sends/receives per kind (conv, norm, attention)."""

    ops: Counter[str] = field(default_factory=Counter)
    halo_convs: int = 0  # convs that exchange rows (kernel > 1)
    sent: list[Counter[str]] = field(default_factory=list)
    received: list[Counter[str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops),
            "halo_convs": self.halo_convs,
            "sent": [dict(c) for c in self.sent],
            "received": [dict(c) for c in self.received],
        }


def unet_ops(config: Mapping[str, Any]) -> Iterator[Op]:
    """Every conv, GroupNorm and attn1 of one UNet pass, in forward order, from a UNet2DConditionModel config."""
    layout = _Layout(config)
    yield Op("conv", 0, int(config.get("in_channels", 4)), kernel=int(config.get("conv_in_kernel", 3)))
    yield from layout.down()
    yield from layout.mid(config.get("mid_block_type", "UNetMidBlock2DCrossAttn"))
    yield from layout.up()
    if config.get("norm_num_groups", 32) is not None:
        yield Op("norm", 0, layout.channels[0], groups=layout.groups)
    yield Op("conv", 0, layout.channels[0], kernel=int(config.get("conv_out_kernel", 3)))


class _Layout:
    """The blocks of a UNet2DConditionModel, as diffusers builds them from its config."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.channels = list(config["block_out_channels"])
        self.levels = len(self.channels)
        if self.levels != len(config["up_block_types"]):
            raise UsageError("the UNet config has different numbers of down and up blocks")
        self.groups = int(config.get("norm_num_groups") or 32)
        self.linear = bool(config.get("use_linear_projection", False))
        self.per_block = _per_level(config.get("layers_per_block", 2), self.levels)
        self.depth = _per_level(config.get("transformer_layers_per_block", 1), self.levels)
        self.up_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(self.depth))
        # diffusers' naming quirk: without num_attention_heads, `attention_head_dim` is the number of heads
        heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
        self.heads = _per_level(heads, self.levels)

    def resnet(self, level: int, c_in: int, c_out: int) -> Iterator[Op]:
        yield Op("norm", level, c_in, groups=self.groups)
        yield Op("conv", level, c_in, kernel=3)
        yield Op("norm", level, c_out, groups=self.groups)
        yield Op("conv", level, c_out, kernel=3)
        if c_in != c_out:
            yield Op("conv", level, c_in)  # conv_shortcut, 1x1

    def transformer(self, level: int, width: int, layers: int) -> Iterator[Op]:
        yield Op("norm", level, width, groups=self.groups)
        if not self.linear:
            yield Op("conv", level, width)  # proj_in, 1x1
        for _ in range(layers):
            yield Op("attention", level, width, groups=int(self.heads[level]))
        if not self.linear:
            yield Op("conv", level, width)  # proj_out, 1x1

    def down(self) -> Iterator[Op]:
        c_out = self.channels[0]
        for i, block in enumerate(self.config["down_block_types"]):
            attends = _block_kind(DOWN_BLOCKS, block)
            c_in, c_out = c_out, self.channels[i]
            for j in range(self.per_block[i]):
                yield from self.resnet(i, c_in if j == 0 else c_out, c_out)
                if attends:
                    yield from self.transformer(i, c_out, _layers(self.depth[i], j))
            if i < self.levels - 1:
                yield Op("conv", i, c_out, kernel=3, stride=2)  # the downsampler

    def mid(self, kind: str | None) -> Iterator[Op]:
        if kind is None:
            return
        if kind != "UNetMidBlock2DCrossAttn":
            raise UsageError(f"no communication model for a {kind} mid block")
        level, width = self.levels - 1, self.channels[-1]
        yield from self.resnet(level, width, width)
        yield from self.transformer(level, width, _layers(self.depth[-1], 0))
        yield from self.resnet(level, width, width)

    def up(self) -> Iterator[Op]:
        per_block, channels = list(reversed(self.per_block)), list(reversed(self.channels))
        c_out = channels[0]
        for i, block in enumerate(self.config["up_block_types"]):
            attends = _block_kind(UP_BLOCKS, block)
            level = self.levels - 1 - i
            prev, c_out = c_out, channels[i]
            layers = per_block[i] + 1
            for j in range(layers):  # each resnet takes a skip: the last one the next block's width
                skip = channels[min(i + 1, self.levels - 1)] if j == layers - 1 else c_out
                yield from self.resnet(level, (prev if j == 0 else c_out) + skip, c_out)
                if attends:
                    yield from self.transformer(level, c_out, _layers(self.up_depth[i], j))
            if i < self.levels - 1:
                yield Op("conv", level - 1, c_out, kernel=3)  # the upsampler's conv, after nearest 2x


def unet_comm_plan(
    config: Mapping[str, Any],
    latent_height: int,
    latent_width: int,
    world: int = 2,
    *,
    batch: int = 2,
    dtype_bytes: int = 2,
    dilation: int = 1,
    bands: Bands | None = None,
) -> CommPlan:
    """Ops and bytes of one UNet pass split over `world` processes.

    batch: 2 with classifier-free guidance in one call; dtype_bytes: the activations' (2 for fp16, 4 for fp32);
    dilation: a refine method's dilated pass (every conv's dilation and padding times r); bands: the split, by
    default `Bands.split` on the UNet's total downsampling."""
    bands = bands or Bands.split(latent_height, world, downsampling(config["block_out_channels"]))
    plan = CommPlan(sent=[Counter() for _ in range(world)], received=[Counter() for _ in range(world)])
    for op in unet_ops(config):
        plan.ops[op.kind] += 1
        if op.kind == "conv":
            edges = bands.at(Fraction(1, 2**op.level))
            rows = ConvRows(op.kernel, op.stride, dilation, dilation * (op.kernel // 2), dilation * (op.kernel // 2))
            row_bytes = batch * op.channels * _width(latent_width, op.level) * dtype_bytes
            transfers = halo_transfers(rows, edges)
            plan.halo_convs += bool(transfers)
            for t in transfers:
                plan.sent[t.src]["conv"] += (t.end - t.start) * row_bytes
                plan.received[t.dst]["conv"] += (t.end - t.start) * row_bytes
        elif world > 1:
            size = _message_bytes(op, batch)
            for rank in range(world):
                plan.sent[rank][op.kind] += size
                plan.received[rank][op.kind] += size * (world - 1 if op.kind == "norm" else 1)
    return plan


def _message_bytes(op: Op, batch: int) -> int:
    if op.kind == "norm":
        return MOMENTS * batch * op.groups * STATS_BYTES
    return (batch * op.channels * op.channels // op.groups + batch * op.channels) * SUMMARY_BYTES  # diagonal blocks


def _width(latent_width: int, level: int) -> int:
    for _ in range(level):
        latent_width = -(-latent_width // 2)  # a stride-2 conv with padding 1 rounds up
    return latent_width


def _per_level(value: int | Sequence[Any], levels: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _layers(depth: Any, resnet_index: int) -> int:
    return int(depth[resnet_index]) if isinstance(depth, (list, tuple)) else int(depth)


def _block_kind(table: Mapping[str, bool], block: str) -> bool:
    if block not in table:
        raise UsageError(f"no communication model for a {block} block (known: {', '.join(table)})")
    return table[block]
