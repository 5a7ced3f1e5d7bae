"""Momentum with weight decay and learning-rate schedules against a direct simulation of the optimizer.

The update ("Banded Square Root Matrix Factorization for Differentially Private Model Training",
Kalinin & Lampert 2024, arXiv:2405.13763; docs/design.md):

    m_t = beta m_{t-1} + g_t,    theta_{t+1} = (1 - eta_t lambda) theta_t - eta_t m_t,   theta_0 = 0.

Fed the unit gradient g = e_j at step j (and 0 elsewhere), -theta_{i+1} is column j of the workload:
A[i, j]. The recursion below is the optimizer, run step by step, with no formula for A.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfnoise.core import workloads


def simulate(n: int, beta: float, eta, weight_decay: float) -> np.ndarray:
    """A[i, j] = -theta_{i+1} when the only gradient is 1 at step j."""
    eta = np.broadcast_to(np.asarray(eta, np.float64), (n,))
    a = np.zeros((n, n))
    for j in range(n):
        theta = m = 0.0
        for t in range(n):
            m = beta * m + (1.0 if t == j else 0.0)
            theta = (1.0 - eta[t] * weight_decay) * theta - eta[t] * m
            a[t, j] = -theta
    return a


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), beta=st.floats(0.0, 0.99), lr=st.sampled_from([1.0, 0.1, 0.7]),
       wd=st.sampled_from([0.0, 1e-3, 0.05, 0.5]))
def test_momentum_weight_decay_equals_simulation(n, beta, lr, wd):
    w = workloads.momentum(n, beta, lr, weight_decay=wd)
    assert w.is_toeplitz and w.rational is not None
    np.testing.assert_allclose(w.dense(), simulate(n, beta, lr, wd), rtol=1e-11, atol=1e-13)


def test_close_poles_use_a_stable_recurrence():
    # alpha = 1 - eta lambda = 0.9 equals beta: a_d = eta (d + 1) 0.9^d, no cancellation.
    n = 200
    w = workloads.momentum(n, 0.9, 0.5, weight_decay=0.2)
    assert w.rational == (0.5, (0.9, 0.9))
    d = np.arange(n)
    np.testing.assert_allclose(w.coeffs, 0.5 * (d + 1) * 0.9**d, rtol=1e-12)
    w2 = workloads.momentum(n, 0.9, 0.5, weight_decay=0.1999)  # alpha - beta = 5e-5
    np.testing.assert_allclose(w2.dense(max_n=n), simulate(n, 0.9, 0.5, 0.1999), rtol=1e-11, atol=1e-13)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 30), beta=st.floats(0.0, 0.95), wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 99))
def test_schedule_with_weight_decay_equals_simulation(n, beta, wd, seed):
    eta = np.random.default_rng(seed).uniform(0.0, 2.0, n)
    w = workloads.momentum(n, beta, eta, weight_decay=wd)
    assert not w.is_toeplitz
    np.testing.assert_allclose(w.dense(), simulate(n, beta, eta, wd), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("n,warmup,peak,final",
                         [(10, 3, 1.0, 0.0), (50, 0, 0.3, 0.01), (7, 6, 2.0, 0.5), (1, 0, 1.0, 0.0)])
def test_warmup_cosine_is_optax_schedule_one_step_on(n, warmup, peak, final):
    eta = workloads.warmup_cosine(n, peak=peak, warmup_steps=warmup, final=final)
    sched = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, n, final)
    with jax.enable_x64(True):
        want = np.array([float(sched(t + 1)) for t in range(n)])
    np.testing.assert_allclose(eta, want, rtol=1e-12, atol=1e-15)
    assert eta[-1] == pytest.approx(final)
    if warmup:
        assert eta[warmup - 1] == pytest.approx(peak) and eta[0] == pytest.approx(peak / warmup)


def test_warmup_cosine_momentum_weight_decay_equals_simulation():
    n = 40
    eta = workloads.warmup_cosine(n, peak=0.5, warmup_steps=8)
    w = workloads.parse("momentum:0.9:lr=0.5:wd=0.01:warmup-cosine:8", n)
    np.testing.assert_array_equal(w.learning_rates, eta)
    np.testing.assert_allclose(w.dense(), simulate(n, 0.9, eta, 0.01), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("spec", ["prefix", "momentum:0.9", "momentum:0.9:lr=0.1", "momentum:0.9:wd=1e-4",
                                  "momentum:0.95:lr=0.5:wd=0.01", "momentum:0.9:cooldown:0.25",
                                  "momentum:0.9:wd=0.001:cooldown:0.5", "momentum:0.9:warmup-cosine:5",
                                  "momentum:0:lr=0.2:wd=0.1:warmup-cosine:3"])
def test_specs_round_trip(spec):
    n = 20
    w = workloads.parse(spec, n)
    again = workloads.parse(w.name, n)
    assert again == w
    back = workloads.from_dict(w.to_dict(), n)
    assert back.name == w.name
    np.testing.assert_array_equal(back.dense(), w.dense())


@pytest.mark.parametrize("spec,match", [
    ("momentum:0.9:wd=x", "bad wd"), ("momentum:0.9:wd=-1", "got -1.0"), ("momentum:0.9:wd=2", "decay factor"),
    ("momentum:0.9:warmup-cosine:20", "warmup_steps"), ("momentum:0.9:warmup-cosine:2.5", "bad schedule"),
    ("momentum:0.9:wd=0.1:lr=0.1", "unknown workload"), ("momentum:0.9:cosine:3", "unknown workload"),
])
def test_bad_specs_name_the_value(spec, match):
    with pytest.raises(ValueError, match=match):
        workloads.parse(spec, 20)


def test_rational_workloads_are_lazy():
    big = 10**9
    for w in (workloads.prefix_sum(big), workloads.momentum(big, 0.9), workloads.momentum(big, 0.9, 0.1, 1e-4)):
        assert w.is_toeplitz
        assert str(big) in repr(w)
        leaves, tree = jax.tree_util.tree_flatten(w)
        assert leaves == [] and jax.tree_util.tree_unflatten(tree, leaves) == w
        assert w.__dict__.get("_coeffs") is None  # nothing above built the 10^9 coefficients
    assert workloads.momentum(big, 0.9, 0.1, 1e-4).rational == (0.1, (1.0 - 0.1 * 1e-4, 0.9))
    small = workloads.momentum(6, 0.5, 2.0)
    np.testing.assert_allclose(small.coeffs, 2.0 * (1 - 0.5 ** (np.arange(6) + 1)) / 0.5, rtol=1e-15)
    assert small.__dict__["_coeffs"] is small.coeffs  # built once, then kept
    assert not small.coeffs.flags.writeable
    assert math.isfinite(float(small.coeffs.sum()))
