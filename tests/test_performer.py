"""performer.favor (FAVOR+): the kernel it computes, its error against softmax attention, its fixed
random features, its linear cost, and its parameter checks. Equivalences in float64 (tests/equivalence.py)."""

import json
import math
import random

import pytest
import torch

import attnbench
from attnbench.cli import main
from attnbench.measure.flops import count_flops
from conftest import FAST_TIMING, randomize_
from equivalence import assert_close64, assert_same_function


def _random_shapes(n, seed):
    """(dim, heads, h, w, batch): head dims 8 or 16, non-square grids 3..12 (seeded)."""
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < n:
        heads = rng.randint(1, 4)
        h, w = rng.randint(3, 12), rng.randint(3, 12)
        if h != w:
            shapes.append((heads * rng.choice([8, 16]), heads, h, w, rng.randint(1, 2)))
    return shapes


def _quadratic(m, x):
    """The same kernel written out with its N x N matrix: phi(x) = exp(w x - |x|^2/2) / sqrt(m) (no
    stabiliser), A = phi(Q) phi(K)^T normalised row-wise, times V, through the module's qkv and proj."""
    B, H, W, C = x.shape
    qkv = m.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, m.heads, m.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    w = m.projection  # (m, d)

    def phi(z):
        z = z * m.head_dim ** -0.25
        return torch.exp(z @ w.T - 0.5 * (z * z).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])

    a = phi(q) @ phi(k).transpose(-2, -1)  # (B, h, N, N)
    out = (a / a.sum(-1, keepdim=True)) @ v
    return m.proj(out.transpose(1, 2).reshape(B, H, W, C))


@pytest.mark.parametrize("dim,heads,h,w,batch", _random_shapes(6, seed=2021))
def test_equals_the_kernel_written_out_quadratically(dim, heads, h, w, batch):
    m = randomize_(attnbench.create("performer.favor", dim=dim, heads=heads, seed=dim + h), seed=h * w).eval()
    x = torch.randn(batch, h, w, dim, generator=torch.Generator().manual_seed(batch + h))
    y, _ = assert_same_function(m, m, x, call_b=_quadratic)
    assert y.shape == (batch, h, w, dim)


def test_projection_rows_are_orthogonal_in_blocks_with_chi_norms():
    d, m = 8, 20
    w = attnbench.create("performer.favor", dim=2 * d, heads=2, nb_features=m).projection.double()
    for start in range(0, m, d):
        block = w[start:start + d]
        unit = block / block.norm(dim=1, keepdim=True)
        assert_close64(unit @ unit.T, torch.eye(len(block), dtype=torch.float64), tol=1e-6)
    assert len(set(w.norm(dim=1).tolist())) == m  # rescaled, each row by its own norm


FEATURES = (16, 64, 256, 1024)


