"""Tests of the BLT problem's parametrisation at its limits (mfnoise/optim/blt.py).

Decays whose optimum is 1 (a constant column; multi-epoch max-error optima for momentum go there)
must give a valid BLT (0 < theta < 1 in float64, finite positive omega) whose loss equals the dense
formula, not theta = 1.0 or a NaN scale. The dense reference is tests/test_optimize.py's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise import Participation
from mfnoise.core import workloads
from mfnoise.optim import blt as blt_loss
from mfnoise.optim.solver import optimize
from tests.optim.test_optimize import dense_objective, jitted

P = Participation.epochs(24, 3)
W = workloads.momentum(24, 0.9)


def test_saturate_is_increasing_bounded_and_inverted_by_unsaturate():
    y = np.concatenate([[0.0], np.logspace(-12, 6, 400)])
    with jax.enable_x64(True):
        h = np.asarray(blt_loss.saturate(jnp.asarray(y)))
    big = blt_loss.LOG_DELTA_RANGE
    assert h[0] == 0 and np.all(np.diff(h) >= 0) and np.all(h <= big)
    # Strictly increasing (distinct decays stay distinct) far into the saturated regime; only
    # beyond y ~ 40 L (a flat loss the optimizer never walks into) does h round to L itself.
    assert np.all(np.diff(h[y < 20 * big]) > 0) and np.all(h[y < 20 * big] < big)
    assert np.allclose(h, blt_loss.saturate(y, np), rtol=1e-15, atol=0)
    small = y < blt_loss.LOG_DELTA_RANGE / 2
    assert np.allclose(h[small], y[small], rtol=5e-4, atol=0)  # the identity where decays usually are
    ok = y < 5 * blt_loss.LOG_DELTA_RANGE  # beyond that h is within rounding of L
    assert np.allclose(blt_loss.unsaturate(h[ok]), y[ok], rtol=1e-9, atol=1e-300)
    # Huge y (an overshooting line-search step) is no overflow and no NaN gradient.
    with jax.enable_x64(True):
        g = jax.grad(lambda t: blt_loss.saturate(t))(jnp.asarray(1e300))
    assert np.isfinite(float(g))


@pytest.mark.parametrize("objective", ["max", "rmse"])
@pytest.mark.parametrize("where", ["bottom", "all-bottom", "top", "huge"])
def test_saturated_parameters_give_a_valid_blt_whose_loss_is_the_dense_formula(where, objective):
    """Parameters far into the saturated regime (the largest decays pushed towards 1, or the
    smallest towards 0): finite loss and gradient, theta in (0, 1), omega finite and positive,
    and the loss equals the dense formula of the BLT that to_strategy returns."""
    buffers = 3
    prob = blt_loss.problem(W, P, objective=objective, buffers=buffers)
    v = blt_loss.init_params(buffers, P.n)
    if where == "bottom":  # the last pair (decays closest to 1) driven far past the bound
        v[-2:] = [60.0, 1e4]
    elif where == "all-bottom":  # every decay far into the saturated regime, crowding towards 1
        v[:] = [40.0, 10.0, 30.0, 50.0, 100.0, 200.0]
    elif where == "top":  # the smallest decays driven towards 0
        v[:2] = [-60.0, -60.0]
    else:  # a step that a line search could try: every decay rounds to the bound itself
        v = v + 1e8
    f = jitted(prob)
    value, grad = f(v)
    if where == "huge":
        # Coinciding poles: no silent wrong number. The loss is NaN (the optimizer's line search
        # treats it as a wall) and to_strategy refuses.
        assert math.isnan(value)
        with pytest.raises(ValueError, match="non-finite"):
            prob.to_strategy(v)
        return
    assert math.isfinite(value) and np.all(np.isfinite(grad))
    s = prob.to_strategy(v)
    assert np.all((s.theta > 0) & (s.theta < 1)) and np.all(np.isfinite(s.omega)) and np.all(s.omega > 0)
    if where in ("bottom", "all-bottom"):
        assert 1 - s.theta.max() < 1e-12  # really saturated, yet below 1 in float64
    assert math.exp(value) == pytest.approx(dense_objective(s.dense(), W, P, objective), rel=1e-9)
    # The inverse is a valid BLT too (the noise generator streams with it).
    theta_inv, omega_inv = s.inverse()
    assert np.all(np.isfinite(theta_inv)) and np.all(np.isfinite(omega_inv))
    c_inv = np.linalg.inv(s.dense())
    from mfnoise.strategies.blt import blt_coeffs

    assert np.allclose(c_inv[:, 0], blt_coeffs(theta_inv, omega_inv, P.n), rtol=0, atol=1e-9)


_PROBLEMS = {d: blt_loss.problem(workloads.prefix_sum(40), Participation.epochs(40, 2), buffers=d)
             for d in range(1, 5)}
_LOSSES = {d: jitted(prob) for d, prob in _PROBLEMS.items()}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), buffers=st.integers(1, 4), log_scale=st.floats(-1.0, 1.5))
def test_any_parameters_give_a_valid_blt_or_a_non_finite_loss(seed, buffers, log_scale):
    """v of magnitude up to ~100 (any sign; the sums of gaps go far into the saturated regime, and
    gaps as small as e^-100 make pairs nearly cancel or poles nearly coincide): to_strategy gives
    finite omega > 0, theta in (0, 1) and non-negative non-increasing coefficients (the exact
    Toeplitz sensitivity applies) or refuses with a ValueError; where the loss is finite (every
    point the optimizer can keep) it returns that BLT and the loss is its rmse. Gaps below float64
    resolution can make two poles coincide: then the loss is NaN (a wall for the line search) and
    to_strategy refuses."""
    v = np.random.default_rng(seed).normal(scale=10.0**log_scale, size=2 * buffers)
    value, _ = _LOSSES[buffers](v)
    try:
        s = _PROBLEMS[buffers].to_strategy(v)
    except ValueError as e:
        # Coinciding poles (the loss is NaN there too), or every pair cancelled (the identity).
        assert not math.isfinite(value) or "cancel every buffer" in str(e)
        return
    # A returned strategy is always a valid BLT, even where the closed-form loss is NaN (a cancelled
    # pair on top of another decay: a removable singularity of the partial fractions).
    c = s.toeplitz_coeffs()
    assert np.all((s.theta > 0) & (s.theta < 1)) and np.all(s.omega > 0) and np.all(np.isfinite(s.omega))
    assert np.all(c >= 0) and np.all(np.diff(c) <= 1e-15)
    if math.isfinite(value):
        p = Participation.epochs(40, 2)
        # 1e-6: clustered decays cost the closed form and the series evaluation digits (the
        # deterministic tests above hold 1e-9 at the optimizer's points).
        assert math.exp(value) == pytest.approx(mfnoise.rmse(s, workloads.prefix_sum(40), p), rel=1e-6)


def test_optimum_at_a_unit_decay_is_reached_as_a_valid_blt():
    """Momentum 0.9, 2 epochs, max error: the optimum's largest decay goes to 1 (before the
    saturation, theta rounded to 1.0 and the optimizer raised). The result is a BLT with
    theta < 1 whose reported max_error is the dense formula's, and more buffers are not worse."""
    n = 64
    p, w = Participation.epochs(n, 2), workloads.momentum(n, 0.9)
    previous = math.inf
    for buffers in (2, 3):
        s, report = optimize(w, p, "blt", buffers=buffers, objective="max", progress=False)
        assert report["converged"]
        assert np.all(s.theta < 1) and 1 - s.theta.max() < 1e-8  # the saturated regime
        assert report["max_error"] == pytest.approx(dense_objective(s.dense(), w, p, "max"), rel=1e-9)
        # Two separate runs (2 and 3 buffers) agree to the solver's tol (1e-7), not further: the
        # 2-buffer run of method "lbfgs" ends 1.4e-9 below both methods' 3-buffer runs (and below
        # L-BFGS-B's 2-buffer run), on a valley flat to 1e-9.
        assert report["max_error"] <= previous * (1 + 1e-8)
        previous = report["max_error"]


def test_staged_rounds_try_a_near_constant_column():
    """Multi-epoch max error (prefix sum, n = 256, 16 epochs): the optimum holds a decay next to 1
    with a sizeable scale. Each staged round tries such a buffer; without that start the optimizer
    stopped at 19.9307 (a local optimum 0.4% worse) for 2 and 3 buffers alike."""
    p, w = Participation.epochs(256, 16), workloads.prefix_sum(256)
    s2, r2 = optimize(w, p, "blt", buffers=2, objective="max", progress=False)
    assert r2["max_error"] <= 19.86 and 1 - s2.theta.max() < 1e-9 and s2.omega[-1] > 1e-4
    assert r2["max_error"] == pytest.approx(mfnoise.max_error(s2, w, p), rel=1e-12)
    s3, r3 = optimize(w, p, "blt", buffers=3, objective="max", progress=False)
    assert r3["max_error"] <= r2["max_error"] * (1 + 1e-12)
