"""The Strategy interface shared by every factorization family.

A strategy is an invertible n×n lower-triangular matrix C; the mechanism releases C G + Z and the
optimizer sees g_t + (C^{-1} Z)_t. Each family is an immutable dataclass registered as a JAX pytree
(its arrays are leaves, its sizes static) in its own module, and registers itself here by its
``family`` name so that strategy files can be loaded.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from mfnoise import sensitivity as sens_lib
from mfnoise.participation import Participation
from mfnoise.workloads import check_dense_size, check_n  # noqa: F401  (re-exported)

FAMILIES: dict[str, type["Strategy"]] = {}


class Strategy(abc.ABC):
    """Base class of the strategy families (identity, dense, banded, toeplitz, blt, ...)."""

    family: ClassVar[str]
    is_toeplitz: ClassVar[bool] = False
    """True when C[i, j] = c_{i-j}; then ``toeplitz_coeffs()`` returns c."""
    n: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            FAMILIES[cls.family] = cls

    # -- the matrix -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _dense(self) -> np.ndarray:
        """The n×n float64 matrix C (called after the size check)."""

    def dense(self, max_n: int | None = None) -> np.ndarray:
        """The n×n float64 matrix C; refused above ``max_n`` (default workloads.DENSE_LIMIT)."""
        check_dense_size(self.n, max_n, f"{self.family} strategy")
        return self._dense()

    def toeplitz_coeffs(self) -> np.ndarray | None:
        """First column of C when C is Toeplitz (implicitly zero-padded to n), else None."""
        return None

    @abc.abstractmethod
    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        """C^{-1} z in float64 for a block of rows z of shape (n, ...)."""

    # -- privacy --------------------------------------------------------------------------------
    @abc.abstractmethod
    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        """sens(C, p) (DESIGN.md); exact, or a proven upper bound flagged ``exact=False``."""

    def _check_participation(self, p: Participation) -> None:
        if not isinstance(p, Participation):
            raise TypeError(f"expected a Participation, got {type(p).__name__}")
        if p.n != self.n:
            raise ValueError(f"participation has n={p.n} but the {self.family} strategy has n={self.n}")

    def _dense_sensitivity(self, p: Participation, why: str) -> sens_lib.Sensitivity:
        """Fallback to the dense routine, refused with ``why`` when n is too large for it."""
        try:
            c = self.dense()
        except ValueError as e:
            raise ValueError(f"cannot bound the sensitivity of this {self.family} strategy: {why}; "
                             f"the dense fallback is refused ({e})") from None
        return sens_lib.dense(c, p)

    # -- persistence ----------------------------------------------------------------------------
    @abc.abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that define the strategy (saved in strategy files)."""

    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters besides the arrays."""
        return {"n": self.n}

    @classmethod
    @abc.abstractmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "Strategy":
        """Inverse of (arrays(), params())."""

    def save(self, path: str, **metadata: Any) -> str:
        """Writes a strategy file (see ``mfnoise.io``); returns the path written."""
        from mfnoise import io

        return io.save(self, path, **metadata)

    def noise_generator(self, *args: Any, **kwargs: Any):
        """The streaming generator of (C^{-1} W)_t (see ``mfnoise.noise``)."""
        from mfnoise import noise

        return noise.generator(self, *args, **kwargs)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"


def register(cls: type, data_fields: list[str], meta_fields: list[str]) -> type:
    """Registers a frozen strategy dataclass as a JAX pytree (arrays as leaves)."""
    jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)
    return cls


def as_float64(name: str, x: Any, ndim: int) -> np.ndarray:
    """A finite float64 copy of x with ``ndim`` dimensions, or a ValueError naming ``name``.

    Tracers and other non-array leaves (inside jit, tree_map) pass through unchecked: validation
    happens when a strategy is built from concrete values.
    """
    if isinstance(x, jax.core.Tracer) or not _is_arraylike(x):
        return x
    a = np.array(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{name} has a non-finite entry {a[bad]} at index {bad if len(bad) != 1 else bad[0]}")
    a.setflags(write=False)
    return a


def frozen_dataclass(cls: type) -> type:
    return dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)


def _is_arraylike(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array, list, tuple, float, int, np.number))
