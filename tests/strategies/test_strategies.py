"""Strategy families: matrices, inverses, BLT algebra, closed forms, validation, pytrees.

Every family is compared with a dense C built in conftest.make_strategy from the family's
defining parameters (docs/design.md), and C^{-1} z with np.linalg.solve.
"""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import mfnoise
from mfnoise.core import series
from mfnoise.core.workloads import DENSE_LIMIT
from mfnoise.strategies.blt import blt_coeffs, blt_inverse, rational

from conftest import (
    FAMILIES,
    FEW,
    binom_sqrt_coeffs,
    make_strategy,
    momentum_matrix,
    prefix_matrix,
    reciprocal_series,
    toeplitz_matrix,
)

N_VALUES = st.sampled_from([1, 2, 5, 16, 63, 64, 65, 130, 200])


@FEW
@given(family=st.sampled_from(FAMILIES), n=N_VALUES, seed=st.integers(0, 2**32 - 1),
       shape=st.sampled_from([(), (2,), (2, 3)]), data=st.data())
def test_dense_and_inverse_apply(family, n, seed, shape, data):
    bands = data.draw(st.integers(1, n), label="bands")
    rng = np.random.default_rng(seed)
    s, c = make_strategy(family, n, rng, bands=bands, conditioned=True)
    assert s.n == n
    dense = s.dense()
    np.testing.assert_allclose(dense, c, rtol=1e-10, atol=1e-12 * np.abs(c).max())
    assert np.all(np.triu(dense, 1) == 0)
    coeffs = s.toeplitz_coeffs()
    if coeffs is not None:  # Toeplitz families: C is the Toeplitz matrix of these coefficients
        np.testing.assert_allclose(toeplitz_matrix(coeffs, n), c, rtol=1e-10, atol=1e-12 * np.abs(c).max())
    z = rng.normal(size=(n,) + shape)
    got = s.inverse_apply(z)
    assert got.shape == z.shape and got.dtype == np.float64
    want = np.linalg.solve(c, z.reshape(n, -1)).reshape(z.shape)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * max(1.0, np.abs(want).max()))


# --------------------------------------------------------------------------------------------- BLT
@st.composite
def blt_params(draw, positive=None):
    d = draw(st.integers(1, 4))
    theta = np.array(draw(st.lists(st.floats(0.02, 0.98), min_size=d, max_size=d, unique=True)))
    if positive is None:
        positive = draw(st.booleans())
    if positive:
        omega = np.array(draw(st.lists(st.floats(0.01, 1.0), min_size=d, max_size=d))) * (1 + theta) / d * 0.95
    else:
        omega = np.array(draw(st.lists(st.floats(-1.0, 1.0), min_size=d, max_size=d)))
        omega *= 0.9 / max(1.0, float(np.sum(np.abs(omega) / (1 - theta))))
    return theta, omega


def _blt_reference(theta, omega, n):
    c = np.zeros(n)
    c[0] = 1.0
    for j in range(1, n):
        c[j] = sum(om * th ** (j - 1) for th, om in zip(theta, omega))
    return c


@FEW
@given(params=blt_params(), n=N_VALUES)
def test_blt_coefficients_and_rational_form(params, n):
    theta, omega = params
    want = _blt_reference(theta, omega, n)
    np.testing.assert_allclose(blt_coeffs(theta, omega, n), want, rtol=1e-12, atol=1e-15)
    num, den = rational(theta, omega)
    assert num.size == den.size == theta.size + 1 and num[0] == den[0] == 1.0
    # c(x) = N(x) / D(x): the series quotient, computed here by the O(n^2) recurrence.
    quotient = np.convolve(num, reciprocal_series(den, n))[:n]
    np.testing.assert_allclose(quotient, want, rtol=1e-9, atol=1e-12)


@FEW
@given(params=blt_params(), n=N_VALUES, shape=st.sampled_from([(), (3,)]), seed=st.integers(0, 2**32 - 1))
def test_blt_apply_and_inverse_apply(params, n, shape, seed):
    theta, omega = params
    s = mfnoise.BLT(theta, omega, n)
    c = toeplitz_matrix(_blt_reference(theta, omega, n), n)
    z = np.random.default_rng(seed).normal(size=(n,) + shape)
    flat = z.reshape(n, -1)
    np.testing.assert_allclose(s.apply(z), (c @ flat).reshape(z.shape), rtol=1e-9, atol=1e-10)
    want = np.linalg.solve(c, flat).reshape(z.shape)
    np.testing.assert_allclose(s.inverse_apply(z), want, rtol=1e-9, atol=1e-10 * max(1, np.abs(want).max()))


