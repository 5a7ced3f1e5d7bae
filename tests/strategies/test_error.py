"""rmse and max_error against dense numpy (B = A C^{-1} by np.linalg.solve), and known values.

    rmse      = sens(C, p) * ||A C^{-1}||_F / sqrt(n)
    max_error = sens(C, p) * max_i ||(A C^{-1})[i, :]||_2
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise.core import workloads

from conftest import FAMILIES, decoder, make_strategy, momentum_matrix, prefix_matrix, toeplitz_matrix

SIZES = st.one_of(st.integers(1, 70), st.sampled_from([127, 128, 129, 200, 256, 300, 511, 512]))


@st.composite
def workload_and_matrix(draw, n):
    """A workload of every kind and its dense matrix, built here from docs/design.md's formulas."""
    kind = draw(st.sampled_from(["prefix", "momentum", "momentum-lr", "cooldown", "matrix"]))
    if kind == "prefix":
        return workloads.prefix_sum(n), prefix_matrix(n)
    beta = draw(st.floats(0.0, 0.95))
    if kind == "momentum":
        return workloads.momentum(n, beta), momentum_matrix(n, beta, 1.0)
    if kind == "momentum-lr":
        lr = draw(st.floats(0.01, 3.0))
        return workloads.momentum(n, beta, lr), momentum_matrix(n, beta, lr)
    if kind == "cooldown":
        fraction = draw(st.floats(0.0, 1.0))
        eta = np.ones(n)
        m = int(round(fraction * n))
        eta[n - m :] = [1.0 - (i + 1) / m for i in range(m)]  # linear decay to 0 over the last m steps
        return workloads.momentum(n, beta, workloads.cooldown(n, 1.0, fraction)), momentum_matrix(n, beta, eta)
    seed = draw(st.integers(0, 2**32 - 1))
    a = np.tril(np.random.default_rng(seed).normal(size=(n, n)))
    return workloads.matrix(a), a


@st.composite
def schemas(draw, n):
    kind = draw(st.sampled_from(["single", "epochs", "min-sep"]))
    if kind == "single":
        return mfnoise.Participation.single(n)
    if kind == "epochs":
        return mfnoise.Participation.epochs(n, draw(st.integers(1, min(n, 20))))
    b = draw(st.integers(1, n))
    return mfnoise.Participation(n, draw(st.integers(1, 4)), b)


