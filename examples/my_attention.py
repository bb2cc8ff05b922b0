"""An attention implementation of your own, in one file.

Load it from a suite (``plugins: [examples/my_attention.py]``, relative to the suite file) or with
``attnbench list --plugin examples/my_attention.py``; it is then listed, validated and measured
like a built-in one. Packages can instead expose such a module through the ``attnbench.impls``
entry point group.
"""

import torch
from torch import nn

import attnbench


@attnbench.register("mine.talking_heads", family="mine")
class TalkingHeads(nn.Module):
    """Global attention whose heads mix their logits through a learned h x h matrix."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads, self.head_dim, self.dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.mix = nn.Parameter(torch.eye(heads))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        q, k, v = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)            # (B, h, N, N)
        logits = torch.einsum("gh,bhnm->bgnm", self.mix, logits)
        out = logits.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        n, c, h = height * width, self.dim, self.heads
        return batch * (8 * n * c * c + 4 * n * n * c + 2 * h * h * n * n)
