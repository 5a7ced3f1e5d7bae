"""Toeplitz and banded Toeplitz strategies: C[i, j] = c_{i-j}.

With ``coeffs`` of length bands < n the strategy is banded Toeplitz. Products, inverses and the
decoder B = A C^{-1} of Toeplitz matrices are Toeplitz (power series, ``mfnoise.core.series``), so
error and sensitivity cost O(n log n) or O(n * bands), never O(n^2). ``toeplitz_sensitivity`` is
the sensitivity of every Toeplitz family (identity, Toeplitz, BLT, inverse BLT, inverse Toeplitz).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core import series
from mfnoise.core.participation import Participation
from mfnoise.core.workloads import check_n
from mfnoise.strategies import registry
from mfnoise.strategies.base import Strategy, StreamTable, as_float64, round_to, rounded_reciprocal

MAJORANT_SLACK = 1e-3
"""Largest relative gap between the majorant bound and a lower bound accepted without the dense routine."""


def toeplitz_sensitivity(strategy: Strategy, coeffs: np.ndarray, p: Participation) -> sens_lib.Sensitivity:
    """Sensitivity of a Toeplitz C from its first column ``coeffs`` (zero-padded to n).

    Banded with bands <= min_sep: the exact column-norm DP (any signs); single participation: the
    largest column norm (exact, any C; method ``max-column-norm``). Non-negative,
    non-increasing: the exact worst pattern {0, b, 2b, ...}; the same up to rounding: a proven bound
    within 1e-9 of it (``sensitivity.toeplitz_envelope``). Otherwise the majorant bound
    (``majorant_bound``) when it is within 1e-9 of a lower bound, else the dense routine (the
    smaller of the two bounds), else, where n is too large for the dense routine, the majorant
    bound if it is within ``MAJORANT_SLACK`` of the lower bound; otherwise refused.
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
    bound, lower = majorant_bound(c, p)
    if bound.value <= lower * (1 + 1e-9):
        return bound
    why = f"its coefficients are not non-negative and non-increasing and bands={bands} > min_sep={p.min_sep}"
    try:
        dense = strategy._dense_sensitivity(p, why)
    except ValueError as e:
        if bound.value <= lower * (1 + MAJORANT_SLACK):
            return bound
        raise ValueError(f"{e}; the majorant bound {bound.value:.9g} is {bound.value / lower - 1:.3g} "
                         f"above the lower bound {lower:.9g} (more than {MAJORANT_SLACK})") from None
    return dense if dense.value <= bound.value else bound


def majorant_bound(coeffs: np.ndarray, p: Participation) -> tuple[sens_lib.Sensitivity, float]:
    """(a proven upper bound on sens(C, p), a lower bound) for a Toeplitz C with any coefficients.

    Upper: with e_j = max_{l >= j} |c_l| (the smallest non-increasing majorant of |c|) and E its
    Toeplitz matrix, |X| = |C^T C| <= |C|^T |C| <= E^T E entrywise, so
    sens(C)^2 <= max_P sum_{i,j in P} |X_ij| <= max_P sum_{i,j in P} (E^T E)_ij = sens(E)^2, exact
    for E by ``sensitivity.toeplitz``. Lower: ||C 1_P|| for the pattern P = {0, b, ..., (m-1) b}
    (every u_t equal). Tight when c is non-negative and non-increasing except for small departures,
    e.g. a slowly growing tail (a float32-rounded BLT whose largest decay reached 1).
    """
    n, b, m = p.n, p.min_sep, p.reachable_participations
    c = np.zeros(n)
    coeffs = np.asarray(coeffs, dtype=np.float64)[:n]
    c[: coeffs.size] = coeffs
    envelope = np.maximum.accumulate(np.abs(c)[::-1])[::-1]
    upper = sens_lib.toeplitz(envelope, p).value
    v = np.zeros(n)
    for q in range(m):
        v[q * b :] += c[: n - q * b]
    return sens_lib.Sensitivity(upper, False, "toeplitz-abs-majorant"), float(np.linalg.norm(v))


@registry.family
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
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
        nonzero = np.flatnonzero(np.asarray(self.coeffs))
        return int(nonzero[-1]) + 1 if nonzero.size else 1

    def band_columns(self) -> np.ndarray:
        c = np.asarray(self.coeffs)[: self.bands]
        cols = np.tile(c, (self.n, 1))
        t, j = np.indices(cols.shape)
        cols[t + j >= self.n] = 0.0
        return cols

    def toeplitz_coeffs(self) -> np.ndarray:
        return np.asarray(self.coeffs)

    def _dense(self) -> np.ndarray:
        return series.to_dense(self.coeffs, self.n)

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        return series.solve(self.coeffs, z)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        return toeplitz_sensitivity(self, self.coeffs, p)

    def stream_table(self, dtype: Any) -> StreamTable:
        """One "output" row for every step: (1 / c_0, c_1, ..., c_{bands-1}) rounded to dtype."""
        c = np.asarray(self.coeffs)
        row = np.concatenate([rounded_reciprocal(c[:1], dtype), round_to(c[1:], dtype)])
        return StreamTable("output", c.size - 1, row[None, :], dtype)

    def realised(self, dtype: Any) -> Toeplitz:
        row = self.stream_table(dtype).table[0]
        with np.errstate(divide="ignore"):
            return Toeplitz(np.concatenate([1.0 / row[:1], row[1:]]), self.n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"coeffs": np.asarray(self.coeffs)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "bands": int(self.coeffs.shape[0])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Toeplitz:
        return cls(arrays["coeffs"], int(params["n"]))


jax.tree_util.register_dataclass(Toeplitz, data_fields=["coeffs"], meta_fields=["n"])
