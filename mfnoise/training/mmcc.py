"""MMCC: a provable accountant for the matrix mechanism under Poisson sampling, for any
lower-triangular C with non-negative entries.

"Privacy Amplification for Matrix Mechanisms" (Choquette-Choo, Ganesh, Steinke, Thakurta, ICLR
2024, arXiv:2310.15526). The mechanism releases y = C x + sigma z, z ~ N(0, I_n), where x_j in
{0, 1} says whether the protected example was sampled at step j (independently, with probability
p_j: p_j = q for Poisson sampling; q on one residue class mod b and 0 elsewhere for cyclic
Poisson sampling), its clipped gradient contributing at most 1 per step, and sigma the noise
standard deviation in clip-norm units. Without the example the release is N(0, sigma^2 I). This
scalar pair (P, Q) = (E_x N(C x, sigma^2 I), N(0, sigma^2 I)) is what everything below bounds.

**What is proved here and what is cited.** Given the pair (P, Q), the bound is derived below step
by step and each step is checked numerically against an independent computation
(tests/training/test_mmcc.py: the exact n-dimensional release for n = 2, 3; the exact tail of
every L_ij; the exact posterior law of every row on its good event; the PLD's rounding). That
(P, Q) dominates the training mechanism, whose contributions are vectors g_j of norm <= 1 chosen
*adaptively* from the earlier outputs, is the reduction the MMCC paper states for lower-triangular
C >= 0, and the hypothesis under which "Near Exact Privacy Amplification for Matrix Mechanisms"
(Choquette-Choo, Ganesh, Haque, Steinke, Thakurta 2024) uses the same pair; it is cited, not
re-derived here (the paper's text could not be read for this implementation). Re-derived here
is its non-adaptive part and the monotonicity in C that ``priced_strategy`` uses:

**Vector contributions and monotonicity** (Gaussian comparison). For fixed g_j (||g_j|| <= 1) the
release is P' = E_x N(M_x, sigma^2 I), M_x = C diag(x) G. Under Q the likelihood ratio is
R = sum_x w_x exp(U_x - S_xx / 2), U ~ N(0, S), S_xx' = <M_x, M_x'> / sigma^2, and both
hockey-stick divergences are E_Q phi(R) with phi convex ((r - a)_+ and (1 - a r)_+). Interpolating
S_t = (1 - t) S + t S-bar, Gaussian integration by parts gives d/dt E phi(R_t) = (1/2)
sum_xx' (S-bar - S)_xx' E[phi''(R_t) w_x w_x' V_x V_x'] (the terms from the means -S_xx / 2 cancel
the diagonal ones), V_x = exp(U_x - S_xx / 2) > 0: non-decreasing whenever S-bar >= S entrywise.
With C >= 0, <M_x, M_x'> = sum_jl (C^T C)_jl x_j x'_l <g_j, g_l> <= <C x, C x'> since C^T C >= 0,
so P' is dominated by P (every gradient along one unit vector is the worst fixed choice; the
paper's Corollary 4.7, cited by dp-accounting's mixture-of-Gaussians loss, is the one-row case);
and 0 <= C <= C-bar entrywise gives <C x, C x'> <= <C-bar x, C-bar x'>: MMCC for C-bar covers C.

**Conditional composition** (the paper's Theorem 3.1; proved here as follows). Row i, given the
rows before it, is a mixture of Gaussians: y_i | y_{<i} ~ E[N(C_i x, sigma^2) | y_{<i}] against
N(0, sigma^2). If on an event G_i of y_{<i} that row is dominated by a fixed pair (P_i, Q_i) (for
every e^eps > 0, both directions), the whole release is dominated by the composition of the
(P_i, Q_i) up to an additive delta_tail >= sum_i Pr[y_{<i} not in G_i], the probabilities taken
under P for the remove direction H(P || Q) and under Q for the add direction H(Q || P): replace
the first distribution's conditionals by the second's from the first failure on; this changes it
by at most that total variation, and after the switch the two rows agree (trivially dominated),
so the adaptive composition of dominating pairs ("Optimal Accounting of Differential Privacy via
Characteristic Function", Zhu, Dong, Wang 2022) applies to the rest.

**The fixed pair of row i**, derived here step by step (the paper's route; each step is an upper
bound):

1. Given y_{<i} and the other coordinates x_{-j}, the posterior odds of x_j = 1 are
   p_j / (1 - p_j) * exp(<c_j, y - C x_{-j}> / sigma^2 - ||c_j||^2 / (2 sigma^2)), c_j the column j
   of C restricted to rows < i. With C >= 0 and x >= 0, <c_j, C x_{-j}> >= 0, so the odds are at
   most p_j / (1 - p_j) * exp(L_ij), L_ij = <c_j, y_{<i}> / sigma^2 - ||c_j||^2 / (2 sigma^2),
   whatever x_{-j}.
2. On G_i = {L_ij <= eps_ij for all j < i}: P(x_j = 1 | x_{-j}, y_{<i}) <= pt_ij = p_j e^eps_ij /
   (p_j e^eps_ij + 1 - p_j); drawing x_0, x_1, ... in turn, each conditional is an average of
   these, so x_{<i} | y_{<i} is coupled below (coordinatewise) independent Bernoulli(pt_ij); x_i is
   Bernoulli(p_i), independent of y_{<i}. With C >= 0, C_i x <= S_i = sum_{j <= i} C_ij B_j with
   independent B_j ~ Bernoulli(pt_ij) (pt_ii = p_i).
3. A mixture of N(c, sigma^2) over c >= 0 against N(0, sigma^2): its optimal tests are half-lines
   (the likelihood ratio is increasing), on which N(c) is monotone in c, so a stochastically
   larger c dominates in both directions. Row i is therefore dominated by the mixture-of-Gaussians
   mechanism of S_i: dp-accounting's ``from_mixture_gaussian_mechanism``.
4. eps_ij: under the neighbour with the example, L_ij = sum_l G_jl x_l / sigma^2 - s^2 / 2 + s N(0,
   1), G = C_{<i}^T C_{<i}, s^2 = G_jj / sigma^2; without it, the sum is absent (stochastically
   smaller). Chernoff: P(L > eps) <= exp(-lambda eps) E exp(lambda L) = exp(-lambda eps + (lambda^2 -
   lambda) s^2 / 2 + sum_l log(1 - p_l + p_l exp(lambda G_jl / sigma^2))); eps_ij is its smallest
   value over a grid of lambda with the bound = delta_1, delta_1 = tail_delta / (number of pairs
   j < i with p_j > 0), a union bound, so sum_i delta_i <= tail_delta under either neighbour. (Any
   lambda > 0 gives a valid bound; a general C uses lambda >= 1 so that one eps_j from the full
   column bounds every row's L_ij, below.)

**Pessimistic discretisation throughout.** Each C_ij is rounded up to a multiple of the
sensitivity grid h (a stochastically larger S_i), except each row's smallest entries (sum <= 1e-3
sigma / sqrt(n)), which are bounded by their sum: it is added to every component (S_i <= grid part
+ that sum, pointwise); each row's law is then moved up onto a ladder of at most
``max_components`` points, uniform then geometric, the one of smallest chi^2 divergence from
N(0, sigma^2) among a few (``_RowDistribution.components``: every grid point to the first ladder
point at or above it); the row's PLD (``mixture_pld``) gives each cell of its
output grid the loss at the cell's worse end, rounds it up to the loss grid, and sends the mass
outside its range to the worse side (beyond it: the infinite loss), on a loss grid d that
shrinks with n (each row's rounding costs up to d, n rows about n d / 2 in epsilon); dp-accounting composes with
``pessimistic_estimate`` (truncated tails to the smallest kept loss and to infinity). Moving
privacy-loss mass up never lowers delta(eps) = E[(1 - e^{eps - L})_+] of one row nor, since that
is increasing in each independent summand, of their composition. The result: (epsilon,
delta)-DP with epsilon = PLD epsilon of the composed rows at delta - tail_delta. The release runs
C' = the strategy's float32 / float64 realisation, not C: ``priced_strategy`` (used by
``accounting``'s routing) prices the entrywise maximum of C and C' (monotonicity above).

**Structure and cost.** General C: G = C^T C (O(n^3) flops), eps_j from the full columns (for
lambda >= 1 the Chernoff bound only grows with more rows, entries >= 0, so one eps_j serves every
row), O(n^2 * bins) for the row distributions and n mixture PLDs composed (O(n) PLD builds and FFT
compositions). Toeplitz C (C_ij = c_{i-j}: BLT, BISR, banded Toeplitz) under Poisson sampling:
L_{i,i-k} depends on the lag k only (its Gram weights are truncated autocorrelations of c,
O(n^2) for all lags), row i's S_i = sum_{k <= i} c_k B_k with pt depending on k is a prefix of row
i + 1's (so row i is dominated by any later row), built incrementally in O(bins) per row; rows
are grouped into at most ``max_distinct_rows`` blocks, each priced as its last row and
self-composed (``self_compose``): O(n^2 * lambdas) + O(n * bins) + max_distinct_rows PLD builds.
The PLDs' loss grid shrinks like 1 / n (so the FFT compositions grow like n). Measured in
benchmarks/mmcc_cost.py (CPU seconds of one evaluation, BISR with 8 bands at q = 512 / 60000:
n = 117 7.6 s, mostly the 34 mixture PLDs; n = 1170 14.5 s (28.3 s before the speed-ups of the
mixture PLD and the Chernoff search); n = 5850 ~63 s, of which the dp-accounting compositions
~42 s, the Chernoff stage ~12 s, the mixture PLDs ~9 s) and benchmarks/amplification.py
(benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from mfnoise.strategies.base import Strategy

# Chernoff parameters tried for each tail bound (geometric; lambda >= 1 where one bound must
# serve every row, see the module doc).
_LAMBDAS = np.geomspace(0.02, 400.0, 64)
_LAMBDAS_MONOTONE = _LAMBDAS[_LAMBDAS >= 1.0]
DEFAULT_MAX_COMPONENTS = 64
# The sensitivity grid h defaults to min(sigma / _GRID_PER_SIGMA, max_ij C_ij / _GRID_PER_ENTRY),
# coarsened so that a row's grid stays <= _MAX_GRID points. Relative to the entries, not only to
# sigma: every entry is rounded up by < h where it is sampled, and a row has up to n of them (with
# h = sigma / 400 alone, BISR at n = 2000 priced its rows' mean sensitivity 460x too high).
_GRID_PER_SIGMA = 400
_GRID_PER_ENTRY = 2000
_MAX_GRID = 200_000
# Entries too small for the grid are bounded by their row sum instead (a deterministic shift of
# every component of the row's mixture, which costs about one Gaussian of that sensitivity per
# row): the smallest entries of each row whose sum stays <= this * sigma / sqrt(n).
_LUMP_PER_SIGMA = 1e-3
# Blocks of Toeplitz rows (each priced as its last row): BISR at n = 2000 gave epsilon 0.07643 with
# 48 and 0.07640 with 192 (4x the time).
DEFAULT_MAX_DISTINCT_ROWS = 48
# Each row's PLD rounds its losses up by up to the grid d, so composing n rows biases epsilon up by
# about n d / 2 (d = 1e-3 at n = 2000: epsilon 1.09 where d = 5e-6 gives 0.076). The default grid
# is therefore min(1e-3, PLD_BIAS / n): a bias of about PLD_BIAS / 2 in epsilon.
PLD_BIAS = 1e-2


def calibration_discretization(n: int, target_epsilon: float) -> float:
    """The PLD grid d a calibration to ``target_epsilon`` uses: min(1e-3, PLD_BIAS max(1, eps) / n),
    a rounding bias of about PLD_BIAS / 2 relative to the target (absolute below epsilon 1), where
    the default grid's absolute bias PLD_BIAS / 2 would be 8x finer than needed at epsilon 8.

    Memory is the reason: the composed PLD has about S / d points and its support S grows with
    epsilon, so the default grid at epsilon 8 needed > 23 GB (BISR at n = 1170 and n = 5850: killed
    for memory on the 24 GB machine); scaling d with the target keeps S / d about what it is at
    epsilon 1. Any d is pessimistic (losses rounded up), and one grid serves the whole search.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon}")
    return min(1e-3, PLD_BIAS * max(1.0, float(target_epsilon)) / int(n))


