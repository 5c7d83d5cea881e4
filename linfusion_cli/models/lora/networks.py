"""What one module of a LoRA-family file changes, as the LyCORIS library defines each kind (lycoris-lora 3.x,
github.com/KohakuBlueleaf/LyCORIS: `lycoris/functional/{locon,loha,lokr,general}.py`, `lycoris/modules/full.py`;
docs/lora-formats.md has the formulas and key names). Each kind gives the change to a module's weight in fp32,
in the weight's own shape, for a multiplier (the `:SCALE` of `--lora`):

- LoRA / LoCon: dW = up @ down x alpha/rank (a Tucker conv: `lora_mid` between them).
- LoHa: dW = (w1a @ w1b) * (w2a @ w2b) x alpha/rank (Tucker: each factor rebuilt through `hada_t1/t2`).
- LoKr: dW = kron(w1, w2) x alpha/rank, each factor whole or a product (w1a @ w1b, w2a @ w2b, or Tucker through
  `lokr_t2`); rank is the inner size of a decomposed factor, and with neither decomposed the scale is 1.
- Full: dW = diff (and the bias by diff_b).
- DoRA (`dora_scale` beside any of them): the changed weight W + dW is rescaled column by column (per input
  channel) to the trained magnitudes, and the multiplier interpolates: W' = W + m (dora_scale (W + dW) / |W + dW|
  - W), as LyCORIS' `apply_dora_scale` and A1111 merge it.

The multiplier scales dW (LyCORIS' `multiplier`), alpha missing or 0 counts as the rank (scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

Tensor = torch.Tensor


class Network(Protocol):
    kind: str

    def delta(self, weight: Tensor, multiplier: float) -> Tensor:
        """The change to `weight` (fp32) at `multiplier`, in the weight's shape."""

    def bias_delta(self, multiplier: float) -> Tensor | None:
        """The change to the module's bias, if the file has one."""


def _scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank, the LyCORIS way: no alpha (or 0) means alpha = rank; no rank (nothing decomposed) means 1."""
    if rank is None or not alpha:
        return 1.0
    return alpha / rank


def _shaped(delta: Tensor, weight: Tensor) -> Tensor:
    """`delta` (a conv's flattened (out, in*kh*kw) included) in the weight's shape."""
    return delta.reshape(weight.shape) if delta.numel() == weight.numel() else delta


def _tucker(core: Tensor, out_factor: Tensor, in_factor: Tensor) -> Tensor:
    """A Tucker conv factor rebuilt: core (r1, r2, kh, kw) with out_factor (r1, out) and in_factor (r2, in) ->
    (out, in, kh, kw)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, out_factor, in_factor)


@dataclass
class LowRank:
    """LoRA and LoCon: `lora_down` (r, in[, kh, kw]), `lora_up` (out, r[, 1, 1]), `lora_mid` (r, r, kh, kw)."""

    down: Tensor
    up: Tensor
    alpha: float | None = None
    mid: Tensor | None = None
    kind: str = "LoRA"

    def delta(self, weight: Tensor, multiplier: float) -> Tensor:
        rank = self.down.shape[0]
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)  # (r, in*k), (out, r)
        if self.mid is not None:  # up (out, r) . mid (r, r, kh, kw) . down (r, in)
            merged = torch.einsum("m n ..., i m, n j -> i j ...", self.mid.float(), up, down)
        else:
            merged = up @ down
        return _shaped(merged * (multiplier * _scale(self.alpha, rank)), weight)

    def bias_delta(self, multiplier: float) -> Tensor | None:
        return None


