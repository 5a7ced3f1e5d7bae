"""Buffered linear Toeplitz (BLT) strategies.

A BLT with d buffers is the Toeplitz C with c_0 = 1 and c_j = sum_{i=1..d} omega_i theta_i^(j-1)
for j >= 1 ("Efficient and Near-Optimal Noise Generation for Streaming Differential Privacy",
Dvijotham et al. 2024). Its generating function is rational,

    c(x) = 1 + sum_i omega_i x / (1 - theta_i x) = N(x) / D(x),   D(x) = prod_i (1 - theta_i x),

so C^{-1} has generating function D(x) / N(x): again a BLT with d buffers whose decays are the
reciprocal roots of N (real and interlacing the theta_i when omega > 0). C z and C^{-1} z are
order-d linear recurrences: O(n d) time and d state values per coordinate, for any n.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.signal

from mfnoise import sensitivity as sens_lib
from mfnoise.participation import Participation
from mfnoise.strategy import Strategy, as_float64, frozen_dataclass, register
from mfnoise.toeplitz import toeplitz_sensitivity


def blt_coeffs(theta: np.ndarray, omega: np.ndarray, n: int) -> np.ndarray:
    """c_0 = 1, c_j = sum_i omega_i theta_i^(j-1): the first column of a BLT, shape (n,)."""
    c = np.zeros(n)
    c[0] = 1.0
    powers = np.arange(n - 1)
    for th, om in zip(np.asarray(theta, np.float64), np.asarray(omega, np.float64)):
        c[1:] += om * np.power(th, powers)
    return c


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
        for l, th in enumerate(theta):
            if l != i:
                others = np.convolve(others, [1.0, -th])
        num[1 : 1 + others.size] += om * others
    return num[: den.size], den


def blt_inverse(theta: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(theta', omega') of C^{-1} = 1 + sum_i omega'_i x / (1 - theta'_i x).

    theta' are the reciprocal roots of N; by partial fractions of D / N at x = 1 / theta'_i,
    omega'_i = theta'_i * D(1/theta'_i) / prod_{l != i} (1 - theta'_l / theta'_i).
    Raises ValueError when the result is not real with distinct decays.
    """
    num, den = rational(theta, omega)
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


@frozen_dataclass
class BLT(Strategy):
    """BLT strategy of size n with buffer decays ``theta`` in (0, 1) and output scales ``omega``."""

    theta: np.ndarray
    omega: np.ndarray
    n: int
    family = "blt"

    def __post_init__(self) -> None:
        theta = as_float64("BLT theta", self.theta, 1)
        omega = as_float64("BLT omega", self.omega, 1)
        object.__setattr__(self, "theta", theta)
        object.__setattr__(self, "omega", omega)
        object.__setattr__(self, "n", int(self.n))
        if not isinstance(theta, np.ndarray) or not isinstance(omega, np.ndarray):
            return
        if theta.shape != omega.shape or theta.size < 1:
            raise ValueError(f"BLT theta {theta.shape} and omega {omega.shape} must have one entry per buffer")
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
        from mfnoise import series

        return series.to_dense(self.toeplitz_coeffs(), self.n)

    def apply(self, z: np.ndarray) -> np.ndarray:
        """C z by the recurrence N / D, z of shape (n, ...)."""
        num, den = rational(self.theta, self.omega)
        return scipy.signal.lfilter(num, den, np.asarray(z, np.float64), axis=0)

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        num, den = rational(self.theta, self.omega)
        return scipy.signal.lfilter(den, num, np.asarray(z, np.float64), axis=0)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        self._check_participation(p)
        return toeplitz_sensitivity(self, self.toeplitz_coeffs(), p)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"theta": np.asarray(self.theta), "omega": np.asarray(self.omega)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "buffers": self.buffers}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "BLT":
        return cls(arrays["theta"], arrays["omega"], int(params["n"]))


register(BLT, data_fields=["theta", "omega"], meta_fields=["n"])
