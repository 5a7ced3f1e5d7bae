"""Tests of the strategy optimizer (mfnoise.optimize, optim/toeplitz.py, optim/blt.py, `mfnoise optimize`).

Every loss is checked against an independent dense computation (C formed densely, B = A C^{-1} by
a triangular solve, sensitivity by brute force over patterns), its gradient against central
finite differences, and every optimized strategy against its initialisation and the closed forms
of the same family, with the exact numbers recomputed by mfnoise.strategies.error.evaluate.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise import Participation
from mfnoise.cli import main as cli_main
from mfnoise.core import series, workloads
from mfnoise.optim import blt as blt_loss
from mfnoise.optim import toeplitz as toeplitz_loss
from mfnoise.optim.solver import optimize


# -- independent reference: dense formulas ---------------------------------------------------------
def dense_objective(c: np.ndarray, workload, p: Participation, objective: str) -> float:
    """sens(C, p) * ||A C^-1||_F / sqrt(n) or * max row norm, all dense, sensitivity by brute force."""
    a = workload.dense()
    b = scipy.linalg.solve_triangular(c.T, a.T, lower=False).T
    rows = np.einsum("ij,ij->i", b, b)
    err = math.sqrt(rows.sum() / p.n) if objective == "rmse" else math.sqrt(rows.max())
    return brute_force_sensitivity(c, p) * err


def brute_force_sensitivity(c: np.ndarray, p: Participation) -> float:
    """max over every pattern P of the exact sens^2 of P: sum_{i,j in P} X_ij when X[P, P] >= 0,
    sum_{t in P} X_tt when the columns of P are orthogonal (any signs)."""
    x = c.T @ c
    best = 0.0
    for pat in p.patterns():
        sub = x[np.ix_(pat, pat)]
        off = sub - np.diag(np.diag(sub))
        if np.all(off == 0):
            best = max(best, float(np.trace(sub)))
        else:
            assert np.all(sub >= 0), "no exact sensitivity for this pattern"
            best = max(best, float(sub.sum()))
    return math.sqrt(best)


def jitted(prob):
    """The problem's value-and-gradient, compiled once (float64)."""
    from mfnoise.optim.problem import FAST_COMPILE

    f = jax.jit(prob.value_and_grad, compiler_options=FAST_COMPILE)

    def call(x):
        with jax.enable_x64(True):
            v, g = f(jnp.asarray(x, jnp.float64))
            return float(v), np.asarray(g)

    return call


def check_gradient(f, x, rng, h=1e-6, directions=3):
    """g . u against the central difference along random unit directions u."""
    _, g = f(x)
    for _ in range(directions):
        u = rng.standard_normal(x.shape)
        u /= np.linalg.norm(u)
        fd = (f(x + h * u)[0] - f(x - h * u)[0]) / (2 * h)
        assert g @ u == pytest.approx(fd, rel=1e-5, abs=1e-8)


SINGLE, CYCLIC, MINSEP, MINSEP_ODD = (Participation.single(24), Participation.epochs(24, 3),
                                      Participation(24, 3, 6), Participation(23, 2, 9))
WORKLOADS = {
    "prefix": lambda n: workloads.prefix_sum(n),
    "momentum": lambda n: workloads.momentum(n, 0.8, 0.5),
    # A Toeplitz workload that is not rational: the BLT loss takes its materialised path.
    "custom": lambda n: workloads.Workload(n=n, name="custom", coeffs=1.0 / np.sqrt(1.0 + np.arange(n))),
}


# -- banded Toeplitz -------------------------------------------------------------------------------
@pytest.mark.parametrize("p,bands,objective,workload", [
    (SINGLE, 1, "rmse", "prefix"),
    (SINGLE, 5, "max", "custom"),
    (CYCLIC, 4, "rmse", "momentum"),
    (CYCLIC, 12, "max", "prefix"),  # bands > min_sep: the monotone parametrisation
    (MINSEP, 6, "rmse", "custom"),
    (MINSEP_ODD, 12, "rmse", "momentum"),
], ids=str)
def test_toeplitz_loss_equals_dense_formula_and_gradient_equals_finite_differences(p, bands, objective, workload):
    rng = np.random.default_rng(bands)
    w = WORKLOADS[workload](p.n)
    prob = toeplitz_loss.problem(w, p, objective=objective, bands=bands)
    f = jitted(prob)
    for _ in range(3):
        x = prob.x0 + 0.1 * rng.standard_normal(prob.x0.shape)
        c = prob.to_strategy(x).dense()
        assert math.exp(f(x)[0]) == pytest.approx(dense_objective(c, w, p, objective), rel=1e-10)
        if x.size:
            check_gradient(f, x, rng)


