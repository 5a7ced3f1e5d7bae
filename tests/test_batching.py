"""mfnoise.batching: every plan honours its schema, and the check catches plans that do not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise import batching


def steps_by_example(plan: batching.BatchPlan) -> dict[int, list[int]]:
    """Reference: the steps of each example, by a plain Python scan of the plan."""
    out: dict[int, list[int]] = {}
    for t in range(plan.indices.shape[0]):
        for slot in range(plan.indices.shape[1]):
            if plan.mask[t, slot]:
                out.setdefault(int(plan.indices[t, slot]), []).append(t)
    return out


def reference_ok(plan: batching.BatchPlan, p: mfnoise.Participation) -> bool:
    """Valid iff the plan has n steps and each example's steps form a pattern of p, without repeats.
    ``Participation.contains`` is the foundation's definition of a pattern."""
    if plan.indices.shape[0] != p.n:
        return False
    return all(len(set(s)) == len(s) and p.contains(s) for s in steps_by_example(plan).values())


@st.composite
def schemas(draw):
    n = draw(st.integers(1, 120))
    k = draw(st.integers(1, min(n, 8)))
    return mfnoise.Participation.epochs(n, k)


@settings(max_examples=60)
@given(p=schemas(), dataset_size=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_cyclic_batches_follow_the_schema(p, dataset_size, seed):
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
    a = batching.cyclic_batches(dataset_size, p, seed)
    b = batching.cyclic_batches(dataset_size, p, seed)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.mask, b.mask)
    if dataset_size >= p.min_sep:
        a = batching.cyclic_poisson_batches(dataset_size, p, 1, seed)
        b = batching.cyclic_poisson_batches(dataset_size, p, 1, seed)
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.mask, b.mask)


def test_seeds_differ():
    p = mfnoise.Participation.epochs(40, 4)
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
@given(p=schemas(), dataset_size=st.integers(2, 300), seed=st.integers(0, 2**16), data=st.data())
def test_check_catches_broken_plans(p, dataset_size, seed, data):
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
            result = batching.check(plan, tight)
            assert not result.ok and reference_ok(plan, tight) is False
            assert any("more than max_participations" in v for v in result.violations)
        return
    result = batching.check(broken, p)
    assert not result.ok, kind
    assert reference_ok(broken, p) is False
    assert any(f"example {e} " in v for v in result.violations)


@settings(max_examples=100)
@given(n=st.integers(1, 12), k=st.integers(1, 4), b=st.integers(1, 6), cyclic=st.booleans(),
       cap=st.integers(1, 4), dataset_size=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_check_agrees_with_reference_on_random_plans(n, k, b, cyclic, cap, dataset_size, seed):
    b = min(b, n)
    p = mfnoise.Participation.epochs(n, n // b) if cyclic else mfnoise.Participation(n, k, b)
    rng = np.random.default_rng(seed)
    plan = batching.BatchPlan(
        indices=rng.integers(0, dataset_size, (n, cap)).astype(np.int32),
        mask=rng.random((n, cap)) < rng.uniform(0.0, 0.5),
        dataset_size=dataset_size, min_sep=p.min_sep, sampling="cyclic", sampling_probability=1.0,
        groups=np.zeros(dataset_size, dtype=np.int64))
    result = batching.check(plan, p)
    assert result.ok == reference_ok(plan, p), result.violations
    assert result.ok == (not result.violations)


def test_check_reports_wrong_length_and_out_of_range():
    p = mfnoise.Participation.epochs(20, 2)
    plan = batching.cyclic_batches(50, p, 0)
    other = mfnoise.Participation.epochs(30, 3)
    assert any("30" in v for v in batching.check(plan, other).violations)
    bad = with_extra(plan, 0, 0, 50)
    result = batching.check(bad, p)
    assert not result.ok and any("outside" in v for v in result.violations)
    with pytest.raises(ValueError, match="breaks the participation schema"):
        result.raise_if_invalid()


def test_schedule_and_refusals():
    p = batching.schedule(1000, 64, 5)
    assert (p.n, p.min_sep, p.max_participations, p.cyclic) == (75, 15, 5, True)
    with pytest.raises(ValueError, match="batch_size=2000 is larger"):
        batching.schedule(1000, 2000, 1)
    with pytest.raises(ValueError, match="q = .* > 1"):
        batching.cyclic_poisson_batches(10, mfnoise.Participation.epochs(20, 2), 2)
    with pytest.raises(ValueError, match="seed"):
        batching.cyclic_batches(10, p, -1)
    with pytest.raises(TypeError, match="Participation"):
        batching.cyclic_batches(10, (20, 2, 10), 0)


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
    assert packed.expected_batch_size == plan.expected_batch_size
    wide = batching.pack(plan, capacity=packed.capacity + 3)
    assert wide.capacity == packed.capacity + 3
    assert np.array_equal(wide.indices[:, : packed.capacity], packed.indices)
    assert not wide.mask[:, packed.capacity:].any()
    if packed.capacity > 1:
        with pytest.raises(ValueError, match="never drops"):
            batching.pack(plan, capacity=packed.capacity - 1)


def test_check_counts_all_violations_but_lists_a_few():
    p = mfnoise.Participation.epochs(40, 4)
    plan = batching.cyclic_batches(1000, p, 0)
    doubled = dataclasses.replace(plan, indices=np.concatenate([plan.indices, plan.indices], axis=1),
                                  mask=np.concatenate([plan.mask, plan.mask], axis=1))
    result = batching.check(doubled, p, limit=5)
    assert not result.ok and len(result.violations) == 6
    # every example is doubled in each of its 4 steps: 1000 count violations + 4000 repeats
    assert result.violations[-1] == "(4995 more violations not listed)"
