"""The IP-Adapter's cross-attention processor: diffusers' IPAdapterAttnProcessor2_0, run over chunks of query
tokens at high resolution.

Cross-attention rows are independent (every query token attends to the same 77 text and few image tokens), so
splitting the queries changes nothing but the size of the temporaries: the text attention output, the image
attention output and their scaled sum are each (batch, tokens, channels). At 16K the top level has 4.2M tokens,
and unchunked those three would add several GiB on top of the layer's input.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from .kind import IP_TOKEN_CHUNK  # below about 8K px every layer runs in one call, as diffusers'


class ChunkedIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """IPAdapterAttnProcessor2_0 over chunks of at most IP_TOKEN_CHUNK query tokens (one call below that)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens = hidden_states.shape[1]
        if hidden_states.ndim != 3 or tokens <= IP_TOKEN_CHUNK or ip_adapter_masks is not None:
            return super().__call__(  # type: ignore[no-any-return]
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale, ip_adapter_masks
            )
        out: torch.Tensor | None = None  # (B, N, C), filled chunk by chunk
        for start in range(0, tokens, IP_TOKEN_CHUNK):
            end = min(start + IP_TOKEN_CHUNK, tokens)
            part = super().__call__(
                attn, hidden_states[:, start:end], encoder_hidden_states, attention_mask, temb, scale
            )
            if out is None:
                out = part.new_empty((part.shape[0], tokens, part.shape[2]))
            out[:, start:end] = part
            del part
        assert out is not None
        return out