def test_toeplitz_decoder_coeffs_match_series_division():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for bands in [3, 300]:  # one block / several blocks of history
            c = np.concatenate([[1.0], 0.5 * rng.random(bands - 1) / np.arange(1, bands)])
            for n in [5, 1000]:
                a = rng.random(n)
                got = np.asarray(jax.jit(toeplitz_loss.decoder_coeffs, static_argnums=2)(
                    jnp.asarray(a), jnp.asarray(c[:n]), n))
                np.testing.assert_allclose(got, series.divide(a, c, n), rtol=1e-10, atol=1e-12)
            got = np.asarray(jax.jit(toeplitz_loss.series_reciprocal, static_argnums=1)(jnp.asarray(c), 500))
            np.testing.assert_allclose(got, series.reciprocal(c, 500), rtol=1e-10, atol=1e-13)


# -- BLT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,buffers,objective,workload", [
    (SINGLE, 1, "max", "prefix"),
    (SINGLE, 3, "rmse", "custom"),
    (CYCLIC, 2, "rmse", "prefix"),
    (CYCLIC, 3, "max", "momentum"),
    (MINSEP, 3, "rmse", "momentum"),
    (MINSEP_ODD, 2, "max", "custom"),
], ids=str)
def test_blt_loss_equals_dense_formula_and_gradient_equals_finite_differences(p, buffers, objective, workload):
    rng = np.random.default_rng(buffers)
    w = WORKLOADS[workload](p.n)
    prob = blt_loss.problem(w, p, objective=objective, buffers=buffers)
    f = jitted(prob)
    for _ in range(3):
        x = blt_loss.init_params(buffers, p.n) + 0.3 * rng.standard_normal(2 * buffers)
        strategy = prob.to_strategy(x)
        assert strategy.buffers == buffers and np.all(strategy.omega > 0)
        c = strategy.dense()
        assert math.exp(f(x)[0]) == pytest.approx(dense_objective(c, w, p, objective), rel=1e-9)
        check_gradient(f, x, rng)
    # The staged start (cancelled pairs) is exactly a BLT with one active buffer.
    x = np.asarray(prob.x0)
    assert prob.to_strategy(x).buffers == 1
    assert math.exp(f(x)[0]) == pytest.approx(dense_objective(prob.to_strategy(x).dense(), w, p, objective), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), buffers=st.integers(1, 5))
def test_blt_parametrisation_is_always_a_valid_decreasing_strategy(seed, buffers):
    """Any parameter vector gives omega > 0 and non-negative non-increasing coefficients, so the
    exact Toeplitz sensitivity applies to every participation schema."""
    v = np.random.default_rng(seed).normal(scale=3.0, size=2 * buffers)
    prob = blt_loss.problem(workloads.prefix_sum(50), Participation.single(50), buffers=buffers)
    s = prob.to_strategy(v)
    c = s.toeplitz_coeffs()
    assert np.all(s.omega > 0) and np.all((s.theta > 0) & (s.theta < 1))
    assert np.all(c >= 0) and np.all(np.diff(c) <= 1e-15)


def test_geometric_sums_against_direct_sums():
    n = 3000
    sums = blt_loss.power_sums(n, blt_loss.SERIES_TERMS)
    j = np.arange(n)
    assert sums[0] == n and sums[1] == n * (n - 1) / 2 and sums[3] == (n * (n - 1) / 2) ** 2
    eps = np.array([0.0, 1e-15, 1e-9, 1e-6, 1.6e-4, 1e-3, 0.3, 0.999])
    with jax.enable_x64(True):
        g = np.asarray(blt_loss.geometric_sums(jnp.asarray(eps), n))
        h = np.asarray(blt_loss.geometric_sums(jnp.asarray(eps), n, sums, weighted=True))
    for e, gi, hi in zip(eps, g, h):
        q = np.power(np.longdouble(1) - np.longdouble(e), j.astype(np.longdouble))
        assert gi == pytest.approx(float(q.sum()), rel=1e-12)
        assert hi == pytest.approx(float(((n - j) * q).sum()), rel=1e-12)


