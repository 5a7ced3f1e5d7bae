"""Monte Carlo accounting of a matrix mechanism under balls-in-bins batching: an *estimate* with a
stated failure probability, never a provable bound ("Near Exact Privacy Amplification for Matrix
Mechanisms", Choquette-Choo, Ganesh, Haque, Steinke, Thakurta 2024, arXiv:2410.06266).

Sampling. Balls-in-bins with b = ``participation.min_sep`` bins, as that paper (and jax-privacy's
``BallsInBinsSampling``, which cites it) defines it and as ``batching.balls_in_bins_batches``
implements it: every example is put into one bin c, uniformly at random and independently of
every other example, and takes part in exactly the steps {c, c + b, c + 2b, ...} ∩ [0, n): one
step per epoch of b steps, the same position in every epoch. Its pattern is a cyclic pattern of
the schema ``Participation.epochs(n, n // b)``; ceil(n / b) participations.

The mechanism releases C G + Z, Z ~ N(0, sigma^2 I) with sigma = noise_multiplier * sens(C, p)
(mfnoise's convention, docs/design.md "Accounting"; clip norm 1). Under add/remove adjacency,
for a lower-triangular C with non-negative entries, the paper's dominating pair is

    P = (1/b) sum_{c < b} N(m_c, sigma^2 I_n),     Q = N(0, sigma^2 I_n),     m_c = C x_c,

x_c the 0/1 indicator of {c, c + b, ...}. The privacy loss of an output y is

    L(y) = log (1/b) sum_c exp((<y, m_c> - ||m_c||^2 / 2) / sigma^2),

which depends on y only through u = M y (M the b×n matrix of rows m_c): with y = m_{c*} + sigma w
(under P, c* uniform) or y = sigma w (under Q), u is Gaussian with covariance sigma^2 G, G = M M^T
the b×b Gram of the modes. So each sample costs O(b^2) (a b×b matrix-vector product and a
log-sum-exp over b) after one pass over C to form the modes: O(n^2) from the dense C, O(n^2 / b)
per bin from the columns of a Toeplitz C, O(n bands) in all for a banded one. The hockey-stick
divergences are expectations of [0, 1]-valued integrands:

    delta_{P||Q}(eps) = E_{y~P}[(1 - e^{eps - L(y)})_+],   delta_{Q||P}(eps) = E_{y~Q}[(1 - e^{eps + L(y)})_+],

and delta(eps) = max of the two. Each is estimated by the mean of ``samples`` independent draws.

Confidence. For the mean of m i.i.d. samples in [0, 1] with true mean mu, Hoeffding's inequality in
its Kullback-Leibler form gives P(mean <= mu - t) <= exp(-m KL(mu - t || mu)) and the same for the
upper tail ("Probability Inequalities for Sums of Bounded Random Variables", Hoeffding 1963,
Theorem 1), KL the Bernoulli relative entropy. Inverting it at beta / 4 for each side of each
direction (a union bound over four events) gives [lower, upper] that holds the true delta(eps) with
probability at least 1 - beta, beta = ``1 - confidence``. For epsilon at a given delta, the
integrands decrease in eps for every sample, so the bounds on delta(eps) decrease in eps too, and
epsilon_upper = inf{eps : upper(eps) <= delta} is below the true epsilon only when the upper bound
fails at (arbitrarily close below) the single fixed point eps*(delta): the same 1 - beta holds.
No bound better than about log(4 / beta) / samples on delta is possible from ``samples`` draws:
delta = 1e-6 needs well over 1e7 samples, and a count too small gives ``upper = inf``.

What it is not. An estimate is a statement about a random procedure: with probability at most
``failure_probability`` the true value lies outside [lower, upper]. Reporting ``upper`` as a DP
guarantee makes the whole pipeline (estimate, then train) (eps, delta)-DP only with that caveat
(the paper discusses it). Provable bounds: "Sampling-Free Privacy Accounting for Matrix Mechanisms
under Random Allocation" (Schuchardt & Kalinin 2026, arXiv:2601.21636) gives sampling-free bounds
(Renyi divergence by dynamic programming, and conditional composition) for random allocation of
k steps out of n, of which one-epoch balls-in-bins is k = 1; they are not implemented here, and we
found no provable amplified bound for the multi-epoch cycled bins above. ``MonteCarloEstimate``
therefore refuses float() and arithmetic, so it cannot be mixed silently with provable bounds. A provable (unamplified)
bound for the same run is the plain Gaussian mechanism with noise multiplier z
(``accounting.epsilon(z, delta)``): it holds for any batches that honour p.

Refused: a C with a negative entry (the dominating pair is the paper's for non-negative C), a
schema that does not allow the cyclic patterns {c, c + b, ...} (k < ceil(n / b)), a strategy of
another n.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import numpy as np

from mfnoise.core.participation import Participation, check_participation
from mfnoise.strategies.base import Strategy

METHOD = "monte-carlo balls-in-bins (Choquette-Choo et al. 2024, arXiv:2410.06266)"

# Samples are drawn in blocks of about this many floats (block size x bins), to bound memory.
_BLOCK_FLOATS = 1 << 22


@dataclasses.dataclass(frozen=True)
class MonteCarloEstimate:
    """A Monte Carlo estimate of epsilon (at ``delta``) or delta (at ``epsilon``): NOT a proven bound.

    Attributes:
      quantity: "epsilon" or "delta", what ``value`` estimates.
      value: the point estimate (the sample means).
      lower, upper: the confidence interval; the true value lies outside it with probability at
        most ``failure_probability`` over the sampling. ``upper`` may be inf (too few samples).
      failure_probability: beta = 1 - confidence.
      samples: draws per direction (add and remove), each.
      seed: the seed the draws came from (the same seed gives the same estimate).
      epsilon, delta: the fixed parameter (the other is None).
      noise_multiplier: z, the mechanism's noise multiplier (mfnoise's convention).
      bins: b, steps per epoch.
      directions: for a delta estimate, (name, value, lower, upper) of each direction: "add",
        delta_{P||Q}, and "remove", delta_{Q||P} (each at the same failure split); () for epsilon.
      method: the estimator, with its paper.

    ``float(estimate)`` raises TypeError: take ``.upper`` (or ``.value``) explicitly.
    """

    provable: ClassVar[bool] = False

    quantity: Literal["epsilon", "delta"]
    value: float
    lower: float
    upper: float
    failure_probability: float
    samples: int
    seed: int
    epsilon: float | None
    delta: float | None
    noise_multiplier: float
    bins: int
    directions: tuple[tuple[str, float, float, float], ...] = ()
    method: str = METHOD

    def __float__(self) -> float:
        raise TypeError(
            "a MonteCarloEstimate is not a number: it is an estimate that fails with probability "
            f"{self.failure_probability:g}; use .upper (the upper confidence bound) or .value explicitly"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["provable"] = False
        return d


def epsilon_estimate(
    strategy: Strategy,
    participation: Participation,
    noise_multiplier: float,
    delta: float,
    *,
    samples: int,
    seed: int,
    confidence: float = 0.95,
    noise_dtype: Any = None,
) -> MonteCarloEstimate:
    """Monte Carlo estimate of epsilon(delta) for C G + Z under balls-in-bins with
    b = ``participation.min_sep`` bins (module doc): value, and [lower, upper] holding the true
    epsilon with probability >= ``confidence``.

    ``noise_dtype`` (e.g. jnp.float32): account for the strategy as it runs in that dtype,
    C' = ``strategy.realised(noise_dtype)`` with noise z * ``noise_sensitivity(p, noise_dtype)``;
    None: the stored C with noise z * sens(C, p).
    """
    _check_probability("delta", delta)
    losses = _LossSamples.draw(strategy, participation, noise_multiplier, samples, seed, confidence, noise_dtype)
    beta = 1.0 - confidence
    value = losses.epsilon_for(delta, "mean")
    lower = losses.epsilon_for(delta, "lower")
    upper = losses.epsilon_for(delta, "upper")
    return MonteCarloEstimate(
        quantity="epsilon", value=value, lower=lower, upper=upper, failure_probability=beta, samples=int(samples),
        seed=int(seed), epsilon=None, delta=float(delta), noise_multiplier=float(noise_multiplier),
        bins=participation.min_sep,
    )


def delta_estimate(
    strategy: Strategy,
    participation: Participation,
    noise_multiplier: float,
    epsilon: float,
    *,
    samples: int,
    seed: int,
    confidence: float = 0.95,
    noise_dtype: Any = None,
) -> MonteCarloEstimate:
    """Monte Carlo estimate of delta(epsilon) (module doc), with [lower, upper] holding the true
    delta with probability >= ``confidence``."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    losses = _LossSamples.draw(strategy, participation, noise_multiplier, samples, seed, confidence, noise_dtype)
    value, lower, upper = losses.delta_at(float(epsilon))
    return MonteCarloEstimate(
        quantity="delta", value=value, lower=lower, upper=upper, failure_probability=1.0 - confidence,
        samples=int(samples), seed=int(seed), epsilon=float(epsilon), delta=None,
        noise_multiplier=float(noise_multiplier), bins=participation.min_sep,
        directions=losses.directions_at(float(epsilon)),
    )


