"""Toeplitz and banded Toeplitz strategies: C[i, j] = c_{i-j}.

With ``coeffs`` of length bands < n the strategy is banded Toeplitz. Products, inverses and the
decoder B = A C^{-1} of Toeplitz matrices are Toeplitz (power series, ``mfnoise.series``), so
error and sensitivity cost O(n log n) or O(n * bands), never O(n^2).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mfnoise import sensitivity as sens_lib
from mfnoise import series
from mfnoise.participation import Participation
from mfnoise.strategy import Strategy, as_float64, check_n, frozen_dataclass, register


def toeplitz_sensitivity(strategy: Strategy, coeffs: np.ndarray, p: Participation) -> sens_lib.Sensitivity:
    """Sensitivity of a Toeplitz C from its first column ``coeffs`` (zero-padded to n).

    Banded with bands <= min_sep: the exact column-norm DP (any signs). Non-negative,
    non-increasing: the exact worst pattern {0, b, 2b, ...}; the same up to rounding: a proven bound
    within 1e-9 of it (``sensitivity.toeplitz_envelope``). Otherwise the dense routine.
    """
    n = p.n
    c = np.asarray(coeffs, dtype=np.float64)[:n]
    last = np.flatnonzero(c)
    bands = int(last[-1]) + 1 if last.size else 1
    if bands <= p.min_sep or p.reachable_participations == 1:
        sq = np.cumsum(c[:bands] ** 2)  # ||C[:, t]||^2 = sum_{j < min(bands, n - t)} c_j^2
        return sens_lib.column_norms(sq[np.minimum(bands, n - np.arange(n)) - 1], p)
    if sens_lib.is_nonneg_nonincreasing(c):
        return sens_lib.toeplitz(c, p)
    if c[0] > 0:
        # Monotone up to rounding (e.g. BISR's C = 1 / r computed by FFT at large n): a proven
        # upper bound within 1e-9 relative of the exact value, instead of a refusal.
        bound, gap = sens_lib.toeplitz_envelope(c, p)
        if gap <= 1e-9 * c[0] / math.sqrt(p.reachable_participations):
            return bound
    return strategy._dense_sensitivity(
        p, f"its coefficients are not non-negative and non-increasing and bands={bands} > min_sep={p.min_sep}"
    )


@frozen_dataclass
class Toeplitz(Strategy):
    """Lower-triangular Toeplitz C of size n with first column ``coeffs`` (length bands <= n)."""

    coeffs: np.ndarray
    n: int
    family = "toeplitz"
    is_toeplitz = True

    def __post_init__(self) -> None:
        c = as_float64("toeplitz coefficients", self.coeffs, 1)
        object.__setattr__(self, "coeffs", c)
        object.__setattr__(self, "n", check_n(self.n))
        if not isinstance(c, np.ndarray):
            return
        if not 1 <= c.size <= self.n:
            raise ValueError(f"toeplitz strategy has {c.size} coefficients, expected 1..n={self.n}")
        if c[0] == 0:
            raise ValueError("toeplitz strategy is singular: c_0 = 0")

    @property
    def bands(self) -> int:
        return int(self.coeffs.shape[0])

    def toeplitz_coeffs(self) -> np.ndarray:
        return np.asarray(self.coeffs)

    def _dense(self) -> np.ndarray:
        return series.to_dense(self.coeffs, self.n)

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        return series.solve(self.coeffs, z)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        return toeplitz_sensitivity(self, self.coeffs, p)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"coeffs": np.asarray(self.coeffs)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "bands": self.bands}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "Toeplitz":
        return cls(arrays["coeffs"], int(params["n"]))


register(Toeplitz, data_fields=["coeffs"], meta_fields=["n"])
