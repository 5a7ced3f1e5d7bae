"""mfnoise.optim.lbfgs (numpy L-BFGS, the BLT family's default solver) against independent computations.

The compact-form direction against the two-loop recursion (Nocedal & Wright Algorithm 7.4), the
incrementally kept R^-1 against numpy's inverse of the upper triangle of S Y^T, the line search's
step against the strong Wolfe conditions, the minimiser against closed-form minima, and optimize's
BLT runs against scipy's L-BFGS-B on the same problems.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise import Participation
from mfnoise.optim import lbfgs, solver


def _two_loop(g, s_rows, y_rows, gamma):
    """-H g by the two-loop recursion (N&W Algorithm 7.4), pure Python floats over numpy rows."""
    q = np.array(g, np.float64)
    alphas = []
    for s, y in zip(s_rows[::-1], y_rows[::-1]):
        a = float(s @ q) / float(s @ y)
        alphas.append(a)
        q = q - a * y
    r = gamma * q
    for (s, y), a in zip(zip(s_rows, y_rows), alphas[::-1]):
        b = float(y @ r) / float(s @ y)
        r = r + (a - b) * s
    return -r


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 20), pairs=st.integers(1, 45),
       memory=st.integers(1, 30), noise=st.floats(0.0, 0.6))
def test_direction_and_inverse_of_r_equal_the_two_loop_recursion(seed, m, pairs, memory, noise):
    rng = np.random.default_rng(seed)
    s_mem, y_mem, r_inv = np.zeros((0, m)), np.zeros((0, m)), np.zeros((0, 0))
    kept_s, kept_y = [], []
    for _ in range(pairs):
        s = rng.normal(size=m)
        y = s * rng.uniform(0.5, 2.0, size=m) + noise * rng.normal(size=m)  # s^T y > 0 mostly
        if s @ y <= 1e-3 * np.linalg.norm(s) * np.linalg.norm(y):
            continue
        s_mem, y_mem, r_inv = lbfgs._push(s_mem, y_mem, r_inv, s, y, memory)
        kept_s, kept_y = (kept_s + [s])[-memory:], (kept_y + [y])[-memory:]
    assert s_mem.shape[0] == len(kept_s) <= memory
    if not kept_s:
        return
    np.testing.assert_array_equal(s_mem, np.array(kept_s))
    r = np.triu(np.array(kept_s) @ np.array(kept_y).T)
    np.testing.assert_allclose(r_inv @ r, np.eye(len(kept_s)), atol=1e-8 * np.linalg.cond(r))
    g = rng.normal(size=m)
    gamma = float(kept_s[-1] @ kept_y[-1]) / float(kept_y[-1] @ kept_y[-1])
    want = _two_loop(g, kept_s, kept_y, gamma)
    got = lbfgs._direction(g, s_mem, y_mem, r_inv, gamma)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.linalg.cond(r) * np.abs(want).max())


def test_line_search_step_satisfies_the_strong_wolfe_conditions():
    # phi(a) = f(x + a p) for f(x) = sum(w x^4 / 4 - x) along p = -grad at x = 0: the conditions
    # checked directly on the returned step, for steps to start from that over- and undershoot.
    w = np.array([1.0, 3.0, 10.0])

    def fun(x):
        return float(np.sum(w * x**4 / 4 - x)), w * x**3 - 1.0

    x = np.zeros(3)
    f0, g0 = fun(x)
    p = -g0
    d0 = float(g0 @ p)
    for alpha in (1e-4, 1.0, 50.0):
        step = lbfgs.line_search(fun, x, f0, d0, p, alpha, lambda x, f: None)
        assert step is not None
        a, fa, ga = step
        assert fa == fun(x + a * p)[0]
        assert fa <= f0 + lbfgs.C1 * a * d0
        assert abs(float(ga @ p)) <= -lbfgs.C2 * d0


def test_line_search_backs_off_a_non_finite_wall():
    # f = inf beyond x = 1 (outside the domain): the step stays inside and decreases f.
    def fun(x):
        if x[0] >= 1.0:
            return math.inf, np.array([math.nan])
        return float(-math.log1p(-x[0]) - 2.0 * x[0]), np.array([1.0 / (1.0 - x[0]) - 2.0])

    x = np.zeros(1)
    f0, g0 = fun(x)
    step = lbfgs.line_search(fun, x, f0, float(-g0 @ g0), -g0, 10.0, lambda x, f: None)
    assert step is not None
    a, fa, _ = step
    assert 0 < a * 1.0 < 1.0 and fa < f0


@pytest.mark.parametrize("m", [2, 16])
def test_minimize_reaches_the_closed_form_minimum_of_a_quadratic_and_rosenbrock(m):
    rng = np.random.default_rng(m)
    q = rng.normal(size=(m, m))
    a = q @ q.T + 0.1 * np.eye(m)  # condition number ~ 1e3
    b = rng.normal(size=m)
    x_star = np.linalg.solve(a, b)  # the minimiser of x^T A x / 2 - b^T x

    def quad(x):
        return float(x @ a @ x / 2 - b @ x), a @ x - b

    seen = []
    why = lbfgs.minimize(quad, np.zeros(m), on_iteration=lambda x, f: None, ftol=0.0, gtol=1e-10,
                         max_iterations=2000, see=lambda x, f: seen.append(f))
    assert why in ("converged", "line search")
    best = min(seen)
    assert best == pytest.approx(quad(x_star)[0], rel=1e-12, abs=1e-12)

    def rosen(x):  # minimum 0 at x = 1
        f = float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))
        g = np.zeros_like(x)
        g[:-1] = -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
        g[1:] += 200 * (x[1:] - x[:-1] ** 2)
        return f, g

    points = []
    lbfgs.minimize(rosen, np.full(m, -1.2), on_iteration=lambda x, f: points.append(x), ftol=0.0,
                   gtol=1e-10, max_iterations=5000)
    np.testing.assert_allclose(points[-1], np.ones(m), atol=1e-6)


def test_on_iteration_stops_the_run_with_its_reason():
    calls = []

    def stop_at_three(x, f):
        calls.append(f)
        return "callback" if len(calls) == 3 else None

    why = lbfgs.minimize(lambda x: (float(x @ x), 2 * x), np.ones(4) * np.arange(1, 5),
                         on_iteration=stop_at_three, ftol=0.0, gtol=0.0, max_iterations=100)
    assert why == "callback" and len(calls) == 3


@pytest.mark.parametrize("n,buffers", [(1000, 3), (10**6, 4)])
def test_blt_default_method_is_lbfgs_and_matches_scipy(n, buffers):
    w, p = mfnoise.workloads.prefix_sum(n), Participation.single(n)
    s_auto, auto = mfnoise.optimize(w, p, "blt", buffers=buffers, objective="max", progress=False)
    _, scipy = mfnoise.optimize(w, p, "blt", buffers=buffers, objective="max", method="scipy", progress=False)
    assert auto.method == "lbfgs" and scipy.method == "scipy"
    # Both stop at tol = 1e-7 relative (the windowed stop): the optima agree within it.
    assert auto.max_error == pytest.approx(scipy.max_error, rel=2e-7)
    assert auto.max_error == pytest.approx(mfnoise.evaluate(s_auto, w, p)["max_error"], rel=1e-12)


def test_blt_rmse_under_epochs_matches_scipy():
    n = 200
    w, p = mfnoise.workloads.prefix_sum(n), Participation.epochs(n, 4)
    _, auto = mfnoise.optimize(w, p, "blt", buffers=3, objective="rmse", progress=False)
    _, scipy = mfnoise.optimize(w, p, "blt", buffers=3, objective="rmse", method="scipy", progress=False)
    assert auto.method == "lbfgs" and auto.rmse == pytest.approx(scipy.rmse, rel=2e-7)


def test_lbfgs_refuses_bounds_and_other_families_keep_scipy():
    w, p = mfnoise.workloads.prefix_sum(64), Participation.single(64)
    _, r = mfnoise.optimize(w, p, "toeplitz", bands=4, progress=False)
    assert r.method == "scipy"
    with pytest.raises(ValueError, match="bounds"):  # no family has bounds today: the runner itself
        solver._lbfgs_stage(None, np.zeros(2), None, [], None, (np.zeros(2), np.ones(2)), window=None, tol=1e-7,
                            gtol=1e-9, max_iterations=10, max_seconds=None, callback=None, start=0.0)


def test_blt_optimize_does_not_import_scipy():
    # A fresh process: importing scipy.optimize was a third of a BLT run at n = 10^7 (issue 16).
    code = ("import sys, mfnoise; n = 10**5; mfnoise.optimize(mfnoise.workloads.prefix_sum(n), "
            "mfnoise.Participation.single(n), 'blt', buffers=2, objective='max', progress=False); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