@settings(max_examples=120)
@given(family=st.sampled_from(FAMILIES), n=SIZES, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_error_matches_dense(family, n, seed, data):
    rng = np.random.default_rng(seed)
    bands = data.draw(st.integers(1, n), label="bands")
    strategy, c = make_strategy(family, n, rng, bands=bands, conditioned=True)
    w, a = data.draw(workload_and_matrix(n), label="workload")
    np.testing.assert_allclose(w.dense(), a, rtol=1e-12, atol=1e-12)
    p = data.draw(schemas(n), label="participation")
    out = mfnoise.evaluate(strategy, w, p)
    sens = strategy.sensitivity(p)
    assert out["sensitivity"] == sens.value and out["sensitivity_exact"] == sens.exact
    b = decoder(a, c)
    frob = np.linalg.norm(b, "fro")
    max_row = np.max(np.linalg.norm(b, axis=1))
    assert out["rmse"] == pytest.approx(sens.value * frob / math.sqrt(n), rel=1e-10)
    assert out["max_error"] == pytest.approx(sens.value * max_row, rel=1e-10)
    assert mfnoise.rmse(strategy, w, p) == out["rmse"]
    assert mfnoise.max_error(strategy, w, p) == out["max_error"]
    # Independent sensitivity where it is cheap at this n: cyclic patterns (b of them) when X >= 0.
    if p.cyclic:
        x = c.T @ c
        pats = [list(range(r, n, p.min_sep)) for r in range(p.min_sep)]
        if np.all(x >= 0):
            want = max(x[np.ix_(P, P)].sum() for P in pats)
            assert sens.value**2 == pytest.approx(want, rel=1e-10)
        else:
            lower = max(np.diag(x)[P].sum() for P in pats) if _cross_terms_vanish(x, pats) else np.diag(x).max()
            assert sens.value**2 >= lower * (1 - 1e-12)


def _cross_terms_vanish(x, pats):
    return all(np.count_nonzero(x[np.ix_(P, P)] - np.diag(np.diag(x)[P])) == 0 for P in pats)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("workload", ["prefix", "momentum:0.9", "momentum:0.5:cooldown:0.3"])
def test_every_family_every_workload_n512(family, workload):
    n = 512
    rng = np.random.default_rng(11)
    strategy, c = make_strategy(family, n, rng, bands=16, conditioned=True)
    w = workloads.parse(workload, n)
    a = prefix_matrix(n) if workload == "prefix" else None
    if workload == "momentum:0.9":
        a = momentum_matrix(n, 0.9, 1.0)
    elif workload.startswith("momentum:0.5"):
        a = momentum_matrix(n, 0.5, workloads.cooldown(n, fraction=0.3))
    p = mfnoise.Participation.epochs(n, 4)
    out = mfnoise.evaluate(strategy, w, p)
    b = decoder(a, c)
    s = out["sensitivity"]
    assert out["rmse"] == pytest.approx(s * np.linalg.norm(b, "fro") / math.sqrt(n), rel=1e-10)
    assert out["max_error"] == pytest.approx(s * np.linalg.norm(b, axis=1).max(), rel=1e-10)


def test_known_values_n4096():
    """Prefix sum, single participation, n = 4096 (Fichtenberger et al. 2023; docs/design.md)."""
    n = 4096
    w, p = workloads.prefix_sum(n), mfnoise.Participation.single(n)
    out = mfnoise.evaluate(mfnoise.sqrt_toeplitz(n), w, p)
    assert round(out["max_error"], 5) == 3.71388
    assert round(out["rmse"], 5) == 3.55129
    assert round(out["sensitivity"], 5) == 1.92714
    assert out["sensitivity_exact"]
    out = mfnoise.evaluate(mfnoise.Identity(n), w, p)
    assert round(out["rmse"], 4) == 45.2604
    assert out["max_error"] == 64.0
    assert out["sensitivity"] == 1.0
    # The identity rmse in closed form: sqrt(sum_i (i + 1) / n) = sqrt((n + 1) / 2).
    assert out["rmse"] == pytest.approx(math.sqrt((n + 1) / 2), rel=1e-14)


def test_sqrt_toeplitz_sensitivity_closed_form_n4096():
    """sens^2 = max column norm^2 = sum_{j < n} binom(2j, j)^2 / 16^j (first column)."""
    n = 4096
    from conftest import binom_sqrt_coeffs

    want = math.sqrt(float(np.sum(binom_sqrt_coeffs(n) ** 2)))
    got = mfnoise.sqrt_toeplitz(n).sensitivity(mfnoise.Participation.single(n)).value
    assert got == pytest.approx(want, rel=1e-10)


def test_large_n_structured_path():
    """n = 10^5: the Toeplitz path, checked against the closed forms of the identity."""
    n = 100_000
    w, p = workloads.prefix_sum(n), mfnoise.Participation.single(n)
    out = mfnoise.evaluate(mfnoise.Identity(n), w, p)
    assert out["rmse"] == pytest.approx(math.sqrt((n + 1) / 2), rel=1e-12)
    assert out["max_error"] == pytest.approx(math.sqrt(n), rel=1e-12)
    # sqrt-Toeplitz: B = A C^{-1} = C, so ||B||_F^2 = sum_j (n - j) c_j^2 and the max row is the last.
    c = mfnoise.sqrt_toeplitz(n).coeffs
    out = mfnoise.evaluate(mfnoise.sqrt_toeplitz(n), w, p)
    sens = math.sqrt(np.sum(c**2))
    assert out["max_error"] == pytest.approx(sens * sens, rel=1e-9)
    assert out["rmse"] == pytest.approx(sens * math.sqrt(np.dot(n - np.arange(n), c**2) / n), rel=1e-9)


def test_mismatched_sizes_refused():
    s = mfnoise.sqrt_toeplitz(8)
    with pytest.raises(ValueError, match="n=9"):
        mfnoise.rmse(s, workloads.prefix_sum(9), mfnoise.Participation.single(8))
    with pytest.raises(ValueError, match="n=9"):
        mfnoise.max_error(s, workloads.prefix_sum(8), mfnoise.Participation.single(9))


@pytest.mark.parametrize(
    "theta,omega",
    [
        # From an optimized library strategy: decays clustered next to 1, one omega 0, one ~1e-15.
        ([0.89335971, 0.9891131, 0.990796, 0.999999999419611], [0.438589321, 2.55109973e-15, 0.504370909, 0.0]),
        # All omega > 0 with clustered decays next to 1.
        ([0.9, 0.999, 0.9999, 0.99999], [0.3, 0.1, 0.05, 0.01]),
        # Mixed signs.
        ([0.5, 0.95, 0.999], [0.4, -0.02, 0.01]),
    ],
)
@pytest.mark.parametrize("workload", ["prefix", "momentum:0.9"])
def test_ill_conditioned_blt_matches_dense(theta, omega, workload):
    """Optimized BLTs are ill-conditioned as polynomials: rmse / max_error still to 1e-10."""
    n = 512
    theta, omega = np.array(theta), np.array(omega)
    c = np.zeros(n)
    c[0] = 1.0
    for j in range(1, n):
        c[j] = sum(om * th ** (j - 1) for th, om in zip(theta, omega))

    cm = toeplitz_matrix(c, n)
    a = prefix_matrix(n) if workload == "prefix" else momentum_matrix(n, 0.9, 1.0)
    s = mfnoise.BLT(theta, omega, n)
    out = mfnoise.evaluate(s, workloads.parse(workload, n), mfnoise.Participation.epochs(n, 4))
    b = decoder(a, cm)
    sens = out["sensitivity"]
    assert out["rmse"] == pytest.approx(sens * np.linalg.norm(b, "fro") / math.sqrt(n), rel=1e-10)
    assert out["max_error"] == pytest.approx(sens * np.linalg.norm(b, axis=1).max(), rel=1e-10)
    z = np.random.default_rng(0).normal(size=(n, 2))
    want = np.linalg.solve(cm, z)
    np.testing.assert_allclose(s.inverse_apply(z), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