@dataclasses.dataclass(frozen=True)
class MMCCResult:
    """An MMCC upper bound: the release is (epsilon, delta)-DP.

    ``tail_delta`` of delta pays for the conditional probabilities' tail bounds, the rest is the
    PLD's; ``rows_priced`` mixture PLDs were built for the n rows; ``seconds`` of wall time.
    """

    epsilon: float
    delta: float
    tail_delta: float
    noise_std: float
    n: int
    rows_priced: int
    sensitivity_grid: float
    max_components: int
    pld_discretization: float
    toeplitz: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_matrix(c: np.ndarray, what: str = "C") -> np.ndarray:
    """C as float64, refused unless square, finite, lower triangular and entrywise >= 0 (why: doc)."""
    c = np.asarray(c, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"{what} must be a square matrix, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{what} has non-finite entries")
    if np.any(np.triu(c, 1) != 0):
        raise ValueError(f"{what} must be lower triangular (MMCC conditions row i on the rows before it)")
    if np.any(c < 0):
        i, j = np.argwhere(c < 0)[0]
        raise ValueError(
            f"MMCC needs C with non-negative entries, but {what}[{i}, {j}] = {c[i, j]:.6g} < 0: the bound on the "
            f"posterior of a participation drops the other participations' term <c_j, C x_-j>, which is >= 0 only "
            f"for C >= 0, and the row sensitivity sum_j C_ij x_j is monotone in x only then; no theorem covers a "
            f"negative entry"
        )
    return c