@FEW
@given(params=blt_params(), n=N_VALUES)
def test_blt_inverse_is_a_blt_with_the_same_buffers(params, n):
    theta, omega = params
    if np.all(omega > 0):
        new_theta, new_omega = blt_inverse(theta, omega)
    else:
        # Mixed signs can give complex decays (no real BLT inverse): refused, never approximated.
        try:
            new_theta, new_omega = blt_inverse(theta, omega)
        except ValueError as e:
            assert "non-real" in str(e) or "repeated" in str(e)
            return
    assert new_theta.shape == new_omega.shape == theta.shape  # d buffers in, d buffers out
    assert np.all(np.isreal(new_theta)) and np.all(np.isreal(new_omega))
    got = _blt_reference(new_theta, new_omega, n)  # 1 + sum omega' x / (1 - theta' x)
    c = _blt_reference(theta, omega, n)
    np.testing.assert_allclose(got, reciprocal_series(c, n), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got, series.reciprocal(c, n), rtol=1e-7, atol=1e-9)
    inv = np.linalg.inv(toeplitz_matrix(c, n))
    np.testing.assert_allclose(toeplitz_matrix(got, n), inv, rtol=1e-7, atol=1e-9)
    # The method agrees with the function.
    t2, o2 = mfnoise.BLT(theta, omega, n).inverse()
    np.testing.assert_array_equal(t2, new_theta)
    np.testing.assert_array_equal(o2, new_omega)


@FEW
@given(params=blt_params(positive=True))
def test_blt_inverse_decays_for_positive_omega(params):
    """omega > 0 with sum omega / (1 + theta) < 1: the decays of C^{-1} are real, in (-1, 1)."""
    theta, omega = params
    new_theta, _ = blt_inverse(theta, omega)
    assert np.all(np.abs(new_theta) < 1)


def test_blt_inverse_product_identity():
    """C C^{-1} = I for a concrete 3-buffer BLT, via the product of the two series."""
    theta, omega = np.array([0.3, 0.6, 0.9]), np.array([0.2, 0.1, 0.05])
    n = 500
    t2, o2 = blt_inverse(theta, omega)
    prod = series.multiply(blt_coeffs(theta, omega, n), _blt_reference(t2, o2, n), n)
    np.testing.assert_allclose(prod, np.eye(1, n)[0], atol=1e-12)


# ------------------------------------------------------------------- InverseBLT (realised BLTs)
@FEW
@given(params=blt_params(), n=N_VALUES, seed=st.integers(0, 2**32 - 1))
def test_inverse_blt_dense_and_inverse_apply(params, n, seed):
    """InverseBLT(theta, omega): C^{-1} = I + sum_i omega_i T_i (any signs), C its inverse, built here densely."""
    from mfnoise.strategies.blt import InverseBLT

    theta, omega = params
    s = InverseBLT(theta, omega, n)
    cinv = toeplitz_matrix(_blt_reference(theta, omega, n), n)
    c = np.linalg.inv(cinv)
    np.testing.assert_allclose(s.dense(), c, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(c).max()))
    np.testing.assert_allclose(s.toeplitz_coeffs(), c[:, 0], rtol=1e-8, atol=1e-10 * max(1.0, np.abs(c).max()))
    z = np.random.default_rng(seed).normal(size=(n, 2))
    np.testing.assert_allclose(s.inverse_apply(z), cinv @ z, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(cinv @ z).max()))
    back = type(s).from_arrays(s.arrays(), s.params())
    np.testing.assert_array_equal(back.dense(), s.dense())


def test_inverse_blt_accepts_decays_at_or_past_one_and_refuses_bad_input():
    """Rounding can put a decay of C^{-1} at 1 (a random walk in the noise): still a valid strategy."""
    from mfnoise.strategies.blt import InverseBLT

    s = InverseBLT(np.array([1.0, 0.5]), np.array([-0.01, -0.2]), 6)
    assert np.all(np.isfinite(s.dense()))
    with pytest.raises(ValueError, match="one entry per buffer"):
        InverseBLT(np.array([0.5]), np.array([0.1, 0.2]), 6)
    with pytest.raises(ValueError, match="non-finite"):
        InverseBLT(np.array([np.nan]), np.array([0.1]), 6)


