"""Workloads: the n×n lower-triangular matrix A whose product A G is the training trajectory.

* prefix sum (SGD, constant learning rate): A[i, j] = 1 for j <= i.
* momentum beta with learning rates eta_t (m_t = beta m_{t-1} + g_t, theta_{t+1} = theta_t - eta_t m_t):
  A[i, j] = sum_{s=j..i} eta_s beta^(s-j). With constant eta it is Toeplitz with
  a_d = eta (1 - beta^(d+1)) / (1 - beta).

Toeplitz workloads are held by their first column (never an n×n matrix); a workload with a
learning-rate schedule is held as its schedule and built densely only on request.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from mfnoise.core import series

DENSE_LIMIT = 8192
"""Largest n for which an n×n float64 matrix (512 MiB) is built without being asked for more."""


def check_dense_size(n: int, max_n: int | None, what: str) -> None:
    limit = DENSE_LIMIT if max_n is None else max_n
    if n > limit:
        raise ValueError(
            f"refusing to build a dense {n}x{n} {what} ({8 * n * n / 2**20:.0f} MiB float64): "
            f"n={n} exceeds max_n={limit}; pass max_n to override"
        )


@dataclasses.dataclass(frozen=True)
class Workload:
    """A lower-triangular workload A of size n.

    Exactly one of ``coeffs`` (Toeplitz: A[i, j] = coeffs[i - j]), ``matrix`` (explicit) or
    ``learning_rates`` (momentum with a schedule) describes A; ``name`` is the spec string
    recorded in strategy files (e.g. "prefix", "momentum:0.9").
    """

    n: int
    name: str
    coeffs: np.ndarray | None = None
    matrix: np.ndarray | None = None
    beta: float | None = None
    learning_rates: np.ndarray | None = None

    @property
    def is_toeplitz(self) -> bool:
        return self.coeffs is not None

    def dense(self, max_n: int | None = None) -> np.ndarray:
        """The n×n float64 matrix A (refused above ``max_n``, default DENSE_LIMIT)."""
        if self.matrix is not None:
            return np.array(self.matrix, dtype=np.float64)
        check_dense_size(self.n, max_n, "workload")
        if self.coeffs is not None:
            return series.to_dense(self.coeffs, self.n)
        # A = S D_eta M: M[s, j] = beta^(s-j), D_eta scales row s, S sums rows j..i.
        if self.beta is None or self.learning_rates is None:
            raise ValueError(f"workload {self.name!r} has neither coefficients, a matrix nor a schedule")
        m = series.to_dense(self.beta ** np.arange(self.n), self.n)
        return np.cumsum(self.learning_rates[:, None] * m, axis=0)

    def to_dict(self) -> dict:
        d: dict = {"name": self.name, "n": self.n}
        if self.learning_rates is not None:
            d["learning_rates"] = [float(x) for x in self.learning_rates]
        return d


def prefix_sum(n: int) -> Workload:
    """A[i, j] = 1 for j <= i (SGD with a constant learning rate)."""
    check_n(n)
    return Workload(n=n, name="prefix", coeffs=np.ones(n))


def momentum(n: int, beta: float, learning_rates: np.ndarray | float | None = None) -> Workload:
    """A[i, j] = sum_{s=j..i} eta_s beta^(s-j): SGD with heavy-ball momentum beta.

    ``learning_rates``: None (eta = 1), a scalar, or an array of n values (see ``cooldown``).
    A constant schedule gives a Toeplitz workload, a_d = eta (1 - beta^(d+1)) / (1 - beta).
    """
    check_n(n)
    beta = float(beta)
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
    if learning_rates is None or np.ndim(learning_rates) == 0:
        eta = 1.0 if learning_rates is None else float(learning_rates)
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"learning rate must be positive and finite, got {eta}")
        d = np.arange(n)
        coeffs = eta * (1.0 - beta ** (d + 1)) / (1.0 - beta)
        name = f"momentum:{beta!r}" if eta == 1.0 else f"momentum:{beta!r}:lr={eta!r}"
        return Workload(n=n, name=name, coeffs=coeffs, beta=beta)
    eta = np.asarray(learning_rates, dtype=np.float64)
    if eta.shape != (n,):
        raise ValueError(f"learning_rates has shape {eta.shape}, expected ({n},)")
    if not np.all(np.isfinite(eta)) or np.any(eta < 0):
        bad = eta[~(np.isfinite(eta) & (eta >= 0))][0]
        raise ValueError(f"learning rates must be finite and non-negative, got {bad}")
    if np.all(eta == eta[0]) and eta[0] > 0:
        return momentum(n, beta, float(eta[0]))
    return Workload(n=n, name=f"momentum:{beta:g}:schedule", beta=beta, learning_rates=eta)


def cooldown(n: int, lr: float = 1.0, fraction: float = 0.2, final: float = 0.0) -> np.ndarray:
    """Learning rates: ``lr`` for the first (1 - fraction) n steps, then linear decay to ``final``."""
    check_n(n)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"cooldown fraction must be in [0, 1], got {fraction}")
    eta = np.full(n, float(lr))
    m = int(round(fraction * n))
    if m > 0:
        eta[n - m :] = np.linspace(lr, final, m + 1)[1:]
    return eta


def matrix(a: np.ndarray, name: str = "matrix") -> Workload:
    """An explicit lower-triangular workload."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"workload matrix must be square, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("workload matrix has non-finite entries")
    if np.any(np.triu(a, 1) != 0):
        raise ValueError("workload matrix must be lower triangular")
    return Workload(n=a.shape[0], name=name, matrix=a)


def parse(spec: str, n: int) -> Workload:
    """A workload from its spec string: "prefix", "momentum:BETA", "momentum:BETA:lr=ETA" or
    "momentum:BETA:cooldown:F" (the names the constructors give, so files can be re-evaluated)."""
    parts = spec.split(":")
    if parts == ["prefix"]:
        return prefix_sum(n)
    if parts[0] == "momentum" and len(parts) >= 2:
        try:
            beta = float(parts[1])
        except ValueError:
            raise ValueError(f"bad momentum beta in workload spec {spec!r}") from None
        if len(parts) == 2:
            return momentum(n, beta)
        if len(parts) == 3 and parts[2].startswith("lr="):
            return momentum(n, beta, float(parts[2][3:]))
        if len(parts) == 4 and parts[2] == "cooldown":
            w = momentum(n, beta, cooldown(n, fraction=float(parts[3])))
            return dataclasses.replace(w, name=spec)
    raise ValueError(
        f"unknown workload {spec!r}: expected 'prefix', 'momentum:BETA' or 'momentum:BETA:cooldown:F'"
    )


def check_n(n: int) -> int:
    """n as a positive int; a float, bool or non-positive n is refused, never truncated."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return int(n)


jax.tree_util.register_dataclass(
    Workload,
    data_fields=["coeffs", "matrix", "learning_rates"],
    meta_fields=["n", "name", "beta"],
)
