"""The samplers honour any schema they are given or refuse it; Poisson coins are fresh every round.

Every plan a sampler returns is checked here by the brute-force reference of
``batching_reference`` (plain loops over each example's steps), never by ``batching.check``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise.training import batching

from batching_reference import epochs, steps_by_example, violations


@st.composite
def any_schema(draw) -> mfnoise.Participation:
    """Min-sep schemas with k below, at and above ceil(n / b), and cyclic ones."""
    n = draw(st.integers(1, 40))
    b = draw(st.integers(1, n))
    if draw(st.booleans()):
        return epochs(n, n // b)
    return mfnoise.Participation(n, draw(st.integers(1, math.ceil(n / b) + 1)), b)


def assert_honours(plan: batching.BatchPlan, p: mfnoise.Participation, dataset_size: int) -> dict[int, list[int]]:
    """The brute-force verdict on a returned plan: no violation of any kind, every realised step
    of an example inside its group's residue class, and no step that no draw could fill."""
    assert plan.indices.shape[0] == p.n and plan.indices.shape == plan.mask.shape
    found = violations(plan.indices.tolist(), plan.mask.tolist(), dataset_size, p,
                       reach=[1] * p.n)  # emptiness is judged from the groups below
    assert found == {}, found
    steps = steps_by_example(plan.indices, plan.mask)
    for e, s in steps.items():
        assert len(s) <= p.max_participations and all(t1 - t0 >= p.min_sep for t0, t1 in itertools.pairwise(s))
        assert {t % p.min_sep for t in s} == {int(plan.groups[e])}
    group_sizes = np.bincount(np.asarray(plan.groups), minlength=p.min_sep)
    assert group_sizes.sum() == dataset_size and group_sizes.min() >= 1  # every step has examples to draw
    return steps


@settings(max_examples=150)
@given(p=any_schema(), dataset_size=st.integers(1, 120), seed=st.integers(0, 2**32 - 1))
def test_cyclic_batches_honour_or_refuse_any_schema(p, dataset_size, seed):
    n, k, b = p.n, p.max_participations, p.min_sep
    rounds = math.ceil(n / b)
    try:
        plan = batching.cyclic_batches(dataset_size, p, seed)
    except ValueError as e:
        event("refused")
        # refused only when it cannot be honoured, with the offending value named
        assert dataset_size < b or k < rounds
        assert (f"dataset_size={dataset_size}" in str(e)) or (f"max_participations={k}" in str(e)), e
        return
    assert dataset_size >= b and k >= rounds
    steps = assert_honours(plan, p, dataset_size)
    for e in range(dataset_size):  # nobody is dropped: all steps of its group
        assert steps.get(e, []) == list(range(int(plan.groups[e]), n, b))


