"""mfnoise.training.batching: every plan honours its schema, and the check catches plans that do not."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise.training import batching

from batching_reference import epochs, plan_violations
from batching_reference import steps_by_example as _steps_by_example


def steps_by_example(plan: batching.BatchPlan) -> dict[int, list[int]]:
    """Reference: the steps of each example, by a plain Python scan of the plan."""
    return _steps_by_example(plan.indices, plan.mask)


def reference_ok(plan: batching.BatchPlan, p: mfnoise.Participation) -> bool:
    """Valid iff the plan has n steps, no step is empty and each example's steps form a pattern of
    p, without repeats. ``Participation.contains`` is the foundation's definition of a pattern."""
    if plan.indices.shape[0] != p.n:
        return False
    reach = plan.mask.sum(axis=1) if plan.max_batch_sizes is None else plan.max_batch_sizes
    if np.any(reach == 0):
        return False
    return all(len(set(s)) == len(s) and p.contains(s) for s in steps_by_example(plan).values())


@st.composite
def schemas(draw):
    n = draw(st.integers(1, 120))
    k = draw(st.integers(1, min(n, 8)))
    return epochs(n, k)


@settings(max_examples=60)
@given(p=schemas(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_cyclic_batches_follow_the_schema(p, data, seed):
    dataset_size = data.draw(st.integers(p.min_sep, 400))
    plan = batching.cyclic_batches(dataset_size, p, seed)
    result = batching.check(plan, p)
    assert result.ok, result.violations
    assert reference_ok(plan, p)
    assert plan.indices.shape == plan.mask.shape == (p.n, max(1, -(-dataset_size // p.min_sep)))
    # every example sits in exactly one group and takes part in every step of that group's residue
    steps = steps_by_example(plan)
    for e in range(dataset_size):
        g = plan.groups[e]
        assert steps.get(e, []) == list(range(g, p.n, p.min_sep))
    # group sizes differ by at most one: uneven sizes are padded, nobody is dropped or repeated
    sizes = np.bincount(plan.groups, minlength=p.min_sep)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == dataset_size


@settings(max_examples=60)
@given(p=schemas(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_cyclic_poisson_batches_follow_the_schema(p, data, seed):
    dataset_size = data.draw(st.integers(p.min_sep, 400))
    batch_size = data.draw(st.integers(1, dataset_size // p.min_sep))
    plan = batching.cyclic_poisson_batches(dataset_size, p, batch_size, seed)
    result = batching.check(plan, p)
    assert result.ok, result.violations
    assert reference_ok(plan, p)
    assert plan.sampling_probability == pytest.approx(batch_size * p.min_sep / dataset_size)
    # a step only ever samples members of its own group
    for t in range(p.n):
        idx = plan.indices[t][plan.mask[t]]
        assert np.all(plan.groups[idx] == t % p.min_sep)


def test_poisson_sampling_rate():
    p = mfnoise.Participation.epochs(400, 4)  # 100 groups
    plan = batching.cyclic_poisson_batches(5000, p, 10, seed=1)  # q = 0.2, groups of 50
    rate = plan.mask.sum() / (p.n * 50)
    assert rate == pytest.approx(0.2, abs=0.01)
    assert plan.expected_batch_size == pytest.approx(10.0)
    assert plan.mask.sum(axis=1).std() > 0  # batch sizes really vary


@given(p=schemas(), dataset_size=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_deterministic_from_seed(p, dataset_size, seed):
    if dataset_size >= p.min_sep:
        a = batching.cyclic_batches(dataset_size, p, seed)
        b = batching.cyclic_batches(dataset_size, p, seed)
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.mask, b.mask)
        a = batching.cyclic_poisson_batches(dataset_size, p, 1, seed)
        b = batching.cyclic_poisson_batches(dataset_size, p, 1, seed)
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.mask, b.mask)


def test_seeds_differ():
    p = epochs(40, 4)
    a = batching.cyclic_batches(100, p, 0)
    b = batching.cyclic_batches(100, p, 1)
    assert not np.array_equal(a.groups, b.groups)


# -- the check catches plans broken on purpose ---------------------------------------------------
def with_extra(plan, t, slot, example):
    indices, mask = plan.indices.copy(), plan.mask.copy()
    indices[t, slot] = example
    mask[t, slot] = True
    return dataclasses.replace(plan, indices=indices, mask=mask)


@settings(max_examples=60)
@given(p=schemas(), data=st.data(), seed=st.integers(0, 2**16))
def test_check_catches_broken_plans(p, data, seed):
    dataset_size = data.draw(st.integers(max(2, p.min_sep), 300))
    plan = batching.cyclic_batches(dataset_size, p, seed)
    e = int(plan.indices[0, 0])  # an example of group 0: steps 0, b, 2b, ...
    kind = data.draw(st.sampled_from(["duplicate", "too-close", "wrong-residue", "too-many"]))
    if kind == "duplicate":  # twice in one step
        broken = plan.indices.shape[1] > 1 and with_extra(plan, 0, 1, e)
        if broken is False:
            indices = np.concatenate([plan.indices, plan.indices[:, :1]], axis=1)
            mask = np.concatenate([plan.mask, np.zeros_like(plan.mask[:, :1])], axis=1)
            mask[0, -1] = True  # only step 0 holds e twice
            broken = dataclasses.replace(plan, indices=indices, mask=mask)
    elif kind == "too-close" and p.min_sep > 1:
        t = data.draw(st.integers(1, p.min_sep - 1))
        broken = with_extra(plan, t, 0, e)  # step t uses group t, closer than b to step 0
    elif kind == "wrong-residue" and p.min_sep > 1 and p.n > p.min_sep:
        t = data.draw(st.integers(p.min_sep + 1, min(p.n - 1, 2 * p.min_sep - 1)) if p.n > p.min_sep + 1
                      else st.just(p.min_sep))
        broken = with_extra(plan, t, 0, e)
        if t == p.min_sep:  # that step is already e's own group: nothing broken
            return
    else:  # too many: checked against a schema allowing fewer participations than the plan makes
        if plan.mask.sum(axis=0).max() and p.max_participations > 1:
            tight = mfnoise.Participation(p.n, p.max_participations - 1, p.min_sep)
            result = batching.check(plan, tight, raise_on_error=False)
            assert not result.ok and reference_ok(plan, tight) is False
            assert any("more than max_participations" in v for v in result.violations)
            assert result.counts == plan_violations(plan, tight)
            assert set(result.counts) == {"count"}
        return
    result = batching.check(broken, p, raise_on_error=False)
    assert not result.ok, kind
    assert reference_ok(broken, p) is False
    assert any(f"example {e} " in v for v in result.violations)
    assert result.counts == plan_violations(broken, p)
    with pytest.raises(ValueError, match="breaks the participation schema"):
        batching.check(broken, p)


@settings(max_examples=100)
@given(n=st.integers(1, 12), k=st.integers(1, 4), b=st.integers(1, 6), cyclic=st.booleans(),
       cap=st.integers(1, 4), dataset_size=st.integers(1, 6), seed=st.integers(0, 2**16),
       with_reach=st.booleans())
def test_check_agrees_with_reference_on_random_plans(n, k, b, cyclic, cap, dataset_size, seed, with_reach):
    """Random (mostly broken) plans: ``ok`` and the count of every kind of violation agree with the
    brute-force reference, so deleting or weakening any one rule changes some count."""
    b = min(b, n)
    p = epochs(n, n // b) if cyclic else mfnoise.Participation(n, k, b)
    rng = np.random.default_rng(seed)
    steps = n + int(rng.integers(-1, 2)) if rng.random() < 0.1 else n  # sometimes the wrong length
    steps = max(steps, 1)
    mask = rng.random((steps, cap)) < rng.uniform(0.0, 0.5)
    reach = (mask.sum(axis=1) + rng.integers(0, 2, steps)) if with_reach else None
    plan = batching.BatchPlan(
        indices=rng.integers(0, dataset_size + 1, (steps, cap)).astype(np.int32),  # some out of range
        mask=mask, dataset_size=dataset_size, min_sep=p.min_sep, sampling="cyclic", sampling_probability=1.0,
        groups=np.zeros(dataset_size, dtype=np.int64), max_batch_sizes=reach)
    result = batching.check(plan, p, raise_on_error=False)
    if plan.indices[plan.mask].max(initial=0) < dataset_size:  # reference_ok does not look at indices
        assert result.ok == reference_ok(plan, p), result.violations
    assert result.counts == plan_violations(plan, p), result.violations
    assert result.ok == (not result.counts) == (not result.violations)
    if not result.ok:
        with pytest.raises(ValueError) as info:
            batching.check(plan, p)
        first, *rest = str(info.value).split("\n")
        assert first == result.summary and tuple(rest) == result.violations


def test_check_reports_wrong_length_and_out_of_range():
    p = epochs(20, 2)
    plan = batching.cyclic_batches(50, p, 0)
    other = epochs(30, 3)
    result = batching.check(plan, other, raise_on_error=False)
    assert any("30" in v for v in result.violations) and result.counts["steps"] == 1
    bad = with_extra(plan, 0, 0, 50)
    result = batching.check(bad, p, raise_on_error=False)
    assert not result.ok and any("outside" in v for v in result.violations)
    assert result.counts == {"index": 1}
    with pytest.raises(ValueError, match="breaks the participation schema"):
        result.raise_if_invalid()


# -- each rule of ``check`` alone: a plan that breaks only that rule ------------------------------
def hand_plan(steps_of: dict[int, list[int]], n: int, dataset_size: int, reach=None) -> batching.BatchPlan:
    """A plan in which example e takes part in steps steps_of[e] (a step listed twice: twice)."""
    rows: list[list[int]] = [[] for _ in range(n)]
    for e, steps in steps_of.items():
        for t in steps:
            rows[t].append(e)
    cap = max(1, max(len(r) for r in rows))
    indices = np.zeros((n, cap), np.int32)
    mask = np.zeros((n, cap), bool)
    for t, r in enumerate(rows):
        indices[t, : len(r)] = r
        mask[t, : len(r)] = True
    return batching.BatchPlan(indices=indices, mask=mask, dataset_size=dataset_size, min_sep=1, sampling="cyclic",
                              sampling_probability=1.0, groups=np.zeros(dataset_size, np.int64),
                              max_batch_sizes=None if reach is None else np.asarray(reach))


# (schema, the plan's steps per example, the one kind of violation, the fix that makes it valid)
SINGLE_RULE_CASES = {
    # epochs(6, 3): b = 2; {0, 3} has 2 <= 3 steps, 3 apart, but residues 0 and 1
    "residue": (epochs(6, 3), {0: [0, 3], 1: [1, 5], 2: [2, 4]}, {0: [1, 3], 1: [1, 5], 2: [0, 2, 4]}),
    # min-sep (6, 2, 2): {0, 2, 4} is separated but 3 > 2 steps
    "count": (mfnoise.Participation(6, 2, 2), {0: [0, 2, 4], 1: [1, 3], 2: [5]},
              {0: [0, 2], 1: [1, 3], 2: [4], 3: [5]}),
    # min-sep (6, 3, 2): {0, 1} is closer than 2
    "gap": (mfnoise.Participation(6, 3, 2), {0: [0, 1], 1: [2, 4], 2: [3, 5]},
            {0: [0, 2], 1: [1, 4], 2: [3, 5]}),
    # min-sep (4, 4, 1): any set of steps, but not one step twice
    "repeat": (mfnoise.Participation(4, 4, 1), {0: [0, 0, 2], 1: [1, 3]}, {0: [0, 2], 1: [1, 3]}),
    # step 3 holds nobody
    "empty": (mfnoise.Participation(4, 2, 2), {0: [0, 2], 1: [1]}, {0: [0, 2], 1: [1, 3]}),
}


@pytest.mark.parametrize("kind", sorted(SINGLE_RULE_CASES))
def test_each_rule_alone(kind):
    p, broken_steps, fixed_steps = SINGLE_RULE_CASES[kind]
    broken = hand_plan(broken_steps, p.n, 4)
    fixed = hand_plan(fixed_steps, p.n, 4)
    # the reference agrees that each case breaks exactly this one rule, once, and the fix none
    assert plan_violations(broken, p) == {kind: 1}
    assert plan_violations(fixed, p) == {}
    result = batching.check(broken, p, raise_on_error=False)
    assert not result.ok and result.counts == {kind: 1}, result.violations
    assert batching.KINDS[kind] in result.summary
    assert batching.check(fixed, p).ok  # does not raise
    summary = f"breaks the participation schema {p}: {batching.KINDS[kind]}: 1\n"
    with pytest.raises(ValueError, match=re.escape(summary)):
        batching.check(broken, p)


def test_wrong_residue_alone_raises_the_true_sensitivity():
    """Why the residue rule matters on its own: under epochs(6, 3) (b = 2) the pattern {0, 3}
    passes every other rule, and for C = I + e_3 e_0^T it reaches ||C[:, 0] + C[:, 3]|| = sqrt(5)
    = 2.236 while the sensitivity over cyclic patterns (what the noise is scaled by) is 2.0."""
    p = epochs(6, 3)
    c = np.eye(6)
    c[3, 0] = 1.0
    cyclic = max(np.linalg.norm(c[:, list(range(r, 6, 2))].sum(axis=1)) for r in range(2))  # X >= 0: u_t equal
    assert cyclic == pytest.approx(2.0)
    assert float(mfnoise.Dense(c).sensitivity(p).value) == pytest.approx(cyclic)
    assert np.linalg.norm(c[:, 0] + c[:, 3]) == pytest.approx(np.sqrt(5.0))
    plan = hand_plan({0: [0, 3], 1: [1, 5], 2: [2, 4]}, 6, 3)
    assert batching.check(plan, p, raise_on_error=False).counts == {"residue": 1}
    with pytest.raises(ValueError, match="different residues mod min_sep=2"):
        batching.check(plan, p)


def test_empty_step_is_structural_not_chance():
    """A step that holds nobody in this draw but could under another (Poisson) is fine; a step no
    draw can fill is flagged."""
    p = mfnoise.Participation(4, 2, 2)
    by_chance = hand_plan({0: [0, 2], 1: [1]}, 4, 2, reach=[1, 1, 1, 1])
    assert batching.check(by_chance, p).ok
    structural = hand_plan({0: [0, 2], 1: [1]}, 4, 2, reach=[1, 1, 1, 0])
    result = batching.check(structural, p, raise_on_error=False)
    assert result.counts == {"empty": 1} and "step 3 is structurally empty" in result.violations[0]


def test_check_raises_summary_first():
    p = mfnoise.Participation(6, 2, 2)
    plan = hand_plan({0: [0, 1, 2, 3], 1: [4]}, 6, 2)  # 4 > 2 steps, 3 gaps of 1, step 5 empty
    with pytest.raises(ValueError) as info:
        batching.check(plan, p)
    lines = str(info.value).split("\n")
    assert lines[0] == (f"batch plan breaks the participation schema {p}: {batching.KINDS['count']}: 1, "
                        f"{batching.KINDS['gap']}: 3, {batching.KINDS['empty']}: 1")
    assert lines[1].startswith("example 0 takes part 4 times") and len(lines) == 6
    result = batching.check(plan, p, raise_on_error=False)
    assert result.counts == {"count": 1, "gap": 3, "empty": 1} == plan_violations(plan, p)


@settings(max_examples=40)
@given(p=schemas(), data=st.data(), seed=st.integers(0, 2**16))
def test_pack_keeps_every_step_and_the_schema(p, data, seed):
    dataset_size = data.draw(st.integers(p.min_sep, 300))
    batch_size = data.draw(st.integers(1, dataset_size // p.min_sep))
    plan = batching.cyclic_poisson_batches(dataset_size, p, batch_size, seed)
    packed = batching.pack(plan)
    assert packed.capacity == max(1, int(plan.mask.sum(axis=1).max()))
    for t in range(p.n):
        assert sorted(packed.indices[t][packed.mask[t]]) == sorted(plan.indices[t][plan.mask[t]])
        k = int(packed.mask[t].sum())
        assert packed.mask[t, :k].all() and not packed.mask[t, k:].any()
    assert batching.check(packed, p).ok
    assert packed.identity == plan.identity and packed.digest() == plan.digest()
    assert packed.expected_batch_size == plan.expected_batch_size
    wide = batching.pack(plan, capacity=packed.capacity + 3)
    assert wide.capacity == packed.capacity + 3
    assert np.array_equal(wide.indices[:, : packed.capacity], packed.indices)
    assert not wide.mask[:, packed.capacity:].any()
    if packed.capacity > 1:
        with pytest.raises(ValueError, match="never drops"):
            batching.pack(plan, capacity=packed.capacity - 1)


def test_check_counts_all_violations_but_lists_a_few():
    p = epochs(40, 4)
    plan = batching.cyclic_batches(1000, p, 0)
    doubled = dataclasses.replace(plan, indices=np.concatenate([plan.indices, plan.indices], axis=1),
                                  mask=np.concatenate([plan.mask, plan.mask], axis=1))
    result = batching.check(doubled, p, limit=5, raise_on_error=False)
    assert not result.ok and len(result.violations) == 6
    assert result.counts == {"count": 1000, "repeat": 4000}
    # every example is doubled in each of its 4 steps: 1000 count violations + 4000 repeats
    assert result.violations[-1] == "(4995 more violations not listed)"