# The dtypes the noise generator runs a correlated strategy in (coarser ones run only C = I).
REALISED_DTYPES = (np.float32, np.float64)


def priced_strategy(strategy: Strategy) -> Strategy | np.ndarray:
    """The C MMCC prices for a strategy the noise generator runs as C' = ``strategy.realised(dtype)``.

    C' differs from C by rounding (in float32, by ~2^-24 relative for the families here), and the
    release is C' G + Z, so MMCC must cover C', not C. Its dominating pair is monotone in the
    entries of C (module doc, "Vector contributions and monotonicity"), so pricing the entrywise
    maximum C-bar = max(C, C'_float32, C'_float64) covers whichever dtype runs, provided every C'
    is itself >= 0 (else MMCC's reduction does not apply: refused, naming the entry). Returns the
    strategy itself when both dtypes run C exactly, a Toeplitz C-bar when every C' is Toeplitz,
    else the dense C-bar.
    """
    from mfnoise.strategies.toeplitz import Toeplitz

    n = strategy.n
    reals = []
    for dt in REALISED_DTYPES:
        try:
            r = strategy.realised(dt)
        except ValueError:  # the generator cannot run this strategy in dt at all
            continue
        if r is not strategy:
            reals.append((np.dtype(dt).name, r))
    if not reals:
        return strategy
    tc = strategy.toeplitz_coeffs()
    if tc is not None and all(r.toeplitz_coeffs() is not None for _, r in reals):
        c = _toeplitz_coeffs(tc, n)
        out = c.copy()
        for name, r in reals:
            rc = r.toeplitz_coeffs()
            assert rc is not None
            out = np.maximum(out, _toeplitz_coeffs(rc, n, f"the {name} realisation's Toeplitz coefficient"))
        return strategy if np.array_equal(out, c) else Toeplitz(out, n)
    dense = check_matrix(strategy.dense(), f"the {strategy.family} strategy's C")
    for name, r in reals:
        dense = np.maximum(dense, check_matrix(r.dense(), f"the {name} realisation C' of the {strategy.family} C"))
    return dense


def all_steps_sensitivity(strategy: Strategy) -> float:
    """sens(C, Participation(n, n, 1)) for C >= 0, from C itself: ||C 1||.

    Every pattern x in {0, 1}^n has 0 <= C x <= C 1 entrywise, so max_x ||C x|| = ||C 1|| (O(n)
    from Toeplitz coefficients, O(n^2) from a dense C, where a strategy's generic sensitivity over
    all 2^n patterns can take minutes). Lowered by 1e-12 relative so that float rounding never
    puts it above the value the noise is scaled by (pricing less noise is the safe side).
    """
    tc = strategy.toeplitz_coeffs()
    if tc is not None:
        row_sums = np.cumsum(_toeplitz_coeffs(tc, strategy.n))
    else:
        row_sums = check_matrix(strategy.dense(), f"the {strategy.family} strategy's C").sum(axis=1)
    return float(np.linalg.norm(row_sums)) * (1.0 - 1e-12)


def _toeplitz_coeffs(c: Any, n: int, what: str = "the Toeplitz coefficient") -> np.ndarray:
    out = np.zeros(n)
    c = np.asarray(c, np.float64).reshape(-1)[:n]
    out[: c.size] = c
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what}s of C are not finite")
    if np.any(out < 0):
        k = int(np.argmax(out < 0))
        raise ValueError(
            f"MMCC needs C with non-negative entries, but {what} c_{k} = {out[k]:.6g} < 0: the "
            f"bound on the posterior of a participation drops the other participations' term <c_j, C x_-j>, which "
            f"is >= 0 only for C >= 0; no theorem covers a negative entry"
        )
    return out


