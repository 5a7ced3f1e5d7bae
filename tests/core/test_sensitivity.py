"""Sensitivity against brute force over every participation pattern (docs/design.md).

sens(C, p)^2 = max_P max_{unit u_t} ||sum_{t in P} C[:, t] u_t||^2. With X = C^T C and P ranging
over every pattern (maximal or not), the tests use two brute-force bounds written here:
  lower = max_{P, s in {-1,+1}^P} s^T X_P s   (u_t = s_t u: a valid choice, so sens^2 >= lower)
  upper = max_P sum_{i,j in P} |X_ij|         (triangle inequality, so sens^2 <= upper)
and lower == upper == sens^2 when X >= 0. A reported value below ``lower`` is a privacy bug.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise.core import sensitivity as sens_lib
from mfnoise.strategies.toeplitz import toeplitz_sensitivity

from conftest import FAMILIES, all_patterns, make_strategy, sensitivity_bounds, toeplitz_matrix

REL = 1e-12


@st.composite
def schemas(draw, max_n: int = 12):
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["min-sep", "cyclic", "single"]))
    if kind == "single":
        return mfnoise.Participation.single(n)
    if kind == "cyclic":
        return mfnoise.Participation.epochs(n, draw(st.integers(1, n)))  # includes k not dividing n
    b = draw(st.integers(1, n))
    k = draw(st.integers(1, -(-n // b) + 1))  # one past reachable: legal, unreachable
    return mfnoise.Participation(n, k, b)


def check_against_brute_force(strategy, c, p):
    s = strategy.sensitivity(p)
    assert isinstance(s, mfnoise.Sensitivity)
    assert math.isfinite(s.value) and s.value > 0
    ref = sensitivity_bounds(c, p)
    got = s.value**2
    # Privacy: never below a true lower bound.
    assert got >= ref["lower"] * (1 - REL), (s, ref["lower"])
    if ref["nonneg"]:
        # X >= 0: lower == upper == sens^2 exactly.
        if s.exact:
            assert got == pytest.approx(ref["plain"], rel=1e-10), (s, ref["plain"])
        else:
            assert got >= ref["plain"] * (1 - REL)
    if s.exact:
        # The exact value lies between the two brute-force bounds.
        assert got <= ref["upper"] * (1 + 1e-10), (s, ref["upper"])
        assert got >= ref["lower"] * (1 - 1e-10)
    elif s.method == "toeplitz-decreasing-envelope":
        # Monotone up to rounding: a bound within 1e-9 relative of the (nearly equal) brute-force bounds.
        assert got <= ref["upper"] * (1 + 1e-8), (s, ref["upper"])
    else:
        # The dense bounds dominate the abs-sum bound over the patterns.
        assert got >= ref["upper"] * (1 - REL), (s, ref["upper"])
    return s, ref


@settings(max_examples=300)
@given(family=st.sampled_from(FAMILIES), p=schemas(), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_sensitivity_matches_brute_force(family, p, seed, data):
    bands = data.draw(st.integers(1, p.n), label="bands")  # both <= and > min_sep
    strategy, c = make_strategy(family, p.n, np.random.default_rng(seed), bands=bands)
    assert np.allclose(strategy.dense(), c, rtol=1e-9, atol=1e-12 * max(1.0, np.abs(c).max()))
    check_against_brute_force(strategy, c, p)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_every_small_schema(family):
    """Deterministic sweep: n in {5, 8}, every min-sep (k, b) and every epochs(n, k)."""
    rng = np.random.default_rng(zlib.crc32(family.encode()))
    for n in (5, 8):
        schemas_ = [mfnoise.Participation.epochs(n, k) for k in range(1, n + 1)]
        schemas_ += [mfnoise.Participation(n, k, b) for b in range(1, n + 1) for k in range(1, -(-n // b) + 1)]
        for bands in (1, 3, n):
            strategy, c = make_strategy(family, n, rng, bands=bands)
            for p in schemas_:
                check_against_brute_force(strategy, c, p)


def test_exact_methods_are_exact():
    """The exact routines are used where docs/design.md says they apply."""
    n = 10
    rng = np.random.default_rng(0)
    # banded, bands <= min_sep, mixed signs: exact by disjoint supports.
    s, c = make_strategy("banded", n, rng, bands=3)
    for p in (mfnoise.Participation(n, 3, 3), mfnoise.Participation.epochs(n, 3)):
        out, ref = check_against_brute_force(s, c, p)
        assert out.exact and out.value**2 == pytest.approx(ref["lower"], rel=1e-12)
    # Toeplitz non-negative non-increasing with bands > min_sep.
    s, c = make_strategy("toeplitz-decreasing", n, rng)
    out, ref = check_against_brute_force(s, c, mfnoise.Participation(n, 4, 2))
    assert out.exact and out.method == "toeplitz-decreasing"
    # dense X >= 0, cyclic and small min-sep: exact.
    s, c = make_strategy("dense-nonneg", n, rng)
    for p in (mfnoise.Participation.epochs(n, 3), mfnoise.Participation(n, 3, 2)):
        out, ref = check_against_brute_force(s, c, p)
        assert out.exact


def test_mixed_signs_never_exact_beyond_single():
    """Mixed-sign dense X with overlapping columns: reported as a bound, not as exact."""
    c = np.array([[1.0, 0, 0], [-1.0, 1.0, 0], [0.5, -2.0, 1.0]])
    x = c.T @ c
    assert np.any(x < 0)
    p = mfnoise.Participation(3, 2, 1)
    out, ref = check_against_brute_force(mfnoise.Dense(c), c, p)
    assert not out.exact


def test_mixed_sign_counterexample_is_not_underestimated():
    """C whose columns cancel: sum_P X_P underestimates; the abs bound must be used."""
    c = np.array([[1.0, 0.0], [1.0, -1.0]])  # X = [[2, -1], [-1, 1]]
    p = mfnoise.Participation(2, 2, 1)
    s = mfnoise.Dense(c).sensitivity(p)
    # u_0 = -u_1 gives ||C[:,0] - C[:,1]||^2 = 1 + 4 = 5 > sum X = 1.
    assert s.value**2 >= 5 - 1e-12


def test_best_pattern_sum_brute_force():
    rng = np.random.default_rng(7)
    for n in range(1, 10):
        for b in range(1, n + 1):
            for k in range(1, -(-n // b) + 2):
                for cyclic in (False, True):
                    if cyclic and k != -(-n // b):
                        continue
                    p = mfnoise.Participation(n, k, b, cyclic=cyclic)
                    w = rng.uniform(0, 1, (3, n))
                    w[0, rng.integers(0, n)] = 0.0
                    got = sens_lib.best_pattern_sum(w, p)
                    want = [max(w[r, list(P)].sum() for P in all_patterns(n, k, b, cyclic)) for r in range(3)]
                    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_best_pattern_sum_refuses_bad_weights():
    p = mfnoise.Participation(4, 2, 2)
    with pytest.raises(ValueError, match="non-negative"):
        sens_lib.best_pattern_sum(np.array([1.0, -1.0, 0.0, 0.0]), p)
    with pytest.raises(ValueError, match="5 steps"):
        sens_lib.best_pattern_sum(np.ones(5), p)


def test_count_patterns():
    for n in range(1, 11):
        for b in range(1, n + 1):
            for k in range(1, -(-n // b) + 2):
                p = mfnoise.Participation(n, k, b)
                assert sens_lib.count_patterns(p) == len(all_patterns(n, k, b, False))


def test_toeplitz_routine_refuses_increasing():
    with pytest.raises(ValueError, match="non-increasing"):
        sens_lib.toeplitz(np.array([1.0, 2.0]), mfnoise.Participation(4, 2, 1))
    with pytest.raises(ValueError, match="non-negative"):
        sens_lib.toeplitz(np.array([1.0, -0.5]), mfnoise.Participation(4, 2, 1))


def test_dense_fallback_refused_when_too_large():
    """A non-monotone Toeplitz C with bands > min_sep at large n cannot be bounded: refused, not guessed."""
    n = mfnoise.workloads.DENSE_LIMIT + 1
    coeffs = np.array([1.0, 0.5, 0.9])
    s = mfnoise.Toeplitz(coeffs, n)
    with pytest.raises(ValueError, match="cannot bound the sensitivity"):
        s.sensitivity(mfnoise.Participation(n, 2, 2))
    # bands <= min_sep: exact column DP, any signs, any n.
    out = s.sensitivity(mfnoise.Participation(n, 2, 3))
    assert out.exact and out.value == pytest.approx(math.sqrt(2 * (1 + 0.25 + 0.81)), rel=1e-14)


def test_toeplitz_large_n_against_pairs_brute_force():
    """n = 300, min-sep k = 2: every pair {i, j} with j - i >= b, by dense numpy."""
    n = 300
    rng = np.random.default_rng(3)
    for b in (1, 7, 150, 299):
        coeffs = np.sort(rng.uniform(0, 1, n))[::-1]
        c = toeplitz_matrix(coeffs, n)
        x = c.T @ c
        d = np.diag(x)
        i, j = np.triu_indices(n, b)
        want = max(d.max(), (d[i] + d[j] + 2 * x[i, j]).max()) if i.size else d.max()
        got = mfnoise.Toeplitz(coeffs, n).sensitivity(mfnoise.Participation(n, 2, b))
        assert got.exact
        assert got.value**2 == pytest.approx(want, rel=1e-12)


def test_toeplitz_sensitivity_wrong_participation():
    s = mfnoise.Toeplitz(np.ones(3), 5)
    with pytest.raises(ValueError, match="n=6"):
        s.sensitivity(mfnoise.Participation(6, 1, 6))
    with pytest.raises(TypeError):
        s.sensitivity((5, 1, 5))


def test_sensitivity_float():
    assert float(mfnoise.Sensitivity(2.5, True, "x")) == 2.5


@pytest.mark.parametrize("n,k", [(10, 3), (12, 5), (9, 2)])
def test_nonneg_decreasing_toeplitz_cyclic_equals_min_sep(n, k):
    """docs/design.md: for non-negative non-increasing Toeplitz C the two kinds agree with k = ceil(n/b)."""
    p_cyc = mfnoise.Participation.epochs(n, k)
    p_min = mfnoise.Participation(n, p_cyc.max_participations, p_cyc.min_sep)
    s = mfnoise.sqrt_toeplitz(n)
    assert s.sensitivity(p_cyc).value == pytest.approx(s.sensitivity(p_min).value, rel=1e-14)
    c = toeplitz_sensitivity(s, s.coeffs, p_min)
    assert c.exact


def test_nearly_monotone_toeplitz_uses_the_envelope_bound():
    """Rounding-sized departures from monotone: a proven bound, not a refusal and not 'exact'."""
    n = 10
    rng = np.random.default_rng(4)
    for _ in range(20):
        s, c = make_strategy("toeplitz-nearly-decreasing", n, rng)
        p = mfnoise.Participation(n, 3, 2)
        out, ref = check_against_brute_force(s, c, p)
        if not sens_lib.is_nonneg_nonincreasing(s.coeffs):
            assert out.method == "toeplitz-decreasing-envelope" and not out.exact
    # A real departure still goes to the dense routine.
    out = mfnoise.Toeplitz(np.array([1.0, 0.5, 0.6]), 6).sensitivity(mfnoise.Participation(6, 2, 1))
    assert out.method != "toeplitz-decreasing-envelope"


def test_bisr_large_n_multi_epoch():
    """BISR with bands > 64 (FFT reciprocal) at n = 20000, 4 epochs: the worst pattern {0, b, 2b, 3b}
    from C's columns, with C's coefficients by the recurrence (scipy.signal.lfilter)."""
    import scipy.signal

    n, bands = 20000, 100
    s = mfnoise.bisr(n, bands)
    p = mfnoise.Participation.epochs(n, 4)
    got = s.sensitivity(p)
    impulse = np.zeros(n)
    impulse[0] = 1.0
    c = scipy.signal.lfilter([1.0], s.inverse_coeffs, impulse)
    pat = [0, 5000, 10000, 15000]
    # X[i, j] = <C[:, i], C[:, j]> = sum_{r >= j} c[r - i] c[r - j], for i <= j.
    x = {(i, j): np.dot(c[j - i : n - i], c[: n - j]) for i in pat for j in pat if i <= j}
    want = sum(x[i, j] if i <= j else x[j, i] for i in pat for j in pat)
    assert got.value**2 == pytest.approx(want, rel=1e-8)
    assert got.value**2 >= want * (1 - 1e-12)


@pytest.mark.parametrize("family", ["dense-nonneg", "dense-mixed", "banded", "toeplitz-arbitrary", "inverse-toeplitz"])
def test_row_bound_when_patterns_are_too_many(family, monkeypatch):
    """Force the min-sep row bound (used when exhaustive search is too big): still above brute force."""
    monkeypatch.setattr(sens_lib, "EXHAUSTIVE_PATTERN_LIMIT", 0)
    rng = np.random.default_rng(zlib.crc32(family.encode()) + 1)
    for n in (4, 7, 9):
        for b in range(1, n):
            for k in range(2, -(-n // b) + 1):
                s, c = make_strategy(family, n, rng, bands=b + 1)  # bands > min_sep: no column DP
                out, ref = check_against_brute_force(s, c, mfnoise.Participation(n, k, b))
                if not out.exact:  # Toeplitz: the smaller of the row bound and the abs-majorant bound
                    # (inverse Toeplitz: or its separated bound, mfnoise/strategies/inverse_toeplitz.py)
                    assert out.method in ("row-bound", "toeplitz-abs-majorant", "toeplitz-tail-envelope-bound")


def test_row_bound_at_n30_dominates_the_full_pattern():
    """n = 30, b = 1, k = 30: 2^30 patterns, so the row bound; the full set is one pattern."""
    rng = np.random.default_rng(9)
    c = np.tril(rng.uniform(0, 1, (30, 30))) + np.eye(30)
    out = mfnoise.Dense(c).sensitivity(mfnoise.Participation(30, 30, 1))
    x = c.T @ c
    assert out.value**2 >= x.sum() * (1 - 1e-14)
    assert out.value**2 == pytest.approx(x.sum(), rel=1e-12)  # X >= 0: the bound is tight here


def test_dense_cyclic_exact_with_negative_entries_across_patterns():
    # X = C^T C with X >= 0 inside each cyclic pattern ({0, 2}, {1, 3}) but negative across them:
    # the cross entries never enter the sensitivity, so the value is exact: sqrt(max(3, 2.8)).
    x = np.array([[1.0, -0.3, 0.5, -0.2], [-0.3, 1.0, -0.1, 0.4],
                  [0.5, -0.1, 1.0, -0.3], [-0.2, 0.4, -0.3, 1.0]])
    j = np.eye(4)[::-1]
    lower = np.linalg.cholesky(j @ x @ j)
    c = j @ lower.T @ j  # lower triangular with C^T C = X
    assert np.allclose(np.triu(c, 1), 0) and np.allclose(c.T @ c, x)
    s = sens_lib.dense(c, mfnoise.Participation.epochs(4, 2))
    assert s.exact
    assert s.value == pytest.approx(np.sqrt(3.0), rel=1e-12)
