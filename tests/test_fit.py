"""Growth-exponent fit: recovers known exponents from noisy synthetic curves, over the large-token part."""

import math

import numpy as np
import pytest

from attnbench.analysis.fit import MIN_POINTS, THEORY, fit_exponent, fit_range, theoretical_exponent

TOKENS = np.array([(r // 4) ** 2 for r in (224, 320, 384, 448, 512, 640, 768, 896, 1024)], dtype=float)


@pytest.mark.parametrize("k_true", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_exponent_with_multiplicative_noise(k_true, seed):
    rng = np.random.default_rng(seed)
    values = 3e-4 * TOKENS ** k_true * np.exp(rng.normal(0, 0.05, len(TOKENS)))  # ~5% noise
    fit = fit_exponent(TOKENS, values)
    assert fit is not None
    assert abs(fit.k - k_true) < 0.15
    assert 0 < fit.stderr < 0.15
    # the truth lies within a few standard errors
    assert abs(fit.k - k_true) < 4 * fit.stderr + 0.02
    assert fit.n_points == 5 and fit.n_min == np.median(TOKENS) and fit.n_max == TOKENS[-1]


def test_exact_power_law_has_zero_error_and_predicts():
    fit = fit_exponent(TOKENS, 7.0 * TOKENS ** 2)
    assert fit.k == pytest.approx(2.0, abs=1e-9)
    assert fit.stderr == pytest.approx(0.0, abs=1e-9)
    assert fit.predict([100.0])[0] == pytest.approx(7.0 * 100 ** 2, rel=1e-6)


def test_fit_uses_the_large_token_part():
    # linear term dominates small N, quadratic dominates large N: the fit must see the quadratic regime
    values = 1e3 * TOKENS + 0.05 * TOKENS ** 2
    whole = np.polyfit(np.log(TOKENS), np.log(values), 1)[0]
    fit = fit_exponent(TOKENS, values)
    assert fit.k > whole + 0.1
    assert fit.k > 1.6
    n, _ = fit_range(TOKENS, values)
    assert n.min() >= np.median(TOKENS) and len(n) >= MIN_POINTS


def test_at_least_three_points_else_no_fit():
    assert fit_exponent([100, 200], [1, 4]) is None
    assert fit_exponent([100, 200, 200, 100], [1, 4, 4, 1]) is None  # two distinct token counts
    # four points: the median leaves two, so the three largest are used
    fit = fit_exponent([100, 200, 400, 800], [1, 2, 4, 8])
    assert fit is not None and fit.n_points == 3 and fit.n_min == 200 and fit.k == pytest.approx(1.0)


def test_unusable_points_are_ignored():
    n = [100, 200, 400, 800, 1600, 3200]
    v = [math.nan, 0.0, 16.0, 64.0, 256.0, 1024.0]  # k = 2 on the usable points
    fit = fit_exponent(n, v)
    assert fit.k == pytest.approx(2.0)
    assert fit.n_min >= 400
    assert fit_exponent([100, 200, 400], [1.0, -1.0, math.nan]) is None


def test_theoretical_exponents_one_table():
    assert theoretical_exponent("mha.sdpa") == 2 and theoretical_exponent("mha.math") == 2
    assert theoretical_exponent("sra.conv") == 2 and theoretical_exponent("sra.linear") == 1
    assert theoretical_exponent("swin.shift_cyclic") == 1 and theoretical_exponent("local.im2col") == 1
    assert theoretical_exponent("mvit.pool") == 2
    assert theoretical_exponent("mine.talking_heads") is None
    assert len({p for p, _k, _w in THEORY}) == len(THEORY)
