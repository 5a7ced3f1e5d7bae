"""Closed-form strategies built from the square root of a Toeplitz workload.

* sqrt-Toeplitz: C = A^{1/2}; for the prefix sum c_j = binom(2j, j) / 4^j, the coefficients of
  (1 - x)^{-1/2} ("Constant Matters: Fine-grained Error Bound on Differentially Private Continual
  Observation", Fichtenberger et al. 2023).
* BSR, banded square root: the first ``bands`` coefficients of A^{1/2}, each column scaled to
  unit norm ("Banded Square Root Matrix Factorization for Differentially Private Model Training",
  Kalinin & Lampert 2024).
* BISR, banded inverse square root: C^{-1} is the first ``bands`` coefficients of A^{-1/2}
  (same paper).
"""

from __future__ import annotations

import numpy as np

from mfnoise.core import series
from mfnoise.strategies.banded import Banded
from mfnoise.strategies.inverse_toeplitz import InverseToeplitz
from mfnoise.strategies.toeplitz import Toeplitz
from mfnoise.core.workloads import Workload


def _workload_sqrt(n: int, workload: Workload | None, m: int) -> np.ndarray:
    """First m coefficients of A^{1/2} for a Toeplitz workload (prefix sum by default)."""
    if workload is not None and workload.n != n:
        raise ValueError(f"workload has n={workload.n}, expected n={n}")
    if workload is None or workload.name == "prefix":
        j = np.arange(1, m)
        return np.concatenate([[1.0], np.cumprod((2 * j - 1) / (2 * j))])
    if not workload.is_toeplitz:
        raise ValueError(f"closed forms need a Toeplitz workload, got {workload.name!r}")
    return series.sqrt(workload.coeffs, m)


def _check_bands(n: int, bands: int) -> int:
    bands = int(bands)
    if not 1 <= bands <= n:
        raise ValueError(f"bands={bands} must be in [1, n={n}]")
    return bands


def sqrt_toeplitz(n: int, workload: Workload | None = None) -> Toeplitz:
    """C = A^{1/2} (Toeplitz, n coefficients)."""
    return Toeplitz(_workload_sqrt(n, workload, n), n)


def bsr(n: int, bands: int, workload: Workload | None = None) -> Banded:
    """Banded square root: columns t of A^{1/2} truncated to ``bands`` rows, normalised."""
    bands = _check_bands(n, bands)
    c = _workload_sqrt(n, workload, bands)
    cols = np.tile(c, (n, 1))
    t, j = np.meshgrid(np.arange(n), np.arange(bands), indexing="ij")
    cols[t + j >= n] = 0.0
    return Banded.normalized_columns(cols)


def bisr(n: int, bands: int, workload: Workload | None = None) -> InverseToeplitz:
    """Banded inverse square root: C^{-1} = first ``bands`` coefficients of A^{-1/2}."""
    bands = _check_bands(n, bands)
    s = _workload_sqrt(n, workload, bands)
    return InverseToeplitz(series.reciprocal(s, bands), n)

