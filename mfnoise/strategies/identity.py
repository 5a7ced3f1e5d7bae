"""The identity strategy C = I: independent noise, i.e. DP-SGD."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core.participation import Participation
from mfnoise.core.workloads import check_n
from mfnoise.strategies import registry
from mfnoise.strategies.base import Strategy, StreamTable


@registry.family
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Identity(Strategy):
    """C = I (n×n). Its columns are orthonormal, so sens = sqrt(min(k, ceil(n / b)))."""

    n: int
    family = "identity"
    is_toeplitz = True
    is_identity = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", check_n(self.n))

    def _dense(self) -> np.ndarray:
        return np.eye(self.n)

    def toeplitz_coeffs(self) -> np.ndarray:
        return np.ones(1)

    @property
    def bands(self) -> int:
        return 1

    def band_columns(self) -> np.ndarray:
        return np.ones((self.n, 1))

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        return sens_lib.Sensitivity(math.sqrt(p.reachable_participations), True, "orthonormal")

    def stream_table(self, dtype: Any) -> StreamTable:
        return StreamTable("independent", 0, np.zeros((1, 1)), dtype)

    def realised(self, dtype: Any) -> Identity:
        """C = I in every dtype: the noise is the sample w_t itself."""
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Identity:
        return cls(int(params["n"]))


jax.tree_util.register_dataclass(Identity, data_fields=[], meta_fields=["n"])
