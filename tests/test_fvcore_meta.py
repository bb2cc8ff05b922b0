"""fvcore's counts on the meta device equal fvcore tracing the real module on the CPU.

On meta, convolutions are counted by fvcore's own formula with the tracer paused (see
attnbench.measure.flops); these tests prove that changes nothing, for every registered
implementation and parameter variant, on random shapes, in forward and re-parameterized form.
"""

import copy
import random

import pytest
import torch

import attnbench
from attnbench.measure import flops as F

VARIANTS = {
    "mvit.pool": [{}, {"pool": "avg"}, {"pool": "max", "stride_q": 2}, {"stride_kv": 2, "residual_pooling": False}],
    "local.slide": [{"kernel": 3}, {"kernel": 5}],
    "local.shift_dwconv": [{"kernel": 3}, {"kernel": 7}],
    "sra.conv": [{"sr_ratio": 2}, {"sr_ratio": 4}],
    "sra.linear": [{"pool_size": 3}, {"pool_size": 7}],
}
KEYS = ("macs_fvcore", "macs_fvcore_matmul", "fvcore_uncounted_ops")


def _cases():
    for name in attnbench.list_impls():
        for params in VARIANTS.get(name, [{}]):
            yield name, params


@pytest.mark.parametrize("name,params", list(_cases()))
def test_meta_counts_equal_real_counts(name, params):
    rng = random.Random(f"{name}{params}")
    checked = 0
    while checked < 2:
        heads = rng.choice([1, 2, 3])
        dim = heads * rng.choice([8, 16])
        try:
            attnbench.create(name, dim=dim, heads=heads, **params)
        except ValueError:  # a design that refuses this head count (cswin.cross: even heads only)
            continue
        checked += 1
        b, h, w = rng.randint(1, 2), rng.randint(8, 20), rng.randint(8, 20)
        forms = [False, True] if attnbench.get_spec(name).has("reparameterize") else [False]
        for merged in forms:
            real = attnbench.create(name, dim=dim, heads=heads, **params)
            if merged:
                real = real.reparameterize() or real
            if getattr(real, "supports", lambda *_: None)(h, w):
                continue
            real.eval()
            meta = copy.deepcopy(real).to("meta")
            counted_meta = F.count_fvcore(meta, torch.empty(b, h, w, dim, device="meta"))
            counted_real = F.count_fvcore(real, torch.randn(b, h, w, dim))
            unavailable = getattr(real, "fvcore_unavailable", None)
            if unavailable:  # the flex forms: jit.trace cannot record flex_attention; NaN with the reason on both
                for c in (counted_meta, counted_real):
                    assert c["macs_fvcore"] != c["macs_fvcore"] and unavailable[:60] in c["fvcore_message"], c
                continue
            assert counted_meta["fvcore_device"] == "meta" and counted_meta["fvcore_message"] == ""
            assert counted_real["fvcore_device"] == "cpu" and counted_real["macs_fvcore"] > 0
            assert {k: counted_meta[k] for k in KEYS} == {k: counted_real[k] for k in KEYS}, (name, params, merged)


def test_convolutions_are_restored_after_a_meta_count():
    before = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)
    meta = attnbench.create("sra.conv", dim=16, heads=2, sr_ratio=2).to("meta")
    F.count_fvcore(meta, torch.empty(1, 8, 8, 16, device="meta"))
    assert (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d) == before
    x = torch.randn(1, 4, 8, 8)
    assert torch.nn.functional.conv2d(x, torch.ones(4, 1, 3, 3), groups=4).shape == (1, 4, 6, 6)  # real work again