def _log_bernoulli_mgf(p: np.ndarray, a: np.ndarray) -> np.ndarray:
    """log(1 - p + p e^a), elementwise, stable for large a (p in [0, 1])."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-p), np.log(p) + a)


def _chernoff_eps(weights: np.ndarray, probs: np.ndarray, s2: float, log_inv_delta: float,
                  lambdas: np.ndarray) -> float:
    """min over lambda of f(lambda) = [log(1 / delta_1) + (lambda^2 - lambda) s2 / 2 + sum_l log(1 - p_l
    + p_l exp(lambda w_l))] / lambda: a bound eps with P(L > eps) <= delta_1 (module doc, step 4).

    f = psi / lambda with psi convex (a cumulant generating function plus a convex quadratic) and
    psi(0) = log(1 / delta_1) > 0, so lambda^2 f'(lambda) = lambda psi'(lambda) - psi(lambda) is
    non-decreasing (its derivative is lambda psi''(lambda) >= 0): f decreases, then increases.
    The grid minimum is therefore found by a ternary search over the grid's indices (~20
    evaluations where the grid has 64), then refined by a golden-section search between the
    minimiser's grid neighbours (any lambda > 0 gives a valid bound); the smallest value evaluated
    is returned: at most the grid minimum, usually a little below it (BISR n = 600: every pt_k
    0-0.5% lower, the Chernoff stage 2.3x faster)."""
    keep = (weights > 0) & (probs > 0)
    w, p = weights[keep], probs[keep]
    log1mp, logp = np.log1p(-p), np.log(p)

    def f(lam: float) -> float:
        mgf = float(np.logaddexp(log1mp, logp + lam * w).sum()) if w.size else 0.0
        return (log_inv_delta + (lam * lam - lam) * s2 / 2.0 + mgf) / lam

    seen: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in seen:
            seen[i] = f(float(lambdas[i]))
        return seen[i]

    lo, hi = 0, lambdas.size - 1
    while hi - lo > 2:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if at(m1) <= at(m2):
            hi = m2
        else:
            lo = m1
    best_i = min(range(lo, hi + 1), key=at)
    best = at(best_i)
    # golden section in log lambda on [lambda_{i-1}, lambda_{i+1}] (unimodal there too)
    a = math.log(lambdas[max(best_i - 1, 0)])
    b = math.log(lambdas[min(best_i + 1, lambdas.size - 1)])
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(6):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
    return float(min(best, fc, fd))


def _conditional_prob(p: float | np.ndarray, eps: float | np.ndarray) -> np.ndarray:
    """p e^eps / (p e^eps + 1 - p), computed as a logistic of log(p / (1 - p)) + eps."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-p) + np.asarray(eps, np.float64)
    return np.where(p > 0, 1.0 / (1.0 + np.exp(-logit)), 0.0)


