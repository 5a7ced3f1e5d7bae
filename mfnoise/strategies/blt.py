"""Buffered linear Toeplitz (BLT) strategies.

A BLT with d buffers is the Toeplitz C with c_0 = 1 and c_j = sum_{i=1..d} omega_i theta_i^(j-1)
for j >= 1 ("Efficient and Near-Optimal Noise Generation for Streaming Differential Privacy",
Dvijotham et al. 2024, arXiv:2404.16706). Its generating function is rational,

    c(x) = 1 + sum_i omega_i x / (1 - theta_i x) = N(x) / D(x),   D(x) = prod_i (1 - theta_i x),

so C^{-1} has generating function D(x) / N(x): again a BLT with d buffers whose decays are the
reciprocal roots of N (real and interlacing the theta_i when omega > 0). C z and C^{-1} z are
order-d linear recurrences: O(n d) time and d state values per coordinate, for any n.

Streaming. When C^{-1} is a real BLT (always for omega > 0) the generator runs C^{-1}'s own
buffers (stream kind "buffers-input"). Otherwise (omega of mixed signs, where the decays of
C^{-1} can be complex) it solves C z = w with C's buffers fed back the outputs (kind
"buffers-output"): z_t = w_t - sum_i omega_i s_i, s_i <- theta_i s_i + z_t; d real buffers
either way.

``InverseBLT`` is the strategy given by the parameters of its inverse (C^{-1} = BLT(theta', omega')).
It is what the noise generator realises for a BLT in a given dtype: the generator streams C^{-1}
from (theta', omega') rounded to that dtype, and the C these rounded values define is in general
no BLT with decays in (0, 1) (rounding can push a decay of C to or past 1, or make a pair of
decays complex), so it is kept in this form and its Toeplitz coefficients are the series
reciprocal of C^{-1}'s.
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
from mfnoise.strategies.toeplitz import toeplitz_sensitivity


def blt_coeffs(theta: np.ndarray, omega: np.ndarray, n: int) -> np.ndarray:
    """c_0 = 1, c_j = sum_i omega_i theta_i^(j-1): the first column of a BLT, shape (n,)."""
    c = np.zeros(n)
    c[0] = 1.0
    for th, om in zip(np.asarray(theta, np.float64), np.asarray(omega, np.float64)):
        c[1:] += om * _powers(th, n - 1)
    return c


def _powers(th: float, m: int, block: int = 4096) -> np.ndarray:
    """th^j for j = 0..m-1 as th^(j mod B) * th^(B (j div B)): two short np.power tables and one
    product per entry (within 2 ulp of np.power, and far faster at n = 10^7)."""
    if m <= block:
        return np.power(th, np.arange(m))
    low = np.power(th, np.arange(block))
    high = np.power(th, block * np.arange(-(-m // block)))
    return (high[:, None] * low[None, :]).reshape(-1)[:m]


def rational(theta: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D): polynomial coefficients (ascending powers of x) with c(x) = N(x) / D(x)."""
    theta = np.asarray(theta, np.float64)
    omega = np.asarray(omega, np.float64)
    den = np.array([1.0])
    for th in theta:
        den = np.convolve(den, [1.0, -th])
    num = np.concatenate([den, [0.0]])
    for i, om in enumerate(omega):
        others = np.array([1.0])
        for k, th in enumerate(theta):
            if k != i:
                others = np.convolve(others, [1.0, -th])
        num[1 : 1 + others.size] += om * others
    return num[: den.size], den


