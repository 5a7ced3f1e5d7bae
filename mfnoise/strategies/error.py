"""Error of a factorization A = B C, B = A C^{-1}, for noise multiplier 1 (docs/design.md).

    rmse(C)      = sens(C, p) * ||A C^{-1}||_F / sqrt(n)
    max_error(C) = sens(C, p) * max_i ||(A C^{-1})[i, :]||_2

For a Toeplitz strategy on a Toeplitz workload B is Toeplitz with first column b = C^{-1} a (the
matrices commute), so ||B||_F^2 = sum_j (n - j) b_j^2 and the largest row is the last,
sum_j b_j^2: O(n log n) or O(n * bands / buffers). Otherwise B is formed densely (small n).
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
    """||B||_F^2 and max_i ||B[i, :]||^2 for B = A C^{-1}."""

    frobenius_sq: float
    max_row_sq: float


def decoder_norms(strategy: Strategy, workload: Workload) -> DecoderNorms:
    """Norms of the decoder B = A C^{-1} (float64)."""
    if workload.n != strategy.n:
        raise ValueError(f"workload has n={workload.n} but the strategy has n={strategy.n}")
    n = strategy.n
    if workload.is_toeplitz and strategy.is_toeplitz:
        b = strategy.inverse_apply(np.asarray(workload.coeffs, np.float64))
        sq = b * b
        return DecoderNorms(float(np.dot(n - np.arange(n), sq)), float(sq.sum()))
    import scipy.linalg  # here, not at module level: `import mfnoise` stays free of scipy

    a = workload.dense()
    c = strategy.dense()
    b = scipy.linalg.solve_triangular(c.T, a.T, lower=False).T  # B C = A
    rows = np.einsum("ij,ij->i", b, b)
    return DecoderNorms(float(rows.sum()), float(rows.max()))


def rmse(strategy: Strategy, workload: Workload, p: Participation) -> float:
    """sens(C, p) * ||A C^{-1}||_F / sqrt(n)."""
    return evaluate(strategy, workload, p)["rmse"]


def max_error(strategy: Strategy, workload: Workload, p: Participation) -> float:
    """sens(C, p) * max_i ||(A C^{-1})[i, :]||_2."""
    return evaluate(strategy, workload, p)["max_error"]


def evaluate(strategy: Strategy, workload: Workload, p: Participation) -> dict:
    """sensitivity, exactness, rmse and max_error in one pass (one sensitivity computation)."""
    check_participation(p, strategy.n)
    sens = strategy.sensitivity(p)
    norms = decoder_norms(strategy, workload)
    return {
        "sensitivity": sens.value,
        "sensitivity_exact": sens.exact,
        "sensitivity_method": sens.method,
        "rmse": sens.value * math.sqrt(norms.frobenius_sq / strategy.n),
        "max_error": sens.value * math.sqrt(norms.max_row_sq),
    }
