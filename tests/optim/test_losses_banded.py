"""The banded (BandMF) and dense optimization problems (mfnoise.optim.banded / .dense).

Every loss is checked against an independent dense numpy computation (A and C formed densely,
B = A C^{-1} by numpy.linalg.solve, the sensitivity by enumerating the patterns), gradients against
central finite differences, and optimized strategies against their initialisation and the closed
forms (BSR, sqrt-Toeplitz) for the same schema.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import scipy.optimize

from mfnoise.core import workloads
from mfnoise.core.participation import Participation
from mfnoise.optim import banded as lb
from mfnoise.optim import dense as ld
from mfnoise.strategies import closed_forms, error
from mfnoise.strategies.banded import Banded
from mfnoise.strategies.dense import Dense


def _schedule(n):
    return workloads.momentum(n, 0.9, workloads.cooldown(n, final=0.1))


def _random_matrix(n, seed=0):
    rng = np.random.default_rng(seed)
    return workloads.matrix(np.tril(rng.random((n, n))) + np.eye(n))


WORKLOADS = {
    "prefix": workloads.prefix_sum,
    "momentum": lambda n: workloads.momentum(n, 0.9),
    "schedule": _schedule,
    "matrix": _random_matrix,  # inverse not banded: the dense fallback
}


def _dense_banded(cols):
    n, bands = cols.shape
    c = np.zeros((n, n))
    for j in range(bands):
        c[np.arange(j, n), np.arange(n - j)] = cols[: n - j, j]
    return c


def _brute_sens_sq(c, p):
    """max over every pattern P of sum_{i,j in P} |X_ij| (= sens^2 when X >= 0 on patterns)."""
    x = np.abs(c.T @ c)
    return max(x[np.ix_(pat, pat)].sum() for pat in p.patterns())


def _numpy_errors(c, a, sens_sq):
    n = c.shape[0]
    b = np.linalg.solve(c.T, a.T).T  # B C = A
    rows = np.sum(b * b, axis=1)
    return math.sqrt(sens_sq * rows.sum() / n), math.sqrt(sens_sq * rows.max())


def _fd_check(prob, x, seed=0, eps=1e-6, rtol=1e-5):
    rng = np.random.default_rng(seed)
    _, g = prob.value_and_grad(x)
    for _ in range(2):
        d = rng.standard_normal(x.shape)
        fd = (float(prob.value_and_grad(x + eps * d)[0]) - float(prob.value_and_grad(x - eps * d)[0])) / (2 * eps)
        assert float(np.dot(np.asarray(g), d)) == pytest.approx(fd, rel=rtol, abs=1e-7)


def _minimize(prob, maxiter=500):
    def f(x):
        v, g = prob.value_and_grad(x)
        return float(v), np.asarray(g, np.float64)

    res = scipy.optimize.minimize(f, prob.x0, jac=True, method="L-BFGS-B",
                                  options={"maxiter": maxiter, "ftol": 1e-12, "gtol": 1e-10})
    return res.x, res.fun


# -- banded -------------------------------------------------------------------------------------


@pytest.mark.parametrize("wname", sorted(WORKLOADS))
@pytest.mark.parametrize("objective", ["rmse", "max"])
def test_banded_loss_matches_dense_formula_and_fd(wname, objective):
    n, bands = 29, 5
    w = WORKLOADS[wname](n)
    p = Participation.epochs(n, 4)  # min_sep 7 >= bands: sens^2 = 5 reachable participations
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        prob = lb.problem(w, p, bands=bands, objective=objective)
        assert ("fallback" in prob.name) == (wname == "matrix")
        x = prob.x0 * (1.0 + 0.2 * rng.standard_normal(prob.x0.shape))
        value = float(prob.value_and_grad(x)[0])
        _fd_check(prob, x)
    cols = x.reshape(n, bands)
    cols = np.where(np.add.outer(np.arange(n), np.arange(bands)) < n, cols, 0.0)
    c = _dense_banded(cols / np.linalg.norm(cols, axis=1, keepdims=True))
    rmse, max_err = _numpy_errors(c, w.dense(), _brute_sens_sq(c, p))
    if objective == "rmse":
        assert value == pytest.approx(rmse, rel=1e-10)
    else:  # l_p smoothing: max <= loss <= 1.01 max
        assert max_err * (1 - 1e-12) <= value <= 1.01 * max_err
    strategy = prob.to_strategy(x)
    assert isinstance(strategy, Banded)
    np.testing.assert_allclose(strategy.dense(), c, atol=1e-14)


@pytest.mark.parametrize(
    "n, w, block, seed",
    [(1, 1, 1, 0), (7, 3, 2, 1), (40, 9, 8, 2), (40, 9, 13, 3), (33, 12, 16, 4), (10, 10, 9, 5)],
)
def test_selected_inversion_matches_numpy(n, w, block, seed):
    """tr(U^-T U^-1) and diag(U^-1 U^-T) of a banded U by the blocked recurrences (any block >= w - 1,
    a ragged last block, block = n) equal numpy's inverse."""
    rng = np.random.default_rng(seed)
    cols = lb._cut_columns(rng.standard_normal((n, w)))
    cols[:, 0] = rng.uniform(0.5, 2.0, n) * rng.choice([-1, 1], n)
    inv = np.linalg.inv(_dense_banded(cols))
    with jax.enable_x64(True):
        blocking = lb._Blocking(n, w, block=block)
        fro, grad = jax.jit(jax.value_and_grad(lambda u: lb.frobenius_sq(u, blocking)))(cols)
        rows = np.asarray(jax.jit(lambda u: lb.row_norms_sq(u, blocking))(cols))
        fro, grad = float(fro), np.asarray(grad)
    assert fro == pytest.approx(np.sum(inv * inv), rel=1e-9)
    np.testing.assert_allclose(rows, np.sum(inv * inv, axis=1), rtol=1e-9)
    # d ||U^-1||_F^2 / dU = -2 U^-T U^-1 U^-T, on the band (checks the hand-written adjoint)
    dense_grad = -2.0 * inv.T @ inv @ inv.T
    expected = np.zeros_like(cols)
    for j in range(w):
        expected[: n - j, j] = np.diagonal(dense_grad, -j)
    np.testing.assert_allclose(grad, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())