def _errors_against_softmax(seeds=range(4)):
    """Mean relative error (Frobenius) of performer.favor against mha.math with the same qkv/proj weights."""
    errs = {m: 0.0 for m in FEATURES}
    for seed in seeds:
        exact = randomize_(attnbench.create("mha.math", dim=32, heads=2), seed=seed).double().eval()
        with torch.no_grad():
            exact.qkv.weight.mul_(0.2)  # logits of order 1, where the estimator's variance is moderate
        x = torch.randn(2, 7, 9, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad():
            ref = exact(x)
            for m in FEATURES:
                fav = attnbench.create("performer.favor", dim=32, heads=2, nb_features=m, seed=seed).double().eval()
                keys = fav.load_state_dict(exact.state_dict(), strict=False)
                assert keys.missing_keys == ["projection"] and keys.unexpected_keys == []
                errs[m] += ((fav(x) - ref).norm() / ref.norm()).item() / len(seeds)
    return errs


def test_error_against_softmax_attention_falls_with_more_features():
    errs = _errors_against_softmax()
    print({m: f"{e:.2e}" for m, e in errs.items()})
    for small, large in zip(FEATURES, FEATURES[1:]):
        assert errs[large] <= 1.1 * errs[small], errs
    assert errs[FEATURES[-1]] < 0.5 * errs[FEATURES[0]], errs
    assert errs[FEATURES[-1]] < 0.02, errs  # it does estimate softmax attention


def test_features_are_fixed_per_module_and_by_seed():
    x = torch.randn(2, 5, 6, 32, generator=torch.Generator().manual_seed(0))
    a = attnbench.create("performer.favor", dim=32, heads=2, seed=3).eval()
    b = attnbench.create("performer.favor", dim=32, heads=2, seed=3).eval()
    c = attnbench.create("performer.favor", dim=32, heads=2, seed=4).eval()
    b.load_state_dict(a.state_dict(), strict=True)  # same weights; b's features are its own (same seed)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
        assert torch.equal(a.projection, b.projection) and torch.equal(a(x), b(x))
        assert not torch.equal(a.projection, c.projection)
        c_own = c.projection.clone()
        c.load_state_dict({k: v for k, v in a.state_dict().items() if k != "projection"}, strict=False)
        assert not torch.allclose(a(x), c(x))  # same weights, other features
        c.projection.copy_(c_own)
        d = attnbench.create("performer.favor", dim=32, heads=2, seed=99).eval()
        d.load_state_dict(a.state_dict(), strict=True)  # the features travel in the state_dict
        assert torch.equal(d.projection, a.projection) and torch.equal(d(x), a(x))
    assert "projection" in a.state_dict()


def test_linear_in_tokens():
    build = lambda: attnbench.create("performer.favor", dim=32, heads=2)  # noqa: E731
    small = count_flops(build, (1, 16, 16, 32), torch.float32)["flops_torch"]
    large = count_flops(build, (1, 32, 32, 32), torch.float32)["flops_torch"]
    assert 3.9 <= large / small <= 4.1, large / small
    assert large == build().flops_analytic(1, 32, 32)
    mha = lambda: attnbench.create("mha.math", dim=32, heads=2)  # noqa: E731
    ratio = count_flops(mha, (1, 32, 32, 32), torch.float32)["flops_torch"] / count_flops(
        mha, (1, 16, 16, 32), torch.float32)["flops_torch"]
    assert ratio > 10  # the quadratic one, for contrast


@pytest.mark.parametrize("head_dim,expected", [(8, 17), (16, 44), (32, 111), (64, 266), (1, 1)])
def test_default_nb_features_is_d_ln_d(head_dim, expected):
    m = attnbench.create("performer.favor", dim=2 * head_dim, heads=2)
    assert m.nb_features == expected == max(1, round(head_dim * math.log(head_dim)))
    assert m.projection.shape == (expected, head_dim)
    spec = attnbench.get_spec("performer.favor")
    assert spec.params == {"nb_features": -1, "qkv_bias": True, "seed": 0}
    assert spec.default_text == {"nb_features": "head_dim * ln(head_dim)"}


@pytest.mark.parametrize("bad", [0, -2, -100])
def test_bad_nb_features_raise(bad):
    with pytest.raises(ValueError, match="nb_features"):
        attnbench.create("performer.favor", dim=32, heads=2, nb_features=bad)


def test_suite_validation_reports_bad_nb_features(tmp_path, capsys):
    suite = {"name": "t", "device": "cpu", "dim": 16, "heads": 2, "resolution": [32], "timing": FAST_TIMING,
             "measure_peaks": False, "impls": [{"performer.favor": {"nb_features": 0}}]}
    (tmp_path / "s.yaml").write_text(json.dumps(suite))
    assert main(["run", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "impls[0]" in err and "cannot be built" in err and "Traceback" not in err


def test_builds_on_meta_with_a_meta_projection():
    with torch.device("meta"):
        m = attnbench.create("performer.favor", dim=32, heads=2)
    assert m.projection.device.type == "meta" and m.projection.shape == (44, 16)
