"""BLT closed forms (mfnoise/strategies/blt.py) against O(n) and dense computations.

The closed forms sum geometric sequences in the d buffers (no array of length n). References:
the materialised first column (blt_coeffs) through core's Toeplitz sensitivity, C^{-1} a by the
inverse's recurrences (scipy's lfilter), dense matrices and the
exhaustive dense sensitivity for small n, and mpmath at 50 digits for n = 10^9.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfnoise import Participation
from mfnoise.core import sensitivity as sens_lib
from mfnoise.core import workloads
from mfnoise.strategies.blt import BLT
from mfnoise.strategies.toeplitz import toeplitz_sensitivity


def make_blt(n: int, d: int, seed: int = 0) -> BLT:
    """Decays log-spaced from 1/2 to 1 - 1/n (jittered), positive scales with sum(omega / theta) < 1
    (so c_1 = sum omega < 1 and the inverse's decays are positive, as the optimizer's BLTs are)."""
    rng = np.random.default_rng(seed)
    delta = np.exp(np.linspace(math.log(0.5), math.log(1.0 / n), d) + 0.1 * rng.standard_normal(d))
    omega = rng.uniform(0.2, 1.0, d) * delta
    omega *= 0.9 / max(1.0, float(np.sum(omega / (1.0 - delta))))
    return BLT(np.sort(1.0 - delta), omega[np.argsort(1.0 - delta)], n)


def reference_norms(s: BLT, w) -> tuple[float, float]:
    n = s.n
    b = s.inverse_apply(np.asarray(w.coeffs, np.float64))  # lfilter recurrences, O(n d)
    sq = b * b
    return float(np.dot(n - np.arange(n), sq)), float(sq.sum())


WORKLOADS = [lambda n: workloads.prefix_sum(n), lambda n: workloads.momentum(n, 0.9),
             lambda n: workloads.momentum(n, 0.5, 0.3)]


# every workload up to n = 10^5; at n = 10^6 the prefix sum only (the reference is O(n d) per call)
CASES = [pytest.param(n, w, id=f"{n}-{name}") for n in (10, 1000, 100_000)
         for w, name in zip(WORKLOADS, ("prefix", "momentum0.9", "momentum0.5-lr0.3"))]
CASES.append(pytest.param(1_000_000, WORKLOADS[0], id="1000000-prefix"))


@pytest.mark.parametrize("n, make_w", CASES)
def test_closed_form_errors_equal_the_materialised_ones(n, make_w):
    s, w = make_blt(n, 5, seed=n % 97), make_w(n)
    fro, last = s.closed_form_decoder_norms(w)
    ref_fro, ref_last = reference_norms(s, w)
    assert fro == pytest.approx(ref_fro, rel=1e-10) and last == pytest.approx(ref_last, rel=1e-10)
    c = s.toeplitz_coeffs()
    for p in (Participation(n, 1, n), Participation(n, 3, max(1, n // 7)), Participation.epochs(n, 5)):
        got = s.sensitivity(p)
        assert got.method == "blt-closed-form" and got.exact
        assert got.value == pytest.approx(toeplitz_sensitivity(s, c, p).value, rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 4), seed=st.integers(0, 10_000), k=st.integers(1, 4),
       b=st.integers(1, 12), beta=st.sampled_from([None, 0.0, 0.3, 0.9]))
def test_closed_forms_equal_dense_formulas_on_small_n(n, d, seed, k, b, beta):
    s = make_blt(max(n, 2), d, seed)
    s = BLT(s.theta, s.omega, n)
    w = workloads.prefix_sum(n) if beta is None else workloads.momentum(n, beta)
    c_dense = s.dense()
    bmat = np.linalg.solve(c_dense.T, w.dense().T).T  # B C = A
    rows = np.sum(bmat**2, axis=1)
    closed = s.closed_form_decoder_norms(w)
    assert closed is not None
    assert closed[0] == pytest.approx(rows.sum(), rel=1e-10) and closed[1] == pytest.approx(rows.max(), rel=1e-10)
    p = Participation(n, k, min(b, n))
    got, dense = s.sensitivity(p), sens_lib.dense(c_dense, p)
    assert got.value == pytest.approx(dense.value, rel=1e-10)


def test_no_closed_form_outside_its_hypotheses():
    n = 200
    mixed = BLT(np.array([0.5, 0.9]), np.array([0.4, -0.1]), n)
    assert mixed.closed_form_decoder_norms(workloads.prefix_sum(n)) is None
    p = Participation(n, 2, 50)
    assert mixed.sensitivity(p).method != "blt-closed-form"
    big = BLT(np.array([0.5, 0.9]), np.array([0.8, 0.7]), n)  # c_1 = 1.5 > c_0: not non-increasing
    assert big.sensitivity(p).method != "blt-closed-form"
    assert big.sensitivity(Participation(n, 1, n)).method == "blt-closed-form"  # one column: any c
    schedule = workloads.momentum(n, 0.9, workloads.cooldown(n))
    assert make_blt(n, 3).closed_form_decoder_norms(schedule) is None  # not Toeplitz


def _mp_sums(s: BLT, eta: float, poles: list[float]) -> tuple[mpmath.mpf, mpmath.mpf, mpmath.mpf]:
    """(||B||_F^2, last row^2, sens^2 single) at 50 digits, from the rational functions directly."""
    mpmath.mp.dps = 50
    n = s.n
    theta = [mpmath.mpf(float(t)) for t in s.theta]
    omega = [mpmath.mpf(float(o)) for o in s.omega]
    theta_inv = [mpmath.mpf(float(t)) for t in s.inverse()[0]]
    rho = [mpmath.mpf(p) for p in poles] + theta_inv
    amps = []
    for m, r in enumerate(rho):  # b(x) = eta prod(1 - theta x) / prod(1 - rho x)
        num = mpmath.fprod(1 - t / r for t in theta)
        den = mpmath.fprod(1 - q / r for l_, q in enumerate(rho) if l_ != m)
        amps.append(eta * num / den)

    def g(q, m):  # sum_{j<m} q^j
        return mpmath.mpf(m) if q == 1 else (1 - q**m) / (1 - q)

    def h(q):  # sum_{j<n} (n - j) q^j
        return mpmath.mpf(n) * (n + 1) / 2 if q == 1 else (n * (1 - q) - q * (1 - q**n)) / (1 - q) ** 2

    fro = mpmath.fsum(a * b * h(p * q) for a, p in zip(amps, rho) for b, q in zip(amps, rho))
    last = mpmath.fsum(a * b * g(p * q, n) for a, p in zip(amps, rho) for b, q in zip(amps, rho))
    sens2 = 1 + mpmath.fsum(a * b * g(p * q, n - 1) for a, p in zip(omega, theta) for b, q in zip(omega, theta))
    return fro, last, sens2


@pytest.mark.parametrize("make_w, eta, poles", [(WORKLOADS[0], 1.0, [1.0]), (WORKLOADS[1], 1.0, [1.0, 0.9])],
                         ids=["prefix", "momentum0.9"])
def test_closed_forms_at_n_1e9_equal_high_precision_sums(make_w, eta, poles):
    n = 10**9
    s, w = make_blt(n, 4, seed=3), make_w(n)
    fro, last = s.closed_form_decoder_norms(w)
    sens = s.sensitivity(Participation(n, 1, n))
    ref_fro, ref_last, ref_sens2 = _mp_sums(s, eta, poles)
    assert fro == pytest.approx(float(ref_fro), rel=1e-9) and last == pytest.approx(float(ref_last), rel=1e-9)
    assert sens.value == pytest.approx(math.sqrt(float(ref_sens2)), rel=1e-12)
    assert w.__dict__.get("_coeffs") is None  # the workload's n coefficients were never built
