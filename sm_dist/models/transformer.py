"""Decoder-only transformers on token sequences: embedding + positions, pre-LayerNorm blocks of
causal self-attention and an MLP, a final LayerNorm and a linear head; each part a layer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sm_dist.models.build import ACTIVATIONS


class Embedding(nn.Module):
    """Token embedding plus learned positions: (n, T) int64 tokens -> (n, T, width)."""

    def __init__(self, vocab: int, context: int, width: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        # Smaller than the tokens' N(0, 1), so that at the start a position shifts a token's
        # vector without drowning it.
        self.positions = nn.Parameter(0.1 * torch.randn(context, width))

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"sequences of {length} tokens exceed the model's context of "
                             f"{self.positions.shape[0]} positions")
        return self.tokens(x) + self.positions[:length]


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ/√d + causal mask) v over (n, heads, T, d), written out in plain ops.

    Not F.scaled_dot_product_attention: its fused kernels (flash and memory-efficient on GPUs,
    and the flash kernel it picks on CPUs even in float64) have no double backward
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"), and SM's Hessian-vector products differentiate the backward once more.
    """
    length = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


class Block(nn.Module):
    """A pre-LayerNorm decoder block: x + attention(LN(x)), then + MLP(LN(x)), per sample."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, activation: str) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"the width {width} must be a multiple of the {heads} heads")
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), ACTIVATIONS[activation](),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor) -> Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = causal_attention(q, k, v).transpose(1, 2).reshape(n, length, width)
        x = x + self.proj(attended)
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """The final LayerNorm and the linear map to one logit per vocabulary entry and position."""

    def __init__(self, width: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.ln(x))


def build_transformer(*, vocab: int, context: int, width: int, blocks: int, heads: int,
                      mlp_ratio: int = 4, activation: str = "gelu") -> nn.Sequential:
    """Embedding, `blocks` decoder blocks, Head: blocks + 2 top-level children (layers)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of "
                         f"{', '.join(ACTIVATIONS)}")
    return nn.Sequential(Embedding(vocab, context, width),
                         *(Block(width, heads, mlp_ratio, activation) for _ in range(blocks)),
                         Head(width, vocab))
