"""The objectives (mfnoise.optim.objectives) in every family that supports them, against dense numpy.

For each family's loss: at a point x, the loss equals the objective of the strategy x maps to,

    last-iterate = sens * ||B[n-1, :]||,   Weighted(w) = sens * sqrt(sum_i w_i ||B[i, :]||^2 / sum w),

with B = A C^{-1} by np.linalg.solve and sens from the definitions (column norms for a banded C
with bands <= min_sep; the per-pattern sums for the dense family's normalised C). And the
optimizer, run for each objective, does no worse on that objective than when run for the other.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import mfnoise
from mfnoise.core import workloads
from mfnoise.optim import banded as banded_opt
from mfnoise.optim import dense as dense_opt
from mfnoise.optim import objectives
from mfnoise.optim import toeplitz as toeplitz_opt
from mfnoise.optim.objectives import Weighted

from conftest import decoder, momentum_matrix, toeplitz_matrix


def _objective(obj, b: np.ndarray, sens2: float) -> float:
    rows = np.sum(b * b, axis=1)
    n = rows.size
    if obj == "rmse":
        return math.sqrt(sens2 * rows.sum() / n)
    if obj == "last-iterate":
        return math.sqrt(sens2 * rows[-1])
    return math.sqrt(sens2 * np.dot(obj.weights, rows) / obj.weights.sum())


def _objective_of(name: str, n: int):
    if name == "last-iterate":
        return name
    return Weighted(np.random.default_rng(n).exponential(size=n) * (np.arange(n) >= n // 3))


def _workload(kind: str, n: int):
    if kind == "momentum-wd":  # a_d = 0.5 sum_u alpha^(d-u) beta^u, alpha = 1 - 0.5 * 0.2
        d = np.arange(n)
        col = np.array([0.5 * sum(0.9 ** (k - u) * 0.8**u for u in range(k + 1)) for k in d])
        return workloads.momentum(n, 0.8, 0.5, weight_decay=0.2), toeplitz_matrix(col, n)
    eta = workloads.warmup_cosine(n, peak=1.0, warmup_steps=4, final=0.1)
    return workloads.momentum(n, 0.5, eta), momentum_matrix(n, 0.5, eta)


# bands <= min_sep = 8 (free coefficients), and > min_sep (the monotone parametrisation)
@pytest.mark.parametrize("name,bands", [("last-iterate", 3), ("weighted", 12), ("last-iterate", 12)])
def test_toeplitz_loss_equals_dense_formula(name, bands):
    n = 24
    obj = _objective_of(name, n)
    p = mfnoise.Participation.epochs(n, 3)
    w, a = _workload("momentum-wd", n)
    prob = toeplitz_opt.problem(w, p, objective=obj, bands=bands)
    x = prob.x0 + 0.05 * np.random.default_rng(1).normal(size=prob.x0.shape)
    with jax.enable_x64(True):
        loss = float(prob.value_and_grad(x)[0])
    s = prob.to_strategy(x)
    c = s.dense()
    xtx = c.T @ c
    assert np.all(xtx >= -1e-15)  # c >= 0, so sens^2 is the sum over the worst cyclic pattern
    sens2 = max(xtx[np.ix_(P, P)].sum() for P in (list(range(r, n, 8)) for r in range(8)))
    assert math.exp(loss) == pytest.approx(_objective(obj, decoder(a, c), sens2), rel=1e-10)
    exact = objectives.evaluate(obj, s, w, p)
    assert exact["objective_value"] == pytest.approx(math.exp(loss), rel=1e-10)


@pytest.mark.parametrize("name,kind", [("last-iterate", "momentum-wd"), ("weighted", "warmup-cosine")])
def test_banded_loss_equals_dense_formula(name, kind):
    n = 32
    obj = _objective_of(name, n)
    p = mfnoise.Participation.epochs(n, 4)  # min_sep 8
    w, a = _workload(kind, n)
    prob = banded_opt.problem(w, p, objective=obj, bands=5)
    x = prob.x0 * (1 + 0.1 * np.random.default_rng(2).normal(size=prob.x0.shape))
    with jax.enable_x64(True):
        loss = float(prob.value_and_grad(x)[0])
    c = prob.to_strategy(x).dense()
    np.testing.assert_allclose(np.linalg.norm(c, axis=0), 1.0, rtol=1e-12)  # bands <= min_sep: sens^2 = k
    assert loss == pytest.approx(_objective(obj, decoder(a, c), 4.0), rel=1e-9)


@pytest.mark.parametrize("name,kind", [("last-iterate", "warmup-cosine"), ("weighted", "momentum-wd")])
def test_dense_loss_equals_dense_formula(name, kind):
    n = 12
    obj = _objective_of(name, n)
    p = mfnoise.Participation.epochs(n, 3)  # patterns {r, r + 4, r + 8}
    w, a = _workload(kind, n)
    prob = dense_opt.problem(w, p, objective=obj)
    assert prob.formulation == "primal"
    x = prob.x0 + 0.05 * np.random.default_rng(3).normal(size=prob.x0.shape)
    with jax.enable_x64(True):
        loss = float(prob.value_and_grad(x)[0])
    c = prob.to_strategy(x).dense()
    bound = max(np.abs(c.T @ c)[np.ix_(P, P)].sum() for P in ([r, r + 4, r + 8] for r in range(4)))
    assert bound == pytest.approx(1.0, rel=1e-12)  # to_strategy normalises the loss's sensitivity bound to 1
    assert loss == pytest.approx(_objective(obj, decoder(a, c), 1.0), rel=1e-9)


def test_families_without_the_objective_refuse_it_by_name():
    n = 16
    p = mfnoise.Participation.epochs(n, 2)
    with pytest.raises(ValueError, match="'last_iterate'"):
        toeplitz_opt.problem(workloads.prefix_sum(n), p, objective="last_iterate")
    with pytest.raises(ValueError, match="3 weights, expected n=16"):
        banded_opt.problem(workloads.prefix_sum(n), p, objective=Weighted([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"weights\[1\]=-1.0"):
        Weighted([1.0, -1.0])
    with pytest.raises(ValueError, match="all zero"):
        Weighted(np.zeros(4))
    with pytest.raises(ValueError, match="dual formulation needs the rmse objective"):
        dense_opt.problem(workloads.prefix_sum(n), p, objective="last-iterate", formulation="dual")


def test_objective_weights():
    n = 5
    np.testing.assert_array_equal(objectives.toeplitz_weights("rmse", n), (n - np.arange(n)) / n)
    np.testing.assert_array_equal(objectives.toeplitz_weights("last-iterate", n), np.ones(n))
    w = Weighted([1.0, 0.0, 2.0, 0.0, 1.0])
    np.testing.assert_allclose(objectives.toeplitz_weights(w, n), [1.0, 0.75, 0.75, 0.25, 0.25], rtol=1e-15)
    assert objectives.row_weights("max", n) is None
    assert objectives.name(w) == "weighted" and objectives.name("last-iterate") == "last-iterate"


@pytest.mark.parametrize("family,kw", [("toeplitz", {"bands": 6}), ("banded", {"bands": 4}), ("dense", {})])
def test_each_objective_optimum_wins_on_its_own_objective(family, kw):
    n = 16 if family == "dense" else 32
    p = mfnoise.Participation.epochs(n, 4)
    w = workloads.momentum(n, 0.9, 0.5, weight_decay=0.1)
    s_rmse, r_rmse = mfnoise.optimize(w, p, family, objective="rmse", progress=False, **kw)
    s_last, r_last = mfnoise.optimize(w, p, family, objective="last-iterate", progress=False, **kw)
    assert r_last.objective == "last-iterate" and r_last.objective_value == r_last.last_iterate_error
    assert r_rmse.objective_value == r_rmse.rmse
    # Exact numbers (error.evaluate), a little slack for the optimizer's tolerance.
    assert r_last.last_iterate_error <= r_rmse.last_iterate_error * (1 + 1e-6)
    assert r_rmse.rmse <= r_last.rmse * (1 + 1e-6)
    late = Weighted(np.r_[np.zeros(n - n // 4), np.ones(n // 4)])
    s_late, r_late = mfnoise.optimize(w, p, family, objective=late, progress=False, **kw)
    assert r_late.objective == "weighted"
    rmse_on_late = objectives.evaluate(late, s_rmse, w, p)["objective_value"]
    assert r_late.objective_value <= rmse_on_late * (1 + 1e-6)
