"""Workloads against their definitions (docs/design.md), summed entry by entry."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfnoise.core import workloads

from conftest import FEW, momentum_matrix, prefix_matrix


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_prefix_sum(n):
    w = workloads.prefix_sum(n)
    assert w.is_toeplitz and w.name == "prefix" and w.matrix is None
    np.testing.assert_array_equal(w.dense(), prefix_matrix(n))


@FEW
@given(n=st.integers(1, 40), beta=st.floats(0.0, 0.99), lr=st.sampled_from([None, 1.0, 0.1, 2.5]))
def test_momentum_constant(n, beta, lr):
    w = workloads.momentum(n, beta, lr)
    assert w.is_toeplitz and w.coeffs.shape == (n,)
    want = momentum_matrix(n, beta, 1.0 if lr is None else lr)
    np.testing.assert_allclose(w.dense(), want, rtol=1e-12, atol=1e-14)


@FEW
@given(n=st.integers(1, 40), beta=st.floats(0.0, 0.99), fraction=st.floats(0.0, 1.0),
       final=st.sampled_from([0.0, 0.1]))
def test_momentum_cooldown(n, beta, fraction, final):
    eta = workloads.cooldown(n, lr=0.5, fraction=fraction, final=final)
    m = int(round(fraction * n))
    assert eta.shape == (n,)
    np.testing.assert_array_equal(eta[: n - m], 0.5)
    if m:
        # Linear decay over the last m steps, ending at `final`.
        assert eta[-1] == pytest.approx(final)
        np.testing.assert_allclose(np.diff(eta[n - m - 1 :]), (final - 0.5) / m, atol=1e-12)
    w = workloads.momentum(n, beta, eta)
    np.testing.assert_allclose(w.dense(), momentum_matrix(n, beta, eta), rtol=1e-12, atol=1e-14)
    if m == 0 or (m == 1 and final == 0.5):
        assert w.is_toeplitz


def test_momentum_zero_beta_is_prefix():
    np.testing.assert_allclose(workloads.momentum(9, 0.0).dense(), prefix_matrix(9))


def test_momentum_schedule_is_not_toeplitz():
    eta = workloads.cooldown(20, fraction=0.5)
    w = workloads.momentum(20, 0.9, eta)
    assert not w.is_toeplitz and w.learning_rates is not None
    assert "schedule" in w.name
    assert w.to_dict()["learning_rates"] == [float(x) for x in eta]
    # A constant array schedule is recognised as Toeplitz.
    assert workloads.momentum(5, 0.5, np.full(5, 0.3)).is_toeplitz


def test_matrix_workload():
    a = np.tril(np.random.default_rng(0).normal(size=(6, 6)))
    w = workloads.matrix(a)
    np.testing.assert_array_equal(w.dense(), a)
    assert not w.is_toeplitz
    with pytest.raises(ValueError, match="lower triangular"):
        workloads.matrix(np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"square, got shape \(2, 3\)"):
        workloads.matrix(np.ones((2, 3)))
    bad = np.eye(3)
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        workloads.matrix(bad)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: workloads.prefix_sum(0), "got 0"),
        (lambda: workloads.prefix_sum(-2), "got -2"),
        (lambda: workloads.prefix_sum(2.5), "got 2.5"),
        (lambda: workloads.momentum(5, 1.0), "got 1.0"),
        (lambda: workloads.momentum(5, -0.1), "got -0.1"),
        (lambda: workloads.momentum(5, 0.5, -1.0), "got -1.0"),
        (lambda: workloads.momentum(5, 0.5, float("inf")), "got inf"),
        (lambda: workloads.momentum(5, 0.5, np.ones(4)), r"shape \(4,\)"),
        (lambda: workloads.momentum(3, 0.5, np.array([1.0, np.nan, 1.0])), "got nan"),
        (lambda: workloads.momentum(3, 0.5, np.array([1.0, -2.0, 1.0])), "got -2.0"),
        (lambda: workloads.cooldown(5, fraction=1.5), "got 1.5"),
    ],
)
def test_bad_inputs_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_parse():
    assert workloads.parse("prefix", 5).name == "prefix"
    w = workloads.parse("momentum:0.9", 5)
    np.testing.assert_allclose(w.dense(), momentum_matrix(5, 0.9, 1.0), rtol=1e-13)
    w = workloads.parse("momentum:0.9:cooldown:0.4", 10)
    assert w.name == "momentum:0.9:cooldown:0.4"
    np.testing.assert_allclose(w.dense(), momentum_matrix(10, 0.9, workloads.cooldown(10, fraction=0.4)), rtol=1e-13)
    for spec in ["adam", "momentum", "momentum:x", "prefix:1", "momentum:0.9:warmup:0.1"]:
        with pytest.raises(ValueError, match="workload"):
            workloads.parse(spec, 5)


def test_dense_size_limit():
    n = workloads.DENSE_LIMIT + 1
    w = workloads.prefix_sum(n)  # Toeplitz: held as n coefficients, never n x n
    assert w.coeffs.shape == (n,)
    with pytest.raises(ValueError, match=f"n={n} exceeds max_n={workloads.DENSE_LIMIT}"):
        w.dense()
    with pytest.raises(ValueError, match="max_n=3"):
        workloads.prefix_sum(4).dense(max_n=3)
    assert workloads.prefix_sum(4).dense(max_n=4).shape == (4, 4)


def test_pytree():
    w = workloads.momentum(6, 0.5)
    leaves, tree = jax.tree_util.tree_flatten(w)
    back = jax.tree_util.tree_unflatten(tree, leaves)
    np.testing.assert_array_equal(back.coeffs, w.coeffs)
    assert back.name == w.name and back.n == w.n