@dataclass
class Hadamard:
    """LoHa: `hada_w1_a` (out, r), `hada_w1_b` (r, in*k) and the same for w2; with Tucker `hada_t1/t2` (r, r, k,
    k) and w*_a (r, out), w*_b (r, in)."""

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    alpha: float | None = None
    t1: Tensor | None = None
    t2: Tensor | None = None
    kind: str = "LoHa"

    def delta(self, weight: Tensor, multiplier: float) -> Tensor:
        rank = self.w1b.shape[0]
        if self.t1 is not None and self.t2 is not None:
            first = _tucker(self.t1.float(), self.w1a.float(), self.w1b.float())
            second = _tucker(self.t2.float(), self.w2a.float(), self.w2b.float())
        else:
            first = self.w1a.float() @ self.w1b.float().flatten(1)
            second = self.w2a.float() @ self.w2b.float().flatten(1)
        return _shaped(first * second * (multiplier * _scale(self.alpha, rank)), weight)

    def bias_delta(self, multiplier: float) -> Tensor | None:
        return None


@dataclass
class Kronecker:
    """LoKr: w1 whole (`lokr_w1`, (a, c)) or `lokr_w1_a` (a, r) @ `lokr_w1_b` (r, c); w2 whole (`lokr_w2`, (b, d[,
    k, k])) or `lokr_w2_a` (b, r) @ `lokr_w2_b` (r, d*k*k), or Tucker (`lokr_t2` (r, r, k, k), w2_a (r, b), w2_b
    (r, d)). dW = kron(w1, w2): (a*b, c*d[, k, k])."""

    w1: Tensor | None
    w1a: Tensor | None
    w1b: Tensor | None
    w2: Tensor | None
    w2a: Tensor | None
    w2b: Tensor | None
    t2: Tensor | None = None
    alpha: float | None = None
    kind: str = "LoKr"

    def rank(self) -> int | None:
        if self.w1a is not None:
            return int(self.w1a.shape[1])
        if self.w2a is not None:
            return int(self.w2a.shape[1] if self.t2 is None else self.w2a.shape[0])
        return None

    def delta(self, weight: Tensor, multiplier: float) -> Tensor:
        w1 = self.w1.float() if self.w1 is not None else _product(self.w1a, self.w1b)
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None and self.w2a is not None and self.w2b is not None:
            w2 = _tucker(self.t2.float(), self.w2a.float(), self.w2b.float())
        else:
            w2 = _product(self.w2a, self.w2b)
        if weight.dim() == 4 and w2.dim() == 2:  # a conv's w2 made flat: (b, d*kh*kw) -> (b, d, kh, kw)
            w2 = w2.reshape(w2.shape[0], -1, *weight.shape[2:])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        merged = torch.kron(w1.contiguous(), w2.contiguous())
        return _shaped(merged * (multiplier * _scale(self.alpha, self.rank())), weight)

    def bias_delta(self, multiplier: float) -> Tensor | None:
        return None


def _product(a: Tensor | None, b: Tensor | None) -> Tensor:
    if a is None or b is None:
        raise ValueError("a LoKr factor needs both of its halves")
    return a.float() @ b.float().flatten(1)


@dataclass
class FullDiff:
    """LyCORIS' full fine-tune difference: `diff` in the weight's shape, `diff_b` for the bias."""

    diff: Tensor
    diff_b: Tensor | None = None
    kind: str = "full"

    def delta(self, weight: Tensor, multiplier: float) -> Tensor:
        return _shaped(self.diff.float() * multiplier, weight)

    def bias_delta(self, multiplier: float) -> Tensor | None:
        return None if self.diff_b is None else self.diff_b.float() * multiplier


@dataclass
class Decomposed:
    """DoRA: any of the above with `dora_scale` (the trained magnitude per input channel: (1, in[, 1, 1]))."""

    inner: Network
    magnitude: Tensor
    kind: str = ""

    def __post_init__(self) -> None:
        self.kind = f"{self.inner.kind} DoRA"

    def delta(self, weight: Tensor, multiplier: float) -> Tensor:
        changed = weight + self.inner.delta(weight, 1.0)
        columns = changed.transpose(0, 1).reshape(changed.shape[1], -1).norm(dim=1)  # (in,): a norm per input
        norm = columns.reshape(1, -1, *[1] * (weight.dim() - 2))
        rescaled = changed * (self.magnitude.float().reshape(norm.shape) / norm)
        return (rescaled - weight) * multiplier

    def bias_delta(self, multiplier: float) -> Tensor | None:
        return self.inner.bias_delta(multiplier)
