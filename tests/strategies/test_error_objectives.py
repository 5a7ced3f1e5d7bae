"""last_iterate_error and weighted_error against dense numpy (B = A C^{-1} by np.linalg.solve).

    last_iterate_error = sens(C, p) * ||B[n-1, :]||_2
    weighted_error(w)  = sens(C, p) * sqrt(sum_i w_i ||B[i, :]||^2 / sum_i w_i)

(docs/design.md, "The mathematics"; mfnoise.optim.objectives). The sensitivity is the strategy's
own (checked against brute force in test_error.py); here the decoder norms are under test, through
both routes: Toeplitz on Toeplitz (O(n), W_j = sum_{i>=j} w_i) and dense.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise.core import workloads
from mfnoise.strategies import error

from conftest import FAMILIES, decoder, make_strategy, momentum_matrix, prefix_matrix


def _weights(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "ones":
        return np.ones(n)
    if kind == "last":
        w = np.zeros(n)
        w[-1] = 1.0
        return w
    if kind == "sparse":
        w = rng.uniform(0, 1, n) * (rng.uniform(size=n) < 0.3)
        w[rng.integers(n)] = 2.0  # never all zero
        return w
    return rng.exponential(size=n)


@settings(max_examples=60, deadline=None)
@given(family=st.sampled_from(FAMILIES), n=st.one_of(st.integers(1, 40), st.sampled_from([127, 200])),
       seed=st.integers(0, 2**32 - 1), workload=st.sampled_from(["prefix", "momentum", "wd", "schedule"]),
       wkind=st.sampled_from(["ones", "last", "sparse", "random"]))
def test_last_iterate_and_weighted_match_dense(family, n, seed, workload, wkind):
    rng = np.random.default_rng(seed)
    strategy, c = make_strategy(family, n, rng, bands=int(rng.integers(1, n + 1)), conditioned=True)
    if workload == "prefix":
        w, a = workloads.prefix_sum(n), prefix_matrix(n)
    elif workload == "momentum":
        w, a = workloads.momentum(n, 0.8, 0.5), momentum_matrix(n, 0.8, 0.5)
    elif workload == "wd":
        # theta_{t+1} = (1 - eta lambda) theta_t - eta m_t: row i = alpha row i-1 + eta beta^(i-j), alpha = 0.9
        w = workloads.momentum(n, 0.8, 0.5, weight_decay=0.2)
        a = np.zeros((n, n))
        for i in range(n):
            a[i] = (0.9 * a[i - 1] if i else 0.0) + 0.5 * np.where(np.arange(n) <= i, 0.8 ** (i - np.arange(n)), 0.0)
    else:
        eta = rng.uniform(0.1, 1.0, n)
        w, a = workloads.momentum(n, 0.5, eta), momentum_matrix(n, 0.5, eta)
    p = mfnoise.Participation.epochs(n, 1)
    weights = _weights(wkind, n, rng)
    out = error.evaluate(strategy, w, p, weights=weights)
    b = decoder(a, c)
    rows = np.sum(b * b, axis=1)
    sens = out["sensitivity"]
    assert out["last_iterate_error"] == pytest.approx(sens * math.sqrt(rows[-1]), rel=1e-9)
    want = sens * math.sqrt(np.dot(weights, rows) / weights.sum())
    assert out["weighted_error"] == pytest.approx(want, rel=1e-9)
    assert error.weighted_error(strategy, w, p, weights) == out["weighted_error"]
    assert error.last_iterate_error(strategy, w, p) == out["last_iterate_error"]


def test_weighted_special_cases_are_rmse_and_last_iterate():
    n = 50
    s = mfnoise.sqrt_toeplitz(n)
    w = workloads.momentum(n, 0.9)
    p = mfnoise.Participation.epochs(n, 5)
    e = np.zeros(n)
    e[-1] = 3.0
    out = error.evaluate(s, w, p)
    assert error.weighted_error(s, w, p, np.full(n, 7.0)) == pytest.approx(out["rmse"], rel=1e-12)
    assert error.weighted_error(s, w, p, e) == pytest.approx(out["last_iterate_error"], rel=1e-12)
    # A Toeplitz decoder's rows are prefixes of b: the last row is the largest.
    assert out["last_iterate_error"] == out["max_error"]


@pytest.mark.parametrize("weights,match", [
    (np.zeros(6), "not all zero"),
    (np.array([1.0, -1, 1, 1, 1, 1]), "non-negative"),
    (np.array([1.0, np.nan, 1, 1, 1, 1]), "finite"),
    (np.ones(5), r"shape \(5,\)"),
])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(ValueError, match=match):
        error.weighted_error(mfnoise.sqrt_toeplitz(6), workloads.prefix_sum(6), mfnoise.Participation.single(6),
                             weights)
