"""Toeplitz strategies defined by a banded inverse: C^{-1}[i, j] = r_{i-j} for i - j < bands.

BISR (banded inverse square root, "Banded Square Root Matrix Factorization for Differentially
Private Model Training", Kalinin & Lampert 2024, arXiv:2405.13763) is of this kind. C itself is a
full Toeplitz matrix (the series reciprocal of r), so ``bands`` is None; ``inverse_bands`` is the
length of r, and the noise C^{-1} W streams from the last inverse_bands - 1 inputs w.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core import series
from mfnoise.core.participation import Participation
from mfnoise.core.workloads import check_n
from mfnoise.strategies import registry
from mfnoise.strategies.base import Strategy, StreamTable, as_float64, round_to
from mfnoise.strategies.toeplitz import majorant_bound, toeplitz_sensitivity


@registry.family
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class InverseToeplitz(Strategy):
    """Toeplitz C of size n whose inverse has first column ``inverse_coeffs`` (length bands)."""

    inverse_coeffs: np.ndarray
    n: int
    family = "inverse-toeplitz"
    is_toeplitz = True

    def __post_init__(self) -> None:
        r = as_float64("inverse toeplitz coefficients", self.inverse_coeffs, 1)
        object.__setattr__(self, "inverse_coeffs", r)
        object.__setattr__(self, "n", check_n(self.n))
        if not isinstance(r, np.ndarray):
            return
        if not 1 <= r.size <= self.n:
            raise ValueError(f"inverse has {r.size} coefficients, expected 1..n={self.n}")
        if r[0] == 0:
            raise ValueError("inverse toeplitz coefficient r_0 = 0 is not invertible")

    @property
    def inverse_bands(self) -> int:
        """The number of bands of C^{-1} (the length of r)."""
        return int(self.inverse_coeffs.shape[0])

    def toeplitz_coeffs(self) -> np.ndarray:
        return series.reciprocal(self.inverse_coeffs, self.n)

    def _dense(self) -> np.ndarray:
        return series.to_dense(self.toeplitz_coeffs(), self.n)

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        return series.apply(self.inverse_coeffs, z)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        """sens(C, p) from C's coefficients c = 1 / r (``strategies.toeplitz.toeplitz_sensitivity``).

        Exact where a proof applies: one reachable participation (the first column's norm, any
        signs), or c non-negative and non-increasing (the closed form, worst pattern
        {0, b, 2b, ...}); the closed form is never applied to other coefficients. Otherwise a
        proven upper bound, exact=False: the majorant bound sens(E, p), E the Toeplitz matrix of
        e_j = max_{l >= j} |c_l| (the bound the optimizer's loss minimises), or, for small n, the
        dense routine where it is smaller. Where the generic routine would refuse (n too large
        for the dense routine and the majorant bound more than ``MAJORANT_SLACK`` above a lower
        bound), the majorant bound is returned: it is proven for any coefficients, so optimized
        strategies (``mfnoise.optim.inverse_toeplitz``) always have a sensitivity.
        """
        self._check_participation(p)
        c = self.toeplitz_coeffs()
        try:
            return toeplitz_sensitivity(self, c, p)
        except ValueError:
            return majorant_bound(c, p)[0]

    def stream_table(self, dtype: Any) -> StreamTable:
        """One "input" row: C^{-1}[t, t - j] = r_j, rounded to dtype."""
        r = round_to(self.inverse_coeffs, dtype)
        return StreamTable("input", r.size - 1, r[None, :], dtype)

    def realised(self, dtype: Any) -> InverseToeplitz:
        """The rounded r define C'^{-1} exactly (no reciprocal: r_0 is a multiplier)."""
        return InverseToeplitz(self.stream_table(dtype).table[0], self.n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"inverse_coeffs": np.asarray(self.inverse_coeffs)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "bands": self.inverse_bands}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> InverseToeplitz:
        return cls(arrays["inverse_coeffs"], int(params["n"]))


jax.tree_util.register_dataclass(InverseToeplitz, data_fields=["inverse_coeffs"], meta_fields=["n"])
