"""Banded storage of a lower-triangular n×n C, by columns or by rows, and the conversions.

    columns[t, j] = C[t + j, t]   column t from its diagonal down (zero where t + j >= n)
    rows[t, j]    = C[t, t - j]   row t from its diagonal leftwards (zero where j > t)

both of shape (n, bands), so ``columns[:, 0] = rows[:, 0]`` is the diagonal. ``Banded`` stores
columns; the noise generator's "output" recurrence reads rows (``StreamTable``); the verifier's
banded solve takes rows reversed (LAPACK's storage of C^T). Every conversion goes through here.
"""

from __future__ import annotations

import numpy as np


def rows_from_columns(columns: np.ndarray) -> np.ndarray:
    """rows[t, j] = C[t, t - j] = columns[t - j, j]."""
    cols = np.asarray(columns, dtype=np.float64)
    n, bands = cols.shape
    rows = np.zeros((n, bands))
    for j in range(bands):
        rows[j:, j] = cols[: n - j, j]
    return rows


def columns_from_rows(rows: np.ndarray) -> np.ndarray:
    """columns[t, j] = C[t + j, t] = rows[t + j, j]."""
    r = np.asarray(rows, dtype=np.float64)
    n, bands = r.shape
    cols = np.zeros((n, bands))
    for j in range(bands):
        cols[: n - j, j] = r[j:, j]
    return cols


def columns_from_dense(c: np.ndarray, bands: int) -> np.ndarray:
    """The first ``bands`` diagonals of a dense lower-triangular C, by columns."""
    c = np.asarray(c, dtype=np.float64)
    n = c.shape[0]
    if not 1 <= bands <= n:
        raise ValueError(f"bands={bands} must be in [1, n={n}]")
    cols = np.zeros((n, bands))
    for j in range(bands):
        cols[: n - j, j] = np.diagonal(c, -j)
    return cols


def dense_from_columns(columns: np.ndarray) -> np.ndarray:
    """The n×n matrix C of its banded columns."""
    cols = np.asarray(columns, dtype=np.float64)
    n, bands = cols.shape
    c = np.zeros((n, n))
    for j in range(bands):
        idx = np.arange(n - j)
        c[idx + j, idx] = cols[: n - j, j]
    return c


def effective_bands(columns: np.ndarray) -> int:
    """1 + the largest j with a non-zero columns[:, j] (trailing zero bands do not count; at least 1)."""
    used = np.flatnonzero(np.any(np.asarray(columns) != 0, axis=0))
    return int(used[-1]) + 1 if used.size else 1
