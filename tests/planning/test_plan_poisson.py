"""``mfnoise.plan`` with Poisson sampling: BISR priced by MMCC on a tiny setting (docs/design.md, "Plan").

The plan's epsilon is recomputed here by ``accounting.epsilon(sampling="poisson")`` directly, its
batches are checked against Poisson sampling's definition (``batching.check`` and the batch sizes'
Binomial law), and the mismatches a Poisson plan invites are refused.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import mfnoise
from mfnoise.core.participation import Participation
from mfnoise.planning import choose
from mfnoise.training import accounting, batching

EPS, DELTA, D, M, N = 4.0, 1e-5, 400, 40, 8
# coarse MMCC options: still upper bounds (pessimistic discretisation), seconds instead of a minute at n = 8
OPTS = {"pld_discretization": 1e-2, "max_components": 16}


@pytest.fixture(scope="module")
def poisson_plan() -> mfnoise.planning.Plan:
    return mfnoise.plan(EPS, DELTA, dataset_size=D, batch_size=M, steps=N, mechanism="bisr", sampling="poisson",
                        amplification_seconds=math.inf, mmcc_options=OPTS, progress=False)


def test_epsilon_is_accountings_mmcc_recomputed(poisson_plan):
    plan = poisson_plan
    assert plan.sampling == "poisson" and plan.mechanism == "bisr" and plan.strategy.family == "inverse-toeplitz"
    assert plan.participation == Participation(N, N, 1)
    direct = accounting.epsilon(plan.noise_multiplier, DELTA, Participation(N, N, 1), sampling="poisson",
                                dataset_size=D, batch_size=M, strategy=plan.strategy, mmcc_options=OPTS)
    assert plan.epsilon == direct <= EPS
    how = accounting.explain(plan.noise_multiplier, DELTA, Participation(N, N, 1), sampling="poisson",
                             dataset_size=D, batch_size=M, strategy=plan.strategy, mmcc_options=OPTS)
    assert how.theorem == plan.accounting.theorem == "mmcc" and how.provable
    # calibrated: 1% less noise is priced above the target by the same accountant
    assert accounting.epsilon(plan.noise_multiplier * 0.99, DELTA, Participation(N, N, 1), sampling="poisson",
                              dataset_size=D, batch_size=M, strategy=plan.strategy, mmcc_options=OPTS) > EPS
    chosen = [c for c in plan.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].accountant == "mmcc" and chosen[0].noise_multiplier == plan.noise_multiplier
    report = plan.report()
    assert "theorem mmcc" in report and "arXiv:2310.15526" in report and "sampling poisson" in report
    assert plan.to_dict()["theorem"] == "mmcc"


def test_batches_honour_poisson_sampling(poisson_plan):
    plan = poisson_plan
    batches = plan.batches(seed=3)
    bp = batches.batch_plan
    assert bp.identity is not None and bp.identity.sampler == "poisson"
    batching.check(bp, Participation(N, N, 1))  # raises on any violation
    indices, mask = batches.arrays()
    assert indices.shape[0] == N
    # every step samples each of the D examples with q = M / D: the step sizes are Binomial(D, q)
    sizes = mask.sum(axis=1)
    q = M / D
    total, mean, sd = sizes.sum(), N * D * q, math.sqrt(N * D * q * (1 - q))
    assert abs(total - mean) < 5 * sd
    for t in range(N):  # no example twice in one step; indices inside the dataset
        real = indices[t][mask[t]]
        assert len(np.unique(real)) == len(real) and (0 <= real).all() and (real < D).all()
    # adjacent steps share examples (Poisson sampling honours min_sep = 1 only): a cyclic schema is refused
    with pytest.raises(ValueError):
        batching.check(bp, Participation.epochs(N, N // 2))


def test_mismatches_are_refused(poisson_plan):
    plan = poisson_plan
    fixed = choose._schema(D, M, None, N)  # the fixed cyclic batches of the same run
    # the Poisson plan's z with fixed cyclic batches: its stored (MMCC) epsilon is not theirs
    with pytest.raises(ValueError, match="only apply to sampling='poisson'"):
        dataclasses.replace(plan, sampling="cyclic", participation=fixed)
    with pytest.raises(ValueError, match="does not match its batches"):
        dataclasses.replace(plan, sampling="cyclic", participation=fixed, mmcc_options={})
    # ... nor is that z enough for them at the target
    gaussian = accounting.epsilon(plan.noise_multiplier, DELTA, fixed, pld_discretization=plan.pld_discretization)
    assert gaussian > EPS
    with pytest.raises(ValueError, match="above its target"):
        dataclasses.replace(plan, sampling="cyclic", participation=fixed, epsilon=gaussian, mmcc_options={})
    # Poisson accounting with a schema that retires examples is refused by the accountant
    with pytest.raises(ValueError, match="Participation\\(n, n, 1\\)"):
        dataclasses.replace(plan, participation=Participation(N, 2, 1))
    # other MMCC options give another epsilon: refused, and the options are in the fingerprint
    with pytest.raises(ValueError, match="does not match its batches"):
        dataclasses.replace(plan, mmcc_options={"pld_discretization": 2e-2, "max_components": 16})
    assert plan.identity.fields()["accounting_options"] == OPTS and plan.identity.sampling == "poisson"
    # a fixed-batch plan's batches are refused by the Poisson plan, naming the sampling
    other = mfnoise.plan(EPS, DELTA, dataset_size=D, batch_size=M, steps=N, mechanism="dp-sgd", sampling="cyclic",
                         progress=False)
    with pytest.raises(ValueError, match="sampling"):
        plan.check_batches(other.batches(0))


def test_saved_and_loaded(poisson_plan, tmp_path):
    path = poisson_plan.save(tmp_path / "plan.json")
    loaded = mfnoise.planning.load(path)
    assert loaded.fingerprint == poisson_plan.fingerprint and loaded.mmcc_options == OPTS
    assert loaded.epsilon == poisson_plan.epsilon and loaded.accounting.theorem == "mmcc"


def test_over_budget_candidates_are_listed_not_evaluated():
    plan = mfnoise.plan(EPS, DELTA, dataset_size=D, batch_size=M, steps=N, mechanism="bisr",
                        amplification_seconds=0.0, progress=False)
    assert plan.sampling == "cyclic"
    rows = [c for c in plan.candidates if c.sampling == "poisson"]
    # banded Toeplitz (16 bands) needs 16 <= the 10 steps of an epoch, so it is not a candidate here
    assert {c.mechanism for c in rows} == {"blt", "bisr"}
    cost = choose.mmcc_cost(N)
    bisr = [c for c in rows if c.mechanism == "bisr"]
    assert bisr and all(c.noise_multiplier is None for c in bisr)
    assert all(c.dropped == f"not evaluated: MMCC at n = {N} costs about {cost:.3g} s (pass amplification_seconds="
               f"{math.ceil(cost)}, --amplification-seconds {math.ceil(cost)}, to include)" for c in bisr)
    # the default budget leaves them out at the setting (60000 examples, batch 512, 20 epochs)
    assert choose.mmcc_cost(20 * (60000 // 512)) > choose.AMPLIFICATION_SECONDS


def test_poisson_refusals():
    with pytest.raises(ValueError, match="amplification_seconds"):
        mfnoise.plan(EPS, DELTA, dataset_size=D, batch_size=M, steps=N, amplification_seconds=-1.0)
    with pytest.raises(ValueError, match="sampling must be 'auto' or one of"):
        mfnoise.plan(EPS, DELTA, dataset_size=D, batch_size=M, steps=N, sampling="balls-in-bins")
    # only Poisson candidates asked for, none within the budget: refused with the reason
    with pytest.raises(ValueError, match="not evaluated: MMCC"):
        mfnoise.plan(EPS, DELTA, dataset_size=D, batch_size=M, steps=N, mechanism="bisr", sampling="poisson",
                     amplification_seconds=0.0, progress=False)
