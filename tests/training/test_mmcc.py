"""MMCC (mfnoise.training.mmcc) against independent computations: a brute-force lower bound for
tiny n (the exact hockey-stick divergence of a 1-D projection of the release, a mixture over the
2^n sampling outcomes), dp-accounting's Poisson DP-SGD for C = I, and dp-accounting's own
mixture-of-Gaussians PLD for the row mechanism."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import stats

from mfnoise.training import mmcc


def _projected_delta(c: np.ndarray, q: float, sigma: float, v: np.ndarray, eps: float) -> float:
    """max of both hockey-stick divergences at e^eps between t = v.y with and without the example:
    a mixture over x in {0,1}^n of N(v.Cx, sigma^2 |v|^2) against N(0, sigma^2 |v|^2), by
    quadrature on a fine grid (post-processing: a lower bound on the release's delta(eps))."""
    n = c.shape[0]
    s = sigma * np.linalg.norm(v)
    means, weights = [], []
    for x in itertools.product([0, 1], repeat=n):
        xa = np.asarray(x, float)
        means.append(float(v @ (c @ xa)))
        weights.append(float(np.prod(np.where(xa == 1, q, 1 - q))))
    means, weights = np.asarray(means), np.asarray(weights)
    t = np.linspace(-12 * s, means.max() + 12 * s, 40_001)
    dt = t[1] - t[0]
    p0 = stats.norm.pdf(t, scale=s)
    p1 = (weights[None, :] * stats.norm.pdf(t[:, None], loc=means[None, :], scale=s)).sum(axis=1)
    a = np.e**eps
    return float(max(np.maximum(p1 - a * p0, 0).sum() * dt, np.maximum(p0 - a * p1, 0).sum() * dt))


def _lower_bound_epsilon(c, q, sigma, delta) -> float:
    """The largest eps with projected delta(eps) > delta, over a few directions (each valid)."""
    n = c.shape[0]
    best = 0.0
    for v in (c @ np.ones(n), np.ones(n), c[:, 0], np.eye(n)[-1]):
        lo, hi = 0.0, 20.0
        if _projected_delta(c, q, sigma, v, 0.0) <= delta:
            continue
        for _ in range(22):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _projected_delta(c, q, sigma, v, mid) > delta else (lo, mid)
        best = max(best, lo)
    return best


C4 = np.tril(np.ones((4, 4))) * np.array([1.0, 0.8, 0.6, 0.5])[None, :]  # non-negative, lower triangular


@pytest.fixture(scope="module")
def lower_bound() -> float:
    return _lower_bound_epsilon(C4, 0.3, 1.0, 1e-3)


def test_never_below_brute_force_lower_bound_and_tightens_with_the_grid(lower_bound):
    assert lower_bound > 0.3  # the test statistic sees real privacy loss
    coarse = mmcc.epsilon(C4, 1.0, 1e-3, 0.3, pld_discretization=1e-2, sensitivity_grid=0.05).epsilon
    fine = mmcc.epsilon(C4, 1.0, 1e-3, 0.3, pld_discretization=1e-3, sensitivity_grid=0.005).epsilon
    assert fine >= lower_bound
    assert coarse >= lower_bound
    assert fine < coarse  # refining the (pessimistic) discretisation moves the bound down, toward the lower one


def test_toeplitz_path_never_below_lower_bound():
    c = np.array([1.0, 0.5, 0.375])
    dense = np.array([[c[0], 0, 0], [c[1], c[0], 0], [c[2], c[1], c[0]]])
    lb = _lower_bound_epsilon(dense, 0.3, 1.0, 1e-3)


    from mfnoise.strategies.toeplitz import Toeplitz

    s = Toeplitz(c, 3)
    r = mmcc.epsilon(s, 1.0, 1e-3, 0.3)
    assert r.toeplitz
    assert r.epsilon >= lb
    assert mmcc.epsilon(dense, 1.0, 1e-3, 0.3).epsilon >= lb


def test_identity_is_close_above_dp_sgd():
    n, q, sigma, delta = 30, 0.02, 1.2, 1e-5
    r = mmcc.epsilon(np.eye(n), sigma, delta, q)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    exact = acc.get_epsilon(delta - r.tail_delta)  # C = I: MMCC's rows are exactly the DP-SGD rounds
    assert exact <= r.epsilon <= exact * 1.1


def test_row_pld_is_pessimistic_against_dp_accounting():
    sens, w = np.array([0.0, 0.5, 1.0, 2.0]), np.array([0.9, 0.06, 0.03, 0.01])
    ours = mmcc.mixture_pld(1.0, sens, w, 1e-3)
    optimistic = pld_lib.from_mixture_gaussian_mechanism(1.0, list(sens), list(w), pessimistic_estimate=False,
                                                         value_discretization_interval=1e-3)
    pessimistic = pld_lib.from_mixture_gaussian_mechanism(1.0, list(sens), list(w), value_discretization_interval=1e-3)
    for eps in (0.0, 0.5, 1.0, 2.0):
        d = ours.get_delta_for_epsilon(eps)
        assert d >= optimistic.get_delta_for_epsilon(eps)
        assert d <= pessimistic.get_delta_for_epsilon(eps) * 1.02 + 1e-15


def test_refuses_negative_entries_and_upper_triangular():
    c = np.array([[1.0, 0.0], [-0.2, 1.0]])
    with pytest.raises(ValueError, match=r"non-negative.*C\[1, 0\] = -0.2"):
        mmcc.epsilon(c, 1.0, 1e-5, 0.1)
    with pytest.raises(ValueError, match="lower triangular"):
        mmcc.epsilon(np.array([[1.0, 0.1], [0.0, 1.0]]), 1.0, 1e-5, 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        mmcc.epsilon(np.eye(2), 0.0, 1e-5, 0.1)


def test_more_noise_less_epsilon():
    eps = [mmcc.epsilon(C4, s, 1e-5, 0.1).epsilon for s in (0.8, 1.6, 3.2)]
    assert eps[0] > eps[1] > eps[2] > 0
    assert math.isfinite(eps[0])
