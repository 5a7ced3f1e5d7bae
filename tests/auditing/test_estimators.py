"""Auditing estimators: every epsilon lower bound is valid on mechanisms whose epsilon is known (never
above the truth beyond the stated failure rate over repeated trials), has power with enough trials,
and the trade-off conversions agree with independent computations (quadrature, dp_accounting,
Neyman-Pearson on explicit distributions, scipy's exact binomial intervals)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from mfnoise.auditing import estimators as E
from mfnoise.auditing import tradeoff as T

DELTA = 1e-5


# ------------------------------------------------------------------------------------ tradeoff


def _delta_by_quadrature(eps: float, mu: float) -> float:
    """delta(eps) = E_{x ~ N(mu, 1)} [(1 - e^{eps - L(x)})_+], L(x) = mu x - mu^2/2 the privacy loss of
    N(mu, 1) against N(0, 1) (the hockey-stick divergence, integrated numerically)."""
    x0 = (eps + mu * mu / 2.0) / mu  # L(x) > eps iff x > x0

    def integrand(x):
        return stats.norm.pdf(x, mu) * -math.expm1(eps - (mu * x - mu * mu / 2.0))

    val, _ = integrate.quad(integrand, x0, x0 + 40.0, epsabs=1e-300, epsrel=1e-11, limit=200)
    return val


@settings(max_examples=40, deadline=None)
@given(mu=st.floats(0.1, 6.0), eps=st.floats(0.0, 25.0))
def test_gaussian_delta_matches_quadrature(mu, eps):
    want = _delta_by_quadrature(eps, mu)
    got = T.gaussian_delta(eps, mu)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-290)


@settings(max_examples=30, deadline=None)
@given(mu=st.floats(0.05, 8.0), log_delta=st.floats(-12.0, -2.0))
def test_mu_epsilon_round_trip_and_dp_accounting(mu, log_delta):
    import dp_accounting

    delta = 10.0**log_delta
    eps = T.gdp_mu_to_epsilon(mu, delta)
    if eps == 0.0:  # delta_mu(0) = 2 Phi(mu/2) - 1 <= delta: no epsilon to speak of
        assert T.gaussian_delta(0.0, mu) <= delta
        return
    # delta_mu(eps) = delta at the root, and the inverse conversion returns mu.
    assert T.gaussian_delta(eps, mu) == pytest.approx(delta, rel=1e-7)
    assert T.epsilon_to_gdp_mu(eps, delta) == pytest.approx(mu, rel=1e-7)
    # dp_accounting's own Gaussian calibration (an independent implementation).
    sigma = dp_accounting.get_sigma_gaussian(eps, delta)
    assert 1.0 / sigma == pytest.approx(mu, rel=1e-4)


def test_gdp_epsilon_matches_dp_accounting_pld():
    from dp_accounting.pld import privacy_loss_distribution as pld

    for mu in (2.0,):
        d = pld.from_gaussian_mechanism(standard_deviation=1.0 / mu, sensitivity=1.0,
                                        value_discretization_interval=1e-4)
        assert T.gdp_mu_to_epsilon(mu, DELTA) == pytest.approx(d.get_epsilon_for_delta(DELTA), abs=2e-4)


def test_gaussian_tradeoff_is_envelope_of_eps_delta_curves():
    """G_mu = sup_eps f_{eps, delta_mu(eps)} ("Gaussian Differential Privacy", Proposition 2.12): the
    two curves and the profile agree with each other, from below and tightly on a fine eps grid."""
    alpha = np.concatenate([[0.0, 1e-9, 1e-6], np.linspace(1e-3, 1.0, 60)])
    for mu in (0.3, 1.0, 3.0):
        env = np.zeros_like(alpha)
        for eps in np.linspace(0.0, 30.0, 1501):
            env = np.maximum(env, T.eps_delta_tradeoff(alpha, eps, T.gaussian_delta(eps, mu)))
        g = T.gaussian_tradeoff(alpha, mu)
        assert np.all(env <= g + 1e-9)
        assert np.max(g - env) < 1e-2


def _neyman_pearson_tradeoff(p: np.ndarray, q: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Least type II error Q[accept P] at type I error P[reject P] = alpha for discrete P vs Q, by brute
    force over the likelihood-ratio-ordered randomised tests."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, q / np.where(p > 0, p, 1.0), np.inf)
    order = np.argsort(-ratio, kind="stable")  # reject P where q/p is largest
    p_c = np.concatenate([[0.0], np.cumsum(p[order])])
    q_c = np.concatenate([[0.0], np.cumsum(q[order])])
    return 1.0 - np.interp(alpha, p_c, q_c)


@settings(max_examples=30, deadline=None)
@given(eps=st.floats(0.0, 6.0), delta=st.floats(0.0, 0.3))
def test_eps_delta_tradeoff_is_the_four_point_mechanism(eps, delta):
    """f_{eps,delta} is the trade-off of P = (delta, (1-delta) e^eps/(1+e^eps), (1-delta)/(1+e^eps), 0)
    against Q = P reversed ("The Composition Theorem for Differential Privacy", Kairouz, Oh,
    Viswanath)."""
    a, b = (1 - delta) * math.exp(eps) / (1 + math.exp(eps)), (1 - delta) / (1 + math.exp(eps))
    p = np.array([delta, a, b, 0.0])
    q = p[::-1].copy()
    alpha = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(T.eps_delta_tradeoff(alpha, eps, delta), _neyman_pearson_tradeoff(p, q, alpha),
                               atol=1e-9)


def test_gaussian_tradeoff_matches_monte_carlo_free_np_test():
    # G_mu(alpha) = P[N(mu, 1) < t] with t the (1 - alpha) quantile of N(0, 1): by the normal cdf at
    # explicit points, computed from the definition of the test (not from the formula's shape).
    mu = 1.3
    for alpha in (1e-8, 0.01, 0.3, 0.9):
        t = stats.norm(0, 1).isf(alpha)
        assert T.gaussian_tradeoff(alpha, mu) == pytest.approx(stats.norm(mu, 1).cdf(t), rel=1e-10)
    assert T.gaussian_tradeoff(0.0, mu) == 1.0 and T.gaussian_tradeoff(1.0, mu) == 0.0


def test_tradeoff_bad_inputs():
    with pytest.raises(ValueError, match="-0.5"):
        T.gaussian_tradeoff(0.5, -0.5)
    with pytest.raises(ValueError, match="alpha"):
        T.gaussian_tradeoff([0.2, 1.5], 1.0)
    with pytest.raises(ValueError, match="1.0"):
        T.gdp_mu_to_epsilon(1.0, 1.0)
    with pytest.raises(ValueError, match="-1e-05"):
        T.eps_delta_tradeoff(0.1, 1.0, -1e-5)
    with pytest.raises(ValueError, match="0.0"):
        T.epsilon_to_gdp_mu(1.0, 0.0)
    assert T.gdp_mu_to_epsilon(0.0, DELTA) == 0.0
    assert T.gdp_mu_to_epsilon(1.0, 0.0) == math.inf
    assert T.gdp_mu_to_epsilon(1e-6, 0.01) == 0.0  # delta_mu(0) below delta


# ------------------------------------------------------------------------- Clopper-Pearson pieces


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), frac=st.floats(0.0, 1.0), failure=st.sampled_from([0.001, 0.025, 0.1]))
def test_clopper_pearson_interval_matches_scipy_exact(n, frac, failure):
    k = int(round(frac * n))
    lo, hi = E.clopper_pearson_interval(k, n, failure)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * failure, method="exact")
    assert float(lo) == pytest.approx(ci.low, abs=1e-10)
    assert float(hi) == pytest.approx(ci.high, abs=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12), st.lists(st.integers(-3, 3), min_size=1, max_size=12))
def test_roc_brute_force(a, b):
    fpr, tpr = E.roc(np.array(a, float), np.array(b, float))
    assert fpr[0] == 0.0 and tpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    pairs = {(float(f), float(t)) for f, t in zip(fpr, tpr, strict=True)}
    for th in sorted(set(a) | set(b)):
        want = (sum(x >= th for x in b) / len(b), sum(x >= th for x in a) / len(a))
        assert want in pairs


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=30), st.lists(st.integers(0, 6), min_size=1, max_size=30),
       st.integers(0, 7), st.sampled_from([0.0, 1e-3, 0.05]))
def test_fixed_threshold_bounds_by_scipy_exact_intervals(a, b, t, delta):
    """One fixed threshold: the bounds equal the formulas evaluated with scipy's exact binomial
    intervals on the counts #{in >= t}, #{out >= t} (counted here by hand)."""
    tp, fp = sum(x >= t for x in a), sum(x >= t for x in b)
    lo = stats.binomtest(tp, len(a)).proportion_ci(confidence_level=1 - 2 * 0.025, method="exact").low
    hi = stats.binomtest(fp, len(b)).proportion_ci(confidence_level=1 - 2 * 0.025, method="exact").high
    cands = [0.0]
    if lo - delta > 0:
        cands.append(math.log((lo - delta) / hi))
    if 1 - hi - delta > 0 and lo < 1:
        cands.append(math.log((1 - hi - delta) / (1 - lo)))
    got = E.clopper_pearson(np.array(a, float), np.array(b, float), delta=delta, thresholds=[t])
    assert got.epsilon == pytest.approx(max(cands), abs=1e-9)
    mu = max(0.0, stats.norm.isf(hi) - stats.norm.isf(lo)) if lo > 0 else 0.0
    assert E.gdp(np.array(a, float), np.array(b, float), delta=0.01, thresholds=[t]).details["mu_lo"] == \
        pytest.approx(mu, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 300), frac=st.floats(0.0, 1.0))
