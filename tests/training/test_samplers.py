"""Poisson, balls-in-bins and b-min-sep samplers: every plan honours its sampler's definition (judged
by the brute-force loops of ``batching_reference``, never by ``batching.check``), their law matches
the definition (exact pattern probabilities enumerated from the per-step coins; chi-square tests with
a fixed seed and a loose threshold), and they are deterministic from the seed."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import mfnoise
from mfnoise.training import batching

from batching_reference import epochs, steps_by_example, violations

P_FLOOR = 1e-4  # chi-square p-values below this fail: loose, with fixed seeds the tests are deterministic


def pattern_counts(plan: batching.BatchPlan) -> Counter[tuple[int, ...]]:
    """How many examples have each participation pattern (the empty one included)."""
    steps = steps_by_example(plan.indices.tolist(), plan.mask.tolist())
    out: Counter[tuple[int, ...]] = Counter(tuple(s) for s in steps.values())
    if plan.dataset_size > len(steps):
        out[()] += plan.dataset_size - len(steps)
    return out


def law_from_coins(n: int, step_rule) -> dict[tuple[int, ...], float]:
    """The law of one example's pattern, by enumerating its 2^n per-step coins: ``step_rule(t, pattern,
    coin)`` says whether it takes part in step t given its pattern so far and that step's coin."""
    law: dict[tuple[int, ...], float] = {}
    for coins in itertools.product([0, 1], repeat=n):
        pattern: tuple[int, ...] = ()
        for t, coin in enumerate(coins):
            if step_rule(t, pattern, coin):
                pattern += (t,)
        law[coins] = pattern  # type: ignore[assignment]
    return law  # coins -> pattern (the caller weights the coins)


def coin_law(n: int, q: float, step_rule) -> dict[tuple[int, ...], float]:
    """P(pattern) when every coin is 1 with probability q."""
    out: dict[tuple[int, ...], float] = {}
    for coins, pattern in law_from_coins(n, step_rule).items():
        w = q ** sum(coins) * (1 - q) ** (n - sum(coins))
        out[pattern] = out.get(pattern, 0.0) + w  # type: ignore[index]
    return out


def chi_square_p(observed: Counter, law: dict, total: int) -> float:
    """Goodness-of-fit p-value of the observed pattern counts against ``law`` (patterns with an
    expected count below 5 are pooled into one cell)."""
    assert set(observed) <= {k for k, v in law.items() if v > 0}, set(observed) - set(law)
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for k, prob in law.items():
        if total * prob >= 5:
            obs.append(observed.get(k, 0))
            exp.append(total * prob)
        else:
            pool_o += observed.get(k, 0)
            pool_e += total * prob
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    return float(stats.chisquare(obs, exp).pvalue)


def gaps_ok(s: list[int], b: int) -> bool:
    return all(t1 - t0 >= b for t0, t1 in itertools.pairwise(s))


# -- definitions, by hypothesis ----------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 25), data=st.data(), dataset_size=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_poisson_plans_honour_their_schema(n, data, dataset_size, seed):
    k = data.draw(st.integers(1, n))
    batch = data.draw(st.integers(1, dataset_size))
    p = mfnoise.Participation(n, k, 1)
    try:
        plan = batching.poisson_batches(dataset_size, p, batch, seed)
    except ValueError as e:
        assert batch == dataset_size and k < n, e  # q = 1 cannot retire without emptying steps
        assert f"max_participations={k}" in str(e)
        return
    assert plan.identity is not None and plan.identity.sampler == "poisson"
    assert plan.indices.shape[0] == n and plan.sampling == "poisson"
    assert plan.sampling_probability == pytest.approx(batch / dataset_size)
    assert violations(plan.indices.tolist(), plan.mask.tolist(), dataset_size, p, reach=[1] * n) == {}
    for e, s in steps_by_example(plan.indices.tolist(), plan.mask.tolist()).items():
        assert 0 <= e < dataset_size and len(s) <= k and len(set(s)) == len(s)
    assert not np.any(plan.indices[~plan.mask])  # padding holds index 0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 25), data=st.data())
def test_poisson_refuses_a_separated_schema(n, data):
    b = data.draw(st.integers(2, n))
    with pytest.raises(ValueError, match=f"min_sep={b}"):
        batching.poisson_batches(50, mfnoise.Participation(n, n, b), 5)