def test_blt_closed_form_matches_independent_series_at_large_n():
    """Decays next to 1 (n = 2e5): the closed-form loss, mfnoise.evaluate and an FFT series
    division of the materialised coefficients agree."""
    n = 200_000
    p, w = Participation.single(n), workloads.prefix_sum(n)
    prob = blt_loss.problem(w, p, objective="max", buffers=4)
    x = blt_loss.init_params(4, n)
    value, _ = jitted(prob)(x)
    s = prob.to_strategy(x)
    c = s.toeplitz_coeffs()
    b = series.divide(np.ones(n), c, n)
    independent = math.sqrt(float((c * c).sum()) * float((b * b).sum()))
    assert math.exp(value) == pytest.approx(independent, rel=1e-9)
    assert mfnoise.max_error(s, w, p) == pytest.approx(independent, rel=1e-9)


# -- the optimizer ----------------------------------------------------------------------------------
def _exact(strategy, w, p, objective):
    ev = mfnoise.evaluate(strategy, w, p)
    return ev["rmse" if objective == "rmse" else "max_error"]


@pytest.mark.parametrize("p", [Participation.single(48), Participation.epochs(48, 4), Participation(48, 3, 10)],
                         ids=str)
def test_full_toeplitz_beats_its_init_and_the_closed_forms(p):
    """bands = n: the family holds sqrt-Toeplitz and BISR (both non-negative and non-increasing)."""
    w = workloads.prefix_sum(p.n)
    strategy, report = optimize(w, p, "toeplitz", bands=p.n, progress=False)
    assert report["converged"] and report["loss"] <= report["initial_loss"]
    assert report["rmse"] == pytest.approx(_exact(strategy, w, p, "rmse"), rel=1e-12)
    assert report["rmse"] <= math.exp(report["initial_loss"]) * (1 + 1e-12)
    for closed in (mfnoise.sqrt_toeplitz(p.n), mfnoise.bisr(p.n, 4), mfnoise.bisr(p.n, 12)):
        assert report["rmse"] <= mfnoise.rmse(closed, w, p) * (1 + 1e-12)


@pytest.mark.parametrize("objective", ["rmse", "max"])
def test_banded_toeplitz_beats_its_init_and_bsr(objective):
    p, w = Participation.epochs(256, 4), workloads.prefix_sum(256)
    strategy, report = optimize(w, p, "toeplitz", bands=16, objective=objective, progress=False)
    key = "rmse" if objective == "rmse" else "max_error"
    assert strategy.bands == 16 and report["converged"]
    init = toeplitz_loss.problem(w, p, objective=objective, bands=16)
    assert report[key] <= _exact(init.to_strategy(init.x0), w, p, objective) * (1 + 1e-12)
    assert report[key] <= _exact(mfnoise.bsr(256, 16), w, p, objective) * (1 + 1e-12)
    assert report["sensitivity"] == pytest.approx(mfnoise.evaluate(strategy, w, p)["sensitivity"], rel=1e-15)


def test_blt_beats_its_init_and_more_buffers_are_never_worse():
    p, w = Participation.epochs(400, 8), workloads.prefix_sum(400)
    previous = math.inf
    for buffers in (1, 2, 3):
        strategy, report = optimize(w, p, "blt", buffers=buffers, progress=False)
        assert report["converged"] and report["loss"] <= report["initial_loss"]
        assert report["rmse"] == pytest.approx(math.exp(report["loss"]), rel=1e-9)
        assert report["rmse"] <= previous * (1 + 1e-10)
        previous = report["rmse"]
    # Multi-epoch BLT against sqrt-Toeplitz (a full Toeplitz strategy) stays close.
    assert previous <= mfnoise.rmse(mfnoise.sqrt_toeplitz(400), w, p) * 1.05


def test_blt_max_error_single_participation_near_sqrt_toeplitz():
    n = 10_000
    p, w = Participation.single(n), workloads.prefix_sum(n)
    strategy, report = optimize(w, p, "blt", buffers=5, objective="max", progress=False)
    sqrt_max = mfnoise.max_error(mfnoise.sqrt_toeplitz(n), w, p)
    assert report["max_error"] <= sqrt_max * 1.003
    assert report["sensitivity_exact"]


