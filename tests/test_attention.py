"""The LinFusion layer computes docs/reference.md section 1 exactly, at any N, in any precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linfusion_cli.linfusion.attention import LinFusionAttention


def reference_attention(module: LinFusionAttention, x: torch.Tensor) -> torch.Tensor:
    """Written from the formula, independently: a loop over heads, plain sums, float64."""
    x = x.double()
    w = {k: v.double() for k, v in module.state_dict().items()}

    def mlp(prefix: str, t: torch.Tensor) -> torch.Tensor:
        h = t @ w[f"{prefix}.0.weight"].T + w[f"{prefix}.0.bias"]
        h = F.layer_norm(h, (h.shape[-1],), w[f"{prefix}.1.weight"], w[f"{prefix}.1.bias"], eps=1e-5)
        h = F.leaky_relu(h, 0.01)
        return h @ w[f"{prefix}.3.weight"].T + w[f"{prefix}.3.bias"]

    q = (x + mlp("to_q_", x)) @ w["to_q.weight"].T
    k = (x + mlp("to_k_", x)) @ w["to_k.weight"].T
    v = x @ w["to_v.weight"].T
    batch, n, c = x.shape
    d = c // module.heads
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(module.heads):
            sl = slice(h * d, (h + 1) * d)
            pq, pk, vv = F.elu(q[b, :, sl]) + 1, F.elu(k[b, :, sl]) + 1, v[b, :, sl]
            kv = sum(pk[j][:, None] * vv[j][None, :] for j in range(n)) / n  # (d, d)
            k_mean = pk.sum(0) / n
            out[b, :, sl] = (pq @ kv) / (pq @ k_mean + 1e-4)[:, None]
    return out @ w["to_out.0.weight"].T + w["to_out.0.bias"]


def make_layer(dim: int = 32, heads: int = 4, mid: int | None = None, seed: int = 0) -> LinFusionAttention:
    torch.manual_seed(seed)
    layer = LinFusionAttention(dim, heads, mid).eval()
    with torch.no_grad():
        for p in layer.parameters():  # non-trivial values everywhere, biases and norms included
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5))
    return layer


@pytest.mark.parametrize("mid", [None, 8])
def test_matches_independent_reference(mid: int | None) -> None:
    layer = make_layer(mid=mid)
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        ours = layer(x).double()
    ref = reference_attention(layer, x)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_chunked_equals_whole() -> None:
    layer = make_layer()
    x = torch.randn(2, 1000, 32)
    with torch.no_grad():
        whole = layer(x)
        layer.token_chunk = 96  # does not divide 1000: the remainder chunk is exercised too
        chunked = layer(x)
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-6)


def test_repeating_feature_map_leaves_every_token_unchanged() -> None:
    """Normalized attention: a 2x2 repetition of the map (every token 4 times) changes nothing."""
    layer = make_layer()
    fmap = torch.randn(1, 32, 6, 5)  # (B, C, h, w)
    tokens = fmap.flatten(2).transpose(1, 2)
    big = fmap.repeat(1, 1, 2, 2)  # (B, C, 2h, 2w)
    big_tokens = big.flatten(2).transpose(1, 2)
    with torch.no_grad():
        small_out = layer(tokens).transpose(1, 2).unflatten(2, (6, 5))
        big_out = layer(big_tokens).transpose(1, 2).unflatten(2, (12, 10))
    assert torch.allclose(big_out, small_out.repeat(1, 1, 2, 2), rtol=1e-5, atol=1e-5)


def test_permuting_tokens_permutes_outputs() -> None:
    layer = make_layer()
    x = torch.randn(2, 50, 32)
    perm = torch.randperm(50)
    with torch.no_grad():
        assert torch.allclose(layer(x)[:, perm], layer(x[:, perm]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close_at_large_n(dtype: torch.dtype) -> None:
    """N = 262,144 with large activations: an unscaled fp16 sum over N would overflow (max 65504)."""
    torch.manual_seed(0)
    layer = LinFusionAttention(16, 2).eval()
    n = 262_144
    x = torch.randn(1, n, 16) * 4 + 3  # phi(k) ~ 3..7 per element; sum_j phi(k_j) v_j ~ 1e6 >> 65504
    with torch.no_grad():
        ref = layer(x)
        # the unscaled sum really would overflow fp16: this is the path being tested
        phi_k = F.elu(layer.to_k(x + layer.to_k_(x))) + 1
        assert (phi_k.sum(1).abs().max() > 65504).item()
        half = layer.to(dtype)(x.to(dtype)).float()
    assert torch.isfinite(half).all()
    rel = (half - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


def test_no_quadratic_memory() -> None:
    """At N = 65,536 an N x N fp32 matrix would be 16 GiB; the layer must not build one."""
    layer = make_layer(dim=16, heads=2)
    x = torch.randn(1, 65_536, 16)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_refuses_cross_attention_inputs() -> None:
    layer = make_layer()
    with pytest.raises(ValueError, match="self-attention only"):
        layer(torch.randn(1, 4, 32), encoder_hidden_states=torch.randn(1, 3, 32))