@settings(max_examples=150)
@given(p=any_schema(), dataset_size=st.integers(1, 120), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_cyclic_poisson_batches_honour_or_refuse_any_schema(p, dataset_size, data, seed):
    batch_size = data.draw(st.integers(1, dataset_size // p.min_sep + 1))  # up to just over a group
    b, k, rounds = p.min_sep, p.max_participations, math.ceil(p.n / p.min_sep)
    # q > 1 cannot be sampled; q = 1 with k < rounds leaves the steps after every example's k-th empty
    cannot = batch_size * b > dataset_size or (batch_size * b == dataset_size and k < rounds)
    try:
        plan = batching.cyclic_poisson_batches(dataset_size, p, batch_size, seed)
    except ValueError as e:
        event("refused")
        assert cannot
        assert f"batch_size={batch_size}" in str(e), e
        return
    assert not cannot
    event("retiring" if k < rounds else "k >= ceil(n / b)")
    assert_honours(plan, p, dataset_size)


def test_the_reported_schema():
    """Issue 10, item 2: Participation(12, max_participations=2, min_sep=4) gave every example
    ceil(12 / 4) = 3 participations."""
    p = mfnoise.Participation(12, max_participations=2, min_sep=4)
    with pytest.raises(ValueError, match="max_participations=2") as info:
        batching.cyclic_batches(100, p, 0)
    assert "steps 8..11" in str(info.value) and "n <= 8" in str(info.value)
    for seed in range(20):
        plan = batching.cyclic_poisson_batches(100, p, 10, seed)
        steps = assert_honours(plan, p, 100)
        assert max(len(s) for s in steps.values()) == 2


@settings(max_examples=40)
@given(n=st.integers(2, 30), data=st.data(), seed=st.integers(0, 2**16))
def test_poisson_retires_after_the_kth_participation(n, data, seed):
    """Under k < ceil(n / b) the plan is the unrestricted plan with each example's participations
    after its k-th (in step order) masked out, and nothing else changed."""
    b = data.draw(st.integers(1, n // 2))
    rounds = math.ceil(n / b)
    k = data.draw(st.integers(1, rounds - 1))
    dataset_size = data.draw(st.integers(b + 1, 60))
    batch_size = data.draw(st.integers(1, (dataset_size - 1) // b))  # q < 1 (q = 1 is refused)
    full = batching.cyclic_poisson_batches(dataset_size, mfnoise.Participation(n, rounds, b), batch_size, seed)
    plan = batching.cyclic_poisson_batches(dataset_size, mfnoise.Participation(n, k, b), batch_size, seed)
    want = {e: s[:k] for e, s in steps_by_example(full.indices, full.mask).items()}
    assert steps_by_example(plan.indices, plan.mask) == want
    assert np.array_equal(plan.groups, full.groups)


def test_shared_finish_refuses_a_violating_candidate():
    """The step every sampler ends with: retirement fixes too many participations, and anything
    else that breaks the schema (one example in two residue classes; steps that retirement
    leaves with nobody) is refused."""
    p = epochs(4, 2)  # b = 2: patterns {0, 2} and {1, 3}
    mask = np.ones((4, 1), bool)
    common = {"sampler": "cyclic", "seed": 0, "dataset_size": 3, "groups": np.array([0, 1, 0]),
              "sampling_probability": 1.0, "batch_size": None, "max_batch_sizes": None}
    mixed = np.array([[0], [1], [2], [0]], np.int32)  # example 0 in steps 0 and 3
    with pytest.raises(ValueError, match="(?s)cannot honour .*different residues mod min_sep=2"):
        batching._finish(p, indices=mixed, mask=mask, **common)
    tight = mfnoise.Participation(4, 1, 2)
    twice = np.array([[0], [1], [0], [1]], np.int32)  # examples 0 and 1 twice each
    common.update(dataset_size=2, groups=np.array([0, 1]))
    with pytest.raises(ValueError, match="step 2 is structurally empty"):  # deterministic: 2, 3 left empty
        batching._finish(tight, indices=twice, mask=mask, **common)
    # a draw of coins that may differ: steps 2 and 3 could hold someone, the plan stands
    plan = batching._finish(tight, indices=twice, mask=mask, **{**common, "max_batch_sizes": np.ones(4, int)})
    assert steps_by_example(plan.indices, plan.mask) == {0: [0], 1: [1]}  # retired after 1


# -- Poisson coins: the right rate, independent across rounds and across examples ---------------
def round_inclusions(plan: batching.BatchPlan, b: int) -> np.ndarray:
    """(dataset_size, rounds) bool: whether each example takes part in the i-th step of its group
    (n a multiple of b, so every group has the same number of rounds)."""
    rounds = plan.n // b
    inc = np.zeros((plan.dataset_size, rounds), bool)
    for t in range(plan.n):
        inc[plan.indices[t][plan.mask[t]], t // b] = True
    return inc


def phi(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 0/1 samples (the phi coefficient of their 2x2 table)."""
    x, y = x.astype(float).ravel(), y.astype(float).ravel()
    return float(((x - x.mean()) * (y - y.mean())).mean() / (x.std() * y.std()))


def independence_scores(plans: list[batching.BatchPlan], b: int, q: float) -> dict[str, float]:
    """Each a z-score, about N(0, 1) when coins are fresh and independent:
    lag1 / lag2: phi of an example's inclusion in rounds r and r + 1 (r + 2), times sqrt(pairs);
    count: the variance of each example's number of participations against Binomial(R, q);
    within: phi of two neighbouring slots of one step (two examples of one group)."""
    inc = np.concatenate([round_inclusions(plan, b) for plan in plans])
    masks = np.concatenate([plan.mask for plan in plans])
    rounds = inc.shape[1]
    lag1 = phi(inc[:, :-1], inc[:, 1:]) * math.sqrt(inc[:, 1:].size)
    lag2 = phi(inc[:, :-2], inc[:, 2:]) * math.sqrt(inc[:, 2:].size)
    counts = inc.sum(axis=1)
    var, m = rounds * q * (1 - q), counts.size
    mu4 = var * (1 + 3 * (rounds - 2) * q * (1 - q))  # central 4th moment of Binomial(R, q)
    count = (counts.var() - var) / math.sqrt((mu4 - var**2) / m)
    within = phi(masks[:, :-1], masks[:, 1:]) * math.sqrt(masks[:, 1:].size)
    return {"lag1": lag1, "lag2": lag2, "count": count, "within": within}


POISSON_CASE = {"dataset_size": 6000, "b": 3, "rounds": 20, "batch_size": 600}  # groups of 2000, q = 0.3


@pytest.fixture(scope="module")
def poisson_plans() -> list[batching.BatchPlan]:
    c = POISSON_CASE
    p = epochs(c["b"] * c["rounds"], c["rounds"])
    return [batching.cyclic_poisson_batches(c["dataset_size"], p, c["batch_size"], seed) for seed in range(3)]


def test_poisson_coins_are_independent_across_rounds(poisson_plans):
    b, q = POISSON_CASE["b"], 0.3
    assert poisson_plans[0].sampling_probability == pytest.approx(q)
    inc = np.concatenate([round_inclusions(plan, b) for plan in poisson_plans])
    assert inc.mean() == pytest.approx(q, abs=6 * math.sqrt(q * (1 - q) / inc.size))
    scores = independence_scores(poisson_plans, b, q)
    assert all(abs(z) < 6 for z in scores.values()), scores  # 6 standard errors: not flaky


def test_independence_scores_catch_reused_coins(poisson_plans):
    """The same statistics on samplers broken on purpose: coins of a group's first round reused
    for all its rounds, and one coin per step for the whole group."""
    b, q = POISSON_CASE["b"], 0.3
    reused, one_coin = [], []
    rng = np.random.default_rng(0)
    for plan in poisson_plans:
        # slot j of a step of group g holds the j-th member of g (the sampler's layout, groups of
        # equal size here), so a step's mask row is one coin per member
        members = np.stack([np.flatnonzero(plan.groups == g) for g in range(b)])
        assert all(np.isin(plan.indices[t][plan.mask[t]], members[t % b]).all() for t in range(plan.n))
        indices = members[np.arange(plan.n) % b].astype(np.int32)
        reused.append(batching.BatchPlan(
            indices=indices, mask=plan.mask[np.arange(plan.n) % b], dataset_size=plan.dataset_size,
            min_sep=b, sampling=plan.sampling, sampling_probability=q, groups=plan.groups))
        one_coin.append(batching.BatchPlan(
            indices=indices, mask=np.broadcast_to(rng.random((plan.n, 1)) < q, indices.shape),
            dataset_size=plan.dataset_size, min_sep=b, sampling=plan.sampling, sampling_probability=q,
            groups=plan.groups))
    for broken, which in ((reused, "lag1"), (one_coin, "within")):
        inc = np.concatenate([round_inclusions(plan, b) for plan in broken])
        scores = independence_scores(broken, b, q)
        assert scores[which] > 100, scores  # while the overall rate can look right
        if which == "lag1":
            assert inc.mean() == pytest.approx(q, abs=0.02)
