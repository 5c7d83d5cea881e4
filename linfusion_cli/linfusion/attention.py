"""LinFusion's normalized, non-causal linear attention (arXiv 2409.02097), and nothing else.

For tokens x (B, N, C), h heads of width d = C / h:

    q = W_q (x + f_q(x))      k = W_k (x + f_k(x))      v = W_v x
    (f_q, f_k small MLPs; the identity in checkpoints with projection_mid_dim -1, as the official code has it)
    phi(t) = elu(t) + 1
    out_i = phi(q_i) . [mean_j phi(k_j)^T v_j]  /  (phi(q_i) . mean_j phi(k_j) + eps)

Dividing by phi(q) . mean(phi(k)) keeps the output's scale independent of N, which is what lets a model
trained at 512 px run at 16K. Cost is O(N C^2) instead of O(N^2 C).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_ATTN_EPS = 1e-4
LEAKY_RELU_SLOPE = 0.01  # nn.LeakyReLU's default, as in the official checkpoints
# projection_mid_dim -1: the official code's "no feature MLP": f_q and f_k are nn.Identity, so q = W_q (x + x)
# and k = W_k (x + x), and the checkpoint has no to_q_ / to_k_ keys.
NO_FEATURE_MLP = -1


class SummaryReducer(Protocol):
    """Seam for one image run in bands of tokens, over processes (engine.parallel) or one after another
    (engine.banded): the layer is called on some of the image's tokens, and the reducer says how many tokens the
    whole image has and gives the whole image's summaries: this call's own, summed over processes, or summed
    over every band beforehand.
    """

    def whole_tokens(self, tokens: int) -> int:
        """The whole image's token count, given this call's."""
        ...

    def summaries(self, layer: LinFusionAttention, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole image's (B, C, C) K^T V and (B, C) sum of phi(k), fp32, each token's scaled by `scale`
        (`layer.summaries(x, scale)` is this call's part)."""
        ...


def every_chunk(items: Any, work: Sequence[float] | None = None) -> Any:
    """The chunk loop of a real run: every chunk. (A memory simulation runs one and counts the others' work.)"""
    return items


def feature_map_mlp(dim: int, mid_dim: int) -> nn.Sequential:
    """f_q / f_k: Linear(C, m) -> LayerNorm(m) -> LeakyReLU -> Linear(m, C).

    Indices 0, 1, 3 are the official checkpoint's key names (`to_q_.0`, `to_q_.1`, `to_q_.3`).
    """
    return nn.Sequential(
        nn.Linear(dim, mid_dim),
        nn.LayerNorm(mid_dim),
        nn.LeakyReLU(LEAKY_RELU_SLOPE),
        nn.Linear(mid_dim, dim),
    )


