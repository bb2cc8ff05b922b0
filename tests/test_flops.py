"""The three FLOP counts agree, under the conventions stated in attnbench.measure.flops.

flops_analytic (2 per MAC, matmul-type ops) == flops_torch (FlopCounterMode, forward)
                                            == 2 * fvcore's matmul-type ops.
fvcore's total may exceed its matmul part only by norms and pooling (its documented extras).
"""

import math
import random

import pytest
import torch

import attnbench
from attnbench.measure import flops as F

FVCORE_EXTRA_OPS = {"layer_norm", "adaptive_avg_pool2d", "group_norm", "batch_norm", "upsample_nearest2d",
                    "upsample_bilinear2d"}


def _shapes(name, n=4):
    rng = random.Random(name)
    out = []
    while len(out) < n:
        heads = rng.choice([1, 2, 3, 4])
        dim = heads * rng.choice([8, 16, 24])
        h, w, b = rng.randint(6, 20), rng.randint(6, 20), rng.randint(1, 3)
        try:
            m = attnbench.create(name, dim=dim, heads=heads)
        except ValueError:  # a design that refuses this head count (cswin.cross: even heads only)
            continue
        if getattr(m, "supports", lambda *_: None)(h, w) is None:
            out.append((b, h, w, dim, heads))
    return out


@pytest.mark.parametrize("name", attnbench.list_impls())
def test_three_counts_agree(name):
    for b, h, w, dim, heads in _shapes(name):
        build = lambda: attnbench.create(name, dim=dim, heads=heads)  # noqa: E731
        module = build().eval()
        analytic = module.flops_analytic(b, h, w)
        counted = F.count_flops(build, (b, h, w, dim), torch.float32)
        assert counted["flops_torch"] == analytic, (name, b, h, w, dim, heads)
        x = torch.randn(b, h, w, dim)
        fv = F.count_fvcore(module, x)  # on real tensors: works for every op jit.trace can record
        unavailable = getattr(module, "fvcore_unavailable", None)
        if unavailable:  # the flex forms: jit.trace cannot record flex_attention; NaN with the reason, never 0
            for c in (fv, counted):
                assert math.isnan(c["macs_fvcore"]) and unavailable[:60] in c["fvcore_message"], (name, c)
            continue
        assert fv["fvcore_message"] == ""
        assert 2 * fv["macs_fvcore_matmul"] == analytic, (name, b, h, w, dim, heads)
        by_op = F.fvcore_by_operator(module, x)
        extras = {k for k in by_op if k not in F.FVCORE_MATMUL_OPS}
        assert extras <= FVCORE_EXTRA_OPS, extras
        extra_macs = sum(by_op[k] for k in extras)
        assert fv["macs_fvcore"] == fv["macs_fvcore_matmul"] + extra_macs
        if not torch.isnan(torch.tensor(float(counted["macs_fvcore"]))):  # meta trace worked: same numbers
            assert counted["macs_fvcore"] == fv["macs_fvcore"]


def test_fvcore_counts_fused_sdpa():
    """Without the registered handle fvcore reports SDPA as 0; with it, B*h*N*N*(d+dv) MACs."""
    m = attnbench.create("mha.sdpa", dim=64, heads=4).eval()
    x = torch.randn(2, 8, 8, 64)
    by_op = F.fvcore_by_operator(m, x)
    n = 64
    assert by_op["scaled_dot_product_attention"] == 2 * 4 * n * n * (16 + 16)


def test_torch_counter_counts_backward_in_train_mode():
    build = lambda: attnbench.create("mha.math", dim=32, heads=2)  # noqa: E731
    c = F.count_flops(build, (1, 8, 8, 32), torch.float32, train=True)
    assert c["flops_torch_fwd_bwd"] == 3 * c["flops_torch"]  # backward of a matmul is two matmuls


def test_counting_needs_no_memory():
    """65536 tokens of global attention: a 48 GB attention matrix, counted on meta in no time."""
    build = lambda: attnbench.create("mha.math", dim=96, heads=3)  # noqa: E731
    c = F.count_flops(build, (1, 256, 256, 96), torch.float32)
    assert c["flops_torch"] == attnbench.create("mha.math", dim=96, heads=3).flops_analytic(1, 256, 256)
    assert c["macs_fvcore"] * 2 == c["flops_torch"]