def mode_gram(strategy: Strategy, participation: Participation) -> np.ndarray:
    """G[c, c'] = <C x_c, C x_c'> for the bins c, c' < b = min_sep, x_c the indicator of
    {c, c + b, ...} ∩ [0, n). Refused (ValueError) for a C with a negative entry."""
    p = check_participation(participation, strategy.n, f"the {strategy.family} strategy")
    n, b = p.n, p.min_sep
    if strategy.bands is not None or strategy.toeplitz_coeffs() is not None:
        # banded and Toeplitz families give their columns without forming C
        modes = np.empty((n, b))
        smallest = math.inf
        for c in range(b):
            cols = strategy.columns_at(np.arange(c, n, b))
            smallest = min(smallest, float(cols.min(initial=0.0)))
            modes[:, c] = cols.sum(axis=1)
    else:
        dense = strategy.dense()
        smallest = float(dense.min())
        if np.any(np.triu(dense, 1) != 0):
            raise ValueError(f"the {strategy.family} strategy is not lower triangular")
        pad = (-n) % b
        modes = np.concatenate([dense, np.zeros((n, pad))], axis=1).reshape(n, -1, b).sum(axis=1)
    if smallest < 0:
        raise ValueError(
            f"the {strategy.family} strategy has a negative entry ({smallest:.3g}): the balls-in-bins dominating "
            "pair of Choquette-Choo et al. 2024 is stated for lower-triangular C with non-negative entries, so "
            "no estimate is given for it"
        )
    return modes.T @ modes