@FEW
@given(params=blt_params(positive=True), n=N_VALUES)
@example(params=(np.array([0.5, 0.75, 0.875, 0.9375]), np.array([0.35625, 0.415625, 0.4453125, 0.46015625])), n=16)
@example(params=(np.array([0.02, np.nextafter(0.02, 1)]), np.array([0.4845, 0.4845])), n=1)
def test_an_inverse_with_negative_scales_has_a_positive_reciprocal(params, n):
    """reciprocal_is_positive's proposition, checked against a dense inverse: C^{-1} the inverse of a
    positive BLT, rounded to float32 or float64 (omega' < 0; a decay theta' may be < 0), has C >= 0,
    and its coefficients are the positive BLT's closed form (not rounding noise below 0)."""
    from mfnoise.strategies.blt import InverseBLT, blt_coeffs, blt_inverse, reciprocal_is_positive

    theta, omega = params
    # decays a rounding apart are one buffer: the inverse then has a scale of exactly 0
    assume(theta.size == 1 or np.min(np.diff(np.sort(theta))) > 1e-6)
    inv_theta, inv_omega = blt_inverse(theta, omega)
    assert np.all(inv_omega < 0)
    for dt in (np.float32, np.float64):
        th, om = inv_theta.astype(dt).astype(np.float64), inv_omega.astype(dt).astype(np.float64)
        # the unrounded inverse's 1 / r is the BLT itself (decays theta > 0.02): rounding keeps that
        assert reciprocal_is_positive(th, om), (th, om)
        dense = np.linalg.inv(toeplitz_matrix(_blt_reference(th, om, n), n))
        assert np.all(np.tril(dense) >= -1e-13)
        coeffs = InverseBLT(th, om, n).toeplitz_coeffs()
        assert np.all(coeffs >= 0)
        # its own BLT form (decays and scales from the secular equation), an independent path; the
        # two roundings differ by up to ~4e-13 absolute (c_0 = 1) where decays cluster
        np.testing.assert_allclose(coeffs, blt_coeffs(*blt_inverse(th, om), n), rtol=1e-9, atol=5e-12)


def test_far_tail_rounding_is_not_a_negative_coefficient():
    """The 50-epoch BLT of benchmarks/amplification.py (n = 5850, its optimizer's decays and scales):
    the series reciprocal of its float32 realisation dips to about -1e-16 from c_3841 on (true
    values ~1e-20 > 0), which made MMCC refuse it. Its coefficients are now >= 0 and within the
    reciprocal's accuracy of the closed form, and MMCC prices it."""
    from mfnoise.core import series
    from mfnoise.strategies.blt import BLT, blt_coeffs, blt_inverse
    from mfnoise.training import mmcc

    s = BLT(np.array([0.06043349, 0.62989489, 0.98950884]), np.array([0.02181776, 0.25170148, 0.2367892]), 5850)
    r = s.realised(np.float32)
    assert np.min(series.reciprocal(r.inverse_coeffs(), r.n)) < 0  # what the clamp is for
    coeffs = r.toeplitz_coeffs()
    assert np.all(coeffs >= 0)
    np.testing.assert_allclose(coeffs, blt_coeffs(*blt_inverse(r.theta, r.omega), r.n), rtol=0, atol=1e-13)
    priced = mmcc.priced_strategy(s)
    tc = priced.toeplitz_coeffs()
    assert tc is not None and np.all(np.asarray(tc) >= s.toeplitz_coeffs())


def test_a_reciprocal_with_true_negative_coefficients_is_left_alone():
    """Not every InverseBLT has C >= 0: 1 / (1 + 0.3 x / (1 - 0.5 x)) = 1 - 0.3 x / (1 - 0.2 x)."""
    from mfnoise.strategies.blt import InverseBLT, reciprocal_is_positive

    coeffs = InverseBLT(np.array([0.5]), np.array([0.3]), 8).toeplitz_coeffs()
    np.testing.assert_allclose(coeffs, np.r_[1.0, -0.3 * 0.2 ** np.arange(7)], rtol=1e-12)
    assert not reciprocal_is_positive(np.array([0.5]), np.array([0.3]))
    assert not reciprocal_is_positive(np.array([0.5, 0.2]), np.array([-0.3, 0.1]))  # mixed signs
    assert not reciprocal_is_positive(np.array([0.5, 0.5]), np.array([-0.3, -0.1]))  # repeated decay
    # one negative decay: 1 / r = 1 + 0.3 x / (1 - 0.2 x) (decay 0.2 >= 0) but 1 / (1 - 0.3 x / (1 + 0.5 x))
    # = 1 + 0.3 x / (1 + 0.2 x) alternates (decay -0.2)
    assert reciprocal_is_positive(np.array([-0.1]), np.array([-0.3]))
    assert not reciprocal_is_positive(np.array([-0.5]), np.array([-0.3]))
    alternating = InverseBLT(np.array([-0.5]), np.array([-0.3]), 8).toeplitz_coeffs()
    np.testing.assert_allclose(alternating, np.r_[1.0, 0.3 * (-0.2) ** np.arange(7)], rtol=1e-12)
    assert not reciprocal_is_positive(np.array([-0.5, -0.1]), np.array([-0.3, -0.1]))  # two negative decays