def test_block_smaller_than_bandwidth_is_refused():
    with pytest.raises(ValueError, match="bandwidth"):
        lb._Blocking(20, 9, block=7)


@pytest.mark.parametrize("wname", ["prefix", "momentum", "schedule"])
def test_workload_inverse_columns(wname):
    n = 23
    w = WORKLOADS[wname](n)
    cols = lb.workload_inverse_columns(w)
    assert cols is not None and cols.shape[1] <= 3
    np.testing.assert_allclose(_dense_banded(cols), np.linalg.inv(w.dense()), atol=1e-12)
    assert lb.workload_inverse_columns(_random_matrix(n)) is None
    # a zero learning rate makes A singular: no banded inverse (the dense fallback takes it)
    assert lb.workload_inverse_columns(workloads.momentum(n, 0.9, workloads.cooldown(n, final=0.0))) is None


def test_banded_refuses_bands_above_min_sep():
    p = Participation.epochs(64, 4)  # min_sep 16
    with pytest.raises(ValueError, match=r"bands=17.*min_sep=16"):
        lb.problem(workloads.prefix_sum(64), p, bands=17)
    with pytest.raises(ValueError, match="buffers"):
        lb.problem(workloads.prefix_sum(64), p, bands=4, buffers=3)
    with pytest.raises(ValueError, match="objective"):
        lb.problem(workloads.prefix_sum(64), p, bands=4, objective="mean")
    with pytest.raises(ValueError, match="n=64"):
        lb.problem(workloads.prefix_sum(64), Participation.single(32), bands=4)
    # single participation: any bands up to n
    assert lb.problem(workloads.prefix_sum(64), Participation.single(64), bands=64).x0.shape == (64 * 64,)


