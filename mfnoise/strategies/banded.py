"""Banded strategies (BandMF): C[i, j] = 0 for i - j >= bands, held column by column.

``columns[t, j] = C[t + j, t]`` for j < bands (entries past row n - 1 are zero), so the storage
is O(n * bands) and column t's norm is ||columns[t]||. Column-normalised (every column of norm 1)
with bands <= min_sep, the columns in one participation pattern have disjoint supports and
sens^2 = max_P |P| = k ("Multi-Epoch Matrix Factorization Mechanisms for Private Machine
Learning", Choquette-Choo et al. 2023; "(Amplified) Banded Matrix Factorization", 2023).
Streaming: z_t = (w_t - sum_{j=1..bands-1} C[t, t-j] z_{t-j}) / C[t, t].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core.participation import Participation
from mfnoise.strategies.base import Strategy, StreamTable, as_float64, frozen_dataclass, register, round_to, rounded_reciprocal


@frozen_dataclass
class Banded(Strategy):
    """A lower-triangular banded C from its columns, shape (n, bands)."""

    columns: np.ndarray
    family = "banded"

    def __post_init__(self) -> None:
        cols = as_float64("banded strategy columns", self.columns, 2)
        object.__setattr__(self, "columns", cols)
        if not isinstance(cols, np.ndarray):
            return
        n, bands = cols.shape
        if bands < 1 or bands > n:
            raise ValueError(f"bands={bands} must be in [1, n={n}]")
        t, j = np.nonzero(cols)
        if np.any(t + j >= n):
            raise ValueError("banded strategy has entries below row n - 1 (columns[t, j] with t + j >= n)")
        if np.any(cols[:, 0] == 0):
            raise ValueError(f"banded strategy is singular: C[{int(np.argmin(np.abs(cols[:, 0])))}, same] = 0")

    @classmethod
    def from_dense(cls, c: np.ndarray, bands: int) -> "Banded":
        """The banded part (rows t..t+bands-1 of each column t) of a dense lower-triangular C."""
        c = np.asarray(c, dtype=np.float64)
        n = c.shape[0]
        if not 1 <= bands <= n:
            raise ValueError(f"bands={bands} must be in [1, n={n}]")
        cols = np.zeros((n, bands))
        for j in range(bands):
            cols[: n - j, j] = np.diagonal(c, -j)
        return cls(cols)

    @classmethod
    def normalized_columns(cls, cols: np.ndarray) -> "Banded":
        """Builds C from raw columns, each scaled to unit norm (so sens^2 = k with bands <= b)."""
        cols = np.asarray(cols, dtype=np.float64)
        norms = np.linalg.norm(cols, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError("cannot normalise a zero column")
        return cls(cols / norms)

    @property
    def n(self) -> int:  # type: ignore[override]
        return int(self.columns.shape[0])

    @property
    def bands(self) -> int:
        return int(self.columns.shape[1])

    def _dense(self) -> np.ndarray:
        n = self.n
        c = np.zeros((n, n))
        for j in range(self.bands):
            idx = np.arange(n - j)
            c[idx + j, idx] = self.columns[: n - j, j]
        return c

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        # LAPACK banded storage with l = bands - 1, u = 0: ab[j, t] = C[t + j, t].
        out = scipy.linalg.solve_banded((self.bands - 1, 0), self.columns.T, z.reshape(self.n, -1))
        return out.reshape(z.shape)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        if self.bands <= p.min_sep or p.reachable_participations == 1:
            return sens_lib.column_norms(np.sum(self.columns**2, axis=1), p)
        return self._dense_sensitivity(
            p, f"bands={self.bands} exceeds min_sep={p.min_sep}, so columns of one pattern overlap"
        )

    def stream_table(self, dtype: Any) -> StreamTable:
        """"output" rows: table[t, 0] = 1 / C[t, t] and table[t, j] = C[t, t - j], rounded to dtype."""
        cols = np.asarray(self.columns)
        n, bands = cols.shape
        rows = np.zeros((n, bands))  # rows[t, j] = C[t, t - j] = columns[t - j, j]
        for j in range(1, bands):
            rows[j:, j] = round_to(cols[: n - j, j], dtype)
        rows[:, 0] = rounded_reciprocal(cols[:, 0], dtype)
        return StreamTable("output", bands - 1, rows, dtype)

    def realised(self, dtype: Any) -> "Banded":
        return Banded(_columns_from_rows(self.stream_table(dtype).table))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"columns": np.asarray(self.columns)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "bands": self.bands}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "Banded":
        return cls(arrays["columns"])


def _columns_from_rows(rows: np.ndarray) -> np.ndarray:
    """Banded columns of the C' an "output" table realises: C'[t, t] = 1 / s_t, C'[t, t - j] = rows[t, j]."""
    n, bands = rows.shape
    cols = np.zeros((n, bands))
    with np.errstate(divide="ignore"):
        cols[:, 0] = 1.0 / rows[:, 0]
    for j in range(1, bands):
        cols[: n - j, j] = rows[j:, j]
    return cols


register(Banded, data_fields=["columns"], meta_fields=[])
