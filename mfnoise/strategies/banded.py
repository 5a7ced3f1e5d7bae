"""Banded strategies (BandMF): C[i, j] = 0 for i - j >= bands, held column by column.

``columns[t, j] = C[t + j, t]`` for j < bands (entries past row n - 1 are zero; ``band_storage``),
so the storage is O(n * bands) and column t's norm is ||columns[t]||. Column-normalised (every
column of norm 1) with bands <= min_sep, the columns in one participation pattern have disjoint
supports and sens^2 = max_P |P| = k ("Multi-Epoch Matrix Factorization Mechanisms for Private
Machine Learning", Choquette-Choo et al. 2023, arXiv:2211.06530; "(Amplified) Banded Matrix
Factorization: A unified approach to private training", Choquette-Choo et al. 2023,
arXiv:2306.08153). Streaming: z_t = (w_t - sum_{j=1..bands-1} C[t, t-j] z_{t-j}) / C[t, t].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core.participation import Participation
from mfnoise.strategies import band_storage, registry
from mfnoise.strategies.base import Strategy, StreamTable, as_float64, leading_size, round_to, rounded_reciprocal


@registry.family
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Banded(Strategy):
    """A lower-triangular banded C from its columns, shape (n, bands)."""

    columns: np.ndarray
    n: int = dataclasses.field(init=False)
    family = "banded"

    def __post_init__(self) -> None:
        cols = as_float64("banded strategy columns", self.columns, 2)
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "n", leading_size(cols))
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
    def from_dense(cls, c: np.ndarray, bands: int) -> Banded:
        """The banded part (rows t..t+bands-1 of each column t) of a dense lower-triangular C."""
        return cls(band_storage.columns_from_dense(c, bands))

    @classmethod
    def normalized_columns(cls, cols: np.ndarray) -> Banded:
        """Builds C from raw columns, each scaled to unit norm (so sens^2 = k with bands <= b)."""
        cols = np.asarray(cols, dtype=np.float64)
        norms = np.linalg.norm(cols, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError("cannot normalise a zero column")
        return cls(cols / norms)

    @property
    def bands(self) -> int:
        return band_storage.effective_bands(self.columns)

    def band_columns(self) -> np.ndarray:
        return np.array(self.columns)

    def columns_at(self, steps: Any) -> np.ndarray:
        steps = self._steps(steps)
        n, stored = self.columns.shape
        out = np.zeros((n, steps.size))
        for i, t in enumerate(steps):
            m = min(stored, n - t)
            out[t : t + m, i] = self.columns[t, :m]
        return out

    def squared_column_norms(self) -> np.ndarray:
        return np.sum(np.asarray(self.columns) ** 2, axis=1)

    def _dense(self) -> np.ndarray:
        return band_storage.dense_from_columns(self.columns)

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        import scipy.linalg  # here, not at module level: `import mfnoise` stays free of scipy

        z = np.asarray(z, dtype=np.float64)
        # LAPACK banded storage with l = bands - 1, u = 0: ab[j, t] = C[t + j, t].
        out = scipy.linalg.solve_banded((self.columns.shape[1] - 1, 0), self.columns.T, z.reshape(self.n, -1))
        return out.reshape(z.shape)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        stored = self.columns.shape[1]
        if stored <= p.min_sep or p.reachable_participations == 1:
            return sens_lib.column_norms(self.squared_column_norms(), p)
        return self._dense_sensitivity(
            p, f"bands={stored} exceeds min_sep={p.min_sep}, so columns of one pattern overlap"
        )

    def stream_table(self, dtype: Any) -> StreamTable:
        """"output" rows: table[t, 0] = 1 / C[t, t] and table[t, j] = C[t, t - j], rounded to dtype."""
        rows = round_to(band_storage.rows_from_columns(self.columns), dtype)
        rows[:, 0] = rounded_reciprocal(np.asarray(self.columns)[:, 0], dtype)
        return StreamTable("output", self.columns.shape[1] - 1, rows, dtype)

    def realised(self, dtype: Any) -> Banded:
        rows = np.array(self.stream_table(dtype).table)
        with np.errstate(divide="ignore"):
            rows[:, 0] = 1.0 / rows[:, 0]
        return Banded(band_storage.columns_from_rows(rows))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"columns": np.asarray(self.columns)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "bands": self.columns.shape[1]}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Banded:
        return cls(arrays["columns"])


jax.tree_util.register_dataclass(Banded, data_fields=["columns"], meta_fields=[])