@pytest.mark.parametrize(
    "wname, p, bands, objective",
    [
        ("prefix", Participation.epochs(96, 3), 32, "rmse"),
        ("prefix", Participation(96, 2, 24), 16, "rmse"),  # min-sep
        ("momentum", Participation.single(80), 12, "rmse"),
        ("prefix", Participation.epochs(80, 2), 8, "max"),
    ],
)
def test_banded_optimized_beats_init_and_bsr(wname, p, bands, objective):
    n = p.n
    w = WORKLOADS[wname](n)
    with jax.enable_x64(True):
        prob = lb.problem(w, p, bands=bands, objective=objective)
        init_loss = float(prob.value_and_grad(prob.x0)[0])
        x, loss = _minimize(prob)
    assert loss <= init_loss
    strategy = prob.to_strategy(x)
    ev = error.evaluate(strategy, w, p)
    bsr = error.evaluate(closed_forms.bsr(n, bands, w), w, p)
    key = "rmse" if objective == "rmse" else "max_error"
    assert ev["sensitivity_exact"] and ev["sensitivity"] == pytest.approx(math.sqrt(p.reachable_participations))
    assert ev[key] < bsr[key]
    if objective == "rmse":
        assert ev["rmse"] == pytest.approx(loss, rel=1e-9)  # the loss is the exact rmse
    else:
        assert ev["max_error"] <= loss * (1 + 1e-12)  # the smoothed max bounds the max from above


def test_banded_init_options():
    n, bands = 40, 6
    w, p = workloads.prefix_sum(n), Participation.single(n)
    bsr = closed_forms.bsr(n, bands)
    with jax.enable_x64(True):
        default = lb.problem(w, p, bands=bands)
        from_banded = lb.problem(w, p, bands=bands, init=bsr)
        from_toeplitz = lb.problem(w, p, bands=bands, init=closed_forms.sqrt_toeplitz(n))
        from_wider = lb.problem(w, p, bands=bands, init=closed_forms.bsr(n, 9))  # truncated to 6 bands
    np.testing.assert_allclose(default.x0, bsr.columns.reshape(-1))
    np.testing.assert_allclose(from_banded.x0, default.x0)
    np.testing.assert_allclose(from_banded.to_strategy(from_toeplitz.x0).columns, bsr.columns, atol=1e-15)
    np.testing.assert_allclose(from_banded.to_strategy(from_wider.x0).columns, bsr.columns, atol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        lb.problem(w, p, bands=bands, init=np.ones((n + 1, bands)))


# -- dense --------------------------------------------------------------------------------------

DENSE_SCHEMAS = [
    Participation.single(12),
    Participation.epochs(12, 3),
    Participation.epochs(13, 3),  # ragged: residue 0 has 4 participations
    Participation(12, 3, 4),  # min-sep: the row bound
]


@pytest.mark.parametrize(
    "p, wname, objective",
    [(p, "prefix", obj) for p in DENSE_SCHEMAS for obj in ("rmse", "max")]
    + [(p, "momentum", "rmse") for p in DENSE_SCHEMAS[1:3]],
    ids=str,
)
def test_dense_loss_matches_dense_formula_and_fd(p, wname, objective):
    n = p.n
    w = WORKLOADS[wname](n)
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        prob = ld.problem(w, p, objective=objective)
        x = prob.x0 * (1.0 + 0.2 * rng.standard_normal(prob.x0.shape))
        value = float(prob.value_and_grad(x)[0])
        _fd_check(prob, x)
    c = np.zeros((n, n))
    c[np.tril_indices(n)] = x
    strategy = prob.to_strategy(x)
    assert isinstance(strategy, Dense)
    cn = strategy.matrix
    # to_strategy only rescales columns of C
    scale = np.diag(cn) / np.diag(c)
    np.testing.assert_allclose(cn, c * scale[None, :], rtol=1e-12)
    sens_sq = _brute_sens_sq(cn, p)
    if p.cyclic:
        assert sens_sq == pytest.approx(1.0)
    else:
        assert sens_sq <= 1.0 + 1e-12  # the row bound is >= the brute-force maximum
    rmse, max_err = _numpy_errors(cn, w.dense(), 1.0)  # the loss's own sensitivity bound is 1
    if objective == "rmse":
        assert value == pytest.approx(rmse, rel=1e-10)
    else:
        assert max_err * (1 - 1e-12) <= value <= 1.01 * max_err
    ev = error.evaluate(strategy, w, p)
    assert ev["sensitivity"] <= 1.0 + 1e-12
    assert ev["sensitivity"] == pytest.approx(math.sqrt(sens_sq), rel=1e-12) or not p.cyclic


@pytest.mark.parametrize(
    "p, objective",
    [(Participation.single(32), "rmse"), (Participation.epochs(30, 3), "rmse"),
     (Participation.epochs(24, 2), "max"), (Participation(24, 2, 8), "rmse")],
    ids=str,
)
def test_dense_optimized_beats_init_and_sqrt_toeplitz(p, objective):
    n = p.n
    w = workloads.prefix_sum(n)
    with jax.enable_x64(True):
        prob = ld.problem(w, p, objective=objective)
        init_loss = float(prob.value_and_grad(prob.x0)[0])
        x, loss = _minimize(prob, maxiter=1000)
    assert loss <= init_loss
    key = "rmse" if objective == "rmse" else "max_error"
    ev = error.evaluate(prob.to_strategy(x), w, p)
    ref = error.evaluate(closed_forms.sqrt_toeplitz(n), w, p)
    assert ev[key] < ref[key]
    assert ev[key] <= loss * (1 + 1e-9)  # the loss bounds the exact error from above
    if p.cyclic:
        # The loss's bound sum_{P_c} |X_ij| is attained (exact) when X >= 0 within each pattern;
        # at the optimum some within-pattern entries sit at the kink 0 (to rounding), while
        # entries across patterns, which the sensitivity does not involve, may be negative.
        c = prob.to_strategy(x).matrix
        xx = c.T @ c
        same = np.equal.outer(np.arange(n) % p.min_sep, np.arange(n) % p.min_sep)
        assert xx[same].min() >= -1e-8 * np.abs(xx).max()
        if objective == "rmse":
            assert ev["rmse"] == pytest.approx(loss, rel=1e-9)


@pytest.mark.parametrize("p", [Participation(24, 3, 6), Participation(23, 2, 9), Participation(20, 4, 1),
                               Participation(30, 5, 7)], ids=str)
def test_dense_loss_jax_best_pattern_sum_agrees_with_the_core_one_and_brute_force(p):
    """optim.dense keeps a JAX twin of core.sensitivity.best_pattern_sum (the loss traces and
    differentiates it); both are the best sum over the min-sep patterns, enumerated here."""
    from mfnoise.core import sensitivity

    rng = np.random.default_rng(p.n)
    w = rng.random((3, p.n)) * (rng.random((3, p.n)) < 0.7)  # some zero weights
    brute = np.array([max(row[list(pat)].sum() for pat in p.patterns()) for row in w])
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(ld._best_pattern_sum, static_argnums=(1, 2, 3))(
            w, p.n, p.min_sep, p.reachable_participations))
    np.testing.assert_allclose(sensitivity.best_pattern_sum(w, p), brute, rtol=1e-13)
    np.testing.assert_allclose(got, brute, rtol=1e-13)


