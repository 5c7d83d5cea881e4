"""What a trace on the meta device cannot see of a CUDA GPU, modelled in one place (docs/memory.md has the sources
and the fit):

- Fused attention. On meta, `F.scaled_dot_product_attention` takes the math path and materialises the attention
  matrix; on a GPU, PyTorch picks a fused kernel that keeps only the output and a log-sum-exp: FlashAttention
  without a mask (output + fp32 log-sum-exp per query and head), the memory-efficient kernel with one.
  `fused_attention()` makes the simulation call those kernels' own meta implementations.
- The caching allocator: every block is a multiple of 512 bytes (`block_bytes`); what it reserves besides
  (segments of 2 MiB and more, fragmentation) and the cuBLAS/cuDNN workspaces are one factor on the traced peak,
  `ALLOCATOR_FACTOR`, fitted to this project's measured H200 peaks.
- Data-dependent branches (NaN and overflow checks) take the no-overflow path: engine/simulate/host.py.

Cards: each one's dense fp16 tensor-core peak (fp32 accumulate, no sparsity) as its maker publishes it, for the
time floor FLOP / peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...base.errors import UsageError

BLOCK_BYTES = 512  # the caching allocator's block granularity
# Traced live-tensor peak -> what the card must hold (reserved segments, fragmentation, library workspaces):
# fitted to the SD-1.5 UNet step peaks measured on an H200 (docs/memory.md); within 7% of every one of them.
ALLOCATOR_FACTOR = 1.07


def block_bytes(size: int) -> int:
    """The bytes the caching allocator hands out for a request of `size`."""
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES


def device_bytes(traced_peak: int) -> int:
    """A traced peak as the memory a card needs for it."""
    return int(traced_peak * ALLOCATOR_FACTOR)


@dataclass(frozen=True)
class Card:
    name: str
    label: str
    tflops_fp16: float  # dense fp16 tensor-core peak with fp32 accumulation, TFLOPS
    memory_gib: float


CARDS: dict[str, Card] = {
    card.name: card
    for card in (
        Card("h200", "NVIDIA H200 SXM", 989.4, 141),
        Card("h100", "NVIDIA H100 SXM", 989.4, 80),
        Card("a100", "NVIDIA A100 SXM", 312.0, 80),
        Card("l40s", "NVIDIA L40S", 362.05, 48),
        Card("4090", "NVIDIA GeForce RTX 4090", 165.2, 24),
        Card("3090", "NVIDIA GeForce RTX 3090", 71.0, 24),
    )
}


def card(value: str) -> Card:
    """A card by name (`h200`, `4090`...) or a peak in TFLOPS (`250`)."""
    key = value.strip().lower().replace("rtx", "").replace("nvidia", "").strip()
    if key in CARDS:
        return CARDS[key]
    try:
        tflops = float(key)
    except ValueError:
        raise UsageError(
            f"--gpu {value!r}: give one of {', '.join(CARDS)} or a dense fp16 peak in TFLOPS (e.g. 250)"
        ) from None
    if tflops <= 0:
        raise UsageError(f"--gpu {value!r}: a peak must be positive TFLOPS")
    return Card(f"{tflops:g}", f"a card of {tflops:g} TFLOPS", tflops, 0)


PLAIN_SDPA = F.scaled_dot_product_attention


def _fused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    **_: Any,
) -> torch.Tensor:
    """What CUDA's fused kernels allocate and compute for F.scaled_dot_product_attention (see the docstring);
    tensors that are not on the meta device (a real run traced for comparison) take the usual path."""
    if query.device.type != "meta":
        return PLAIN_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    if attn_mask is None:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )
    else:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale
        )
    return out[0]


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """F.scaled_dot_product_attention as CUDA's fused kernels run it, for the block (restored after)."""
    F.scaled_dot_product_attention = _fused_sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = PLAIN_SDPA