def test_one_run_pure_dp_bound_by_root_finding(r, frac):
    """delta = 0: the bound is the eps where P[Bin(r, e^eps/(1+e^eps)) >= v] = failure (scipy root
    finding on the binomial tail), or 0 when even eps = 0 is not rejected."""
    from scipy import optimize, special

    v = int(round(frac * r))
    m = r + 5
    scores = np.concatenate([np.arange(r, dtype=float), -np.ones(5)])
    is_in = np.zeros(m, bool)
    is_in[r - v:r] = True  # the v top scores are in: v of the r top guesses are right
    got = E.one_run(scores, is_in, delta=0.0, guesses=[(r, 0)]).epsilon
    fail = 0.05

    def tail(e):
        return stats.binom.sf(v - 1, r, special.expit(e)) - fail

    want = 0.0 if v == 0 or tail(0.0) >= 0 else optimize.brentq(tail, 0.0, 60.0, xtol=1e-12)
    assert got == pytest.approx(want, abs=1e-7)


def test_one_run_p_value_matches_the_papers_loop():
    """The vectorised p-value against a direct transcription of the paper's definition."""
    def direct(m, r, v, eps, delta):
        q = math.exp(eps) / (1 + math.exp(eps))
        beta = sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))
        alpha = 0.0
        for i in range(1, v + 1):
            mass = sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v - i, v))
            alpha = max(alpha, mass / i)
        return min(beta + 2 * m * delta * alpha, 1.0)

    for m, r, v, eps, delta in [(100, 30, 25, 1.0, 1e-3), (50, 50, 40, 0.3, 0.0), (200, 60, 58, 3.0, 1e-4),
                                (1000, 20, 20, 2.0, 1e-5)]:
        assert E.one_run_p_value(m, r, v, eps, delta) == pytest.approx(direct(m, r, v, eps, delta), rel=1e-9)
    # With more than _ALPHA_TERMS terms the p-value is an upper bound on the exact one.
    m, r, v = 10**5, 6000, 4000
    grid = np.array([0.2, 0.4, 0.6])
    approx = E.one_run_p_value(m, r, v, grid, 1e-5)
    exact_terms = E._ALPHA_TERMS
    try:
        E._ALPHA_TERMS = v
        exact = E.one_run_p_value(m, r, v, grid, 1e-5)
    finally:
        E._ALPHA_TERMS = exact_terms
    assert np.all(approx >= exact - 1e-12)


