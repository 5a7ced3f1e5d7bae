"""The BLT family's last-iterate and weighted-steps objectives (mfnoise/optim/blt.py).

References are dense: B = A C^{-1} by a linear solve of the materialised matrices, its row norms
summed by hand, the sensitivity by brute force over every participation pattern
(tests/optim/test_optimize.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise import Participation
from mfnoise.core import workloads
from mfnoise.optim import blt as blt_loss
from mfnoise.optim import objectives
from mfnoise.optim.objectives import Weighted
from tests.optim.test_optimize import brute_force_sensitivity, jitted

N = 24
SCHEMAS = {"single": Participation.single(N), "cyclic": Participation.epochs(N, 3),
           "minsep": Participation(N, 3, 7)}


def _workload(kind: str):
    if kind == "prefix":
        return workloads.prefix_sum(N)
    if kind == "momentum":
        return workloads.momentum(N, 0.9)
    # A Toeplitz workload that says nothing of being rational: the materialised decoder path.
    return workloads.Workload(n=N, name="custom", coeffs=np.exp(-0.1 * np.arange(N)) + 0.5)


def dense_objective(c: np.ndarray, a: np.ndarray, p: Participation, objective) -> float:
    """sens(C, p) * the objective's error of B = A C^{-1}, every number from dense matrices."""
    b = np.linalg.solve(c.T, a.T).T
    rows = np.sum(b * b, axis=1)
    sens = brute_force_sensitivity(c, p)
    if objective == "last-iterate":
        return sens * math.sqrt(rows[-1])
    if objective == "max":
        return sens * math.sqrt(rows.max())
    if objective == "rmse":
        return sens * math.sqrt(rows.mean())
    return sens * math.sqrt(np.dot(objective.weights, rows) / objective.weights.sum())


def _weights(seed: int, n: int = N) -> Weighted:
    rng = np.random.default_rng(seed)
    w = rng.exponential(size=n) * (rng.random(n) < 0.7)
    w[rng.integers(n)] += 1.0  # never all zero
    return Weighted(w)


@pytest.mark.parametrize("kind,schema", [("prefix", "single"), ("momentum", "cyclic"), ("custom", "minsep")])
def test_last_iterate_loss_is_the_dense_last_row_and_equals_max(kind, schema):
    p, w = SCHEMAS[schema], _workload(kind)
    last = blt_loss.problem(w, p, objective="last-iterate", buffers=3)
    f = jitted(last)
    rng = np.random.default_rng(7)
    for _ in range(2):
        x = blt_loss.init_params(3, N) + 0.3 * rng.standard_normal(6)
        c = last.to_strategy(x).dense()
        b = np.linalg.solve(c.T, w.dense().T).T
        rows = np.sum(b * b, axis=1)
        sens = brute_force_sensitivity(c, p)
        value = math.exp(f(x)[0])
        assert value == pytest.approx(sens * math.sqrt(rows[-1]), rel=1e-9)
        # For a Toeplitz B the last row is the largest: the same objective as max.
        assert rows[-1] == pytest.approx(rows.max(), rel=1e-14)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(["prefix", "momentum", "custom"]),
       schema=st.sampled_from(sorted(SCHEMAS)), buffers=st.integers(1, 3))
def test_weighted_loss_equals_the_dense_weighted_row_sum(seed, kind, schema, buffers):
    p, w = SCHEMAS[schema], _workload(kind)
    obj = _weights(seed)
    prob = blt_loss.problem(w, p, objective=obj, buffers=buffers)
    x = blt_loss.init_params(buffers, N) + 0.3 * np.random.default_rng(seed).standard_normal(2 * buffers)
    value = math.exp(jitted(prob)(x)[0])
    c = prob.to_strategy(x).dense()
    assert value == pytest.approx(dense_objective(c, w.dense(), p, obj), rel=1e-9)


def test_weighted_with_uniform_weights_is_rmse_and_one_hot_last_is_last_iterate():
    p, w = SCHEMAS["cyclic"], _workload("momentum")
    x = blt_loss.init_params(2, N) + 0.2
    uniform = math.exp(jitted(blt_loss.problem(w, p, objective=Weighted(np.ones(N)), buffers=2))(x)[0])
    rmse = math.exp(jitted(blt_loss.problem(w, p, objective="rmse", buffers=2))(x)[0])
    assert uniform == pytest.approx(rmse, rel=1e-12)
    onehot = math.exp(jitted(blt_loss.problem(w, p, objective=Weighted(np.eye(N)[-1]), buffers=2))(x)[0])
    last = math.exp(jitted(blt_loss.problem(w, p, objective="last-iterate", buffers=2))(x)[0])
    assert onehot == pytest.approx(last, rel=1e-12)


def test_optimize_reports_each_objective_by_the_exact_routines_and_wins_on_its_own():
    n = 64
    p, w = Participation.epochs(n, 4), workloads.momentum(n, 0.9)
    s_last, r_last = mfnoise.optimize(w, p, "blt", buffers=3, objective="last-iterate", progress=False)
    assert r_last.objective == "last-iterate" and r_last.objective_value == r_last.last_iterate_error
    assert r_last.last_iterate_error == pytest.approx(r_last.max_error, rel=1e-12)
    assert r_last.objective_value == pytest.approx(dense_objective(s_last.dense(), w.dense(), p, "last-iterate"),
                                                   rel=1e-9)
    late = Weighted(np.r_[np.zeros(n - n // 4), np.ones(n // 4)])
    s_late, r_late = mfnoise.optimize(w, p, "blt", buffers=3, objective=late, progress=False)
    assert r_late.objective == "weighted" and "weighted" in r_late.problem
    assert r_late.objective_value == pytest.approx(dense_objective(s_late.dense(), w.dense(), p, late), rel=1e-9)
    s_rmse, _ = mfnoise.optimize(w, p, "blt", buffers=3, objective="rmse", progress=False)
    # Each optimum is no worse on its own objective than the others' optima (exact numbers).
    assert r_late.objective_value <= objectives.evaluate(late, s_rmse, w, p)["objective_value"] * (1 + 1e-6)
    assert r_late.objective_value <= objectives.evaluate(late, s_last, w, p)["objective_value"] * (1 + 1e-6)


def test_a_weighted_objective_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="3 weights, expected n=24"):
        blt_loss.problem(_workload("prefix"), SCHEMAS["single"], objective=Weighted([1.0, 2.0, 3.0]))