def test_optax_method_agrees_with_scipy():
    p, w = Participation.epochs(64, 2), workloads.prefix_sum(64)
    _, a = optimize(w, p, "toeplitz", bands=4, method="scipy", progress=False)
    _, b = optimize(w, p, "toeplitz", bands=4, method="optax", progress=False)
    assert b["stopped"] == "converged"
    assert b["rmse"] == pytest.approx(a["rmse"], rel=1e-7)


def test_callback_progress_and_interrupt_keep_the_best_so_far(capsys):
    p, w = Participation.epochs(256, 4), workloads.prefix_sum(256)
    seen = []

    def stop_after_three(progress):
        seen.append(progress)
        return progress.iteration >= 3

    strategy, report = optimize(w, p, "toeplitz", bands=16, callback=stop_after_three, progress=True)
    assert report["stopped"] == "callback" and report["iterations"] == 3 and not report["converged"]
    assert [s.iteration for s in seen] == [1, 2, 3]
    assert all(s.best_loss <= s.loss + 1e-15 for s in seen)
    assert "it" in capsys.readouterr().err  # the progress bar went to stderr

    def interrupt(progress):
        if progress.iteration == 2:
            raise KeyboardInterrupt

    strategy, report = optimize(w, p, "toeplitz", bands=16, callback=interrupt, progress=False)
    assert report["interrupted"] and report["iterations"] == 2
    assert report["loss"] <= report["initial_loss"]
    assert report["rmse"] == pytest.approx(math.exp(report["loss"]), rel=1e-10)  # a valid, evaluated strategy
    assert report["history"] == sorted(report["history"], reverse=True)


def test_bad_input_is_refused_with_a_clear_message():
    p = Participation.single(16)
    w = workloads.prefix_sum(16)
    with pytest.raises(ValueError, match="unknown family"):
        optimize(w, p, "nope")
    with pytest.raises(ValueError, match="objective"):
        optimize(w, p, "blt", objective="mean")
    with pytest.raises(ValueError, match="bands"):
        optimize(w, p, "toeplitz", bands=17)
    with pytest.raises(ValueError, match="buffers"):
        optimize(w, p, "blt", buffers=0)
    with pytest.raises(ValueError, match="n=16"):
        optimize(workloads.prefix_sum(8), p, "blt")
    schedule = workloads.momentum(16, 0.9, workloads.cooldown(16))
    with pytest.raises(ValueError, match="Toeplitz workload"):
        optimize(schedule, p, "blt")


# -- the command line ------------------------------------------------------------------------------
def _cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(argv)
    return rc, out.getvalue()


@pytest.mark.parametrize("family,size,schema", [
    ("toeplitz", ["--bands", "8"], ["--epochs", "4"]),
    ("blt", ["--buffers", "2"], ["--min-sep", "20", "--max-participations", "3"]),
])
def test_cli_reported_rmse_equals_mfnoise_evaluate_on_the_saved_file(tmp_path, family, size, schema):
    path = str(tmp_path / "s.npz")
    rc, out = _cli(["optimize", "--json", "--family", family, "--n", "96", *schema, *size,
                    "--workload", "momentum:0.5", "--out", path, "--no-progress"])
    assert rc == 0
    result = json.loads(out)
    for key in ("family", "n", "max_participations", "min_sep", "rmse", "max_error", "sensitivity",
                "iterations", "seconds", "path"):
        assert key in result
    assert ("bands" in result) == (family != "blt") and ("buffers" in result) == (family == "blt")
    rc, out = _cli(["evaluate", "--json", path])
    assert rc == 0
    evaluated = json.loads(out)
    for key in ("rmse", "max_error", "sensitivity"):
        assert evaluated[key] == result[key]
    assert (evaluated["max_participations"], evaluated["min_sep"]) == (result["max_participations"], result["min_sep"])
    _, meta = mfnoise.strategies.io.read(path)
    assert meta["command"].startswith("mfnoise optimize --family " + family)
    assert meta["rmse"] == result["rmse"] and meta["workload"]["name"] == "momentum:0.5"


def test_cli_refuses_bad_flags(tmp_path):
    rc, out = _cli(["optimize", "--json", "--family", "blt", "--bands", "3", "--n", "10",
                    "--out", str(tmp_path / "x.npz")])
    assert rc == 2 and "buffers" in json.loads(out)["error"]