# ------------------------------------------------------------------------------------- validity

REPS = 200
# Failures allowed over REPS repetitions at confidence 0.95: the 0.999 quantile of Bin(REPS, 0.05).
MAX_FAILURES = int(stats.binom.ppf(0.999, REPS, 0.05))


def _two_world_failures(estimator, mu, n, *, seed, **kw) -> int:
    truth = T.gdp_mu_to_epsilon(mu, DELTA)
    rng = np.random.default_rng(seed)
    fails = 0
    for _ in range(REPS):
        res = estimator(rng.normal(mu, 1.0, n), rng.normal(0.0, 1.0, n), delta=DELTA, confidence=0.95, **kw)
        fails += res.epsilon > truth + 1e-9
    return fails


def _naive_gdp(scores_in, scores_out, *, delta, confidence, **_):
    """An INVALID estimator (point rates, best of every threshold): the harness must catch it."""
    fpr, tpr = E.roc(scores_in, scores_out)
    ok = (fpr > 0) & (tpr < 1) & (tpr > 0)
    mu = float(np.max(stats.norm.isf(fpr[ok]) - stats.norm.isf(tpr[ok]), initial=0.0))
    return E.EpsilonLowerBound(T.gdp_mu_to_epsilon(max(mu, 0.0), delta), delta, confidence, "naive", 0, {})


