"""Performer's FAVOR+ attention (Choromanski et al. 2021, "Rethinking Attention with Performers").

Softmax attention is estimated with positive orthogonal random features: with q, k scaled by
d^-1/4 each (so q.k carries the 1/sqrt(d) of softmax), phi(x) = exp(w x - |x|^2 / 2) / sqrt(m) for m
rows w of a fixed random projection, and

    out = D^-1 (phi(Q) (phi(K)^T V)),   D = phi(Q) (phi(K)^T 1),

linear in the number of tokens N: no N x N matrix is formed. The projection is m rows drawn as
blocks of d orthogonal rows (QR of Gaussian d x d blocks), each row rescaled by the norm of a
Gaussian d-vector (chi-distributed), fixed at construction from ``seed`` and kept as a buffer (it
is in the state_dict). Numerical stabiliser, as in the Performer reference: the exponent's maximum is
subtracted before exp, per query row for queries and over all keys and features (per batch and
head) for keys; both shifts are constant factors that cancel in D^-1. (Here the maximum is taken of
the whole exponent w x - |x|^2/2, so the largest feature of each query row, and of the keys, is
exactly exp(0): the denominator cannot underflow to zero.)

Cost (2 FLOPs per MAC, N = H*W tokens, C = dim, h heads, m features), matmul-type only:
qkv 6NC^2 + proj 2NC^2 + feature projections of Q and K 4NCm + phi(K)^T V 2NCm + phi(Q)(phi(K)^T V)
2NCm + normaliser phi(Q)(phi(K)^T 1) 2Nhm (the key sum phi(K)^T 1 is a sum, not counted).
"""

from __future__ import annotations

import math

import torch
from ..registry import register
from ._common import linear_flops
from .mha import _GlobalMHA


def default_nb_features(head_dim: int) -> int:
    """The paper's default number of random features, d ln d (rounded, at least 1)."""
    return max(1, round(head_dim * math.log(head_dim)))


def orthogonal_random_features(nb_features: int, head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(m, d) float64 on the CPU: blocks of d orthogonal rows (QR of Gaussian blocks, signs fixed so
    that each block is uniformly distributed (Haar), the last block truncated), each row scaled by the norm of an independent Gaussian d-vector (chi with d d.o.f.)."""
    blocks, left = [], nb_features
    while left > 0:
        g = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64, device="cpu")
        q, r = torch.linalg.qr(g)
        q = q * torch.where(r.diagonal() < 0, -1.0, 1.0)  # R's diagonal made positive: Q is Haar-distributed
        blocks.append(q.T[:min(left, head_dim)])  # rows orthonormal
        left -= head_dim
    norms = torch.randn(nb_features, head_dim, generator=generator, dtype=torch.float64, device="cpu").norm(dim=1)
    return norms[:, None] * torch.cat(blocks, dim=0)


@register("performer.favor", algorithm="performer")
class PerformerFavor(_GlobalMHA):
    """Performer FAVOR+: softmax attention estimated with positive orthogonal random features, linear in N."""

    default_text = {"nb_features": "head_dim * ln(head_dim)"}

    def __init__(self, dim: int, heads: int, nb_features: int = -1, qkv_bias: bool = True, seed: int = 0):
        super().__init__(dim, heads, qkv_bias)  # qkv, proj and the forward pass of global attention
        if isinstance(nb_features, bool) or not isinstance(nb_features, int):
            raise ValueError(f"nb_features must be an integer, got {nb_features!r}")
        if nb_features == 0 or nb_features < -1:
            raise ValueError(f"nb_features must be positive, or -1 for head_dim * ln(head_dim); got {nb_features}")
        self.nb_features = default_nb_features(self.head_dim) if nb_features == -1 else nb_features
        self.seed = seed
        # Drawn on the CPU whatever the default device (a meta build gets the same shape, no values).
        w = orthogonal_random_features(self.nb_features, self.head_dim, torch.Generator().manual_seed(seed))
        self.register_buffer("projection", w.to(device=self.qkv.weight.device, dtype=self.qkv.weight.dtype))

    def features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """phi(x) of x (B, h, N, d), already scaled by d^-1/4: (B, h, N, m), up to a factor per query
        row (queries) or per batch and head (keys), which cancels in the normalisation."""
        wx = torch.matmul(x, self.projection.transpose(0, 1))  # (B, h, N, m)
        exponent = wx - 0.5 * (x * x).sum(dim=-1, keepdim=True)
        dims = (-1,) if is_query else (-2, -1)
        shift = exponent.detach().amax(dim=dims, keepdim=True)
        return torch.exp(exponent - shift) * self.nb_features ** -0.5

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = self.head_dim ** -0.25
        phi_q = self.features(q * scale, is_query=True)  # (B, h, N, m)
        phi_k = self.features(k * scale, is_query=False)
        kv = torch.matmul(phi_k.transpose(-2, -1), v)  # (B, h, m, d)
        k_sum = phi_k.sum(dim=-2).unsqueeze(-1)  # (B, h, m, 1): phi(K)^T 1
        denom = torch.matmul(phi_q, k_sum)  # (B, h, N, 1)
        return torch.matmul(phi_q, kv) / denom

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        n, c, m = height * width, self.dim, self.nb_features
        linears = linear_flops(n, c, 3 * c) + linear_flops(n, c, c)
        features = 2 * (2 * n * c * m)  # Q and K: (N x d)(d x m) per head
        products = 2 * n * c * m + 2 * n * c * m  # phi(K)^T V and phi(Q)(phi(K)^T V)
        normaliser = 2 * n * self.heads * m  # phi(Q)(phi(K)^T 1)
        return batch * (linears + features + products + normaliser)