def test_dense_matches_banded_when_bands_equal_n_single():
    """Single participation: dense = column-normalised full-band BandMF, the same loss."""
    n = 16
    w, p = workloads.prefix_sum(n), Participation.single(n)
    c = closed_forms.sqrt_toeplitz(n).dense()
    with jax.enable_x64(True):
        d = float(ld.problem(w, p, init=c).value_and_grad(ld.problem(w, p, init=c).x0)[0])
        b = lb.problem(w, p, bands=n, init=Banded.from_dense(c, n))
        bv = float(b.value_and_grad(b.x0)[0])
    assert d == pytest.approx(bv, rel=1e-12)


def test_dense_refusals():
    w = workloads.prefix_sum(16)
    with pytest.raises(ValueError, match="bands"):
        ld.problem(w, Participation.single(16), bands=4)
    with pytest.raises(ValueError, match="lower triangular"):
        ld.problem(w, Participation.single(16), init=np.ones((16, 16)))
    with pytest.raises(ValueError, match="n <= "):
        ld.problem(workloads.prefix_sum(ld.DENSE_LIMIT + 1), Participation.single(ld.DENSE_LIMIT + 1))


# -- through the driver -------------------------------------------------------------------------


@pytest.mark.parametrize("family, kw", [("banded", {"bands": 8}), ("dense", {})])
def test_optimize_driver_runs_these_problems(family, kw):
    optimize = pytest.importorskip("mfnoise.optim.solver").optimize
    p = Participation.epochs(48, 2)
    w = workloads.prefix_sum(48)
    strategy, report = optimize(w, p, family=family, progress=False, **kw)
    ev = error.evaluate(strategy, w, p)
    assert report["rmse"] == pytest.approx(ev["rmse"], rel=1e-12)
    assert report["loss"] <= report["initial_loss"]
    assert ev["sensitivity"] <= math.sqrt(p.reachable_participations) * (1 + 1e-12)
    assert ev["sensitivity_exact"] or family == "dense"  # see test_dense_optimized_beats_init...
