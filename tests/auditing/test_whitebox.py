"""The white-box canary audit (mfnoise.auditing.whitebox) and its mechanisms (honest and broken).

Independent checks: the canary pattern against brute force over every pattern and sign vector
(dense numpy), the clipping shortcut against the real clipping of all canaries' per-example
gradients (bit for bit), the releases of the real transform whitened with a numpy C against
N(0, I) (sample covariance) and the scores' moments against N(0, 1) / N(mu, 1) with mu from numpy.
Then the audit itself: honest BLT, banded (BSR) and DP-SGD at epsilon 2, 4, 8 are tight (>= 0.7)
and never accused; each broken fixture is flagged at 95% confidence.
"""

from __future__ import annotations

import functools
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise import BLT, Dense, Identity, Participation, bsr
from mfnoise.auditing import mechanisms, whitebox
from mfnoise.auditing.tradeoff import epsilon_to_gdp_mu
from mfnoise.training import accounting
from mfnoise.training.clipping import clipped_sum

N = 16
P = Participation.epochs(N, 4)  # 4 epochs of fixed cyclic batches, min_sep 4
DELTA = 1e-5
TRIALS = 1 << 15
THETA, OMEGA = np.array([0.9, 0.5]), np.array([0.3, 0.2])


def _blt() -> BLT:
    return BLT(THETA, OMEGA, N)


STRATEGIES = {"blt": _blt, "banded": lambda: bsr(N, 4), "dpsgd": lambda: Identity(N)}


@functools.cache
def _claim(epsilon: float) -> tuple[float, float]:
    """(z, claimed epsilon): z from the Gaussian mechanism's exact mu at (epsilon, DELTA), the claim from
    the accounting (PLD, an upper bound) for the schema (one Gaussian mechanism whatever C)."""
    z = 1.0 / epsilon_to_gdp_mu(epsilon, DELTA)
    return z, float(accounting.epsilon(z, DELTA, P))


def _blt_dense_numpy(n: int) -> np.ndarray:
    """C of the BLT from its definition: c_0 = 1, c_j = sum_i omega_i theta_i^(j - 1)."""
    j = np.arange(1, n)
    coeffs = np.concatenate([[1.0], (OMEGA[:, None] * THETA[:, None] ** (j - 1)).sum(0)])
    return np.array([[coeffs[i - k] if i >= k else 0.0 for k in range(n)] for i in range(n)])


def _brute_force_pattern(c: np.ndarray, p: Participation) -> float:
    """max ||C u|| over every pattern of the schema (cyclic: every subset of a residue class) and every
    u in {-1, 0, 1} on it."""
    n = c.shape[0]
    best = 0.0
    for u in itertools.product((-1, 0, 1), repeat=n):
        steps = [t for t in range(n) if u[t]]
        if steps and p.contains(steps):
            best = max(best, float(np.linalg.norm(c @ np.array(u, float))))
    return best


# -- the canary pattern ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 6), k=st.integers(1, 3), cyclic=st.booleans(), seed=st.integers(0, 2**31 - 1),
       signed=st.booleans())