class _RowDistribution:
    """The law of S = sum_j w_j B_j on the grid {0, h, 2 h, ...}, the weights rounded up to it."""

    def __init__(self, bins: int, h: float) -> None:
        self.pmf = np.zeros(bins)
        self.pmf[0] = 1.0
        self.top = 0  # the largest possible sum so far, in grid units
        self.h = h

    def add(self, k: int, p: float) -> None:
        """Convolves with k h * Bernoulli(p) (k = the weight rounded up to grid units)."""
        if k == 0 or p == 0:
            return
        if self.top + k >= self.pmf.size:
            raise AssertionError("row distribution grid too small (a bug)")
        moved = p * self.pmf[: self.top + 1]
        self.pmf[: self.top + 1] *= 1.0 - p
        self.pmf[k: self.top + k + 1] += moved
        self.top += k

    def components(self, max_components: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """(sensitivities, probabilities) for the mixture PLD, each grid point rounded up to a ladder
        of at most max_components points (stochastically larger: pessimistic, whichever ladder).

        Ladders tried: 0, u, 2u, ..., m u, then a geometric part of ratio 1 + 1/m up to the largest
        sum (absolute rounding below m u, relative above), for m in 1..64 and u from 1 up; the one
        kept is the one whose rounded mixture has the smallest chi^2 divergence from N(0, sigma^2),
        sum_ab w_a w_b exp(s_a s_b / sigma^2) - 1 (exact on <= max_components points), which tracks
        the row's privacy loss (a choice among valid roundings, so any criterion is safe)."""
        pmf = self.pmf[: self.top + 1]
        pmf = pmf / pmf.sum()
        idx = np.flatnonzero(pmf > 0)
        if idx.size <= max_components:
            return idx * self.h, pmf[idx]
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for m in (64, 32, 16, 8, 4, 2, 1):
            for k in range(0, 7):
                u = max(1, math.ceil(self.top / (math.e**k * m))) if k else 1
                lad = _ladder(self.top, m, u)
                if lad.size > max_components:
                    continue
                where = np.searchsorted(lad, idx, side="left")  # the first ladder point >= idx
                probs = np.bincount(where, weights=pmf[idx], minlength=lad.size)
                keep = probs > 0
                sens, pr = lad[keep] * self.h, probs[keep]
                logw = np.log(pr)
                pair = logw[:, None] + logw[None, :] + np.outer(sens, sens) / sigma**2
                score = float(np.logaddexp.reduce(pair.ravel()))
                if best is None or score < best[0]:
                    best = (score, sens, pr)
        assert best is not None  # m = 1 with u = top has 2 points
        return best[1], best[2]

    def key(self) -> bytes:
        return self.pmf[: self.top + 1].tobytes()


def _ladder(top: int, m: int, u: int) -> np.ndarray:
    """0, u, 2u, ..., m u, then each point the previous times 1 + 1/m rounded up; the last one = top."""
    pts = sorted({min(k * u, top) for k in range(m + 1)})
    x = pts[-1]
    while x < top:
        x = max(x + 1, math.ceil(x * (1.0 + 1.0 / m)))
        pts.append(min(x, top))
    return np.asarray(pts, np.int64)


def _norm_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Phi(b) - Phi(a) for a <= b, computed in the tail that keeps it accurate."""
    from scipy.special import ndtr

    upper = a > 0
    return np.where(upper, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))


def _mixture_cells(x: np.ndarray, sens: np.ndarray, w: np.ndarray, sigma: float) -> np.ndarray:
    """Mass of each cell [x_t, x_{t+1}] under sum_m w_m N(c_m, sigma^2): differences of the CDF
    below the median and of the survival function above it (no cancellation in either tail).

    The mixture CDF is non-decreasing in x, so the cells whose right end has CDF <= 1/2 are a
    prefix (found by bisection on single points): the CDF is evaluated on the points up to it and
    the survival function on the rest (one normal CDF per point and component, not two)."""
    from scipy.special import ndtr

    x = np.asarray(x, np.float64)
    npts = x.size
    lo, hi = 0, npts  # first point whose CDF is > 1/2 (npts: none)
    while lo < hi:
        mid = (lo + hi) // 2
        if float(ndtr((x[mid] - sens) / sigma) @ w) <= 0.5:
            lo = mid + 1
        else:
            hi = mid
    k = lo
    out = np.empty(npts - 1)
    # cells t = 0..k-2 (right end t + 1 < k: CDF <= 1/2) from the CDF at points 0..k-1
    chunk = 8192
    if k >= 2:
        cdf = np.concatenate([ndtr((x[a: min(a + chunk, k)][:, None] - sens[None, :]) / sigma) @ w
                              for a in range(0, k, chunk)])
        out[: k - 1] = np.diff(cdf)
    # cells t = k-1..npts-2 from the survival function at points k-1..npts-1
    first = max(k - 1, 0)
    if first < npts - 1:
        sf = np.concatenate([ndtr((sens[None, :] - x[a: min(a + chunk, npts)][:, None]) / sigma) @ w
                             for a in range(first, npts, chunk)])
        out[first:] = -np.diff(sf)
    return np.maximum(out, 0.0)


def _mixture_upper_quantile(sens: np.ndarray, w: np.ndarray, sigma: float, tail: float, z: float) -> float:
    """The x beyond which the mixture keeps at most ``tail`` mass (bisection)."""
    from scipy.special import ndtr

    lo, hi = float(sens.min()), float(sens.max()) + z * sigma
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(ndtr(-(mid - sens) / sigma) @ w) > tail:
            lo = mid
        else:
            hi = mid
    return hi


def _mixture_log_ratio(x: np.ndarray, sens: np.ndarray, logw: np.ndarray, sigma: float) -> np.ndarray:
    """g(x) = log sum_m w_m exp((c_m x - c_m^2 / 2) / sigma^2) (max-shifted log-sum-exp, in chunks of
    x: the same sums as scipy's logsumexp without its per-call overhead, ~5x faster here)."""
    out = np.empty(x.size)
    half = sens**2 / 2.0
    s2 = sigma**2
    chunk = 8192
    for a in range(0, x.size, chunk):
        t = logw[None, :] + (np.outer(x[a: a + chunk], sens) - half[None, :]) / s2
        m = t.max(axis=1)
        out[a: a + chunk] = m + np.log(np.exp(t - m[:, None]).sum(axis=1))
    return out


def mixture_pld(sigma: float, sens: np.ndarray, probs: np.ndarray, d: float, *, tail: float = 1e-30,
                points: int = 100_000):
    """dp-accounting PLD of the mixture-of-Gaussians pair (sum_m w_m N(c_m, sigma^2), N(0, sigma^2))
    and its reverse, privacy losses rounded up to multiples of d (pessimistic).

    The loss g(x) = log sum_m w_m exp((c_m x - c_m^2 / 2) / sigma^2) is increasing in x (c_m >= 0).
    On a grid x_0 < ... < x_N each cell's exact mass (normal CDF differences) goes to the loss at
    the cell's end where the loss is largest, rounded up to the grid of d ("privacy buckets" with
    upper rounding); mass beyond x_N (remove side) or below x_0 (add side), where the loss exceeds
    every grid value, and any float deficit go to the infinite loss; mass on the other side, where
    the loss is below the extreme cell's, goes to that cell. The x range holds all but ``tail`` of
    either distribution. (dp-accounting's own ``from_mixture_gaussian_mechanism`` is the same
    pessimistic PLD by connect-the-dots, ~30x slower here; tests compare the two.)
    """
    from dp_accounting.pld import pld_pmf
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from scipy.special import ndtri

    sens = np.asarray(sens, np.float64)
    w = np.asarray(probs, np.float64)
    keep = w > 0
    sens, w = sens[keep], w[keep] / w[keep].sum()
    if sens.max() <= 0:
        return pld_lib.identity(value_discretization_interval=d)
    z = float(-ndtri(tail))  # sigma-units beyond which a Gaussian keeps `tail` mass
    lo = -z * sigma
    hi = float(sens.max()) + z * sigma
    # Cells fine enough that the loss moves by <= d / 4 across one in the central range (all but
    # 1e-12 of either distribution's mass), coarse outside it: a coarse cell only gets a larger
    # loss (its end's), so the PLD stays pessimistic, and its mass is too small to matter.
    zc = float(-ndtri(1e-12))
    order = np.argsort(sens)
    central_hi = min(hi, _mixture_upper_quantile(sens, w, sigma, 1e-12, zc))
    central_lo = -zc * sigma
    slope = float(sens[order][np.cumsum(w[order]) >= 1.0 - 1e-12][0] if sens.size > 1 else sens.max())
    slope = max(slope, float(sens[w >= 1e-12].max())) / sigma**2
    n_central = int(min(points, max(2000, math.ceil((central_hi - central_lo) * slope / (d / 4.0)))))
    x = np.unique(np.concatenate([
        np.linspace(lo, central_lo, 200), np.linspace(central_lo, central_hi, n_central + 1),
        np.linspace(central_hi, hi, 2000),
    ]))
    logw = np.log(w)
    g = _mixture_log_ratio(x, sens, logw, sigma)
    # remove side: x ~ the mixture, loss g(x); cell [x_t, x_{t+1}] -> g(x_{t+1}).
    cells = _mixture_cells(x, sens, w, sigma)
    below = float(w @ _norm_mass(np.full(sens.size, -np.inf), (x[0] - sens) / sigma))
    mass_r = np.concatenate([[below], cells])  # `below` joins the first cell's loss g(x_0)...
    loss_r = np.concatenate([[g[0]], g[1:]])
    # add side: x ~ N(0, sigma^2), loss -g(x); cell [x_t, x_{t+1}] -> -g(x_t).
    cells0 = _mixture_cells(x, np.zeros(1), np.ones(1), sigma)
    above0 = float(_norm_mass(np.array([x[-1] / sigma]), np.array([np.inf]))[0])
    mass_a = np.concatenate([cells0, [above0]])
    loss_a = np.concatenate([-g[:-1], [-g[-1]]])

    def pmf(loss: np.ndarray, mass: np.ndarray):
        # Round up, never down: a loss k d below the true one would be optimistic (a float
        # quotient just above an integer must not be pulled back onto it).
        k = np.ceil(loss / d)
        k = (k + (k * d < loss)).astype(np.int64)
        k0 = int(k.min())
        probs_k = np.bincount(k - k0, weights=mass)
        inf_mass = max(0.0, 1.0 - float(probs_k.sum()))
        return pld_pmf.DensePLDPmf(d, k0, probs_k, inf_mass, pessimistic_estimate=True)

    return pld_lib.PrivacyLossDistribution(pmf(loss_r, mass_r), pmf(loss_a, mass_a))


def epsilon(
    strategy: Strategy | np.ndarray,
    noise_std: float,
    delta: float,
    sampling_probabilities: float | np.ndarray,
    *,
    tail_fraction: float = 0.5,
    sensitivity_grid: float | None = None,
    max_components: int = DEFAULT_MAX_COMPONENTS,
    pld_discretization: float | None = None,
    max_distinct_rows: int = DEFAULT_MAX_DISTINCT_ROWS,
    compose: str = "chain",
) -> MMCCResult:
    """An MMCC upper bound on epsilon at ``delta`` for y = C x + noise_std z (module doc).

    Args:
      strategy: a Strategy (its Toeplitz coefficients are used when it has them, else its dense
        C) or a lower-triangular matrix with non-negative entries.
      noise_std: sigma, the noise standard deviation in units of the per-step contribution bound.
      delta: the target delta; ``tail_fraction * delta`` pays for the tail bounds.
      sampling_probabilities: q (Poisson: every step) or a length-n vector p_j (e.g. cyclic
        Poisson: q on one residue class, 0 elsewhere; the Toeplitz fast path needs a scalar).
      sensitivity_grid: h, the grid every C_ij is rounded up to; default min(sigma / 400, max C_ij /
        2000), coarsened so the largest row sum spans at most 200000 grid points. Each row's
        smallest entries with sum <= 1e-3 sigma / sqrt(n) are not gridded but added, all of them,
        to every component (a deterministic upper bound on their part of the row).
      max_components: each row's sensitivity law is rounded up onto a ladder of about this many
        points before its PLD is built.
      pld_discretization: the privacy-loss grid d of every row's PLD (smaller: tighter and
        slower); default min(1e-3, 1e-2 / n): the rounding costs about n d / 2 in epsilon.
      max_distinct_rows: Toeplitz only: rows are grouped into at most this many blocks.
      compose: "chain" (one row PLD after the other) or "tree" (``compose_all``: pairwise,
        balanced; fewer FFT flops at large n). The same composition (commutative, associative),
        each dp-accounting compose truncating <= 1e-15 of tail mass pessimistically either way, so
        the two differ only by that truncation: epsilon within ~1e-9 relative (the tree's was the
        higher one where measured, hence not the default).
    """
    if compose not in ("tree", "chain"):
        raise ValueError(f"compose must be 'tree' or 'chain', got {compose!r}")
    t0 = time.perf_counter()
    if pld_discretization is not None and not (pld_discretization > 0 and math.isfinite(pld_discretization)):
        raise ValueError(f"pld_discretization must be positive and finite, got {pld_discretization}")
    bounds = row_bounds(strategy, noise_std, delta, sampling_probabilities, tail_fraction=tail_fraction,
                        sensitivity_grid=sensitivity_grid, max_components=max_components,
                        max_distinct_rows=max_distinct_rows)
    d = min(1e-3, PLD_BIAS / bounds.n) if pld_discretization is None else float(pld_discretization)
    plds = []
    for b in bounds.rows:
        one = mixture_pld(noise_std, b.sensitivities, b.probabilities, d)
        plds.append(one.self_compose(b.count) if b.count > 1 else one)
    pld = compose_all(plds) if compose == "tree" else _compose_chain(plds)
    eps = float(pld.get_epsilon_for_delta(delta - bounds.tail_delta))
    return MMCCResult(epsilon=eps, delta=delta, tail_delta=bounds.tail_delta, noise_std=float(noise_std),
                      n=bounds.n, rows_priced=len(bounds.rows), sensitivity_grid=bounds.sensitivity_grid,
                      max_components=max_components, pld_discretization=d,
                      toeplitz=bounds.toeplitz, seconds=time.perf_counter() - t0)


def compose_all(plds: list) -> Any:
    """The composition of dp-accounting PLDs, pairwise in a balanced tree: each compose is an FFT
    of the two supports, so composing m similar PLDs one after the other costs ~m^2 / 2 times one
    support, the tree ~m log2 m times (the composed PLD is the same: composition is commutative
    and associative; every compose truncates only pessimistically, mass moved to higher losses)."""
    if not plds:
        raise ValueError("nothing to compose")
    level = list(plds)
    while len(level) > 1:
        nxt = [level[i].compose(level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _compose_chain(plds: list) -> Any:
    pld = plds[0]
    for one in plds[1:]:
        pld = pld.compose(one)
    return pld


@dataclasses.dataclass(frozen=True)
class RowBound:
    """Rows ``first``..``last`` of the release: each one's conditional law given the rows before it
    is dominated (on the good event) by the mixture of N(s_m, sigma^2) with weights w_m against
    N(0, sigma^2), (s_m, w_m) = (``sensitivities``, ``probabilities``)."""

    first: int
    last: int
    sensitivities: np.ndarray
    probabilities: np.ndarray

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclasses.dataclass(frozen=True)
class RowBounds:
    """What MMCC composes: the dominating row mechanisms covering rows 0..n-1 in order, and the
    tail delta their good events cost; ``pt`` the conditional sampling bounds (module doc, step 2):
    by lag k = i - j (``pt[0]`` = q) on the Toeplitz path, by column j otherwise."""

    n: int
    rows: list[RowBound]
    tail_delta: float
    sensitivity_grid: float
    toeplitz: bool
    pt: np.ndarray


def row_bounds(
    strategy: Strategy | np.ndarray,
    noise_std: float,
    delta: float,
    sampling_probabilities: float | np.ndarray,
    *,
    tail_fraction: float = 0.5,
    sensitivity_grid: float | None = None,
    max_components: int = DEFAULT_MAX_COMPONENTS,
    max_distinct_rows: int = DEFAULT_MAX_DISTINCT_ROWS,
) -> RowBounds:
    """The per-row dominating mixtures ``epsilon`` composes (arguments as there)."""
    if not (noise_std > 0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be positive and finite, got {noise_std}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < tail_fraction < 1:
        raise ValueError(f"tail_fraction must be in (0, 1), got {tail_fraction}")
    if not (isinstance(max_components, int) and max_components >= 8):
        raise ValueError(f"max_components must be an int >= 8, got {max_components!r}")
    coeffs = None
    dense = None
    if isinstance(strategy, Strategy):
        n = strategy.n
        tc = strategy.toeplitz_coeffs()
        if tc is not None:
            coeffs = _toeplitz_coeffs(tc, n)
        else:
            dense = check_matrix(strategy.dense(), f"the {strategy.family} strategy's C")
    else:
        dense = check_matrix(strategy)
        n = dense.shape[0]
    probs = np.broadcast_to(np.asarray(sampling_probabilities, np.float64), (n,)).copy()
    if np.any(~np.isfinite(probs)) or np.any(probs < 0) or np.any(probs > 1):
        raise ValueError(f"sampling probabilities must be in [0, 1], got {sampling_probabilities!r}")
    scalar_q = np.ndim(sampling_probabilities) == 0
    if coeffs is not None and not scalar_q:
        dense = _toeplitz_dense(coeffs, n)
        coeffs = None
    cmax = float(coeffs.max() if coeffs is not None else dense.max())  # type: ignore[union-attr]
    if cmax <= 0:
        raise ValueError("C is zero: nothing is released")
    w = coeffs if coeffs is not None else np.asarray(dense)
    small = _small_entries(w, _LUMP_PER_SIGMA * noise_std / math.sqrt(n))
    big = np.where(small, 0.0, w)
    row_sum = float(big.sum() if coeffs is not None else big.sum(axis=1).max())
    if sensitivity_grid is None:
        h = max(min(noise_std / _GRID_PER_SIGMA, cmax / _GRID_PER_ENTRY), row_sum / _MAX_GRID)
    else:
        h = float(sensitivity_grid)
        if not (h > 0 and math.isfinite(h)):
            raise ValueError(f"sensitivity_grid must be positive and finite, got {sensitivity_grid}")
    units = _grid_units(big, h)
    bins = int(units.sum() if coeffs is not None else units.sum(axis=1).max()) + 1
    tail_delta = tail_fraction * delta
    sigma2 = noise_std**2
    if coeffs is not None:
        pt = lag_probabilities(coeffs, float(probs[0]), sigma2, tail_delta)
        shifts = np.cumsum(np.where(small, coeffs, 0.0))  # row i: its small lags <= i
        rows = _toeplitz_rows(units, pt, bins, h, max_distinct_rows)
    else:
        pt = column_probabilities(dense, probs, sigma2, tail_delta)  # type: ignore[arg-type]
        shifts = np.where(small, dense, 0.0).sum(axis=1)  # type: ignore[arg-type]
        rows = _dense_rows(units, probs, pt, bins, h, shifts)
    out = []
    for first, last, dist in rows:
        sens, pr = dist.components(max_components, noise_std)
        # S_i <= (grid part) + (the row's small entries, all taken): the block's last row has the
        # largest shift on the Toeplitz path (a prefix sum), every row of a dense block the same.
        shift = float(shifts[last])
        out.append(RowBound(first, last, sens + shift * (1.0 + 1e-12) if shift > 0 else sens, pr))
    return RowBounds(n=n, rows=out, tail_delta=tail_delta, sensitivity_grid=h, toeplitz=coeffs is not None, pt=pt)


def _toeplitz_dense(c: np.ndarray, n: int) -> np.ndarray:
    idx = np.arange(n)
    lag = idx[:, None] - idx[None, :]
    return np.where(lag >= 0, c[np.clip(lag, 0, n - 1)], 0.0)


def _grid_units(w: np.ndarray, h: float) -> np.ndarray:
    """w / h rounded up (pessimistic: k h >= w exactly in floating point), as ints."""
    w = np.asarray(w, np.float64)
    k = np.ceil(w / h)
    k = k + (k * h < w)
    return k.astype(np.int64)


def column_probabilities(c: np.ndarray, probs: np.ndarray, sigma2: float, tail_delta: float) -> np.ndarray:
    """pt_j for a general C (module doc, steps 2 and 4): one eps_j per column from the full column
    (lambda >= 1, so it bounds the tail of L_ij for every row i), at delta_1 = tail_delta / (the
    number of pairs (i, j), j < i, p_j > 0)."""
    n = c.shape[0]
    active = probs > 0
    pairs = int(np.sum((n - 1 - np.arange(n))[active]))
    log_inv = math.log(max(pairs, 1) / tail_delta)
    gram = c.T @ c
    eps = np.zeros(n)
    for j in np.flatnonzero(active):
        eps[j] = _chernoff_eps(gram[j] / sigma2, probs, gram[j, j] / sigma2, log_inv, _LAMBDAS_MONOTONE)
    return _conditional_prob(probs, eps)


def _small_entries(w: np.ndarray, budget: float) -> np.ndarray:
    """Per row (the last axis), the smallest entries whose sum stays <= budget (a mask)."""
    w2 = np.atleast_2d(w)
    order = np.argsort(w2, axis=-1, kind="stable")
    csum = np.cumsum(np.take_along_axis(w2, order, axis=-1), axis=-1)
    mask = np.zeros(w2.shape, bool)
    np.put_along_axis(mask, order, csum <= budget, axis=-1)
    return mask.reshape(w.shape) & (w > 0)


def _dense_rows(units: np.ndarray, probs: np.ndarray, pt: np.ndarray, bins: int, h: float,
                shifts: np.ndarray) -> list[tuple[int, int, _RowDistribution]]:
    """Every row's dominating S_i for a general C; consecutive rows with the same law and shift merged."""
    n = units.shape[0]
    rows = []
    for i in range(n):
        dist = _RowDistribution(bins, h)
        dist.add(int(units[i, i]), float(probs[i]))
        for j in np.flatnonzero((units[i, :i] > 0) & (pt[:i] > 0)):
            dist.add(int(units[i, j]), float(pt[j]))
        rows.append(dist)
    return _merge_equal(rows, shifts)


def _merge_equal(rows: list[_RowDistribution], shifts: np.ndarray) -> list[tuple[int, int, _RowDistribution]]:
    """Consecutive rows with the same law and shift become one block (composition is order-free,
    but blocks of consecutive rows keep ``RowBound``'s first..last meaningful)."""
    out: list[tuple[int, int, _RowDistribution]] = []
    for i, r in enumerate(rows):
        if out and out[-1][2].key() == r.key() and shifts[out[-1][0]] == shifts[i]:
            out[-1] = (out[-1][0], i, out[-1][2])
        else:
            out.append((i, i, r))
    return out


def toeplitz_lag_gram(c: np.ndarray) -> np.ndarray:
    """S[t, r] = sum_{u <= r} c_u c_{u + t} (0 where u + t >= n): the truncated autocorrelations
    from which every lag's Gram weights are read (module doc)."""
    n = c.size
    s = np.zeros((n, n))
    for t in range(n):
        s[t, : n - t] = np.cumsum(c[: n - t] * c[t:])
    return s


def lag_probabilities(c: np.ndarray, q: float, sigma2: float, tail_delta: float) -> np.ndarray:
    """Toeplitz C under Poisson sampling: pt[k] bounds P(x_{i-k} = 1 | y_{<i}, x_{-(i-k)}) for every
    row i on the good event (pt[0] = q: x_i is independent of y_{<i}); delta_1 = tail_delta / (n (n - 1) / 2)."""
    n = c.size
    pairs = n * (n - 1) // 2
    log_inv = math.log(max(pairs, 1) / tail_delta)
    s = toeplitz_lag_gram(c)
    probs_all = np.full(n, q)
    pt = np.zeros(n)
    pt[0] = q
    for k in range(1, n):
        # Column j = i - k restricted to rows j..i-1 holds c_0..c_{k-1}. Its Gram weight with column
        # l = j + m (rows < i): m in [0, k): S[m, k - 1 - m]; l = j - t, t >= 1 (at most n - 1 - k
        # older columns, the worst row; a missing column only drops a term >= 0): S[t, k - 1].
        m = np.arange(k)
        w_new = s[m, k - 1 - m]
        t = np.arange(1, n - k)
        w_old = s[t, k - 1] if t.size else np.zeros(0)
        w = np.concatenate([w_new, w_old]) / sigma2
        eps = _chernoff_eps(w, probs_all[: w.size], s[0, k - 1] / sigma2, log_inv, _LAMBDAS)
        pt[k] = _conditional_prob(q, eps)
    return pt


def _toeplitz_rows(units: np.ndarray, pt: np.ndarray, bins: int, h: float,
                   max_distinct_rows: int) -> list[tuple[int, int, _RowDistribution]]:
    """S_i = sum_{k <= i} c_k B_k, B_k ~ Bernoulli(pt[k]), built incrementally; rows in blocks."""
    n = units.size
    ends = _block_ends(n, max_distinct_rows)
    rows: list[tuple[int, int, _RowDistribution]] = []
    dist = _RowDistribution(bins, h)
    start = 0
    for end in ends:  # rows start..end, priced as row `end` (row i is dominated by any later row)
        for k in range(start, end + 1):
            dist.add(int(units[k]), float(pt[k]))
        rows.append((start, end, _copy(dist)))
        start = end + 1
    return rows


def _copy(d: _RowDistribution) -> _RowDistribution:
    out = _RowDistribution(d.pmf.size, d.h)
    out.pmf = d.pmf.copy()
    out.top = d.top
    return out


def _block_ends(n: int, m: int) -> list[int]:
    """Last rows of at most m blocks covering 0..n-1: every row alone while n <= m, else the first
    rows alone and later blocks growing geometrically (late rows differ little)."""
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"max_distinct_rows must be a positive int, got {m!r}")
    if n <= m:
        return list(range(n))
    ends = np.unique(np.round(np.geomspace(1, n, m)).astype(np.int64) - 1)
    ends = [int(e) for e in ends if 0 <= e < n]
    if ends[-1] != n - 1:
        ends.append(n - 1)
    return ends