@pytest.mark.parametrize("mu, rule", [(0.0, "split"), (1.0, "split"), (1.0, "bonferroni")])
def test_two_world_estimators_valid_on_gaussian_mechanism(mu, rule):
    kw = {"thresholds": np.linspace(-1, 4, 11)} if rule == "bonferroni" else {}
    for est in (E.clopper_pearson, E.gdp):
        fails = _two_world_failures(est, mu, 400, seed=int(10 * mu) + 1, **kw)
        assert fails <= MAX_FAILURES, (est.__name__, kw, fails)


def test_validity_harness_catches_an_invalid_estimator():
    assert _two_world_failures(_naive_gdp, 1.0, 400, seed=3) > MAX_FAILURES


def test_gdp_valid_where_it_is_nearly_tight():
    # 2 x 4000 trials: the median bound is within ~25% of the truth, so its failures are not vacuous.
    mu, n = 1.5, 4000
    truth = T.gdp_mu_to_epsilon(mu, DELTA)
    rng = np.random.default_rng(7)
    vals = np.array([E.gdp(rng.normal(mu, 1, n), rng.normal(0, 1, n), delta=DELTA).epsilon for _ in range(REPS)])
    assert np.sum(vals > truth) <= MAX_FAILURES
    assert np.median(vals) > 0.7 * truth


def _one_run_failures(estimator, mu, m, *, seed, delta=DELTA, **kw) -> tuple[int, float]:
    truth = T.gdp_mu_to_epsilon(mu, delta)
    rng = np.random.default_rng(seed)
    fails, vals = 0, []
    for _ in range(REPS):
        is_in = rng.random(m) < 0.5
        scores = rng.normal(0.0, 1.0, m) + mu * is_in
        res = estimator(scores, is_in, delta=delta, confidence=0.95, **kw)
        fails += res.epsilon > truth + 1e-9
        vals.append(res.epsilon)
    return fails, float(np.median(vals))


@pytest.mark.parametrize("mu", [0.0, 1.5])
def test_one_run_estimators_valid_on_gaussian_canaries(mu):
    for est in (E.one_run, E.one_run_fdp):
        fails, _ = _one_run_failures(est, mu, 200, seed=int(10 * mu) + 2)
        assert fails <= MAX_FAILURES, (est.__name__, mu, fails)


def test_one_run_fdp_valid_with_a_fixed_guess_count_near_its_power():
    # A single rule (no Bonferroni slack) on many canaries: the bound is a sizeable part of the truth.
    fails, med = _one_run_failures(E.one_run_fdp, 1.0, 1000, seed=11, guesses=100)
    assert fails <= MAX_FAILURES
    assert med > 0.3 * T.gdp_mu_to_epsilon(1.0, DELTA)


def test_pure_dp_randomized_response_one_run_and_clopper_pearson():
    """delta = 0 on randomized response (exactly eps-DP): one-run is nearly tight here, so validity
    is tested where failures could happen."""
    eps = 1.0
    q = math.exp(eps) / (1 + math.exp(eps))
    rng = np.random.default_rng(5)
    fails_or = fails_cp = 0
    vals = []
    for _ in range(REPS):
        is_in = rng.random(1000) < 0.5
        truthful = rng.random(1000) < q
        scores = np.where(is_in == truthful, 1.0, -1.0) + 1e-3 * rng.random(1000)  # break ties at random
        r = E.one_run(scores, is_in, delta=0.0, guesses=1000)
        fails_or += r.epsilon > eps
        vals.append(r.epsilon)
        s_in = np.where(rng.random(500) < q, 1.0, 0.0)
        s_out = np.where(rng.random(500) < 1 - q, 1.0, 0.0)
        fails_cp += E.clopper_pearson(s_in, s_out, delta=0.0, thresholds=[1.0]).epsilon > eps
    assert fails_or <= MAX_FAILURES and fails_cp <= MAX_FAILURES
    assert np.median(vals) > 0.6 * eps


# ---------------------------------------------------------------------------------------- power


@pytest.mark.parametrize("eps", [2.0, 4.0, 8.0])
def test_gdp_power_at_1e5_trials(eps):
    mu = T.epsilon_to_gdp_mu(eps, DELTA)
    rng = np.random.default_rng(int(eps))
    r = E.gdp(rng.normal(mu, 1, 50_000), rng.normal(0, 1, 50_000), delta=DELTA)
    assert 0.7 * eps <= r.epsilon <= eps
    c = E.clopper_pearson(rng.normal(mu, 1, 50_000), rng.normal(0, 1, 50_000), delta=DELTA)
    assert 0.3 * eps <= c.epsilon <= eps


