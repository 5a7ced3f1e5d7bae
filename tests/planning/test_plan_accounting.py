"""A plan's epsilon is dp-accounting's for its mechanism and sampling, computed here directly
(docs/design.md, "Plan" and "Accounting"), and its batches honour its participation schema.

The reference builds the DpEvent by hand from the definitions: fixed cyclic batches release one
Gaussian mechanism with noise multiplier z ("Multi-Epoch Matrix Factorization Mechanisms for
Private Machine Learning", arXiv:2211.06530); cyclic Poisson sampling over b = min_sep groups
releases ceil(n / b) rounds of a Poisson-subsampled Gaussian with q = batch * b / dataset and
per-round noise multiplier z * sens(C, p) / (max column norm * margin) ("(Amplified) Banded Matrix
Factorization", arXiv:2306.08153), sens and the column norms from the dense C with numpy, the margin
1 + 2^-20 for a C that float32 does not run exactly (1 for C = I; docs/design.md, "Accounting").
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

import mfnoise
from mfnoise.training import batching


def _direct_epsilon(plan: mfnoise.planning.Plan, scale: float = 1.0) -> float:
    z = plan.noise_multiplier * scale
    if plan.sampling == "cyclic":
        event = dp_accounting.GaussianDpEvent(z)
    else:
        c = plan.strategy.dense()
        b, n = plan.participation.min_sep, plan.steps
        col_sq = np.einsum("ij,ij->j", c, c)
        # banded C with bands <= b: sens^2 = max over residues of the sum of its columns' squared norms
        sens = math.sqrt(max(col_sq[r::b].sum() for r in range(b)))
        margin = 1.0 if np.array_equal(c, np.eye(n)) else 1.0 + 2.0**-20
        q = plan.batch_size * b / plan.dataset_size
        round_event = dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(z * sens / (math.sqrt(col_sq.max()) * margin)))
        event = dp_accounting.SelfComposedDpEvent(round_event, -(-n // b))
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=plan.pld_discretization)
    return float(acc.compose(event).get_epsilon(plan.delta))


GRID = [  # (epsilon, dataset size, batch size, epochs, mechanism, sampling)
    (1.0, 400, 50, 2, "dp-sgd", "cyclic-poisson"),
    (4.0, 600, 100, 3, "bandmf", "cyclic-poisson"),
    (2.0, 300, 100, 4, "bandmf", "cyclic"),
    (8.0, 500, 50, 1, "dp-sgd", "cyclic"),
]


@pytest.fixture(scope="module")
def plans() -> list:
    return [mfnoise.plan(eps, 1e-5, dataset_size=d, batch_size=m, epochs=e, mechanism=mech, sampling=s)
            for eps, d, m, e, mech, s in GRID]


def test_grid_epsilon_equals_dp_accounting_directly(plans):
    for plan, (eps, d, m, e, mech, s) in zip(plans, GRID):
        assert (plan.mechanism, plan.sampling, plan.dataset_size, plan.batch_size) == (mech, s, d, m)
        assert plan.steps == e * (d // m)
        direct = _direct_epsilon(plan)
        assert plan.epsilon == pytest.approx(direct, rel=1e-9, abs=1e-12), (plan.mechanism, plan.sampling)
        assert direct <= eps
        # calibrated, not merely private: 1% less noise breaks the budget
        assert _direct_epsilon(plan, 0.99) > eps


def test_grid_batches_honour_the_participation(plans):
    for plan in plans:
        batches = plan.batches(seed=3)
        report = batching.check(batches.batch_plan, plan.participation, raise_on_error=False)
        assert report.ok, report.summary
        indices, mask = batches.arrays()
        assert indices.shape[0] == mask.shape[0] == plan.steps
        assert indices.dtype == np.int32 and mask.dtype == bool
        want = "cyclic" if plan.sampling == "cyclic" else "cyclic-poisson"
        assert batches.identity.sampler == want  # the sampler the accounting assumed
        rows = list(batches)
        assert [r.step for r in rows] == list(range(plan.steps))
        assert all(r.fingerprint == plan.fingerprint for r in rows)


def test_fixed_cyclic_batches_use_every_example_once_per_epoch(plans):
    plan = plans[2]
    indices, mask = plan.batches(0).arrays()
    b = plan.participation.min_sep
    for epoch in range(plan.steps // b):
        seen = np.sort(indices[epoch * b:(epoch + 1) * b][mask[epoch * b:(epoch + 1) * b]])
        np.testing.assert_array_equal(seen, np.arange(plan.dataset_size))


def test_poisson_batches_have_the_stated_expected_size(plans):
    plan = plans[1]  # amplified: each step samples its group with q = batch * b / dataset
    sizes = np.concatenate([plan.batches(seed).arrays()[1].sum(axis=1) for seed in range(20)])
    b = plan.participation.min_sep
    q = plan.batch_size * b / plan.dataset_size
    group = plan.dataset_size / b
    assert plan.expected_batch_size == plan.batch_size == pytest.approx(q * group)
    # binomial(group, q) mean, within 4 standard errors
    assert abs(sizes.mean() - q * group) < 4 * math.sqrt(group * q * (1 - q) / sizes.size)
