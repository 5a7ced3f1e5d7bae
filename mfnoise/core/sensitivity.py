"""Sensitivity of a strategy C under a participation schema p (docs/design.md).

sens(C, p) = max over patterns P of max over unit vectors u_t of || sum_{t in P} C[:, t] u_t ||.
With X = C^T C: sens^2 <= max_P sum_{i,j in P} |X[i, j]|, with equality when X >= 0
elementwise ("Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning",
Choquette-Choo et al. 2023, arXiv:2211.06530). Routines here:

* ``column_norms``: banded C with bands <= min_sep, whose columns in one pattern have disjoint
  supports, so sens^2 = max_P sum_{t in P} ||C[:, t]||^2 (a dynamic programme; exact); and any C
  under single participation (the largest column norm).
* ``toeplitz``: Toeplitz C with non-negative, non-increasing coefficients. X >= 0, and moving a
  pattern's steps earlier or closer together never decreases any X[i, j] (X[i, j] =
  sum_{l <= n-1-j} c_l c_{l+j-i}), so the pattern {0, b, 2b, ...} is the worst; exact, O(k n).
* ``dense``: any C. Exact for single participation (max column norm), for cyclic participation
  when X >= 0, and by exhaustive search over min-sep patterns when X >= 0 and there are few;
  otherwise a proven upper bound (``exact=False``).

A computed sensitivity below the true one is a privacy bug: every branch is tested against brute
force over all patterns.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mfnoise.core.participation import Participation

EXHAUSTIVE_PATTERN_LIMIT = 200_000
NEGATIVE_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """A sensitivity value; ``exact`` is False when it is a proven upper bound."""

    value: float
    exact: bool
    method: str

    def __float__(self) -> float:
        return float(self.value)


def best_pattern_sum(w: np.ndarray, p: Participation) -> np.ndarray:
    """max over patterns P of sum_{t in P} w[..., t], for non-negative weights w of shape (..., n).

    Min-sep: g_j[t] = best sum of at most j picks in [0, t], g_j = cummax(max(g_{j-1},
    shift_b(g_{j-1}) + w)), j = 1..k. Cyclic: max over residues c of the sum over t = c mod b.
    """
    w = np.asarray(w, dtype=np.float64)
    n, b = p.n, p.min_sep
    if w.shape[-1] != n:
        raise ValueError(f"weights have {w.shape[-1]} steps, participation has n={n}")
    if np.any(w < 0):
        raise ValueError("best_pattern_sum needs non-negative weights")
    if p.cyclic:
        pad = (-n) % b
        padded = np.concatenate([w, np.zeros(w.shape[:-1] + (pad,))], axis=-1)
        return padded.reshape(w.shape[:-1] + (-1, b)).sum(axis=-2).max(axis=-1)
    g = np.maximum.accumulate(w, axis=-1)
    for _ in range(p.reachable_participations - 1):
        shifted = np.concatenate([np.zeros(w.shape[:-1] + (b,)), g[..., : n - b]], axis=-1)
        g = np.maximum.accumulate(np.maximum(g, shifted + w), axis=-1)
    return g[..., -1]


def column_norms(sq_norms: np.ndarray, p: Participation) -> Sensitivity:
    """Exact sensitivity from the squared column norms ||C[:, t]||^2, where it is determined by them.

    That is: any C under single participation (k = 1 reachable: sens = max_t ||C[:, t]||, method
    ``max-column-norm``), or a banded C with bands <= min_sep under any schema (a pattern's columns
    have disjoint supports: sens^2 = max_P sum_{t in P} ||C[:, t]||^2, a dynamic programme, method
    ``banded-dp``). The caller guarantees one of the two; the method names the one computed.
    """
    method = "max-column-norm" if p.reachable_participations == 1 else "banded-dp"
    return Sensitivity(math.sqrt(float(best_pattern_sum(sq_norms, p))), True, method)


def toeplitz(coeffs: np.ndarray, p: Participation) -> Sensitivity:
    """Exact sensitivity of the n×n lower-triangular Toeplitz C with first column ``coeffs``.

    Requires coeffs non-negative and non-increasing (checked). With P = {0, b, ..., (m-1) b},
    m = min(k, ceil(n / b)) and d = j - i a multiple of b:
    sens^2 = sum_{i, j in P} X[i, j], X[i, j] = S_{j-i}[n-1-j], S_d[m] = sum_{l<=m} c_l c_{l+d}.
    """
    n, b = p.n, p.min_sep
    c = np.zeros(n)
    coeffs = np.asarray(coeffs, dtype=np.float64)[:n]
    c[: coeffs.size] = coeffs
    if not is_nonneg_nonincreasing(c):
        raise ValueError("toeplitz sensitivity needs non-negative, non-increasing coefficients")
    m = p.reachable_participations
    total = 0.0
    for q in range(m):
        d = q * b
        s = np.cumsum(c[: n - d] * c[d:])  # s[r] = S_d[r]
        # pairs (i, j) = (a b, (a + q) b), a = 0..m-1-q; X = S_d[n - 1 - j]
        js = (np.arange(m - q) + q) * b
        contrib = s[n - 1 - js].sum()
        total += contrib if q == 0 else 2.0 * contrib
    return Sensitivity(math.sqrt(total), True, "toeplitz-decreasing")


def toeplitz_envelope(coeffs: np.ndarray, p: Participation) -> tuple[Sensitivity, float]:
    """An upper bound for a Toeplitz C whose coefficients are nearly non-negative non-increasing.

    With e = (the smallest non-negative non-increasing majorant of c) - c >= 0 and C = C' - E:
    sens(C) <= sens(C') + sens(E) <= sens(C') + sqrt(m) ||E||_2 <= sens(C') + sqrt(m) sum_j e_j
    (triangle inequality; the m unit vectors u_t give ||E_P U||_F <= ||E||_2 sqrt(m); a Toeplitz
    E has ||E||_2 <= sum_j |e_j|). sens(C') is exact (``toeplitz``). Returns (bound, sum_j e_j).
    Used when rounding (e.g. of a series reciprocal) leaves c monotone only up to ~1e-16.
    """
    n = p.n
    c = np.zeros(n)
    coeffs = np.asarray(coeffs, dtype=np.float64)[:n]
    c[: coeffs.size] = coeffs
    envelope = np.maximum.accumulate(np.maximum(c, 0.0)[::-1])[::-1]
    gap = float(np.sum(envelope - c))
    base = toeplitz(envelope, p).value
    bound = base + math.sqrt(p.reachable_participations) * gap
    return Sensitivity(bound, False, "toeplitz-decreasing-envelope"), gap


def is_nonneg_nonincreasing(c: np.ndarray) -> bool:
    c = np.asarray(c)
    return bool(np.all(c >= 0) and np.all(np.diff(c) <= 0))


def dense(c: np.ndarray, p: Participation) -> Sensitivity:
    """Sensitivity of a dense lower-triangular C (n×n): exact where possible, else an upper bound."""
    c = np.asarray(c, dtype=np.float64)
    if c.shape != (p.n, p.n):
        raise ValueError(f"strategy has shape {c.shape}, participation has n={p.n}")
    x = c.T @ c
    m = p.reachable_participations
    if m == 1:
        return Sensitivity(math.sqrt(float(np.max(np.diag(x)))), True, "max-column-norm")
    ax = np.abs(x)
    patterns, method = None, ""
    if p.cyclic:
        patterns, method = list(p.cyclic_patterns()), "cyclic-exhaustive"
    elif count_patterns(p) <= EXHAUSTIVE_PATTERN_LIMIT:
        patterns, method = p.patterns(), "min-sep-exhaustive"
    if patterns is not None:
        # max_P sum_{i,j in P} |X_ij| bounds sens^2 (subsets of P sum less). It is attained when
        # the maximising pattern P* has X_{P*} >= 0 (all u_t equal); entries of X outside the
        # patterns never matter. Negative mass up to NEGATIVE_TOLERANCE of the total still counts
        # as exact: the value reported is the |X| sum, so it can only err upwards.
        best, best_neg = -1.0, 0.0
        for pat in patterns:
            block = x[np.ix_(pat, pat)]
            total = float(np.abs(block).sum())
            if total > best:
                best, best_neg = total, float(-block[block < 0].sum())
        exact = best_neg <= NEGATIVE_TOLERANCE * best
        return Sensitivity(math.sqrt(best), exact, method if exact else method + "-abs-bound")
    # sum_{i,j in P} |X_ij| <= sum_{i in P} r_i with r_i = max_{P'} sum_{j in P'} |X_ij|.
    r = best_pattern_sum(ax, p)
    return Sensitivity(math.sqrt(float(best_pattern_sum(r, p))), False, "row-bound")


def count_patterns(p: Participation) -> int:
    """Number of non-empty min-sep patterns (separated subsets of size <= k), by a DP."""
    n, b, m = p.n, p.min_sep, p.reachable_participations
    # f[t][j]: number of patterns of size j whose last step is t.
    f = np.zeros((n, m + 1), dtype=object)
    cum = np.zeros((n + 1, m + 1), dtype=object)
    for t in range(n):
        f[t, 1] = 1
        if t - b >= 0:
            f[t, 2:] = cum[t - b + 1, 1:m]
        cum[t + 1] = cum[t] + f[t]
    return int(cum[n, 1:].sum())
