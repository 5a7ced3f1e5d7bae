"""Error of a factorization A = B C, B = A C^{-1}, for noise multiplier 1 (docs/design.md).

    rmse(C)               = sens(C, p) * ||A C^{-1}||_F / sqrt(n)
    max_error(C)          = sens(C, p) * max_i ||(A C^{-1})[i, :]||_2
    last_iterate_error(C) = sens(C, p) * ||(A C^{-1})[n-1, :]||_2          (the final model's error)
    weighted_error(C, w)  = sens(C, p) * sqrt(sum_i w_i ||(A C^{-1})[i, :]||^2 / sum_i w_i)

For a Toeplitz strategy on a Toeplitz workload B is Toeplitz with first column b = C^{-1} a (the
matrices commute), its row i the prefix b_0..b_i, so ||B||_F^2 = sum_j (n - j) b_j^2, the largest
row is the last, sum_j b_j^2, and sum_i w_i ||B[i, :]||^2 = sum_j W_j b_j^2 with W_j = sum_{i>=j} w_i:
O(n log n) or O(n * bands / buffers). Otherwise B is formed densely (small n).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mfnoise.core.participation import Participation, check_participation
from mfnoise.core.workloads import Workload
from mfnoise.strategies.base import Strategy


@dataclasses.dataclass(frozen=True)
class DecoderNorms:
    """||B||_F^2, max_i ||B[i, :]||^2 and ||B[n-1, :]||^2 for B = A C^{-1}."""

    frobenius_sq: float
    max_row_sq: float
    last_row_sq: float


def decoder_norms(strategy: Strategy, workload: Workload) -> DecoderNorms:
    """Norms of the decoder B = A C^{-1} (float64)."""
    if workload.n != strategy.n:
        raise ValueError(f"workload has n={workload.n} but the strategy has n={strategy.n}")
    n = strategy.n
    closed = strategy.closed_form_decoder_norms(workload)
    if closed is not None:  # a Toeplitz B: its largest row is the last
        return DecoderNorms(closed[0], closed[1], closed[1])
    b = _toeplitz_decoder(strategy, workload)
    if b is not None:
        sq = b * b
        last = float(sq.sum())
        return DecoderNorms(float(np.dot(n - np.arange(n), sq)), last, last)
    rows = _dense_row_norms_sq(strategy, workload)
    return DecoderNorms(float(rows.sum()), float(rows.max()), float(rows[-1]))


def _toeplitz_decoder(strategy: Strategy, workload: Workload) -> np.ndarray | None:
    """b = C^{-1} a, B's first column, when both are Toeplitz (B is then Toeplitz), else None."""
    if workload.is_toeplitz and strategy.is_toeplitz:
        return strategy.inverse_apply(np.asarray(workload.coeffs, np.float64))
    return None


def _dense_row_norms_sq(strategy: Strategy, workload: Workload) -> np.ndarray:
    """||B[i, :]||^2 for every i, B formed densely (n <= DENSE_LIMIT)."""
    import scipy.linalg  # here, not at module level: `import mfnoise` stays free of scipy

    a = workload.dense()
    c = strategy.dense()
    b = scipy.linalg.solve_triangular(c.T, a.T, lower=False).T  # B C = A
    return np.einsum("ij,ij->i", b, b)


def weighted_row_norms_sq(strategy: Strategy, workload: Workload, weights: np.ndarray) -> float:
    """sum_i w_i ||B[i, :]||^2 / sum_i w_i for B = A C^{-1} (w: n finite non-negative, not all zero).

    Toeplitz on Toeplitz: sum_j W_j b_j^2 with W_j = sum_{i>=j} w_i (O(n) after b); otherwise dense.
    """
    if workload.n != strategy.n:
        raise ValueError(f"workload has n={workload.n} but the strategy has n={strategy.n}")
    w = np.asarray(weights, np.float64)
    if w.shape != (strategy.n,):
        raise ValueError(f"weights have shape {w.shape}, expected ({strategy.n},)")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError("weights must be finite and non-negative, and not all zero")
    w = w / w.sum()
    b = _toeplitz_decoder(strategy, workload)
    if b is not None:
        return float(np.dot(np.cumsum(w[::-1])[::-1], b * b))
    return float(np.dot(w, _dense_row_norms_sq(strategy, workload)))


def rmse(strategy: Strategy, workload: Workload, p: Participation) -> float:
    """sens(C, p) * ||A C^{-1}||_F / sqrt(n)."""
    return evaluate(strategy, workload, p)["rmse"]


def max_error(strategy: Strategy, workload: Workload, p: Participation) -> float:
    """sens(C, p) * max_i ||(A C^{-1})[i, :]||_2."""
    return evaluate(strategy, workload, p)["max_error"]


def last_iterate_error(strategy: Strategy, workload: Workload, p: Participation) -> float:
    """sens(C, p) * ||(A C^{-1})[n-1, :]||_2: the error of the final model only."""
    return evaluate(strategy, workload, p)["last_iterate_error"]


def weighted_error(strategy: Strategy, workload: Workload, p: Participation, weights: np.ndarray) -> float:
    """sens(C, p) * sqrt(sum_i w_i ||(A C^{-1})[i, :]||^2 / sum_i w_i)."""
    return evaluate(strategy, workload, p, weights=weights)["weighted_error"]


def evaluate(strategy: Strategy, workload: Workload, p: Participation, weights: np.ndarray | None = None) -> dict:
    """sensitivity, exactness, rmse, max_error and last_iterate_error in one pass (one sensitivity
    computation); with ``weights`` also weighted_error."""
    check_participation(p, strategy.n)
    sens = strategy.sensitivity(p)
    norms = decoder_norms(strategy, workload)
    out = {
        "sensitivity": sens.value,
        "sensitivity_exact": sens.exact,
        "sensitivity_method": sens.method,
        "rmse": sens.value * math.sqrt(norms.frobenius_sq / strategy.n),
        "max_error": sens.value * math.sqrt(norms.max_row_sq),
        "last_iterate_error": sens.value * math.sqrt(norms.last_row_sq),
    }
    if weights is not None:
        out["weighted_error"] = sens.value * math.sqrt(weighted_row_norms_sq(strategy, workload, weights))
    return out