def blt_inverse(theta: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(theta', omega') of C^{-1} = 1 + sum_i omega'_i x / (1 - theta'_i x).

    theta' are the reciprocal roots of N; by partial fractions of D / N at x = 1 / theta'_i,
    omega'_i = theta'_i * D(1/theta'_i) / prod_{l != i} (1 - theta'_l / theta'_i).
    With omega > 0 the theta' are the roots y of the secular equation 1 + sum_i omega_i / (y - theta_i)
    = 0, one below theta_1 and one between each pair of consecutive theta_i; they are found by
    bisection in those brackets, which stays accurate when decays cluster next to 1 (the
    polynomial roots of N lose all accuracy there). Otherwise np.roots of N.
    Raises ValueError when the result is not real with distinct decays.
    """
    theta = np.asarray(theta, np.float64)
    omega = np.asarray(omega, np.float64)
    new_theta = _secular_roots(theta, omega)
    if new_theta is None:
        num, _ = rational(theta, omega)
        # Reciprocal roots of N(x) = sum_k num[k] x^k are the roots of y^d N(1/y).
        new_theta = np.roots(num)
        if new_theta.size != len(theta) or np.any(np.abs(new_theta.imag) > 1e-9 * (1 + np.abs(new_theta.real))):
            raise ValueError(f"BLT inverse has non-real or missing decays {new_theta}")
        new_theta = np.sort(new_theta.real)
    if np.any(np.diff(new_theta) == 0):
        raise ValueError(f"BLT inverse has repeated decays {new_theta}")
    new_omega = np.empty_like(new_theta)
    for i, th in enumerate(new_theta):
        y = 1.0 / th if th != 0 else np.inf
        d_val = np.prod(1.0 - np.asarray(theta) * y) if np.isfinite(y) else 0.0
        others = np.prod(1.0 - np.delete(new_theta, i) / th) if th != 0 else 1.0
        new_omega[i] = th * d_val / others
    return new_theta, new_omega


def _secular_roots(theta: np.ndarray, omega: np.ndarray) -> np.ndarray | None:
    """Roots of f(y) = 1 + sum_i omega_i / (y - theta_i) by bisection (None unless omega > 0, distinct theta)."""
    order = np.argsort(theta)
    th, om = theta[order], omega[order]
    if np.any(om <= 0) or np.any(np.diff(th) <= 0):
        return None
    # f increases from 1 - ... : on (-inf, th_0) it falls from 1 to -inf; on (th_{i-1}, th_i) from +inf to -inf.
    lo = np.concatenate([[th[0] - om.sum() - 1.0], th[:-1]])
    hi = th.copy()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.all((mid == lo) | (mid == hi)):
            break
        with np.errstate(divide="ignore"):  # a bracket already closed on theta_i gives f = +inf: fine
            f = 1.0 + (om[None, :] / (mid[:, None] - th[None, :])).sum(axis=1)
        pos = f > 0
        lo = np.where(pos, mid, lo)
        hi = np.where(pos, hi, mid)
    return 0.5 * (lo + hi)


@registry.family
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BLT(Strategy):
    """BLT strategy of size n with buffer decays ``theta`` in (0, 1) and output scales ``omega``."""

    theta: np.ndarray
    omega: np.ndarray
    n: int
    family = "blt"
    is_toeplitz = True

    def __post_init__(self) -> None:
        theta, omega = _set_buffers(self, "BLT")
        if theta is None or omega is None:
            return
        bad = theta[(theta <= 0) | (theta >= 1)]
        if bad.size:
            raise ValueError(f"BLT decay theta={bad[0]} is outside (0, 1)")
        if self.n < 1:
            raise ValueError(f"n must be positive, got {self.n}")

    @property
    def buffers(self) -> int:
        return int(self.theta.shape[0])

    def toeplitz_coeffs(self) -> np.ndarray:
        return blt_coeffs(self.theta, self.omega, self.n)

    def inverse(self) -> tuple[np.ndarray, np.ndarray]:
        """(theta', omega') of the BLT C^{-1} (see ``blt_inverse``)."""
        return blt_inverse(self.theta, self.omega)

    def _dense(self) -> np.ndarray:
        return series.to_dense(self.toeplitz_coeffs(), self.n)

    def apply(self, z: np.ndarray) -> np.ndarray:
        """C z = z + sum_i omega_i F_i z, F_i = x / (1 - theta_i x): d stable first-order recurrences."""
        return _parallel_filter(self.theta, self.omega, z)

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        """C^{-1} z by the inverse BLT's first-order recurrences (stable for decays next to 1, unlike
        one order-d recurrence N / D whose polynomial coefficients lose the clustered roots)."""
        if _secular_roots(np.asarray(self.theta), np.asarray(self.omega)) is None:
            # omega of mixed signs or zero: the inverse's decays may be complex. The series
            # reciprocal of c (O(n log n), ~1e-15), not the order-d recurrence D / N, whose
            # expanded coefficients cost ~1e-9 relative error in B = A C^{-1} when decays cluster.
            return series.solve(self.toeplitz_coeffs(), np.asarray(z, np.float64))
        theta_inv, omega_inv = blt_inverse(self.theta, self.omega)
        return _parallel_filter(theta_inv, omega_inv, z)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        return toeplitz_sensitivity(self, self.toeplitz_coeffs(), p)

    def stream_table(self, dtype: Any) -> StreamTable:
        """"buffers-input": the inverse's (theta', omega') rounded to dtype, when C^{-1} is a real BLT;
        otherwise "buffers-output": C's own (theta, omega) rounded to dtype (module docstring)."""
        try:
            theta, omega = self.inverse()
        except ValueError:
            table = _blt_table("buffers-output", self.theta, self.omega, dtype)
            decays = table.table[0]
            if np.any((decays <= 0) | (decays >= 1)):
                raise ValueError(
                    f"cannot stream this BLT in {np.dtype(dtype).name}: its decays {np.asarray(self.theta)} round to "
                    f"{decays}, outside (0, 1); stream it in a wider dtype"
                ) from None
            return table
        return _blt_table("buffers-input", theta, omega, dtype)

    def realised(self, dtype: Any) -> BLT | InverseBLT:
        """InverseBLT(theta', omega') from a "buffers-input" table, BLT(theta, omega) from a
        "buffers-output" one (the rounded values in either case)."""
        table = self.stream_table(dtype)
        if table.kind == "buffers-output":
            return BLT(table.table[0], table.table[1], self.n)
        return InverseBLT(table.table[0], table.table[1], self.n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"theta": np.asarray(self.theta), "omega": np.asarray(self.omega)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "buffers": self.buffers}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> BLT:
        return cls(arrays["theta"], arrays["omega"], int(params["n"]))


