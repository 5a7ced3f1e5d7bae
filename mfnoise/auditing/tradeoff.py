"""Trade-off curves and the Gaussian-mechanism conversions between mu-GDP and (epsilon, delta).

A trade-off function f maps a test's type I error alpha (false positive rate, FPR) to the smallest
type II error beta = 1 - TPR that any test distinguishing the neighbouring output distributions can
reach ("Gaussian Differential Privacy", Dong, Roth, Su 2019, arXiv:1905.02383):

* mu-GDP: ``G_mu(alpha) = Phi(Phi^{-1}(1 - alpha) - mu)``, the trade-off of N(0, 1) vs N(mu, 1);
* (epsilon, delta)-DP: ``f_{eps,delta}(alpha) = max(0, 1 - delta - e^eps alpha, e^{-eps}(1 - delta - alpha))``.

A mechanism is mu-GDP iff it is (epsilon, delta(epsilon))-DP for every epsilon >= 0 with the Gaussian
mechanism's privacy profile ("Improving the Gaussian Mechanism for Differential Privacy: Analytical
Calibration and Optimal Denoising", Balle & Wang 2018, arXiv:1805.06530, Theorem 8; Dong, Roth, Su
Corollary 2.13):

    delta_mu(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2).

``gdp_mu_to_epsilon(mu, delta)`` solves delta_mu(epsilon) = delta for epsilon (delta_mu decreases in
epsilon), ``epsilon_to_gdp_mu(epsilon, delta)`` solves it for mu (delta_mu increases in mu). Both use
log-space evaluation of the second term (``e^eps Phi(x) = exp(eps + log Phi(x))``) so that epsilon up to
hundreds and delta down to 1e-300 stay finite, and bracketed root finding (scipy ``brentq``).
A Gaussian mechanism with L2 sensitivity 1 and noise multiplier sigma is mu-GDP with mu = 1/sigma.

scipy is imported inside the functions: this module is loaded by ``mfnoise.auditing`` only.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "eps_delta_tradeoff",
    "epsilon_to_gdp_mu",
    "gaussian_delta",
    "gaussian_tradeoff",
    "gdp_mu_to_epsilon",
]


def _check_delta(delta: float, *, allow_zero: bool = True) -> float:
    delta = float(delta)
    if not (math.isfinite(delta) and (0.0 <= delta < 1.0) and (allow_zero or delta > 0.0)):
        bound = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"delta must lie in {bound}, got {delta!r}")
    return delta


def gaussian_tradeoff(alpha, mu: float) -> np.ndarray:
    """The mu-GDP trade-off curve ``G_mu(alpha) = Phi(Phi^{-1}(1 - alpha) - mu)`` ("Gaussian
    Differential Privacy", Dong, Roth, Su 2019, Definition 2.6): the least false negative rate
    (1 - TPR) of a test at false positive rate ``alpha`` between N(0, 1) and N(mu, 1).

    ``alpha``: array-like in [0, 1] (any shape; the result has its shape), ``mu >= 0``.
    """
    from scipy import stats

    mu = float(mu)
    if not (math.isfinite(mu) and mu >= 0.0):
        raise ValueError(f"mu must be finite and >= 0, got {mu!r}")
    a = np.asarray(alpha, dtype=np.float64)
    if np.any((a < 0.0) | (a > 1.0)) or np.any(np.isnan(a)):
        raise ValueError(f"alpha must lie in [0, 1], got values in [{np.nanmin(a)}, {np.nanmax(a)}]")
    # Phi(Phi^{-1}(1 - a) - mu) = Phi(-Phi^{-1}(a) - mu) = sf(isf(1 - a) ... ); use isf(a) = Phi^{-1}(1 - a)
    # which is accurate for small a (1 - a would round to 1).
    return stats.norm.cdf(stats.norm.isf(a) - mu)


def eps_delta_tradeoff(alpha, epsilon: float, delta: float) -> np.ndarray:
    """The (epsilon, delta)-DP trade-off curve ``max(0, 1 - delta - e^eps alpha, e^{-eps}(1 - delta - alpha))``
    ("Gaussian Differential Privacy", Dong, Roth, Su 2019, Proposition 2.5; "The Composition Theorem
    for Differential Privacy", Kairouz, Oh, Viswanath 2015).

    ``alpha``: array-like in [0, 1]; ``epsilon >= 0``; ``delta`` in [0, 1).
    """
    epsilon = float(epsilon)
    if not (math.isfinite(epsilon) and epsilon >= 0.0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    delta = _check_delta(delta)
    a = np.asarray(alpha, dtype=np.float64)
    if np.any((a < 0.0) | (a > 1.0)) or np.any(np.isnan(a)):
        raise ValueError(f"alpha must lie in [0, 1], got values in [{np.nanmin(a)}, {np.nanmax(a)}]")
    with np.errstate(over="ignore"):
        first = 1.0 - delta - np.exp(epsilon) * a
    second = np.exp(-epsilon) * (1.0 - delta - a)
    return np.maximum(0.0, np.maximum(first, second))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The Gaussian mechanism's privacy profile ``delta_mu(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``
    ("Improving the Gaussian Mechanism for Differential Privacy", Balle & Wang 2018, Theorem 8): the
    least delta for which a mu-GDP mechanism is (eps, delta)-DP. ``mu = 0`` gives 0 for every eps >= 0.
    """
    from scipy import special

    epsilon, mu = float(epsilon), float(mu)
    if not (math.isfinite(mu) and mu >= 0.0):
        raise ValueError(f"mu must be finite and >= 0, got {mu!r}")
    if not (epsilon >= 0.0) or math.isnan(epsilon):
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if mu == 0.0 or math.isinf(epsilon):
        return 0.0
    a = -epsilon / mu + mu / 2.0
    b = -epsilon / mu - mu / 2.0
    # Both terms in log space; the difference as log(Phi(a)) + log1p(-exp(eps + logPhi(b) - logPhi(a))).
    # log_ndtr is log Phi (scipy.stats.norm.logcdf's ufunc; called directly: root finding calls it often).
    la = float(special.log_ndtr(a))
    lb = float(special.log_ndtr(b)) + epsilon
    if lb >= la:  # only by rounding: the profile is >= 0
        return 0.0
    return float(math.exp(la) * -math.expm1(lb - la))


def gdp_mu_to_epsilon(mu: float, delta: float) -> float:
    """The least epsilon with ``delta_mu(epsilon) <= delta`` (``gaussian_delta``): a mu-GDP mechanism is
    (epsilon, delta)-DP at this epsilon and at no smaller one (Balle & Wang 2018, Theorem 8).

    ``mu >= 0``, ``delta`` in (0, 1) (delta = 0 gives infinity for mu > 0). Returns 0.0 when
    ``delta_mu(0) = 2 Phi(mu/2) - 1 <= delta``.
    """
    from scipy import optimize

    mu = float(mu)
    if not (math.isfinite(mu) and mu >= 0.0):
        raise ValueError(f"mu must be finite and >= 0, got {mu!r}")
    delta = _check_delta(delta)
    if mu == 0.0:
        return 0.0
    if delta == 0.0:
        return math.inf
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while gaussian_delta(hi, mu) > delta:
        hi *= 2.0
    sol = optimize.root_scalar(lambda e: gaussian_delta(e, mu) - delta, bracket=(0.0, hi), method="brentq", xtol=1e-12)
    return float(sol.root)


def epsilon_to_gdp_mu(epsilon: float, delta: float) -> float:
    """The largest mu with ``delta_mu(epsilon) <= delta``: the mu-GDP guarantee of the Gaussian mechanism
    that is exactly (epsilon, delta)-DP (Balle & Wang 2018, Theorem 8; ``delta_mu`` increases in mu).

    ``epsilon >= 0``, ``delta`` in (0, 1).
    """
    from scipy import optimize

    epsilon = float(epsilon)
    if not (math.isfinite(epsilon) and epsilon >= 0.0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    delta = _check_delta(delta, allow_zero=False)
    hi = 1.0
    while gaussian_delta(epsilon, hi) < delta:
        hi *= 2.0
    sol = optimize.root_scalar(lambda m: gaussian_delta(epsilon, m) - delta, bracket=(0.0, hi), method="brentq",
                               xtol=1e-13)
    return float(sol.root)