def test_canary_pattern_is_the_brute_force_maximum(n, k, cyclic, seed, signed):
    rng = np.random.default_rng(seed)
    c = np.tril(rng.normal(size=(n, n)) if signed else rng.random((n, n)))
    c[np.diag_indices(n)] = np.abs(c[np.diag_indices(n)]) + 0.5
    k = min(k, n)
    p = Participation.epochs(n - n % k, k) if cyclic and n - n % k >= k else Participation(n, k, max(1, n // (k + 1)))
    if p.n != n:
        c = c[: p.n, : p.n]
    strategy = Dense(c)
    u = whitebox.canary_pattern(strategy, p)
    steps = [t for t in range(p.n) if u[t]]
    assert p.contains(steps)
    value = float(np.linalg.norm(c @ u.astype(float)))
    assert value == pytest.approx(_brute_force_pattern(c, p), rel=1e-12)
    if np.all(c.T @ c >= 0):  # then the sign vector attains the sensitivity
        assert value == pytest.approx(float(strategy.sensitivity(p).value), rel=1e-12)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_canary_pattern_attains_the_sensitivity(name):
    s = STRATEGIES[name]()
    u = whitebox.canary_pattern(s, P)
    assert P.contains([t for t in range(N) if u[t]])
    assert np.linalg.norm(s.dense() @ u) == pytest.approx(float(s.sensitivity(P).value), rel=1e-12)


# -- the clipping shortcut and the releases -------------------------------------------------------


@pytest.mark.parametrize("canary_norm", [0.5, 1.0, 3.0])
def test_contributions_equal_the_real_clipping_of_every_canary(canary_norm):
    """X from one clipped canary of each sign = clipped_sum of all d canaries' per-example gradients."""
    d, clip = 64, 1.0
    rng = np.random.default_rng(1)
    u = rng.choice([-1, 0, 1], size=N).astype(np.int8)
    members = rng.random(d) < 0.5
    pos, neg = mechanisms.clipped_canary(canary_norm, clip, d, jnp.float32)
    x = np.asarray(mechanisms.contributions(u, members, pos, neg, jnp.float32))
    clip_all = jax.jit(clipped_sum, static_argnums=1)  # one compilation for the 16 steps
    for t in range(N):
        per_example = jnp.asarray(np.eye(d, dtype=np.float32) * np.float32(u[t] * canary_norm)
                                  * members[:, None].astype(np.float32))
        summed, dropped = clip_all(per_example, clip)
        assert int(dropped) == 0
        np.testing.assert_array_equal(np.asarray(summed), x[t])
    assert float(pos) <= min(canary_norm, clip) * (1 + 1e-3) and float(pos) == -float(neg)


def test_honest_releases_whitened_with_numpy_c_are_white_noise():
    """C (O - X) / sigma_abs ~ N(0, I_n) per coordinate: the real transform's noise is C'^{-1} W at the
    claimed scale (numpy C from the BLT's definition, S by brute force)."""
    c = _blt_dense_numpy(N)
    s_brute = _brute_force_cyclic_sensitivity(c, P)
    z, d, clip = 0.8, 1 << 14, 2.0
    rng = np.random.default_rng(2)
    members = rng.random(d) < 0.5
    u = whitebox.canary_pattern(_blt(), P)
    o = mechanisms.honest().releases(_blt(), P, z, pattern=u, members=members, l2_clip_norm=clip, canary_norm=clip,
                                     key=jax.random.key(3), dtype=jnp.float32)
    x = np.outer(u, members) * clip
    white = c @ (o - x) / (z * clip * s_brute)
    cov = white @ white.T / d
    # each entry of the sample covariance of N(0, I) has std <= sqrt(2 / d) ~ 0.011
    assert np.max(np.abs(cov - np.eye(N))) < 6 * math.sqrt(2 / d)
    assert np.max(np.abs(white.mean(axis=1))) < 6 / math.sqrt(d)


def _brute_force_cyclic_sensitivity(c: np.ndarray, p: Participation) -> float:
    return max(float(np.linalg.norm(c[:, list(pat)].sum(axis=1))) for pat in p.cyclic_patterns())


def test_score_moments_match_the_gaussian_shift():
    """Out scores N(0, 1), in scores N(mu, 1), mu = a' ||C u|| / (z c S) from dense numpy, for the honest
    mechanism with a pattern that does not attain the sensitivity (so mu != 1/z) and a clipped canary."""
    c = _blt_dense_numpy(N)
    s_brute = _brute_force_cyclic_sensitivity(c, P)
    z, d, clip, a = 0.7, 1 << 15, 1.0, 4.0  # a > c: clipped to c
    u = np.zeros(N, np.int8)
    u[[2, 10]] = 1  # two of the four steps of residue 2
    rng = np.random.default_rng(4)
    members = rng.random(d) < 0.5
    o = mechanisms.honest().releases(_blt(), P, z, pattern=u, members=members, l2_clip_norm=clip, canary_norm=a,
                                     key=jax.random.key(5), dtype=jnp.float32)
    cu = c @ u
    mu = clip * np.linalg.norm(cu) / (z * clip * s_brute)
    assert abs(mu - 1 / z) > 0.3  # the check is not the trivial mu = 1/z
    scores = (cu @ c @ o) / (np.linalg.norm(cu) * z * clip * s_brute)
    np.testing.assert_allclose(whitebox.whitened_scores(o, _blt().dense(), u, z * clip * s_brute), scores,
                               rtol=1e-9, atol=1e-9)
    for sample, mean in ((scores[~members], 0.0), (scores[members], mu)):
        m = sample.size
        assert abs(sample.mean() - mean) < 5 / math.sqrt(m)
        assert abs(sample.var(ddof=1) - 1.0) < 5 * math.sqrt(2 / m)


# -- the audit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [2.0, 4.0, 8.0])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_honest_audit_is_tight_and_never_accuses(name, epsilon):
    z, claimed = _claim(epsilon)
    r = whitebox.whitebox_audit(STRATEGIES[name](), P, z, delta=DELTA, trials=TRIALS, seed=11,
                                claimed_epsilon=claimed)
    assert r.mechanism == "honest" and r.trials == TRIALS
    assert r.lower_bound.epsilon <= r.claimed_epsilon and not r.flagged
    assert r.tightness >= 0.7, r.to_dict()
    whitened = r.details["attacks"]["whitened"]["epsilon"]
    assert whitened <= claimed and whitened / claimed >= 0.7  # the model-based score alone is tight
    assert r.mu_model == pytest.approx(1 / z, rel=1e-6)  # u attains the sensitivity: mu = 1/z


def test_honest_audit_with_a_clipped_canary_is_not_accused():
    z, claimed = _claim(4.0)
    r = whitebox.whitebox_audit(Identity(N), P, z, delta=DELTA, trials=TRIALS, canary_norm=5.0, seed=12,
                                claimed_epsilon=claimed)
    assert not r.flagged and r.tightness >= 0.7


def test_honest_audit_undoes_the_public_batch_divisor():
    z, claimed = _claim(4.0)
    r = whitebox.whitebox_audit(bsr(N, 4), P, z, delta=DELTA, trials=TRIALS, seed=17, claimed_epsilon=claimed,
                                mechanism=mechanisms.honest(expected_batch_size=7.0))
    assert not r.flagged and r.tightness >= 0.7
    assert abs(r.scores_out.mean()) < 5 / math.sqrt(r.scores_out.size)
    assert abs(r.scores_out.std() - 1) < 5 * math.sqrt(0.5 / r.scores_out.size)


def test_empirical_attack_needs_enough_coordinates():
    z, claimed = _claim(2.0)
    s, p = Identity(64), Participation.epochs(64, 4)
    r = whitebox.whitebox_audit(s, p, z, delta=DELTA, trials=2048, coordinates=1024, claimed_epsilon=claimed)
    assert list(r.details["attacks"]) == ["whitened"] and r.details["notes"]
    with pytest.raises(ValueError, match="coordinates"):
        whitebox.whitebox_audit(s, p, z, delta=DELTA, trials=2048, coordinates=1024, attack="empirical",
                                claimed_epsilon=claimed)


FIXTURE_CASES = [
    ("sensitivity_k1", "banded", None),
    ("wrong_strategy", "banded", None),
    ("reused_last_row", "blt", None),
    ("no_clipping", "dpsgd", 2.0),
]


@pytest.mark.parametrize("fixture,name,canary_norm", FIXTURE_CASES)
def test_broken_fixture_is_flagged(fixture, name, canary_norm):
    """2^12 canaries suffice (measured: each fixture flagged from 512 on, the lower bound at 4096 being
    6.3 .. 33 against the claimed 4)."""
    z, claimed = _claim(4.0)
    r = whitebox.whitebox_audit(STRATEGIES[name](), P, z, delta=DELTA, trials=1 << 12, canary_norm=canary_norm,
                                mechanism=fixture, seed=13, claimed_epsilon=claimed)
    assert r.mechanism == fixture
    assert r.flagged and r.lower_bound.epsilon > claimed and r.lower_bound.confidence == 0.95, r.to_dict()


def test_repeated_honest_audits_do_not_accuse():
    """Validity over repetitions: at confidence 0.95 at most ~5% of independent audits may exceed the
    truth (here the claim is the exact Gaussian epsilon, up to the PLD grid); 12 seeds, small trials."""
    z, claimed = _claim(4.0)
    flagged = sum(whitebox.whitebox_audit(Identity(N), P, z, delta=DELTA, trials=1 << 11, seed=1000 + i,
                                          claimed_epsilon=claimed).flagged for i in range(12))
    assert flagged <= 2  # P[Bin(12, 0.05) >= 3] = 2%; measured 0 of 162 audits at 2^11 .. 2^16


def test_min_sep_schema_is_audited_tight():
    """A min-sep schema (k = 3, b = 5) with a banded C of 4 bands: the pattern search runs over every
    separated set, and the audit is tight and honest."""
    p = Participation(N, 3, 5)
    z = 1.0 / epsilon_to_gdp_mu(4.0, DELTA)
    r = whitebox.whitebox_audit(bsr(N, 4), p, z, delta=DELTA, trials=TRIALS, seed=18)
    assert r.mu_model == pytest.approx(1 / z, rel=1e-6) and p.contains([t for t in range(N) if r.pattern[t]])
    assert not r.flagged and r.tightness >= 0.7


def test_reused_rows_need_the_empirical_attack():
    """The model-based score does not see repeated rows; the covariance estimated on held-out canaries does."""
    z, claimed = _claim(4.0)
    r = whitebox.whitebox_audit(_blt(), P, z, delta=DELTA, trials=TRIALS, mechanism=mechanisms.reused_last_row(12),
                                seed=14, claimed_epsilon=claimed)
    assert r.details["attacks"]["whitened"]["epsilon"] <= claimed
    assert r.details["attacks"]["empirical"]["epsilon"] > 2 * claimed
    assert r.details["reported_attack"] == "empirical"


def test_estimators_and_to_dict():
    z, claimed = _claim(4.0)
    for estimator in ("clopper-pearson", "one-run", "one-run-fdp"):
        r = whitebox.whitebox_audit(Identity(N), P, z, delta=DELTA, trials=1 << 12, estimator=estimator, seed=15,
                                    attack="whitened", claimed_epsilon=claimed)
        assert r.lower_bound.method == estimator and 0 <= r.lower_bound.epsilon <= claimed
    d = r.to_dict(scores=True)
    json.dumps(d)
    assert "consistent with the claim" in r.summary() and "one-run-fdp" in r.summary()
    numpy_scalars: dict = {"noise_multiplier": np.float32(z), "delta": np.float64(DELTA), "trials": np.int64(1 << 10)}
    r2 = whitebox.whitebox_audit(Identity(N), P, attack="whitened", claimed_epsilon=claimed, **numpy_scalars)
    assert r2.trials == 1 << 10
    assert d["trials"] == 1 << 12 and len(d["scores_in"]) + len(d["scores_out"]) == 1 << 12
    assert d["claimed_epsilon"] == claimed and d["mechanism"] == "honest"


def test_runs_split_the_trials():
    z, claimed = _claim(2.0)
    r = whitebox.whitebox_audit(Identity(N), P, z, delta=DELTA, trials=3000, coordinates=1000, seed=16,
                                claimed_epsilon=claimed)
    assert r.runs == 3 and r.trials == 3000 and r.scores_in.size + r.scores_out.size > 1000


def test_claimed_epsilon_default_is_the_accounting():
    z = 1.5
    r = whitebox.whitebox_audit(Identity(N), P, z, delta=DELTA, trials=1 << 10, attack="whitened")
    assert r.claimed_epsilon == pytest.approx(float(mfnoise.epsilon(z, DELTA, P)))


@pytest.mark.parametrize("kwargs,match", [
    ({"trials": 3}, "trials"),
    ({"estimator": "magic"}, "estimator"),
    ({"attack": "psychic"}, "attack"),
    ({"mechanism": "nonsense"}, "mechanism"),
    ({"thresholds": "best"}, "thresholds"),
    ({"delta": 0.0}, "delta"),
    ({"canary_norm": -1.0}, "canary_norm"),
    ({"confidence": 1.0}, "confidence"),
])
def test_bad_arguments_are_refused(kwargs, match):
    args = {"delta": DELTA, "trials": 1 << 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        whitebox.whitebox_audit(Identity(N), P, 1.0, **args)


def test_wrong_participation_size_is_refused():
    with pytest.raises(ValueError, match="n=8"):
        whitebox.whitebox_audit(Identity(N), Participation.epochs(8, 2), 1.0, delta=DELTA, trials=1 << 10)