def _blt_table(kind: str, theta: np.ndarray, omega: np.ndarray, dtype: Any) -> StreamTable:
    return StreamTable(kind, int(np.size(theta)), np.stack([round_to(theta, dtype), round_to(omega, dtype)]), dtype)


@registry.family
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class InverseBLT(Strategy):
    """The Toeplitz C of size n whose inverse is the BLT with decays ``theta`` and scales ``omega``.

    C^{-1} has first column r_0 = 1, r_j = sum_i omega_i theta_i^(j-1) (any finite real decays and
    scales); C's coefficients are the series reciprocal of r (``mfnoise.core.series``, O(n log n)).
    """

    theta: np.ndarray
    omega: np.ndarray
    n: int
    family = "inverse-blt"
    is_toeplitz = True

    def __post_init__(self) -> None:
        _set_buffers(self, "inverse BLT")

    @property
    def buffers(self) -> int:
        return int(self.theta.shape[0])

    def inverse(self) -> tuple[np.ndarray, np.ndarray]:
        """(theta, omega) of the BLT C^{-1}."""
        return np.asarray(self.theta), np.asarray(self.omega)

    def inverse_coeffs(self) -> np.ndarray:
        """First column of C^{-1}, shape (n,)."""
        return blt_coeffs(self.theta, self.omega, self.n)

    def toeplitz_coeffs(self) -> np.ndarray:
        return series.reciprocal(self.inverse_coeffs(), self.n)

    def _dense(self) -> np.ndarray:
        return series.to_dense(self.toeplitz_coeffs(), self.n)

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        return _parallel_filter(self.theta, self.omega, z)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        return toeplitz_sensitivity(self, self.toeplitz_coeffs(), p)

    def stream_table(self, dtype: Any) -> StreamTable:
        return _blt_table("buffers-input", self.theta, self.omega, dtype)

    def realised(self, dtype: Any) -> InverseBLT:
        table = self.stream_table(dtype).table
        return InverseBLT(table[0], table[1], self.n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"theta": np.asarray(self.theta), "omega": np.asarray(self.omega)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "buffers": self.buffers}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> InverseBLT:
        return cls(arrays["theta"], arrays["omega"], int(params["n"]))


def _parallel_filter(theta: np.ndarray, omega: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(I + sum_i omega_i T_i) z with T_i the Toeplitz matrix of x / (1 - theta_i x), z of shape (n, ...)."""
    import scipy.signal  # here, not at module level: `import mfnoise` stays free of scipy

    z = np.asarray(z, np.float64)
    out = z.copy()
    for th, om in zip(np.asarray(theta, np.float64), np.asarray(omega, np.float64)):
        out += om * scipy.signal.lfilter([0.0, 1.0], [1.0, -th], z, axis=0)
    return out


jax.tree_util.register_dataclass(BLT, data_fields=["theta", "omega"], meta_fields=["n"])
jax.tree_util.register_dataclass(InverseBLT, data_fields=["theta", "omega"], meta_fields=["n"])


def _set_buffers(strategy: Any, what: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validates and stores a BLT-like strategy's decays, scales and n; returns the concrete
    (theta, omega), or (None, None) for traced leaves (validated when built from values)."""
    theta = as_float64(f"{what} theta", strategy.theta, 1)
    omega = as_float64(f"{what} omega", strategy.omega, 1)
    object.__setattr__(strategy, "theta", theta)
    object.__setattr__(strategy, "omega", omega)
    object.__setattr__(strategy, "n", check_n(strategy.n))
    if not isinstance(theta, np.ndarray) or not isinstance(omega, np.ndarray):
        return None, None
    if theta.shape != omega.shape or theta.size < 1:
        raise ValueError(f"{what} theta {theta.shape} and omega {omega.shape} must have one entry per buffer")
    return theta, omega
