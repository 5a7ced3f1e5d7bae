"""The balls-in-bins Monte Carlo accountant against independent numerical references.

Reference (b = 2 bins, any non-negative C): the privacy loss depends on the output only through the
two mode inner products u = M y / sigma^2, which under Q are N(0, Gt), Gt = M M^T / sigma^2 (M the
modes C x_c, built here from the dense C). Writing u = (a xi_1, r xi_1 + s xi_2) (Cholesky),
e^L = alpha(xi_1) + beta(xi_1) e^{s xi_2}, and both hockey-stick divergences are expectations under Q:
delta_{P||Q} = E_Q[(e^L - e^eps)_+], delta_{Q||P} = E_Q[(1 - e^eps e^L)_+]. The inner expectation over
xi_2 is a closed form (Black-Scholes style), the outer one a 1-D quadrature. The estimator samples
under P for the first direction, so the two routes differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

import mfnoise
from mfnoise.strategies import BLT, Dense, Toeplitz
from mfnoise.training import balls_in_bins as bb

from batching_reference import epochs


def _positive_part_of_lognormal(A: float, B: float, mu: float) -> float:
    """E[(A + B e^{mu Z})_+], Z ~ N(0, 1), mu >= 0."""
    if B == 0 or mu == 0:
        return max(A + B, 0.0)
    m2 = math.exp(mu * mu / 2)
    if B > 0:
        if A >= 0:
            return A + B * m2
        z0 = math.log(-A / B) / mu
        return float(A * stats.norm.sf(z0) + B * m2 * stats.norm.cdf(mu - z0))
    if A <= 0:
        return 0.0
    z0 = math.log(A / -B) / mu
    return float(A * stats.norm.cdf(z0) + B * m2 * stats.norm.cdf(z0 - mu))


def reference_delta(gram: np.ndarray, eps: float) -> float:
    """delta(eps) = max of both directions for b <= 2 bins, gram = Gt in units of sigma^2."""
    if gram.shape == (1, 1):  # one Gaussian with shift sqrt(g)
        mu = math.sqrt(gram[0, 0])
        return float(stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu))
    return max(reference_directions(gram, eps))


def reference_directions(gram: np.ndarray, eps: float) -> tuple[float, float]:
    """(delta_{P||Q}(eps), delta_{Q||P}(eps)) for b = 2 bins."""
    a = math.sqrt(gram[0, 0])
    r = gram[0, 1] / a
    s = math.sqrt(max(gram[1, 1] - r * r, 0.0))
    e = math.exp(eps)

    def inner(x: float, direction: int) -> float:
        alpha = 0.5 * math.exp(a * x - gram[0, 0] / 2)
        beta = 0.5 * math.exp(r * x - gram[1, 1] / 2)
        if direction == 0:
            return _positive_part_of_lognormal(alpha - e, beta, s)
        return _positive_part_of_lognormal(1 - e * alpha, -e * beta, s)

    out = []
    for direction in (0, 1):
        val, _ = integrate.quad(lambda x, d=direction: stats.norm.pdf(x) * inner(x, d), -14, 14, limit=400,
                                epsabs=1e-13, epsrel=1e-10)
        out.append(val)
    return out[0], out[1]


def reference_epsilon(gram: np.ndarray, delta: float) -> float:
    root = optimize.brentq(lambda eps: reference_delta(gram, eps) - delta, 0.0, 50.0, xtol=1e-10)
    return float(root)  # type: ignore[arg-type]


def dense_gram(strategy, p: mfnoise.Participation, noise_multiplier: float) -> np.ndarray:
    """M M^T / sigma^2 from the dense C, sigma = z * sens with sens^2 = max_c ||C x_c||^2 (C >= 0, so
    the full cyclic pattern is the worst one)."""
    c = strategy.dense()
    n, b = p.n, p.min_sep
    x = np.zeros((n, b))
    x[np.arange(n), np.arange(n) % b] = 1.0
    m = c @ x
    g = m.T @ m
    sens = math.sqrt(g.diagonal().max())
    assert float(strategy.sensitivity(p).value) == pytest.approx(sens, rel=1e-12)
    return g / (noise_multiplier * sens) ** 2


CASES = {
    # C = I, one epoch of 2 steps: one of two Gaussians shifted, vs N(0, I)
    "identity-1-epoch": (mfnoise.Identity(2), epochs(2, 1), 1.0),
    # C = I, 3 epochs: the same pair (the k repeats add up coherently, sens = sqrt(k))
    "identity-3-epochs": (mfnoise.Identity(6), epochs(6, 3), 1.0),
    # b does not divide n: bin 0 takes part 3 times, bin 1 twice
    "identity-uneven": (mfnoise.Identity(5), epochs(5, 2), 0.8),
    # banded Toeplitz (Toeplitz path of mode_gram), correlated modes
    "toeplitz": (Toeplitz(np.array([1.0, 0.6, 0.3]), 6), epochs(6, 3), 1.2),
    # BLT (dense path), every column coupled
    "blt": (BLT(np.array([0.7]), np.array([0.4]), 8), epochs(8, 4), 1.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mode_gram_is_the_dense_one(name):
    strategy, p, z = CASES[name]
    sens = float(strategy.sensitivity(p).value)
    np.testing.assert_allclose(bb.mode_gram(strategy, p) / (z * sens) ** 2, dense_gram(strategy, p, z),
                               rtol=1e-12, atol=1e-14)


def test_identity_multi_epoch_equals_one_epoch_reference():
    g1 = dense_gram(mfnoise.Identity(2), epochs(2, 1), 1.0)
    g3 = dense_gram(mfnoise.Identity(6), epochs(6, 3), 1.0)
    np.testing.assert_allclose(g1, g3)
    # and the reference itself against the single-Gaussian closed form for a 1-bin mixture
    assert reference_delta(np.array([[4.0]]), 1.0) == pytest.approx(
        stats.norm.cdf(1 - 0.5) - math.e * stats.norm.cdf(-1 - 0.5), rel=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_delta_estimate_brackets_the_reference(name):
    strategy, p, z = CASES[name]
    eps = 0.5
    truth = reference_delta(dense_gram(strategy, p, z), eps)
    est = bb.delta_estimate(strategy, p, z, eps, samples=60_000, seed=1, confidence=0.99)
    assert est.quantity == "delta" and est.epsilon == eps and est.samples == 60_000 and not est.provable
    assert est.lower <= truth <= est.upper, (est, truth)
    assert abs(est.value - truth) < 0.1 * truth + 2e-3  # the point estimate is close, not just bracketed
    # each direction on its own (here P||Q is the larger, so the max alone would not test Q||P)
    for (name, value, lower, upper), want in zip(est.directions, reference_directions(dense_gram(strategy, p, z), eps)):
        assert lower <= want <= upper and abs(value - want) < 0.1 * want + 2e-3, (name, value, want)


def test_epsilon_estimate_brackets_the_reference():
    strategy, p, z = CASES["toeplitz"]
    delta = 1e-2
    truth = reference_epsilon(dense_gram(strategy, p, z), delta)
    est = bb.epsilon_estimate(strategy, p, z, delta, samples=60_000, seed=2, confidence=0.99)
    assert est.quantity == "epsilon" and est.delta == delta
    assert est.lower <= truth <= est.upper, (est, truth)
    assert abs(est.value - truth) < 0.1 * truth


def test_noise_dtype_accounts_for_the_realised_strategy():
    """With noise_dtype the estimate is of C' = realised(dtype) with noise z * noise_sensitivity: for a
    Toeplitz C rounded to float32 it agrees with the float64 reference within the stated interval."""
    strategy, p, z = CASES["toeplitz"]
    truth = reference_delta(dense_gram(strategy, p, z), 0.5)
    est = bb.delta_estimate(strategy, p, z, 0.5, samples=40_000, seed=5, confidence=0.99, noise_dtype=np.float32)
    assert est.lower <= truth <= est.upper


def test_one_bin_is_the_gaussian_mechanism():
    """b = 1 (every example in every step, C = I, n = 1): the Gaussian mechanism, closed form."""
    z, eps = 0.8, 1.0
    mu = 1 / z
    truth = stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu)
    est = bb.delta_estimate(mfnoise.Identity(1), epochs(1, 1), z, eps, samples=50_000, seed=0)
    assert est.lower <= truth <= est.upper


def test_coverage_over_seeds():
    """Over repeated estimates with different seeds, the stated interval holds the true value at least
    about 1 - failure of the time, and the point estimates average to it (no bias)."""
    strategy, p, z = CASES["identity-1-epoch"]
    gram = dense_gram(strategy, p, z)
    eps, delta, runs, m, conf = 1.0, 0.05, 60, 3000, 0.8
    truth_delta = reference_delta(gram, eps)
    truth_eps = reference_epsilon(gram, delta)
    hits_d = hits_e = 0
    values = []
    for seed in range(runs):
        d = bb.delta_estimate(strategy, p, z, eps, samples=m, seed=seed, confidence=conf)
        e = bb.epsilon_estimate(strategy, p, z, delta, samples=m, seed=10_000 + seed, confidence=conf)
        hits_d += d.lower <= truth_delta <= d.upper
        hits_e += e.lower <= truth_eps <= e.upper
        values.append(d.value)
    # at least 1 - failure, less 3 binomial standard deviations
    floor = runs * conf - 3 * math.sqrt(runs * conf * (1 - conf))
    assert hits_d >= floor and hits_e >= floor, (hits_d, hits_e, floor)
    se = np.std(values) / math.sqrt(runs)
    assert abs(np.mean(values) - truth_delta) < 4 * se + 1e-4


def test_kl_bounds_hold_their_failure_probability():
    """kl_upper / kl_lower on Bernoulli means: coverage of each one-sided bound >= 1 - beta."""
    rng = np.random.default_rng(0)
    mu, m, beta, runs = 0.03, 400, 0.1, 2000
    means = rng.binomial(m, mu, size=runs) / m
    upper_fail = np.mean([bb.kl_upper(x, m, beta) < mu for x in means])
    lower_fail = np.mean([bb.kl_lower(x, m, beta) > mu for x in means])
    assert upper_fail <= beta and lower_fail <= beta
    assert bb.kl_upper(0.0, m, beta) == pytest.approx(1 - beta ** (1 / m), rel=1e-9)  # KL(0 || mu) = -log(1 - mu)


def test_deterministic_from_the_seed():
    strategy, p, z = CASES["blt"]
    a = bb.epsilon_estimate(strategy, p, z, 1e-2, samples=5000, seed=3)
    b = bb.epsilon_estimate(strategy, p, z, 1e-2, samples=5000, seed=3)
    c = bb.epsilon_estimate(strategy, p, z, 1e-2, samples=5000, seed=4)
    assert a == b and a.value != c.value and a.seed == 3


def test_an_estimate_is_not_a_number():
    est = bb.delta_estimate(mfnoise.Identity(2), epochs(2, 1), 1.0, 1.0, samples=100, seed=0)
    with pytest.raises(TypeError, match="not a number"):
        float(est)
    with pytest.raises(TypeError):
        est + 1.0  # type: ignore[operator]
    d = est.to_dict()
    assert d["provable"] is False and d["failure_probability"] == pytest.approx(0.05) and "2410.06266" in d["method"]


def test_too_few_samples_give_an_infinite_upper_bound():
    est = bb.epsilon_estimate(mfnoise.Identity(2), epochs(2, 1), 1.0, 1e-6, samples=1000, seed=0)
    assert est.upper == math.inf  # log(4 / beta) / samples > 1e-6: no sample count this small can show it


def test_refusals_name_the_reason():
    p = epochs(4, 2)
    negative = Dense(np.array([[1.0, 0, 0, 0], [-0.2, 1, 0, 0], [0, -0.2, 1, 0], [0, 0, -0.2, 1]]))
    with pytest.raises(ValueError, match="negative entry"):
        bb.epsilon_estimate(negative, p, 1.0, 1e-3, samples=10, seed=0)
    with pytest.raises(ValueError, match="max_participations=1"):
        bb.epsilon_estimate(mfnoise.Identity(4), mfnoise.Participation(4, 1, 2), 1.0, 1e-3, samples=10, seed=0)
    with pytest.raises(ValueError, match="n=4"):
        bb.epsilon_estimate(mfnoise.Identity(5), p, 1.0, 1e-3, samples=10, seed=0)
    for kwargs, what in [({"samples": 0, "seed": 0}, "samples"), ({"samples": 10, "seed": -1}, "seed"),
                         ({"samples": 10, "seed": 0, "confidence": 1.0}, "confidence")]:
        with pytest.raises(ValueError, match=what):
            bb.epsilon_estimate(mfnoise.Identity(4), p, 1.0, 1e-3, **kwargs)
    with pytest.raises(ValueError, match="delta"):
        bb.epsilon_estimate(mfnoise.Identity(4), p, 1.0, 0.0, samples=10, seed=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        bb.delta_estimate(mfnoise.Identity(4), p, 0.0, 1.0, samples=10, seed=0)
