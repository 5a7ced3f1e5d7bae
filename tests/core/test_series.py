"""Toeplitz power-series algebra against dense linear algebra (scipy.linalg.toeplitz, numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfnoise.core import series

from conftest import FEW, toeplitz_matrix

# Sizes on both sides of the direct / FFT (64) switches, and a non-power-of-two FFT size.
SIZES = st.sampled_from([1, 2, 3, 17, 63, 64, 65, 100, 129, 257, 300])


def _coeffs(rng, m, dominant=True):
    t = rng.normal(size=m)
    t[0] = rng.choice([-1, 1]) * rng.uniform(0.5, 2.0)
    if dominant:  # keeps 1 / t(x) bounded, so relative comparisons are meaningful at large n
        t[1:] *= 0.9 * abs(t[0]) / max(1.0, np.abs(t[1:]).sum())
    return t


@FEW
@given(n=SIZES, la=SIZES, lb=SIZES, seed=st.integers(0, 2**32 - 1))
def test_multiply_is_the_dense_product(n, la, lb, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=la), rng.normal(size=lb)
    got = series.multiply(a, b, n)
    assert got.shape == (n,)
    want = toeplitz_matrix(a, n) @ toeplitz_matrix(b, n)
    np.testing.assert_allclose(toeplitz_matrix(got, n), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(got, want[:, 0], rtol=1e-12, atol=1e-12 * np.abs(want).max())


@FEW
@given(n=SIZES, m=SIZES, seed=st.integers(0, 2**32 - 1))
def test_reciprocal_is_the_dense_inverse(n, m, seed):
    rng = np.random.default_rng(seed)
    t = _coeffs(rng, m)
    g = series.reciprocal(t, n)
    want = np.linalg.inv(toeplitz_matrix(t, n))
    np.testing.assert_allclose(g, want[:, 0], rtol=1e-10, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(toeplitz_matrix(t, n) @ toeplitz_matrix(g, n), np.eye(n), atol=1e-11)


@FEW
@given(n=SIZES, m=SIZES, seed=st.integers(0, 2**32 - 1))
def test_divide_is_a_times_t_inverse(n, m, seed):
    rng = np.random.default_rng(seed)
    a, t = rng.normal(size=m), _coeffs(rng, m)
    want = toeplitz_matrix(a, n) @ np.linalg.inv(toeplitz_matrix(t, n))
    np.testing.assert_allclose(series.divide(a, t, n), want[:, 0], rtol=1e-10, atol=1e-11 * np.abs(want).max())


@FEW
@given(n=SIZES, m=SIZES, seed=st.integers(0, 2**32 - 1))
def test_sqrt_squared_is_the_input(n, m, seed):
    rng = np.random.default_rng(seed)
    a = _coeffs(rng, m)
    a[0] = abs(a[0])
    s = series.sqrt(a, n)
    assert s[0] == pytest.approx(np.sqrt(a[0]), rel=1e-15)
    want = np.zeros(n)
    want[: min(m, n)] = a[:n]
    s_dense = toeplitz_matrix(s, n)
    np.testing.assert_allclose((s_dense @ s_dense)[:, 0], want, rtol=1e-10, atol=1e-11 * np.abs(a).max())


def test_sqrt_of_prefix_sum_is_binomial():
    n = 1000
    s = series.sqrt(np.ones(n), n)
    from conftest import binom_sqrt_coeffs

    np.testing.assert_allclose(s, binom_sqrt_coeffs(n), rtol=1e-12)


@FEW
@given(n=SIZES, m=SIZES, shape=st.sampled_from([(), (1,), (3,), (2, 3)]), seed=st.integers(0, 2**32 - 1))
def test_apply_and_solve_are_dense(n, m, shape, seed):
    rng = np.random.default_rng(seed)
    t = _coeffs(rng, m)
    z = rng.normal(size=(n,) + shape)
    dense = toeplitz_matrix(t, n)
    flat = z.reshape(n, -1)
    got = series.apply(t, z)
    assert got.shape == z.shape
    want = (dense @ flat).reshape(z.shape)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    got = series.solve(t, z)
    want = np.linalg.solve(dense, flat).reshape(z.shape)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * np.abs(want).max())


@FEW
@given(n=SIZES, m=SIZES, seed=st.integers(0, 2**32 - 1))
def test_to_dense(n, m, seed):
    t = np.random.default_rng(seed).normal(size=m)
    np.testing.assert_array_equal(series.to_dense(t, n), toeplitz_matrix(t, n))


def test_reciprocal_refuses_singular():
    with pytest.raises(ValueError, match="t_0=0.0"):
        series.reciprocal(np.array([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="nan"):
        series.reciprocal(np.array([np.nan, 1.0]), 4)
    with pytest.raises(ValueError):
        series.reciprocal(np.array([]), 4)


def test_sqrt_refuses_non_positive_leading_coefficient():
    with pytest.raises(ValueError, match="a_0 > 0, got -1.0"):
        series.sqrt(np.array([-1.0, 1.0]), 3)
    with pytest.raises(ValueError, match="got 0.0"):
        series.sqrt(np.array([0.0, 1.0]), 3)


def test_multiply_empty_and_truncation():
    np.testing.assert_array_equal(series.multiply(np.array([]), np.ones(3), 4), np.zeros(4))
    np.testing.assert_array_equal(series.multiply(np.ones(10), np.ones(10), 3), [1.0, 2.0, 3.0])
