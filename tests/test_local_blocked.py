"""local.blocked: exact local attention (zero K/V outside the image) by tiles of queries with fused SDPA."""

import random

import pytest
import torch

import attnbench
from attnbench.impls.local import halo_tiles, tile_neighbourhood_mask
from attnbench.measure import flops as F
from conftest import randomize_
from equivalence import assert_same_function
from test_local import _reference


def _pair(kernel, tile, seed=3, dim=48, heads=3):
    ref = randomize_(attnbench.create("local.im2col", dim=dim, heads=heads, kernel=kernel), seed=seed).eval()
    new = attnbench.create("local.blocked", dim=dim, heads=heads, kernel=kernel, tile=tile).eval()
    new.load_state_dict(ref.state_dict(), strict=True)
    return new, ref


def _random_cases(n=8):
    rng = random.Random(41)
    cases = []
    while len(cases) < n:
        k, t = rng.choice([1, 3, 5, 7]), rng.choice([2, 3, 4, 7, 8])
        h, w = rng.randint(1, 19), rng.randint(1, 19)
        cases.append((k, t, h, w))
    return cases


CASES = [(7, 8, 16, 24), (7, 8, 14, 13), (3, 4, 8, 5), (5, 7, 21, 14), (7, 8, 3, 2)] + _random_cases()


@pytest.mark.parametrize("kernel,tile,h,w", CASES)
def test_same_function_as_im2col(kernel, tile, h, w):
    """Divisible and not by the tile, grids smaller than the kernel or the tile, random ones."""
    new, ref = _pair(kernel, tile)
    x = torch.randn(2, h, w, 48, generator=torch.Generator().manual_seed(h * 31 + w))
    assert_same_function(new, ref, x)


def test_matches_the_written_out_loop():
    new, ref = _pair(5, 4)
    x = torch.randn(1, 7, 6, 48, generator=torch.Generator().manual_seed(0))
    assert_same_function(new, ref, x, call_b=lambda m, x: _reference(m, x))


def test_a_misaligned_window_is_caught():
    """The comparison has power: the same tiles with every window shifted one key to the right differ."""
    new, ref = _pair(5, 4)
    wrong = tile_neighbourhood_mask(4, 5, dtype=torch.float64).roll(1, dims=-1)
    new._tile_mask = lambda device, dtype: wrong.to(device, dtype)
    x = torch.randn(1, 9, 7, 48, generator=torch.Generator().manual_seed(2))
    with pytest.raises(AssertionError, match="differ in float64"):
        assert_same_function(new, ref, x)


def test_tile_mask_allows_exactly_the_window():
    for t, k in [(1, 1), (4, 3), (8, 7), (3, 5)]:
        m = tile_neighbourhood_mask(t, k)
        s = t + k - 1
        assert m.shape == (t * t, s * s)
        allowed = m == 0
        assert int(allowed.sum()) == t * t * k * k
        assert torch.isneginf(m[~allowed]).all()
        a, b = divmod(t * t - 1, t)  # the tile's last query sees the bottom-right k x k corner
        rows = allowed[t * t - 1].reshape(s, s)
        assert rows[a:a + k, b:b + k].all() and int(rows.sum()) == k * k


def test_halo_tiles_is_a_view_of_the_right_regions():
    t, r = 4, 2
    g = torch.arange(2 * 12 * 16 * 3.0).reshape(2, 8 + 2 * r, 12 + 2 * r, 3)
    tiles = halo_tiles(g, t, r)
    assert tiles.shape == (2, 2, 3, t + 2 * r, t + 2 * r, 3) and tiles.data_ptr() == g.data_ptr()
    assert torch.equal(tiles[1, 1, 2], g[1, 4:4 + t + 2 * r, 8:8 + t + 2 * r])


def test_float32_close_to_float64():
    new, _ = _pair(7, 8)
    x = torch.randn(2, 20, 17, 48)
    with torch.no_grad():
        y32 = new(x)
        y64 = new.double()(x.double())
    assert (y32.double() - y64).abs().max() <= 1e-5 * y64.abs().max()


@pytest.mark.parametrize("kernel,tile,h,w", [(7, 8, 14, 14), (3, 4, 9, 11), (5, 7, 13, 6)])
def test_flops(kernel, tile, h, w):
    """Computed pairs: whole tiles of t^2 x (t+k-1)^2; useful: K per query, local.im2col's count; both
    counters agree with the computed count."""
    new, ref = _pair(kernel, tile)
    s = tile + kernel - 1
    tiles = -(-h // tile) * -(-w // tile)
    assert new.computed_pairs(h, w) == tiles * tile * tile * s * s
    c = 48
    lin = 2 * h * w * c * 4 * c
    assert new.flops_analytic(2, h, w) == 2 * (lin + 4 * c * new.computed_pairs(h, w))
    assert new.flops_useful(2, h, w) == ref.flops_analytic(2, h, w) == 2 * (lin + 4 * c * h * w * kernel ** 2)
    build = lambda: attnbench.create("local.blocked", dim=48, heads=3, kernel=kernel, tile=tile)  # noqa: E731
    counted = F.count_flops(build, (2, h, w, 48), torch.float32)
    assert counted["flops_torch"] == new.flops_analytic(2, h, w)
    assert 2 * counted["macs_fvcore_matmul"] == new.flops_analytic(2, h, w)


def test_bad_tile():
    with pytest.raises(ValueError, match="tile"):
        attnbench.create("local.blocked", dim=48, heads=3, tile=0)