# ------------------------------------------------------------- what the noise generator realises
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("family", ["dense-nonneg", "dense-mixed", "banded", "toeplitz-arbitrary", "blt-positive",
                                    "inverse-toeplitz", "bsr", "bisr", "identity"])
def test_realised_strategy_is_the_rounded_one(family, dtype):
    """realised(dtype): the off-diagonal coefficients rounded to dtype, the diagonal 1 / round(1 / C[t, t]),
    or for a BLT the inverse BLT's parameters rounded; rebuilt here from the defining parameters."""
    n = 9
    s, c = make_strategy(family, n, np.random.default_rng(3), bands=4, conditioned=True)
    r = s.realised(dtype)

    def rnd(x):
        return np.asarray(np.asarray(x, np.float64).astype(dtype), np.float64)

    if family == "blt-positive":
        theta, omega = s.inverse()
        want = np.linalg.inv(toeplitz_matrix(_blt_reference(rnd(theta), rnd(omega), n), n))
    elif family in ("inverse-toeplitz", "bisr"):
        want = np.linalg.inv(toeplitz_matrix(rnd(s.inverse_coeffs), n))
    else:
        want = np.tril(rnd(c), -1) + np.diag(1.0 / rnd(1.0 / np.diag(c)))
    np.testing.assert_allclose(r.dense(), want, rtol=1e-12, atol=1e-13 * np.abs(want).max())
    if dtype == np.float64:  # float64: only the reciprocal diagonal can move, by at most one ulp
        np.testing.assert_allclose(r.dense(), c, rtol=3e-16 if family != "blt-positive" else 1e-9,
                                   atol=1e-12 * np.abs(c).max())