@dataclasses.dataclass(frozen=True)
class _LossSamples:
    """Privacy-loss samples L(y), y ~ P (``positive``) and y ~ Q (``negative``), and the bounds
    on delta(eps) they give (each direction at beta / 4 per side)."""

    positive: np.ndarray
    negative: np.ndarray
    beta: float

    @classmethod
    def draw(cls, strategy: Strategy, participation: Participation, noise_multiplier: float, samples: int,
             seed: int, confidence: float, noise_dtype: Any) -> _LossSamples:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
        p = check_participation(participation, strategy.n, f"the {strategy.family} strategy")
        z = float(noise_multiplier)
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
        m = _positive_int("samples", samples)
        s = _nonneg_int("seed", seed)
        if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
            raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
        n, b = p.n, p.min_sep
        rounds = -(-n // b)
        if p.reachable_participations < rounds:
            raise ValueError(
                f"balls-in-bins with min_sep={b} bins puts an example in ceil(n / min_sep)={rounds} steps "
                f"{{c, c + {b}, ...}}, but the schema {p} allows only max_participations={p.max_participations}"
            )
        if noise_dtype is None:
            run, sens = strategy, float(strategy.sensitivity(p).value)
        else:
            run, sens = strategy.realised(noise_dtype), float(strategy.noise_sensitivity(p, noise_dtype).value)
        if not (math.isfinite(sens) and sens > 0):
            raise ValueError(f"the {strategy.family} strategy has sensitivity {sens}")
        sigma = z * sens
        gram = mode_gram(run, p) / sigma**2  # everything in units of sigma
        rng = np.random.default_rng(np.random.SeedSequence([s, 0x6262]))  # "bb"
        positive = _losses(gram, m, rng, positive=True)
        negative = _losses(gram, m, rng, positive=False)
        return cls(positive=positive, negative=negative, beta=1.0 - float(confidence))

    def _integrand_means(self, eps: float) -> tuple[float, float]:
        add = float(np.mean(-np.expm1(np.minimum(eps - self.positive, 0.0))))
        remove = float(np.mean(-np.expm1(np.minimum(eps + self.negative, 0.0))))
        return add, remove

    def bound(self, eps: float, which: Literal["mean", "lower", "upper"]) -> float:
        """The estimate, lower or upper confidence bound of delta(eps) = max(delta_{P||Q}, delta_{Q||P})."""
        add, remove = self._integrand_means(eps)
        if which == "mean":
            return max(add, remove)
        m, q = self.positive.size, self.beta / 4
        side = kl_upper if which == "upper" else kl_lower
        return max(side(add, m, q), side(remove, m, q))

    def directions_at(self, eps: float) -> tuple[tuple[str, float, float, float], ...]:
        """("add", mean, lower, upper) for delta_{P||Q}(eps) and the same, "remove", for delta_{Q||P}."""
        m, q = self.positive.size, self.beta / 4
        return tuple((name, x, kl_lower(x, m, q), kl_upper(x, m, q))
                     for name, x in zip(("add", "remove"), self._integrand_means(eps)))

    def delta_at(self, eps: float) -> tuple[float, float, float]:
        """(estimate, lower, upper) of delta(eps)."""
        return self.bound(eps, "mean"), self.bound(eps, "lower"), self.bound(eps, "upper")

    def epsilon_for(self, delta: float, which: Literal["mean", "lower", "upper"]) -> float:
        """inf{eps >= 0 : bound(eps) <= delta} for the estimate, lower or upper bound on delta(eps)
        (each non-increasing in eps); inf when even the largest eps gives more than delta."""

        def f(eps: float) -> float:
            return self.bound(eps, which)

        if f(0.0) <= delta:
            return 0.0
        # beyond eps_max every integrand is 0, so the bounds stop decreasing there
        hi = max(float(self.positive.max()), float(-self.negative.min()), 0.0) + 1.0
        if f(hi) > delta:
            return math.inf
        lo = 0.0
        while hi - lo > 1e-9 * max(1.0, hi):  # bisection (f is monotone, not smooth): ~35 steps
            mid = 0.5 * (lo + hi)
            if f(mid) <= delta:
                hi = mid
            else:
                lo = mid
        return hi  # f(hi) <= delta: never below the crossing


def _losses(gram: np.ndarray, m: int, rng: np.random.Generator, *, positive: bool) -> np.ndarray:
    """m samples of L(y) (module doc), gram in units of sigma^2: y = m_{c*} + w, c* uniform
    (``positive``), or y = w; u = M w ~ N(0, gram) drawn as R xi with gram = R R^T."""
    b = gram.shape[0]
    vals, vecs = np.linalg.eigh(gram)
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))  # gram is PSD; eigh's tiny negative eigenvalues are 0
    half_norms = 0.5 * np.diag(gram)
    out = np.empty(m)
    block = max(1, _BLOCK_FLOATS // max(b, 1))
    for start in range(0, m, block):
        size = min(block, m - start)
        u = rng.standard_normal((size, b)) @ root.T
        if positive:
            u += gram[rng.integers(0, b, size)]
        a = u - half_norms
        top = a.max(axis=1)
        out[start:start + size] = top + np.log(np.mean(np.exp(a - top[:, None]), axis=1))
    return out


def _kl(a: float, mu: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(mu)), with 0 log 0 = 0."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / mu) if mu > 0 else math.inf
    if a < 1:
        out += (1 - a) * (math.log1p(-a) - math.log1p(-mu)) if mu < 1 else math.inf
    return out


def kl_upper(mean: float, m: int, beta: float) -> float:
    """The largest mu >= mean with m KL(mean || mu) <= log(1 / beta): for the mean of m i.i.d.
    samples in [0, 1], the true mean exceeds it with probability at most beta (Hoeffding 1963)."""
    target = math.log(1.0 / beta) / m
    if mean >= 1 or _kl(mean, 1.0) <= target:
        return 1.0
    lo, hi = mean, 1.0
    while hi - lo > 1e-12 * hi:  # KL(mean || mu) increases in mu >= mean
        mid = 0.5 * (lo + hi)
        if _kl(mean, mid) <= target:
            lo = mid
        else:
            hi = mid
    return hi  # rounding outward: an upper bound stays one


def kl_lower(mean: float, m: int, beta: float) -> float:
    """The smallest mu <= mean with m KL(mean || mu) <= log(1 / beta) (as ``kl_upper``)."""
    return 1.0 - kl_upper(1.0 - mean, m, beta)


def _check_probability(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


__all__ = ["METHOD", "MonteCarloEstimate", "delta_estimate", "epsilon_estimate", "kl_lower", "kl_upper",
           "mode_gram"]
