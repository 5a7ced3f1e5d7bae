"""Dense strategies: any invertible lower-triangular n×n C (a reference for small n)."""

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
class Dense(Strategy):
    """C given entry by entry. Memory O(n^2); streaming its noise needs the whole history."""

    matrix: np.ndarray
    n: int = dataclasses.field(init=False)
    family = "dense"

    def __post_init__(self) -> None:
        c = as_float64("dense strategy matrix", self.matrix, 2)
        object.__setattr__(self, "matrix", c)
        object.__setattr__(self, "n", leading_size(c))
        if not isinstance(c, np.ndarray):
            return
        if c.shape[0] != c.shape[1]:
            raise ValueError(f"dense strategy must be square, got shape {c.shape}")
        if np.any(np.triu(c, 1) != 0):
            raise ValueError("dense strategy must be lower triangular")
        diag = np.diag(c)
        if np.any(diag == 0):
            raise ValueError(f"dense strategy is singular: C[{int(np.argmin(np.abs(diag)))}, same] = 0")

    def _dense(self) -> np.ndarray:
        return np.array(self.matrix)

    def dense(self, max_n: int | None = None) -> np.ndarray:
        return np.array(self.matrix)  # already materialised: no size check needed

    @property
    def bands(self) -> int:
        i, j = np.nonzero(np.asarray(self.matrix))
        return int(np.max(i - j)) + 1

    def band_columns(self) -> np.ndarray:
        return band_storage.columns_from_dense(self.matrix, self.bands)

    def columns_at(self, steps: Any) -> np.ndarray:
        return np.array(np.asarray(self.matrix)[:, self._steps(steps)])

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        import scipy.linalg  # here, not at module level: `import mfnoise` stays free of scipy

        z = np.asarray(z, dtype=np.float64)
        out = scipy.linalg.solve_triangular(self.matrix, z.reshape(self.n, -1), lower=True)
        return out.reshape(z.shape)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        return sens_lib.dense(self.matrix, p)

    def stream_table(self, dtype: Any) -> StreamTable:
        """"output" rows over the whole history: table[t, 0] = 1 / C[t, t], table[t, j] = C[t, t - j]."""
        n = self.n
        rows = round_to(band_storage.rows_from_columns(band_storage.columns_from_dense(self.matrix, n)), dtype)
        rows[:, 0] = rounded_reciprocal(np.diagonal(np.asarray(self.matrix)), dtype)
        return StreamTable("output", n - 1, rows, dtype)

    def realised(self, dtype: Any) -> Dense:
        rows = np.array(self.stream_table(dtype).table)
        with np.errstate(divide="ignore"):
            rows[:, 0] = 1.0 / rows[:, 0]
        return Dense(band_storage.dense_from_columns(band_storage.columns_from_rows(rows)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"matrix": np.asarray(self.matrix)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Dense:
        return cls(arrays["matrix"])


jax.tree_util.register_dataclass(Dense, data_fields=["matrix"], meta_fields=[])