def _head_masks(
    channels: int, heads: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal (C, C) mask keeping each head's d x d block, and the (C, h) channel -> head one-hot."""
    head_of = torch.arange(channels, device=device) // (channels // heads)  # (C,)
    block = (head_of[:, None] == head_of[None, :]).to(dtype)  # (C, C)
    onehot = (head_of[:, None] == torch.arange(heads, device=device)[None, :]).to(dtype)  # (C, h)
    return block, onehot


def phi(t: torch.Tensor) -> torch.Tensor:
    """The feature map elu(t) + 1; in place (callers pass tensors they own) unless autograd needs `t`."""
    if t.requires_grad:
        return F.elu(t) + 1.0
    return F.elu(t, inplace=True).add_(1.0)


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t * scale if t.requires_grad else t.mul_(scale)


class LinFusionAttention(nn.Module):
    """Drop-in replacement for a UNet transformer block's `attn1` (self-attention).

    Sub-module names match diffusers' `Attention` (`to_q`, `to_k`, `to_v`, `to_out.0`) so LoRA adapters
    loaded afterwards land on the weights that are really used, plus the official `to_q_` / `to_k_` MLPs.

    `token_chunk` bounds memory at huge N: K^T V is accumulated chunk by chunk (fp32), then queries are
    processed chunk by chunk. Peak extra memory is then O(chunk * C) instead of O(N * C). The math is the
    same either way; `None` means one chunk.

    `reducer` (None: this call's tokens are the whole image) makes the layer one band of a split image.
    """

    reducer: SummaryReducer | None = None
    each: Callable[..., Any] = staticmethod(every_chunk)  # the seam engine/host.Host.each fills in

    def __init__(self, dim: int, heads: int, mid_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim = dim
        self.heads = heads
        if mid_dim is not None and mid_dim != NO_FEATURE_MLP and mid_dim < 1:
            raise ValueError(f"projection_mid_dim {mid_dim}: must be None, {NO_FEATURE_MLP} or a positive width")
        self.mid_dim = mid_dim if mid_dim is not None else dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_q_: nn.Module = nn.Identity() if mid_dim == NO_FEATURE_MLP else feature_map_mlp(dim, self.mid_dim)
        self.to_k_: nn.Module = nn.Identity() if mid_dim == NO_FEATURE_MLP else feature_map_mlp(dim, self.mid_dim)
        self.token_chunk: int | None = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, mid_dim={self.mid_dim}, token_chunk={self.token_chunk}"

    def _keys_values(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        k = _scaled(phi(self.to_k(x + self.to_k_(x))), scale)  # (B, n, C), phi(k) / sqrt(N)
        v = _scaled(self.to_v(x), scale)  # (B, n, C), v / sqrt(N)
        return k, v

    def summaries(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_j phi(k_j)^T v_j (B, C, C) and sum_j phi(k_j) (B, C) over these tokens x (B, n, C), in fp32, with
        phi(k) and v each scaled by `scale` (N^-1/2 of the whole image: K^T V is then its mean)."""
        batch, tokens, channels = x.shape
        kv = x.new_zeros((batch, channels, channels), dtype=torch.float32)  # (B, C, C)
        k_sum = x.new_zeros((batch, channels), dtype=torch.float32)  # (B, C)
        pieces = x.split(self.token_chunk or tokens, dim=1)
        for xs in self.each(pieces, [p.shape[1] for p in pieces]):
            k, v = self._keys_values(xs, scale)
            kv += torch.bmm(k.transpose(1, 2), v).float()  # (B, C, C), every head against every head
            k_sum += k.sum(dim=1, dtype=torch.float32)
            del k, v
        return kv, k_sum

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LinFusionAttention replaces self-attention only: no encoder states or masks")
        x = hidden_states  # (B, N, C)
        tokens, channels = x.shape[1:]
        chunk = self.token_chunk or tokens
        # Scaling phi(k) and v by N^-1/2 each makes K^T V the *mean* over tokens, so no fp16 sum overflows
        # (at 16K the top UNet level has N = 4,194,304 tokens; fp16 tops out at 65504).
        scale = (tokens if self.reducer is None else self.reducer.whole_tokens(tokens)) ** -0.5

        # 1. Summaries over all tokens: kv = mean_j phi(k_j)^T v_j, k_mean = mean_j phi(k_j), in fp32.
        kv, k_sum = self.summaries(x, scale) if self.reducer is None else self.reducer.summaries(self, x, scale)
        k_mean = k_sum * scale  # (B, C)

        # 2. One matrix W = [block-diagonal kv | k_mean per head] so a single GEMM per query chunk gives
        #    numerator (C columns) and denominator (h columns); tokens stay in (B, N, C) layout, no copies.
        block, onehot = _head_masks(channels, self.heads, x.device, torch.float32)
        weights = torch.cat([kv * block, k_mean.unsqueeze(-1) * onehot], dim=-1).to(x.dtype)  # (B, C, C+h)

        if chunk >= tokens:
            return self.to_out[1](self._attend(x, weights))
        out = torch.empty_like(x)  # (B, N, C)
        starts = range(0, tokens, chunk)
        for start in self.each(starts, [min(chunk, tokens - s) for s in starts]):
            out[:, start : start + chunk] = self._attend(x[:, start : start + chunk], weights)
        return self.to_out[1](out)

    def _attend(self, xs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Queries of one chunk against the summaries: to_out(phi(q) kv / (phi(q) . k_mean + eps))."""
        channels = xs.shape[-1]
        q = phi(self.to_q(xs + self.to_q_(xs)))  # (B, n, C)
        r = torch.bmm(q, weights)  # (B, n, C+h)
        del q
        num = r[..., :channels].unflatten(-1, (self.heads, channels // self.heads))  # (B, n, h, d)
        den = r[..., channels:].unsqueeze(-1).add_(LINEAR_ATTN_EPS)  # (B, n, h, 1)
        return self.to_out[0]((num / den).flatten(2))
