"""The chooser: every candidate is scored by the noise in the training trajectory, computed here
densely (rmse = z * sens(C, p) * ||A C^{-1}||_F / sqrt(n), sens by brute force over the schema's
patterns), the lowest eligible one is chosen, and the memory budget drops what does not fit."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import mfnoise
from mfnoise.planning import workload_for


def _dense_rmse(c: np.ndarray, a: np.ndarray, p: mfnoise.Participation) -> float:
    n = c.shape[0]
    x = c.T @ c
    # sens^2 = max over cyclic patterns of sum_{i,j in P} |X_ij| (equality for X >= 0; docs/design.md)
    sens_sq = max(sum(abs(x[i, j]) for i, j in itertools.product(range(r, n, p.min_sep), repeat=2))
                  for r in range(p.min_sep))
    b = a @ np.linalg.inv(c)
    return math.sqrt(sens_sq) * float(np.linalg.norm(b)) / math.sqrt(n)


@pytest.fixture(scope="module")
def auto() -> mfnoise.planning.Plan:
    return mfnoise.plan(4.0, 1e-5, dataset_size=240, batch_size=40, epochs=2, optimizer=("momentum", 0.9),
                        params=1000, memory_budget=4 * 1000 * 4, optimize_seconds=4.0)


def test_the_chosen_candidate_has_the_least_trajectory_noise(auto):
    rows = auto.candidates
    chosen = [c for c in rows if c.chosen]
    assert len(chosen) == 1
    eligible = [c for c in rows if c.dropped is None and c.accountant == "pld"]
    assert chosen[0].trajectory_rmse == min(c.trajectory_rmse for c in eligible)
    assert (auto.mechanism, auto.sampling) == (chosen[0].mechanism, chosen[0].sampling)
    assert auto.noise_multiplier == chosen[0].noise_multiplier
    a = workload_for(("momentum", 0.9), auto.steps).dense()
    want = auto.noise_multiplier * _dense_rmse(auto.strategy.dense(), a, auto.participation)
    assert chosen[0].trajectory_rmse == pytest.approx(want, rel=1e-9)
    # every priced row's score is its z times its own dense rmse
    assert {c.mechanism for c in eligible} >= {"dp-sgd", "bandmf", "bisr"}
    assert {c.sampling for c in eligible} == {"cyclic", "cyclic-poisson"}


def test_the_memory_budget_drops_what_does_not_fit(auto):
    budget = 4 * 1000 * 4  # 4 float32 arrays of 1000 parameters
    for c in auto.candidates:
        if c.state_bytes is not None and c.state_bytes > budget:
            assert c.dropped is not None and c.dropped.startswith("memory"), c
        if c.dropped is None:
            assert c.state_bytes == c.state_arrays * 1000 * 4 <= budget
    assert auto.strategy.state_arrays() * 4000 <= budget
    assert any(c.dropped and "amplification does not apply" in c.dropped for c in auto.candidates)
    text = auto.report()
    assert "dropped: memory" in text and auto.fingerprint[:16] in text
    assert "arXiv:2211.06530" in text or "arXiv:2306.08153" in text


def test_workloads_of_the_optimizers():
    n = 6
    np.testing.assert_array_equal(workload_for("sgd", n).dense(), np.tril(np.ones((n, n))))
    beta = 0.5
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    momentum = np.where(i >= j, (1 - beta ** (i - j + 1)) / (1 - beta), 0.0)
    np.testing.assert_allclose(workload_for(("momentum", beta), n).dense(), momentum)
    lrs = np.linspace(1.0, 0.5, n)
    # SGD with learning rates eta_t: theta_{i+1} = theta_0 - sum_{j <= i} eta_j g_j
    schedule = np.where(i >= j, lrs[j], 0.0)
    np.testing.assert_allclose(workload_for(lrs, n).dense(), schedule)
    with pytest.raises(ValueError, match="shape"):
        workload_for(np.ones(n + 1), n)
    with pytest.raises(ValueError, match="optimizer must be"):
        workload_for("adam", n)