@FEW
@given(n=st.integers(2, 8), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_majorant_bound_brackets_the_sensitivity(n, seed, data):
    """For any Toeplitz coefficients: lower <= sens(C, p) <= upper, against brute force over patterns."""
    from mfnoise.strategies.toeplitz import majorant_bound

    from conftest import sensitivity_bounds

    if data.draw(st.booleans(), label="cyclic"):
        p = mfnoise.Participation.epochs(n, data.draw(st.sampled_from([k for k in range(1, n + 1) if n % k == 0])))
    else:
        b = data.draw(st.integers(1, n), label="min_sep")
        p = mfnoise.Participation(n, data.draw(st.integers(1, -(-n // b)), label="k"), b)
    rng = np.random.default_rng(seed)
    if rng.random() < 0.5:
        coeffs = rng.normal(size=n)
    else:  # nearly non-increasing: where the bound is meant to be tight
        coeffs = np.sort(rng.uniform(0, 1, n))[::-1] + 1e-3 * rng.normal(size=n)
    coeffs[0] = 1.0
    bound, lower = majorant_bound(coeffs, p)
    ref = sensitivity_bounds(toeplitz_matrix(coeffs, n), p)
    assert bound.value**2 >= ref["upper"] * (1 - 1e-12)  # dominates even the abs-sum bound
    assert lower**2 <= ref["upper"] * (1 + 1e-12) and lower**2 <= ref["plain"] * (1 + 1e-12) + 1e-12


def test_large_n_non_monotone_toeplitz_uses_a_tight_majorant():
    """n = DENSE_LIMIT + 1 (no dense routine), a tail growing by 1e-9 per step (a float32 BLT whose decay
    reached 1): the majorant bound, within MAJORANT_SLACK of the lower bound, instead of a refusal."""
    from mfnoise.strategies.toeplitz import MAJORANT_SLACK, majorant_bound

    n = DENSE_LIMIT + 1
    j = np.arange(n)
    coeffs = 0.6 * 0.9 ** j + 0.01 * (1 + 1e-9) ** j
    coeffs[0] = 1.0
    p = mfnoise.Participation(n, 4, n // 4)
    got = mfnoise.Toeplitz(coeffs, n).sensitivity(p)
    bound, lower = majorant_bound(coeffs, p)
    assert got.method == "toeplitz-abs-majorant" and not got.exact and got.value == bound.value
    assert lower <= got.value <= lower * (1 + MAJORANT_SLACK)


# ----------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("n", [1, 2, 10, 100, 4096])
def test_sqrt_toeplitz_prefix(n):
    s = mfnoise.sqrt_toeplitz(n)
    assert isinstance(s, mfnoise.Toeplitz) and s.coeffs.shape == (n,)
    np.testing.assert_allclose(s.coeffs, binom_sqrt_coeffs(n), rtol=1e-10)
    if n <= 100:
        c = s.dense()
        np.testing.assert_allclose(c @ c, prefix_matrix(n), atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
def test_sqrt_toeplitz_momentum_squares_to_the_workload(beta):
    n = 80
    w = mfnoise.workloads.momentum(n, beta)
    c = mfnoise.sqrt_toeplitz(n, w).dense()
    a = momentum_matrix(n, beta, 1.0)
    np.testing.assert_allclose(c @ c, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,bands", [(1, 1), (10, 1), (10, 3), (10, 10), (300, 17)])
def test_bsr_and_bisr(n, bands):
    root = binom_sqrt_coeffs(bands)
    s = mfnoise.bsr(n, bands)
    assert isinstance(s, mfnoise.Banded) and s.bands == bands
    c = s.dense()
    np.testing.assert_allclose(np.linalg.norm(c, axis=0), 1.0, rtol=1e-14)  # column-normalised
    for t in range(n):
        m = min(bands, n - t)
        np.testing.assert_allclose(c[t : t + m, t], root[:m] / np.linalg.norm(root[:m]), rtol=1e-13)
        assert np.all(c[t + m :, t] == 0)
    s = mfnoise.bisr(n, bands)
    assert isinstance(s, mfnoise.InverseToeplitz) and s.inverse_bands == bands
    # C^{-1} = the first `bands` coefficients of A^{-1/2} = (1 - x)^{1/2}.
    want = reciprocal_series(binom_sqrt_coeffs(bands), bands)
    np.testing.assert_allclose(s.inverse_coeffs, want, rtol=1e-12, atol=1e-15)
    if n <= 300:
        np.testing.assert_allclose(np.linalg.inv(s.dense()), toeplitz_matrix(want, n), atol=1e-10)


def test_closed_forms_with_momentum_workload():
    n, bands = 50, 6
    w = mfnoise.workloads.momentum(n, 0.9)
    s = mfnoise.sqrt_toeplitz(n, w)
    b = mfnoise.bsr(n, bands, w)
    i = mfnoise.bisr(n, bands, w)
    np.testing.assert_allclose(b.columns[0], s.coeffs[:bands] / np.linalg.norm(s.coeffs[:bands]), rtol=1e-12)
    np.testing.assert_allclose(i.inverse_coeffs, reciprocal_series(s.coeffs, bands), rtol=1e-10)


def test_closed_forms_refuse_bad_input():
    with pytest.raises(ValueError, match="bands=0"):
        mfnoise.bsr(10, 0)
    with pytest.raises(ValueError, match="bands=11"):
        mfnoise.bisr(10, 11)
    sched = mfnoise.workloads.momentum(10, 0.9, mfnoise.workloads.cooldown(10))
    with pytest.raises(ValueError, match="Toeplitz workload"):
        mfnoise.sqrt_toeplitz(10, sched)
    with pytest.raises(ValueError, match="n=12"):
        mfnoise.sqrt_toeplitz(10, mfnoise.workloads.momentum(12, 0.5))
    with pytest.raises(ValueError, match="n=12"):
        mfnoise.bsr(10, 2, mfnoise.workloads.prefix_sum(12))


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: mfnoise.Toeplitz(np.ones(4), 3), "4 coefficients"),
        (lambda: mfnoise.Toeplitz(np.array([]), 3), "0 coefficients"),
        (lambda: mfnoise.Toeplitz(np.array([0.0, 1.0]), 3), "c_0 = 0"),
        (lambda: mfnoise.Toeplitz(np.array([1.0, np.nan]), 3), "nan"),
        (lambda: mfnoise.Toeplitz(np.array([1.0, np.inf]), 3), "inf"),
        (lambda: mfnoise.Toeplitz(np.ones((2, 2)), 3), r"shape \(2, 2\)"),
        (lambda: mfnoise.BLT([0.5, 0.6], [0.1], 5), r"\(2,\).*\(1,\)"),
        (lambda: mfnoise.BLT([1.0], [0.1], 5), "theta=1.0"),
        (lambda: mfnoise.BLT([0.0], [0.1], 5), "theta=0.0"),
        (lambda: mfnoise.BLT([-0.2], [0.1], 5), "theta=-0.2"),
        (lambda: mfnoise.BLT([1.5, 0.5], [0.1, 0.1], 5), "theta=1.5"),
        (lambda: mfnoise.BLT([0.5], [np.nan], 5), "nan"),
        (lambda: mfnoise.BLT([0.5], [0.1], 0), "got 0"),
        (lambda: mfnoise.Dense(np.ones((2, 3))), r"shape \(2, 3\)"),
        (lambda: mfnoise.Dense(np.ones((2, 2))), "lower triangular"),
        (lambda: mfnoise.Dense(np.array([[1.0, 0], [1.0, 0.0]])), r"C\[1, same\] = 0"),
        (lambda: mfnoise.Dense(np.array([[1.0, 0], [np.inf, 1.0]])), "inf"),
        (lambda: mfnoise.Banded(np.ones((3, 2))), "t \\+ j >= n"),
        (lambda: mfnoise.Banded(np.array([[1.0], [0.0], [1.0]])), r"C\[1, same\] = 0"),
        (lambda: mfnoise.Banded(np.ones((2, 3))), "bands=3"),
        (lambda: mfnoise.Banded.from_dense(np.eye(3), 4), "bands=4"),
        (lambda: mfnoise.Banded.normalized_columns(np.array([[1.0, 0.0], [0.0, 0.0]])), "zero column"),
        (lambda: mfnoise.InverseToeplitz(np.array([0.0, 1.0]), 4), "r_0 = 0"),
        (lambda: mfnoise.InverseToeplitz(np.ones(5), 4), "5 coefficients"),
        (lambda: mfnoise.Identity(0), "got 0"),
    ],
)
def test_bad_strategies_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_banded_from_dense():
    rng = np.random.default_rng(0)
    c = np.tril(rng.normal(size=(7, 7))) + 3 * np.eye(7)
    s = mfnoise.Banded.from_dense(c, 3)
    want = np.tril(c) - np.tril(c, -3)
    np.testing.assert_array_equal(s.dense(), want)


_LARGE = {
    "identity": lambda n: mfnoise.Identity(n),
    "banded": lambda n: mfnoise.bsr(n, 2),
    "toeplitz": lambda n: mfnoise.Toeplitz(np.array([1.0, 0.5]), n),
    "blt": lambda n: mfnoise.BLT([0.5], [0.2], n),
    "inverse-toeplitz": lambda n: mfnoise.bisr(n, 3),
    "sqrt-toeplitz": lambda n: mfnoise.sqrt_toeplitz(n),
}


@pytest.mark.parametrize("family", sorted(_LARGE))  # Dense is materialised already: nothing to refuse
def test_dense_refused_above_the_limit(family):
    n = DENSE_LIMIT + 1
    s = _LARGE[family](n)
    with pytest.raises(ValueError, match=rf"refusing to build a dense {n}x{n}.*n={n} exceeds max_n={DENSE_LIMIT}"):
        s.dense()
    with pytest.raises(ValueError, match="max_n=5"):
        s.dense(max_n=5)


def test_dense_max_n_override():
    s = mfnoise.Toeplitz(np.array([1.0, 0.5]), 6)
    with pytest.raises(ValueError, match="max_n=5"):
        s.dense(max_n=5)
    assert s.dense(max_n=6).shape == (6, 6)


# --------------------------------------------------------------------------------------- pytrees
def _all_strategies():
    rng = np.random.default_rng(5)
    return [make_strategy(f, 6, rng, bands=3)[0] for f in FAMILIES]


@pytest.mark.parametrize("s", _all_strategies(), ids=FAMILIES)
def test_pytree_round_trip(s):
    leaves, tree = jax.tree_util.tree_flatten(s)
    assert len(leaves) == len(s.arrays())
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert type(back) is type(s) and back.n == s.n
    for k, v in s.arrays().items():
        np.testing.assert_array_equal(back.arrays()[k], v)
    same = jax.tree.map(lambda x: x, s)
    np.testing.assert_array_equal(same.dense(), s.dense())
    halved = jax.tree.map(lambda x: 0.5 * x, s)  # keeps BLT decays in (0, 1)
    assert type(halved) is type(s)
    for k, v in s.arrays().items():
        np.testing.assert_array_equal(halved.arrays()[k], 0.5 * v)


@pytest.mark.parametrize("s", _all_strategies(), ids=FAMILIES)
def test_pytree_through_jit(s):
    """Strategies pass through jax.jit as pytrees (arrays as leaves, sizes static)."""
    with jax.enable_x64(True):
        out = jax.jit(lambda t: jax.tree.map(lambda x: x + 0.0, t))(s)
    assert type(out) is type(s) and out.n == s.n
    for k, v in s.arrays().items():
        np.testing.assert_allclose(np.asarray(out.arrays()[k]), v, rtol=1e-15)


def test_strategies_are_immutable():
    s = mfnoise.Toeplitz(np.array([1.0, 0.5]), 4)
    with pytest.raises(Exception):  # noqa: B017 (any refusal: the strategy is frozen)
        s.n = 5  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.coeffs[0] = 2.0  # read-only array


def test_import_does_not_flip_x64():
    code = (
        "import jax; before = jax.config.jax_enable_x64; import mfnoise; "
        "import mfnoise.cli, mfnoise.cli.evaluate, mfnoise.strategies.io, mfnoise.strategies.error; "
        "mfnoise.sqrt_toeplitz(8).sensitivity(mfnoise.Participation.single(8)); "
        "import jax.numpy as jnp; print(before, jax.config.jax_enable_x64, jnp.zeros(1).dtype)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "float32"]


def test_families_registry_and_repr():
    from mfnoise.strategies.registry import FAMILIES as REGISTRY

    for cls in (mfnoise.Identity, mfnoise.Dense, mfnoise.Banded, mfnoise.Toeplitz, mfnoise.BLT,
                mfnoise.InverseToeplitz):
        assert REGISTRY[cls.family] is cls
    assert repr(mfnoise.BLT([0.5], [0.2], 7)) == "BLT(n=7, buffers=1)"
    assert math.isclose(mfnoise.Identity(9).sensitivity(mfnoise.Participation(9, 5, 2)).value, math.sqrt(5))


# ------------------------------------------------ what every strategy tells its consumers
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 7, 20])
def test_strategy_interface_matches_the_dense_matrix(family, n):
    """columns_at, squared_column_norms, bands, band_columns and state_arrays against the dense C
    built in conftest from the defining parameters."""
    s, c = make_strategy(family, n, np.random.default_rng(n), bands=4, conditioned=True)
    tol = dict(rtol=1e-10, atol=1e-12 * max(1.0, np.abs(c).max()))
    steps = np.array([0, n // 2, n - 1])
    np.testing.assert_allclose(s.columns_at(steps), c[:, steps], **tol)
    np.testing.assert_allclose(s.columns_at(np.arange(n)), c, **tol)
    np.testing.assert_allclose(s.squared_column_norms(), np.sum(c**2, axis=0), rtol=1e-9,
                               atol=1e-12 * max(1.0, np.abs(c).max()) ** 2)
    bands = s.bands
    lags = np.subtract.outer(np.arange(n), np.arange(n))
    if bands is None:
        assert s.band_columns() is None
    else:
        assert np.all(c[lags >= bands] == 0)  # C[i, j] = 0 for i - j >= bands ...
        assert bands == 1 or np.any(c[lags == bands - 1] != 0)  # ... and no smaller number does
        cols = s.band_columns()
        assert cols is not None and cols.shape[0] == n and cols.shape[1] >= bands
        for j in range(cols.shape[1]):
            np.testing.assert_allclose(cols[: n - j, j], np.diagonal(c, -j), **tol)
            assert np.all(cols[n - j :, j] == 0)
    assert s.state_arrays() == s.stream_table(np.float32).m == s.stream_table(np.float64).m
    with pytest.raises(ValueError, match="steps"):
        s.columns_at([n])


def test_bands_of_stored_forms():
    """Trailing zero bands do not count; the families that hold C in full say None."""
    cols = np.zeros((6, 4))
    cols[:, 0] = 1.0
    cols[:5, 1] = 0.5
    assert mfnoise.Banded(cols).bands == 2 and mfnoise.Banded(cols).params()["bands"] == 4
    assert mfnoise.Toeplitz(np.array([1.0, 0.5, 0.0]), 6).bands == 2
    assert mfnoise.Identity(6).bands == 1 and mfnoise.Dense(np.eye(6)).bands == 1
    assert mfnoise.Dense(np.tril(np.ones((6, 6)))).bands == 6
    assert mfnoise.BLT([0.5], [0.2], 6).bands is None
    s = mfnoise.bisr(6, 3)
    assert s.bands is None and s.inverse_bands == 3 and s.params()["bands"] == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_runs_exactly(dtype):
    """True exactly when the strategy the generator realises in dtype is C itself, entry for entry."""
    assert mfnoise.Identity(5).runs_exactly(dtype)
    assert mfnoise.Toeplitz(np.array([1.0, 0.5, 0.25]), 5).runs_exactly(dtype)
    assert mfnoise.Toeplitz(np.array([2.0, -0.75]), 5).runs_exactly(dtype)
    assert not mfnoise.Toeplitz(np.array([3.0, 0.5]), 5).runs_exactly(dtype)  # 1 / 3 is inexact
    assert mfnoise.Toeplitz(np.array([1.0, 0.1]), 5).runs_exactly(dtype) == (dtype == np.float64)
    assert not mfnoise.BLT([0.5], [0.25], 5).runs_exactly(dtype)  # it streams its computed inverse
    rng = np.random.default_rng(0)
    for family in FAMILIES:
        s, _ = make_strategy(family, 8, rng, bands=3, conditioned=True)
        if s.runs_exactly(dtype):
            np.testing.assert_array_equal(s.realised(dtype).dense(), s.dense(), err_msg=family)


def test_family_signatures_are_visible():
    """Families are plain dataclasses: their constructors' signatures are the fields."""
    import inspect

    assert list(inspect.signature(mfnoise.Toeplitz).parameters) == ["coeffs", "n"]
    assert list(inspect.signature(mfnoise.BLT).parameters) == ["theta", "omega", "n"]
    assert list(inspect.signature(mfnoise.Banded).parameters) == ["columns"]
    assert list(inspect.signature(mfnoise.Dense).parameters) == ["matrix"]
    assert list(inspect.signature(mfnoise.Identity).parameters) == ["n"]
    assert mfnoise.Dense(np.eye(3)).n == 3 and mfnoise.Banded(np.ones((4, 1))).n == 4


def test_registry_lookup_and_duplicates():
    from mfnoise.strategies import registry

    assert registry.lookup("toeplitz") is mfnoise.Toeplitz
    assert set(registry.FAMILIES) == {"identity", "dense", "banded", "toeplitz", "blt", "inverse-blt",
                                      "inverse-toeplitz"}
    with pytest.raises(ValueError, match="unknown strategy family 'nope'"):
        registry.lookup("nope")

    class Impostor(mfnoise.Toeplitz):
        family = "toeplitz"

    with pytest.raises(ValueError, match="already registered"):
        registry.family(Impostor)
    assert registry.family(mfnoise.Toeplitz) is mfnoise.Toeplitz  # registering the same class again is a no-op


def test_closed_forms_registry():
    from mfnoise.strategies.closed_forms import CLOSED_FORMS, closed_form

    assert list(CLOSED_FORMS) == ["identity", "sqrt-toeplitz", "bsr", "bisr"]
    np.testing.assert_array_equal(closed_form("bsr", 12, 3).dense(), mfnoise.bsr(12, 3).dense())
    np.testing.assert_array_equal(closed_form("bisr", 12, 3).dense(), mfnoise.bisr(12, 3).dense())
    np.testing.assert_array_equal(closed_form("sqrt-toeplitz", 12).dense(), mfnoise.sqrt_toeplitz(12).dense())
    assert isinstance(closed_form("identity", 12), mfnoise.Identity)
    with pytest.raises(ValueError, match="needs bands"):
        closed_form("bsr", 12)
    with pytest.raises(ValueError, match="unknown closed form"):
        closed_form("nope", 12)


# ------------------------------------------- a BLT whose inverse is no real BLT still streams
def test_mixed_sign_blt_streams_its_own_buffers():
    """omega of mixed signs: C^{-1}'s decays are complex (0.5 +- 0.2i), so the generator solves
    C z = w with C's own buffers ("buffers-output"); the realised strategy is C's rounded BLT."""
    s = mfnoise.BLT(np.array([0.9, 0.5]), np.array([0.5, -0.1]), 16)
    with pytest.raises(ValueError, match="non-real"):
        s.inverse()
    for dtype in (np.float32, np.float64):
        table = s.stream_table(dtype)
        assert table.kind == "buffers-output" and table.m == 2 == s.state_arrays()
        np.testing.assert_array_equal(table.table, np.stack([s.theta, s.omega]).astype(dtype).astype(np.float64))
        r = s.realised(dtype)
        assert type(r) is mfnoise.BLT
        np.testing.assert_array_equal(r.theta, table.table[0])
        p = mfnoise.Participation.epochs(16, 4)
        bound = s.noise_sensitivity(p, dtype).value
        assert bound >= max(s.sensitivity(p).value, r.sensitivity(p).value)
    assert type(s.realised(np.float64)) is mfnoise.BLT and s.runs_exactly(np.float64)
    # a decay that rounds to 1 in float32 cannot be represented as a BLT: refused, naming the dtype
    near_one = mfnoise.BLT(np.array([1 - 2.0**-30, 0.5]), np.array([0.5, -0.1]), 16)
    with pytest.raises(ValueError, match="float32"):
        near_one.stream_table(np.float32)
    assert near_one.stream_table(np.float64).kind == "buffers-output"