@st.composite
def bin_schema(draw) -> mfnoise.Participation:
    n = draw(st.integers(1, 30))
    b = draw(st.integers(1, n))
    if draw(st.booleans()):
        return epochs(n, n // b)
    return mfnoise.Participation(n, draw(st.integers(1, math.ceil(n / b) + 1)), b)


@settings(max_examples=80, deadline=None)
@given(p=bin_schema(), dataset_size=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_balls_in_bins_plans_are_one_random_bin_cycled(p, dataset_size, seed):
    n, b = p.n, p.min_sep
    rounds = math.ceil(n / b)
    try:
        plan = batching.balls_in_bins_batches(dataset_size, p, seed)
    except ValueError as e:
        assert p.max_participations < rounds and f"max_participations={p.max_participations}" in str(e)
        return
    bins = np.asarray(plan.groups)
    assert bins.shape == (dataset_size,) and bins.min() >= 0 and bins.max() < b
    assert violations(plan.indices.tolist(), plan.mask.tolist(), dataset_size, p, reach=[1] * n) == {}
    steps = steps_by_example(plan.indices.tolist(), plan.mask.tolist())
    for e in range(dataset_size):
        # exactly every step of its bin's residue class: one step per epoch, same position
        assert steps.get(e, []) == list(range(int(bins[e]), n, b))
    for t in range(n):  # and a step holds its whole bin, nothing else
        assert sorted(plan.indices[t][plan.mask[t]].tolist()) == np.flatnonzero(bins == t % b).tolist()


@st.composite
def min_sep_schema(draw) -> mfnoise.Participation:
    n = draw(st.integers(1, 30))
    b = draw(st.integers(1, n))
    return mfnoise.Participation(n, draw(st.integers(1, math.ceil(n / b) + 1)), b)


@settings(max_examples=80, deadline=None)
@given(p=min_sep_schema(), dataset_size=st.integers(1, 80), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_b_min_sep_plans_keep_their_separation(p, dataset_size, data, seed):
    batch = data.draw(st.integers(1, dataset_size))
    b = p.min_sep
    try:
        plan = batching.b_min_sep_batches(dataset_size, p, batch, seed)
    except ValueError as e:
        assert dataset_size - (b - 1) * batch <= batch, e  # the coin would be >= 1
        assert f"batch_size={batch}" in str(e)
        return
    prob = plan.sampling_probability
    assert prob == pytest.approx(batch / (dataset_size - (b - 1) * batch)) and 0 < prob < 1
    assert violations(plan.indices.tolist(), plan.mask.tolist(), dataset_size, p, reach=[1] * p.n) == {}
    for s in steps_by_example(plan.indices.tolist(), plan.mask.tolist()).values():
        assert len(s) <= p.max_participations and gaps_ok(s, b)


# -- the laws -----------------------------------------------------------------------------------
def test_poisson_patterns_follow_independent_coins():
    n, d, q = 4, 20_000, 0.3
    plan = batching.poisson_batches(d, mfnoise.Participation(n, n, 1), int(q * d), seed=11)
    law = coin_law(n, q, lambda t, pattern, coin: coin == 1)
    assert chi_square_p(pattern_counts(plan), law, d) > P_FLOOR


def test_poisson_participation_counts_are_binomial():
    n, d, m = 60, 5000, 250
    plan = batching.poisson_batches(d, mfnoise.Participation(n, n, 1), m, seed=5)
    counts = Counter(len(s) for s in pattern_counts(plan).elements())
    law = {c: float(stats.binom.pmf(c, n, m / d)) for c in range(n + 1)}
    assert chi_square_p(counts, law, d) > P_FLOOR
    sizes = plan.mask.sum(axis=1)  # batch sizes: Binomial(d, q), independent across steps
    assert abs(sizes.mean() - m) < 5 * math.sqrt(m / n)


def test_balls_in_bins_bins_are_uniform():
    n, b, d = 6, 3, 9000
    plan = batching.balls_in_bins_batches(d, epochs(n, n // b), seed=3)
    law = {tuple(range(c, n, b)): 1 / b for c in range(b)}
    assert chi_square_p(pattern_counts(plan), law, d) > P_FLOOR
    # exactly one step per epoch for every example
    for s in steps_by_example(plan.indices.tolist(), plan.mask.tolist()).values():
        assert [t // b for t in s] == list(range(n // b))


def test_b_min_sep_patterns_follow_the_definition():
    """The exact law of one example's pattern, enumerated from the definition (a coin per step,
    used only when the example took part in none of the previous b - 1 steps)."""
    n, b, d, batch = 7, 3, 30_000, 5000
    plan = batching.b_min_sep_batches(d, mfnoise.Participation(n, n, b), batch, seed=8)
    prob = batch / (d - (b - 1) * batch)
    law = coin_law(n, prob, lambda t, pattern, coin: coin == 1 and (not pattern or t - pattern[-1] >= b))
    assert chi_square_p(pattern_counts(plan), law, d) > P_FLOOR


def test_b_min_sep_with_b_1_is_poisson():
    n, d, batch = 5, 20_000, 4000
    plan = batching.b_min_sep_batches(d, mfnoise.Participation(n, n, 1), batch, seed=2)
    law = coin_law(n, batch / d, lambda t, pattern, coin: coin == 1)
    assert chi_square_p(pattern_counts(plan), law, d) > P_FLOOR


def test_b_min_sep_long_run_batch_is_the_one_asked():
    d, b, batch, n = 20_000, 4, 1000, 400
    plan = batching.b_min_sep_batches(d, mfnoise.Participation(n, n, b), batch, seed=1)
    later = plan.mask[50:].sum(axis=1)  # past the start-up
    assert abs(later.mean() - batch) < 0.02 * batch
    assert plan.expected_batch_size == pytest.approx(batch)


# -- determinism and resumption -----------------------------------------------------------------
SAMPLERS = [
    ("poisson", lambda seed: batching.poisson_batches(200, mfnoise.Participation(12, 12, 1), 20, seed)),
    ("balls-in-bins", lambda seed: batching.balls_in_bins_batches(200, epochs(12, 3), seed)),
    ("b-min-sep", lambda seed: batching.b_min_sep_batches(200, mfnoise.Participation(12, 3, 4), 20, seed)),
]


@pytest.mark.parametrize("name,make", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_deterministic_from_the_seed_and_resumable(name, make):
    a, b, c = make(7), make(7), make(8)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.mask, b.mask)
    assert a.identity is not None and c.identity is not None
    assert a.identity == b.identity and a.identity.sampler == name
    assert a.digest() != c.digest()
    rebuilt = batching.from_identity(a.identity.to_dict())
    assert rebuilt.digest() == a.digest()
    with pytest.raises(ValueError, match="seed: saved 8, now 7"):
        a.check_resume(c.identity.to_dict())


# -- check verifies the sampler's definition ------------------------------------------------------
def test_check_catches_a_balls_in_bins_plan_that_left_its_bin():
    p = epochs(8, 2)
    plan = batching.balls_in_bins_batches(40, p, seed=0)
    mask = plan.mask.copy()
    t, slot = 5, int(np.flatnonzero(mask[5])[0])
    mask[t, slot] = False  # the example misses one step of its bin: still inside the schema
    tampered = dataclasses.replace(plan, mask=mask)
    assert violations(tampered.indices.tolist(), mask.tolist(), 40, p, reach=[1] * 8) == {}
    result = batching.check(tampered, p, raise_on_error=False)
    assert not result.ok and result.counts == {"sampler": 1}
    e = int(plan.indices[t, slot])
    assert f"example {e} takes part 1 times, but balls-in-bins puts it in all 2 steps" in result.violations[0]
    with pytest.raises(ValueError, match="participations the plan's sampler cannot produce"):
        batching.check(tampered, p)


def test_check_holds_a_b_min_sep_plan_to_its_own_separation():
    plan = batching.b_min_sep_batches(30, mfnoise.Participation(10, 10, 3), 3, seed=1)
    indices, mask = plan.indices.copy(), plan.mask.copy()
    e = int(indices[0][mask[0]][0]) if mask[0].any() else 0
    free = int(np.flatnonzero(~mask[1])[0]) if (~mask[1]).any() else None
    if free is None:  # widen by one slot
        indices = np.concatenate([indices, np.zeros((10, 1), np.int32)], axis=1)
        mask = np.concatenate([mask, np.zeros((10, 1), bool)], axis=1)
        free = mask.shape[1] - 1
    if not mask[0].any():
        indices[0, 0], mask[0, 0] = e, True
    indices[1, free], mask[1, free] = e, True  # steps 0 and 1: closer than b = 3
    tampered = dataclasses.replace(plan, indices=indices, mask=mask)
    loose = mfnoise.Participation(10, 10, 1)  # a schema that allows it
    result = batching.check(tampered, loose, raise_on_error=False)
    assert not result.ok and result.counts.get("sampler", 0) >= 1
    assert "closer than the b-min-sep sampler's min_sep=3" in "\n".join(result.violations)
