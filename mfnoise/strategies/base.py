"""The Strategy interface shared by every factorization family (docs/design.md).

A strategy is an invertible n×n lower-triangular matrix C; the mechanism releases C G + Z and the
optimizer sees g_t + (C^{-1} Z)_t. Each family is a frozen dataclass registered as a JAX pytree
(its arrays are leaves, its sizes static) in its own module, and registered by its ``family``
name in ``mfnoise.strategies.registry``. A strategy tells its consumers how it streams and what
it is, so that no module outside ``mfnoise/strategies/`` branches on a family name:

* what it is: ``dense()``, ``columns_at(steps)`` (C[:, steps]), ``squared_column_norms()``,
  ``bands`` (or None), ``band_columns()``, ``toeplitz_coeffs()``, ``inverse_apply(z)``;
* its privacy: ``sensitivity(p)``;
* how it streams: ``stream_table(dtype)`` (a ``StreamTable``), ``state_arrays()``,
  ``realised(dtype)``, ``noise_sensitivity(p, dtype)``, ``runs_exactly(dtype)``;
* its file: ``arrays()``, ``params()``, ``from_arrays(...)``, ``save(path)``.

What the noise generator runs. A strategy is stored in float64, but ``mfnoise.training.noise``
streams (C'^{-1} W)_t from coefficients rounded to the noise dtype, and C' is not C: over the
library's BLTs at n = 1e5 run in float32, the bound on sens(C') is -1.8e-4 .. +2.6e-4 relative
from sens(C) (e.g. 27.746764 vs 27.745628 for momentum0.9-n100000-e16-blt4-rmse, where it is
exact; the largest values where a decay rounded to or past 1 leaves a growing tail and the bound
is not exact). Each family defines, in one place, the rounded coefficients it streams
(``stream_table(dtype)``, consumed by the generator) and the strategy they realise
(``realised(dtype)``, built from the same table), and ``noise_sensitivity(p, dtype)`` bounds
sens(C', p): the one number the noise must be scaled by.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
from typing import Any, ClassVar

import jax
import numpy as np
from jax.core import Tracer

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core.participation import Participation, check_participation
from mfnoise.core.workloads import Workload, check_dense_size
from mfnoise.strategies import files

STREAM_KINDS = ("independent", "output", "input", "buffers-input", "buffers-output")


@dataclasses.dataclass(frozen=True, eq=False)
class StreamTable:
    """The coefficients the noise generator runs for a strategy in one dtype (``mfnoise.training.noise``).

    Every entry of ``table`` (float64) is exactly representable in ``dtype``, so converting it to
    ``dtype`` inside the generator is exact: the realised strategy built from this table is what
    runs. ``m`` is the number of parameter-sized state arrays the recurrence keeps.

    The kinds name recurrences, not families (each family picks its kind):

    "independent": z_t = w_t (C' = I; table unused, m = 0).
    "output": z_t = s_t (w_t - sum_{j=1..m} a_{t,j} z_{t-j}), table (rows, m + 1) with
        table[r, 0] = s_t (the reciprocal of C'[t, t], rounded) and table[r, j] = a_{t,j} = C'[t, t - j];
        row r = min(t, rows - 1). So C'[t, t] = 1 / s_t, the only entry of C' not in the table.
        State: the last m outputs z.
    "input": z_t = sum_{j=0..m} table[r, j] w_{t-j}, i.e. C'^{-1}[t, t - j] = table[r, j].
        State: the last m inputs w.
    "buffers-input": table (2, m) = (theta', omega'); C'^{-1} is the BLT with these decays and
        scales: z_t = w_t + sum_i omega'_i s_i, then s_i <- theta'_i s_i + w_t (m buffers s).
    "buffers-output": table (2, m) = (theta, omega); C' is the BLT with these decays and scales,
        and z solves C' z = w: z_t = w_t - sum_i omega_i s_i, then s_i <- theta_i s_i + z_t.
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
    """Base class of the strategy families (the registry ``mfnoise.strategies.registry.FAMILIES``)."""

    family: ClassVar[str]
    """The family's name in files, the CLI, the library and JSON."""
    is_toeplitz: ClassVar[bool] = False
    """True when C[i, j] = c_{i-j}; then ``toeplitz_coeffs()`` returns c."""
    is_identity: ClassVar[bool] = False
    """True when C = I by construction: no coefficient or state is rounded, so its noise runs in any dtype."""
    n: int

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

    @property
    def bands(self) -> int | None:
        """The number of bands of C, the smallest b with C[i, j] = 0 for i - j >= b (trailing zero
        bands of the stored form do not count, so it can be below ``params()["bands"]``), or None
        when the family does not hold C in banded form (its C is in general full)."""
        return None

    def band_columns(self) -> np.ndarray | None:
        """C in banded storage by columns (``band_storage``): shape (n, bands), [t, j] = C[t + j, t],
        or None when ``bands`` is None. O(n * bands) memory."""
        return None

    def columns_at(self, steps: Any) -> np.ndarray:
        """C[:, steps] as an (n, len(steps)) float64 array, from the family's own arrays.

        Toeplitz C: column t holds c_0, c_1, ... from row t down. Others: from the dense matrix
        unless the family overrides it (banded families do, from their columns).
        """
        steps = self._steps(steps)
        c = self.toeplitz_coeffs()
        if c is None:
            return self.dense()[:, steps]
        n = self.n
        first = np.zeros(n)
        c = np.asarray(c, np.float64)[:n]
        first[: c.size] = c
        out = np.zeros((n, steps.size))
        for i, t in enumerate(steps):
            out[t:, i] = first[: n - t]
        return out

    def squared_column_norms(self) -> np.ndarray:
        """||C[:, t]||^2 for t = 0..n-1 (Toeplitz: sum_{j < n - t} c_j^2, O(n))."""
        c = self.toeplitz_coeffs()
        if c is None:
            return np.sum(self.dense() ** 2, axis=0)
        n = self.n
        sq = np.zeros(n)
        c = np.asarray(c, np.float64)[:n]
        sq[: c.size] = c**2
        return np.cumsum(sq)[n - 1 - np.arange(n)]

    def _steps(self, steps: Any) -> np.ndarray:
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        if steps.size and (steps.min() < 0 or steps.max() >= self.n):
            raise ValueError(f"steps must be in [0, n={self.n}), got {steps.min()}..{steps.max()}")
        return steps

    @abc.abstractmethod
    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        """C^{-1} z in float64 for a block of rows z of shape (n, ...)."""

    def closed_form_decoder_norms(self, workload: Workload) -> tuple[float, float] | None:
        """(||B||_F^2, max_i ||B[i, :]||^2) of B = A C^{-1} from a closed form that touches no array
        of length n, or None (the default) when the family has none for this workload
        (``mfnoise.strategies.error.decoder_norms`` asks first, then materialises)."""
        return None

    # -- privacy --------------------------------------------------------------------------------
    @abc.abstractmethod
    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        """sens(C, p) (docs/design.md); exact, or a proven upper bound flagged ``exact=False``."""

    def _check_participation(self, p: Participation) -> None:
        check_participation(p, self.n, f"the {self.family} strategy")

    def _dense_sensitivity(self, p: Participation, why: str) -> sens_lib.Sensitivity:
        """Fallback to the dense routine, refused with ``why`` when n is too large for it."""
        try:
            c = self.dense()
        except ValueError as e:
            raise ValueError(f"cannot bound the sensitivity of this {self.family} strategy: {why}; "
                             f"the dense fallback is refused ({e})") from None
        return sens_lib.dense(c, p)

    # -- what the noise generator runs ---------------------------------------------------------
    @abc.abstractmethod
    def stream_table(self, dtype: Any) -> StreamTable:
        """The coefficients, rounded to ``dtype``, from which the generator streams (C'^{-1} W)_t."""

    def state_arrays(self) -> int:
        """m: parameter-sized arrays of noise state the generator keeps (bytes = m x params x itemsize).

        It does not depend on the dtype (``stream_table(float64).m``): 0 for C = I, bands - 1 for
        banded and Toeplitz C and for a banded C^{-1}, the buffers of a BLT, n - 1 for a dense C.
        """
        return self.stream_table(np.float64).m

    @abc.abstractmethod
    def realised(self, dtype: Any) -> Strategy:
        """The strategy C' whose C'^{-1} the noise generator computes in ``dtype``.

        Built from ``stream_table(dtype)`` (the same rounded coefficients the generator converts to
        ``dtype``), so the two cannot disagree. Exact except for the diagonal 1 / s_t of the
        "output" tables, which is the float64 nearest to it (``noise_sensitivity`` covers that).
        Arithmetic rounding inside the recurrence (one rounding per operation, as in any sampler)
        is not part of C'.
        """

    def runs_exactly(self, dtype: Any) -> bool:
        """True when the generator in ``dtype`` runs C itself: C' = C entry for entry, every
        reciprocal s_t an exact power of two (so 1 / s_t is exact too) within 4x of ``dtype``'s
        normal range."""
        table = self.stream_table(dtype)
        if table.kind == "independent":
            return True
        if table.kind == "output":
            s = np.abs(table.table[:, 0])
            mantissa, _ = np.frexp(s)
            tiny = float(np.finfo(np.dtype(dtype)).tiny)
            if not (np.all(mantissa == 0.5) and np.all((s >= 4 * tiny) & (s <= 1.0 / (4 * tiny)))):
                return False
        real = self.realised(dtype)
        if real is self:
            return True
        if type(real) is not type(self):
            return False
        mine, theirs = self.arrays(), real.arrays()
        return mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)

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
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Strategy:
        """Inverse of (arrays(), params())."""

    def save(self, path: str | os.PathLike, **metadata: Any) -> str:
        """Writes a strategy file (``mfnoise.strategies.files.write``); returns the path written."""
        return files.write(path, self.family, self.params(), self.arrays(), **metadata)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"


def as_float64(name: str, x: Any, ndim: int) -> Any:
    """A finite, read-only float64 copy of x with ``ndim`` dimensions, or a ValueError naming ``name``.

    Tracers and other non-array leaves (inside jit, tree_map) pass through unchecked: validation
    happens when a strategy is built from concrete values.
    """
    if isinstance(x, Tracer) or not _is_arraylike(x):
        return x
    a = np.array(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{name} has a non-finite entry {a[bad]} at index {bad if len(bad) != 1 else bad[0]}")
    a.setflags(write=False)
    return a


def leading_size(x: Any) -> int:
    """x.shape[0]: the n of a strategy held as an (n, ...) array (0 for a pytree rebuilt from
    placeholder leaves without a shape, which has no size)."""
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape else 0


def _is_arraylike(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array, list, tuple, float, int, np.number))
