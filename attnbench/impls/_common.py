"""Helpers shared by the attention families.

Shapes: q (B, h, Nq, d), k (B, h, Nk, d), v (B, h, Nk, d) -> (B, h, Nq, d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_heads(dim: int, heads: int) -> int:
    """Return the head dimension; raise ValueError when ``heads`` does not divide ``dim``."""
    if heads < 1 or dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    return dim // heads


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``F.scaled_dot_product_attention``; ``bias`` (broadcast to (B, h, Nq, Nk)) is added to the logits."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d) + bias) v, materialising the (B, h, Nq, Nk) logits."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v


def attention_flops(batch: int, n_q: int, n_k: int, dim: int) -> int:
    """FLOPs of q k^T and attn v summed over heads (2 per MAC): 4 * B * Nq * Nk * C."""
    return 4 * batch * n_q * n_k * dim


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """FLOPs of a linear layer on ``tokens`` rows, bias not counted (2 per MAC)."""
    return 2 * tokens * d_in * d_out
