"""The Strategy interface shared by every factorization family.

A strategy is an invertible n×n lower-triangular matrix C; the mechanism releases C G + Z and the
optimizer sees g_t + (C^{-1} Z)_t. Each family is an immutable dataclass registered as a JAX pytree
(its arrays are leaves, its sizes static) in its own module, and registers itself here by its
``family`` name so that strategy files can be loaded.

What the noise generator runs. A strategy is stored in float64, but ``mfnoise.noise`` streams
(C'^{-1} W)_t from coefficients rounded to the noise dtype, and C' is not C: over the library's
BLTs at n = 1e5 run in float32, the bound on sens(C') is -1.8e-4 .. +2.6e-4 relative from sens(C)
(e.g. 27.746764 vs 27.745628 for momentum0.9-n100000-e16-blt4-rmse, where it is exact; the largest
values where a decay rounded to or past 1 leaves a growing tail and the bound is not exact).
Each family defines, in one place, the rounded coefficients it streams (``stream_table(dtype)``,
consumed by the generator) and the strategy they realise (``realised(dtype)``, built from the
same table), and ``noise_sensitivity(p, dtype)`` bounds sens(C', p): the one number the noise
must be scaled by.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

import jax
import numpy as np

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core.participation import Participation
from mfnoise.core.workloads import check_dense_size, check_n  # noqa: F401  (re-exported)

FAMILIES: dict[str, type["Strategy"]] = {}

STREAM_KINDS = ("identity", "output", "input", "blt")


@dataclasses.dataclass(frozen=True, eq=False)
class StreamTable:
    """The coefficients the noise generator runs for a strategy in one dtype (``mfnoise.noise``).

    Every entry of ``table`` (float64) is exactly representable in ``dtype``, so converting it to
    ``dtype`` inside the generator is exact: the realised strategy built from this table is what runs.

    kind "identity": z_t = w_t (table unused).
    kind "output":  z_t = s_t (w_t - sum_{j=1..m} a_{t,j} z_{t-j}), table (rows, m + 1) with
        table[r, 0] = s_t (the reciprocal of C'[t, t], rounded) and table[r, j] = a_{t,j} = C'[t, t - j];
        row r = min(t, rows - 1). So C'[t, t] = 1 / s_t, the only entry of C' not in the table.
    kind "input":   z_t = sum_{j=0..m} table[r, j] w_{t-j}, i.e. C'^{-1}[t, t - j] = table[r, j].
    kind "blt":     table (2, d) = (theta', omega'): C'^{-1} is the BLT with these decays and scales,
        z_t = w_t + sum_i omega'_i s_i, s_i <- theta'_i s_i + w_t (m = d buffers).
    """

    kind: str
    m: int
    table: np.ndarray
    dtype: np.dtype

    def __post_init__(self) -> None:
        if self.kind not in STREAM_KINDS:
            raise ValueError(f"stream kind must be one of {STREAM_KINDS}, got {self.kind!r}")
        table = np.array(self.table, dtype=np.float64)
        if not np.all(np.isfinite(table)):
            raise ValueError(
                f"the strategy's coefficients are not finite in {np.dtype(self.dtype).name} "
                f"(overflow when rounded: {table[~np.isfinite(table)][:3]}); stream it in a wider dtype"
            )
        if self.kind == "output" and np.any(table[:, 0] == 0):
            raise ValueError(f"the strategy's diagonal is too large for {np.dtype(self.dtype).name}: its reciprocal "
                             "underflows to 0; stream it in a wider dtype")
        if not np.array_equal(round_to(table, self.dtype), table):
            raise ValueError(f"stream table entries are not representable in {np.dtype(self.dtype).name}")
        table.setflags(write=False)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))


def round_to(x: Any, dtype: Any) -> np.ndarray:
    """x rounded to ``dtype`` (round to nearest even, as numpy / ml_dtypes convert), back in float64."""
    return np.asarray(np.asarray(x, np.float64).astype(np.dtype(dtype)), np.float64)


def rounded_reciprocal(d: Any, dtype: Any) -> np.ndarray:
    """s = 1 / d rounded to ``dtype``: the multiplier the generator uses in place of dividing by d."""
    with np.errstate(divide="ignore", over="ignore"):
        return round_to(1.0 / np.asarray(d, np.float64), dtype)


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

    # -- what the noise generator runs ---------------------------------------------------------
    def stream_table(self, dtype: Any) -> StreamTable:
        """The coefficients, rounded to ``dtype``, from which ``mfnoise.noise`` streams (C'^{-1} W)_t."""
        raise ValueError(f"no noise generator for strategy family {self.family!r}")

    def realised(self, dtype: Any) -> "Strategy":
        """The strategy C' whose C'^{-1} the noise generator computes in ``dtype``.

        Built from ``stream_table(dtype)`` (the same rounded coefficients the generator converts to
        ``dtype``), so the two cannot disagree. Exact except for the diagonal 1 / s_t of the
        "output" families, which is the float64 nearest to it (``noise_sensitivity`` covers that).
        Arithmetic rounding inside the recurrence (one rounding per operation, as in any sampler)
        is not part of C'.
        """
        raise ValueError(f"no noise generator for strategy family {self.family!r}")

    def noise_sensitivity(self, p: Participation, dtype: Any) -> sens_lib.Sensitivity:
        """A proven upper bound on sens(C', p) for C' = ``realised(dtype)``: what the noise is scaled by.

        Returns max(sens(C, p), sens(C', p)) * (1 + sqrt(k) 2^-52), k = p.reachable_participations.
        sens(C', p) bounds what runs; taking the larger of the two means rounding never lowers the
        noise below what the stored strategy's accounting assumed. The factor covers the float64
        rounding of C''s reciprocal diagonal entries 1 / s_t (relative error e <= 2^-53 each): with
        C' = C'' - E, E diagonal with |E_tt| <= 2^-52 |C''_tt|, sens(C') <= sens(C'') + sens(E) and
        sens(E) <= sqrt(k) max_t |E_tt| <= 2^-52 sqrt(k) max_t ||C''[:, t]|| <= 2^-52 sqrt(k) sens(C'').
        """
        self._check_participation(p)
        stored = self.sensitivity(p)
        real_strategy = self.realised(dtype)
        name = np.dtype(dtype).name
        if real_strategy is self:
            real = stored
        else:
            try:
                real = real_strategy.sensitivity(p)
            except ValueError as e:
                raise ValueError(f"cannot bound the sensitivity of this {self.family} strategy as realised in "
                                 f"{name} (its coefficients rounded to {name}): {e}") from None
        value = max(float(stored.value), float(real.value)) * (1.0 + math.sqrt(p.reachable_participations) * 2.0**-52)
        return sens_lib.Sensitivity(value, False, f"max(stored {stored.method}, {name}-realised {real.method})")

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
        """Writes a strategy file (see ``mfnoise.strategies.io``); returns the path written."""
        from mfnoise.strategies import io

        return io.save(self, path, **metadata)

    def noise_generator(self, *args: Any, **kwargs: Any):
        """The streaming generator of (C^{-1} W)_t (see ``mfnoise.noise``)."""
        from mfnoise.training import noise

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