def test_one_run_fdp_power_and_refinement():
    mu = T.epsilon_to_gdp_mu(4.0, DELTA)
    rng = np.random.default_rng(4)
    is_in = rng.random(100_000) < 0.5
    scores = rng.normal(0, 1, is_in.size) + mu * is_in
    f = E.one_run_fdp(scores, is_in, delta=DELTA)
    o = E.one_run(scores, is_in, delta=DELTA)
    assert 0.5 * 4.0 <= f.epsilon <= 4.0
    assert f.epsilon > o.epsilon  # the f-DP analysis is the tighter one on Gaussian canaries


# ----------------------------------------------------------------------------------- edge cases


def test_no_separation_gives_zero():
    x = np.random.default_rng(0).normal(size=500)
    for est in (E.clopper_pearson, E.gdp):
        assert est(x, x, delta=DELTA).epsilon == 0.0
        assert est(x, x, delta=DELTA, thresholds=[0.0, 1.0]).epsilon == 0.0
    flags = np.zeros(500, bool)
    flags[::2] = True
    for est in (E.one_run, E.one_run_fdp):  # the attack ranks every out canary above every in one
        s = np.where(flags, 0.0, 1.0) + np.arange(500) * 1e-6
        assert est(s, flags, delta=DELTA).epsilon == 0.0


def test_one_run_ties_do_not_leak_membership_through_the_input_order():
    """Constant scores carry no information; canaries passed "out ones first, in ones last" must not
    turn index order into correct guesses (an index tie-break would get every top guess right)."""
    is_in = np.arange(1000) >= 500
    for est in (E.one_run, E.one_run_fdp):
        r = est(np.zeros(1000), is_in, delta=DELTA)
        assert r.epsilon < 0.5, r.details
        r = est(np.zeros(1000), ~is_in, delta=DELTA)
        assert r.epsilon < 0.5, r.details


def test_bad_inputs_name_the_value():
    x = np.ones(10)
    for est in (E.clopper_pearson, E.gdp):
        with pytest.raises(ValueError, match="scores_in"):
            est([], x, delta=DELTA)
        with pytest.raises(ValueError, match="scores_out"):
            est(x, np.ones((2, 2)), delta=DELTA)
        with pytest.raises(ValueError, match="1.5"):
            est(x, x, delta=DELTA, confidence=1.5)
        with pytest.raises(ValueError, match="0.0"):
            est(x, x, delta=DELTA, confidence=0.0)
        with pytest.raises(ValueError, match="1.0"):
            est(x, x, delta=1.0)
        with pytest.raises(ValueError, match="-0.1"):
            est(x, x, delta=-0.1)
        with pytest.raises(ValueError, match="NaN"):
            est(x, np.array([1.0, np.nan]), delta=DELTA)
        with pytest.raises(ValueError, match="thresholds"):
            est(x, x, delta=DELTA, thresholds=[])
    b = np.zeros(10, bool)
    for est in (E.one_run, E.one_run_fdp):
        with pytest.raises(ValueError, match="scores"):
            est([], [], delta=DELTA)
        with pytest.raises(ValueError, match="shape"):
            est(x, b[:5], delta=DELTA)
        with pytest.raises(ValueError, match="2.0"):
            est(x, b, delta=DELTA, confidence=2.0)
        with pytest.raises(ValueError, match="1.5"):
            est(x, b, delta=1.5)
        with pytest.raises(ValueError, match="11"):
            est(x, b, delta=DELTA, guesses=11)
        with pytest.raises(ValueError, match="values"):
            est(x, np.full(10, 2), delta=DELTA)


def test_result_to_dict_is_json():
    rng = np.random.default_rng(1)
    b = rng.random(200) < 0.5
    results = [E.clopper_pearson(rng.normal(1, 1, 100), rng.normal(0, 1, 100), delta=DELTA),
               E.gdp(rng.normal(1, 1, 100), rng.normal(0, 1, 100), delta=DELTA, thresholds=[0.5, 1.0]),
               E.one_run(rng.normal(size=200) + b, b, delta=DELTA),
               E.one_run_fdp(rng.normal(size=200) + b, b, delta=DELTA)]
    for r in results:
        d = json.loads(json.dumps(r.to_dict()))
        assert d["method"] == r.method and d["confidence"] == 0.95 and d["delta"] == DELTA
        assert d["trials"] == 200
    assert results[1].details["rule"] == "bonferroni" and results[0].details["rule"] == "split"
    assert "mu_lo" in results[1].details and "correct" in results[3].details
