"""Dense strategies: any invertible lower-triangular n×n C (a reference for small n)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core.participation import Participation
from mfnoise.strategies.base import Strategy, StreamTable, as_float64, frozen_dataclass, register, round_to, rounded_reciprocal


@frozen_dataclass
class Dense(Strategy):
    """C given entry by entry. Memory O(n^2); streaming its noise needs the whole history."""

    matrix: np.ndarray
    family = "dense"

    def __post_init__(self) -> None:
        c = as_float64("dense strategy matrix", self.matrix, 2)
        object.__setattr__(self, "matrix", c)
        if not isinstance(c, np.ndarray):
            return
        if c.shape[0] != c.shape[1]:
            raise ValueError(f"dense strategy must be square, got shape {c.shape}")
        if np.any(np.triu(c, 1) != 0):
            raise ValueError("dense strategy must be lower triangular")
        diag = np.diag(c)
        if np.any(diag == 0):
            raise ValueError(f"dense strategy is singular: C[{int(np.argmin(np.abs(diag)))}, same] = 0")

    @property
    def n(self) -> int:  # type: ignore[override]
        return int(self.matrix.shape[0])

    def _dense(self) -> np.ndarray:
        return np.array(self.matrix)

    def dense(self, max_n: int | None = None) -> np.ndarray:
        return np.array(self.matrix)  # already materialised: no size check needed

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        out = scipy.linalg.solve_triangular(self.matrix, z.reshape(self.n, -1), lower=True)
        return out.reshape(z.shape)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        return sens_lib.dense(self.matrix, p)

    def stream_table(self, dtype: Any) -> StreamTable:
        """"output" rows over the whole history: table[t, 0] = 1 / C[t, t], table[t, j] = C[t, t - j]."""
        c = np.asarray(self.matrix)
        n = c.shape[0]
        rows = np.zeros((n, n))
        rows[:, 0] = rounded_reciprocal(np.diagonal(c), dtype)
        for j in range(1, n):
            rows[j:, j] = round_to(np.diagonal(c, -j), dtype)
        return StreamTable("output", n - 1, rows, dtype)

    def realised(self, dtype: Any) -> "Dense":
        rows = self.stream_table(dtype).table
        n = rows.shape[0]
        c = np.zeros((n, n))
        idx = np.arange(n)
        with np.errstate(divide="ignore"):
            c[idx, idx] = 1.0 / rows[:, 0]
        for j in range(1, n):
            c[idx[j:], idx[: n - j]] = rows[j:, j]
        return Dense(c)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"matrix": np.asarray(self.matrix)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "Dense":
        return cls(arrays["matrix"])


register(Dense, data_fields=["matrix"], meta_fields=[])
