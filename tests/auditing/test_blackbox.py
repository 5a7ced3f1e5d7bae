"""Black-box audit: canaries deterministic from the seed, membership Bernoulli(1/2), the fixed-shape
and add/remove views agree, and the score-to-bound path separates a leaking train_fn from one that
ignores its data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mfnoise.auditing import blackbox
from mfnoise.auditing.blackbox import audit_blackbox, make_canaries


def _data(n: int = 400, f: int = 5, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, f)).astype(np.float32), rng.integers(0, classes, size=n).astype(np.int32)


def test_canaries_are_deterministic_from_the_seed():
    x, y = _data()
    a, b = make_canaries(x, y, 50, seed=7), make_canaries(x, y, 50, seed=7)
    for field in ("x_all", "y_all", "present", "canary_slots", "canary_x", "canary_y", "is_in", "source_indices"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    c = make_canaries(x, y, 50, seed=8)
    assert not np.array_equal(a.is_in, c.is_in) or not np.array_equal(a.canary_slots, c.canary_slots)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(20, 200), m_frac=st.floats(0.05, 0.5), seed=st.integers(0, 10**6),
       kind=st.sampled_from(blackbox.CANARY_KINDS))
def test_the_dataset_views_are_consistent(n, m_frac, seed, kind):
    x, y = _data(n, seed=seed % 97)
    m = max(1, int(m_frac * n) // 1)
    m = min(m, n // 2)
    ds = make_canaries(x, y, m, kind=kind, num_classes=4, seed=seed)
    # canary j sits at its slot, in canary order
    np.testing.assert_array_equal(ds.x_all[ds.canary_slots], ds.canary_x)
    np.testing.assert_array_equal(ds.y_all[ds.canary_slots], ds.canary_y)
    # absent exactly at the out canaries' slots
    expected_present = np.ones(n, bool)
    expected_present[ds.canary_slots[~ds.is_in]] = False
    np.testing.assert_array_equal(ds.present, expected_present)
    # the add/remove view: the remaining user examples (each once) and the in canaries
    assert ds.x.shape[0] == n - m + ds.is_in.sum()
    held_out = set(ds.source_indices.tolist())
    others = np.setdiff1d(np.arange(n), ds.canary_slots)
    kept = [i for i in range(n) if i not in held_out]
    np.testing.assert_array_equal(ds.x_all[others], x[kept])
    np.testing.assert_array_equal(ds.y_all[others], y[kept])
    assert len(set(ds.canary_slots.tolist())) == m
    if kind == "mislabelled":
        np.testing.assert_array_equal(ds.canary_x, x[ds.source_indices])
        assert np.all(ds.canary_y != y[ds.source_indices])  # a wrong label, always
    assert np.all((ds.canary_y >= 0) & (ds.canary_y < 4))


def test_membership_is_bernoulli_half():
    x, y = _data(4000)
    # the coins of many seeds pooled: Binomial(total, 1/2) (two-sided exact test), and no seed's
    # coins correlate with the canary index (first half vs second half)
    counts, first, total = 0, 0, 0
    for seed in range(40):
        ds = make_canaries(x, y, 1000, seed=seed)
        counts += int(ds.is_in.sum())
        first += int(ds.is_in[:500].sum())
        total += ds.m
    assert stats.binomtest(counts, total, 0.5).pvalue > 1e-3
    assert stats.binomtest(first, total // 2, 0.5).pvalue > 1e-3


def test_mislabelled_labels_are_uniform_over_the_other_classes():
    x, y = _data(4000, classes=5)
    ds = make_canaries(x, y, 2000, num_classes=5, seed=3)
    shift = (ds.canary_y.astype(int) - y[ds.source_indices].astype(int)) % 5
    observed = np.bincount(shift, minlength=5)
    assert observed[0] == 0
    assert stats.chisquare(observed[1:]).pvalue > 1e-3


def _leaky(strength: float):
    """A train_fn whose score reveals membership: +strength when the canary is in its training set."""

    def train_fn(ds):
        rng = np.random.default_rng(123)
        present = {tuple(row) for row in np.round(ds.x, 6).tolist()}
        member = np.array([tuple(row) in present for row in np.round(ds.canary_x, 6).tolist()])
        return strength * member + rng.normal(size=ds.m)

    return train_fn


def _oblivious(ds):
    return np.random.default_rng(5).normal(size=ds.m)  # ignores the data


def test_a_leaky_train_fn_gives_a_positive_bound_and_an_oblivious_one_zero():
    x, y = _data(2000, f=8)
    leak = audit_blackbox(_leaky(4.0), x, y, canaries=1000, delta=1e-5, claimed_epsilon=1.0, kind="crafted",
                          num_classes=4, seed=1)
    assert leak.lower_bound.epsilon > 1.0 and leak.flagged  # the leak is caught above a claim of 1
    assert leak.tightness == pytest.approx(leak.lower_bound.epsilon / 1.0)
    none = audit_blackbox(_oblivious, x, y, canaries=1000, delta=1e-5, claimed_epsilon=1.0, seed=1)
    assert none.lower_bound.epsilon <= 0.1 and not none.flagged
    d = leak.to_dict()
    assert d["epsilon_lower_bound"] == leak.lower_bound.epsilon and d["canaries"] == 1000
    assert d["canaries_in"] == int(leak.is_in.sum())
    np.testing.assert_array_equal(leak.scores_in, leak.scores[leak.is_in])


def test_the_bound_matches_an_independent_count_of_correct_guesses():
    # fixed guesses: the top k called in, the bottom k out; correct guesses counted here by hand
    x, y = _data(1000)
    res = audit_blackbox(_leaky(2.0), x, y, canaries=400, delta=0.0, guesses=[(50, 50)], seed=2)
    order = np.argsort(res.scores)
    correct = int(res.is_in[order[-50:]].sum() + (~res.is_in[order[:50]]).sum())
    assert res.lower_bound.details["correct"] == correct
    # delta = 0: W ~ Bin(100, q) at most, q = e^eps / (1 + e^eps): the bound is the Clopper-Pearson one
    q_lo = stats.beta.ppf(0.05, correct, 100 - correct + 1)
    expected = max(0.0, float(np.log(q_lo / (1 - q_lo))))
    assert res.lower_bound.epsilon == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_the_one_run_bound_is_valid_when_the_claim_holds():
    # Scores of a train_fn that is exactly mu-GDP per canary (Gaussian shift mu): epsilon(mu) at delta
    # known; over 30 seeds the bound exceeds it in at most a few (5% failure allowed, binomial slack).
    # One fixed guess rule (40 + 40 of 400) keeps it quick; the estimators' own tests search the grid.
    from mfnoise.auditing.tradeoff import gdp_mu_to_epsilon

    mu, delta = 0.3, 1e-5  # epsilon 1.13: a weak signal, the regime where a loose test might overclaim
    truth = gdp_mu_to_epsilon(mu, delta)
    x, y = _data(800)
    above = 0
    for seed in range(30):
        def train_fn(ds, seed=seed):
            rng = np.random.default_rng(10_000 + seed)
            return mu * ds.is_in + rng.normal(size=ds.m)  # the coins themselves: the strongest signal allowed

        res = audit_blackbox(train_fn, x, y, canaries=400, delta=delta, guesses=[(40, 40)], seed=seed)
        above += res.lower_bound.epsilon > truth
    assert stats.binom.sf(above - 1, 30, 0.05) > 1e-3


def test_bad_input_is_refused_naming_the_value():
    x, y = _data(100)
    with pytest.raises(ValueError, match="51 canaries"):
        make_canaries(x, y, 51)
    with pytest.raises(ValueError, match="positive integer"):
        make_canaries(x, y, 0)
    with pytest.raises(ValueError, match="kind"):
        make_canaries(x, y, 5, kind="poisoned")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer class labels"):
        make_canaries(x, y.astype(float), 5)
    with pytest.raises(ValueError, match="one score per canary"):
        audit_blackbox(lambda ds: np.zeros(3), x, y, canaries=10, delta=1e-5)
    with pytest.raises(ValueError, match="finite"):
        audit_blackbox(lambda ds: np.full(ds.m, np.nan), x, y, canaries=10, delta=1e-5)
    with pytest.raises(ValueError, match="estimator"):
        audit_blackbox(_oblivious, x, y, canaries=10, delta=1e-5, estimator="gdp")
    with pytest.raises(ValueError, match="claimed_epsilon"):
        audit_blackbox(_oblivious, x, y, canaries=10, delta=1e-5, claimed_epsilon=-1.0)
