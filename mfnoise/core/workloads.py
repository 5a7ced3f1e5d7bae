"""Workloads: the n×n lower-triangular matrix A whose product A G is the training trajectory.

* prefix sum (SGD, constant learning rate): A[i, j] = 1 for j <= i.
* momentum beta with learning rates eta_t and weight decay lambda (m_t = beta m_{t-1} + g_t,
  theta_{t+1} = (1 - eta_t lambda) theta_t - eta_t m_t, "Banded Square Root Matrix Factorization for
  Differentially Private Model Training", Kalinin & Lampert 2024, arXiv:2405.13763):
  A[i, j] = sum_{s=j..i} eta_s beta^(s-j) prod_{r=s+1..i} (1 - eta_r lambda). With constant eta it is
  Toeplitz with the rational generating function a(x) = eta / ((1 - (1 - eta lambda) x)(1 - beta x)).

Toeplitz workloads are held by their first column or, for the rational ones (prefix sum, momentum
with constant eta, with or without weight decay), by ``rational = (eta, poles)``, a(x) = eta /
prod_p (1 - alpha_p x), their n coefficients built only when read (so n = 10^9 costs nothing); a
workload with a learning-rate schedule is held as its schedule and built densely only on request.
See ``parse`` for the spec strings ("momentum:0.9:wd=1e-4", "momentum:0.9:warmup-cosine:100", ...).
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


Rational = tuple[float, tuple[float, ...]]
"""(eta, poles): the generating function a(x) = sum_d a_d x^d = eta / prod_p (1 - alpha_p x)."""


def rational_coeffs(rational: Rational, n: int) -> np.ndarray:
    """The first n coefficients a_d of a(x) = eta / prod_p (1 - alpha_p x), float64.

    One pole: a_d = eta alpha^d. Two poles: a_d = eta (alpha_1^(d+1) - alpha_2^(d+1)) / (alpha_1 - alpha_2)
    (partial fractions). Close poles (where that difference cancels) and more poles run the recurrence
    a_d = eta [d = 0] + sum_k e_k a_{d-k} of the denominator's polynomial (scipy's lfilter).
    """
    eta, poles = rational
    d = np.arange(n, dtype=np.float64)
    if len(poles) == 0:
        out = np.zeros(n)
        out[0] = eta
        return out
    if len(poles) == 1:
        return eta * poles[0] ** d
    if len(poles) == 2:
        a, b = poles
        # The partial-fraction difference loses about |a| / |a - b| ulps; close poles use the recurrence.
        if abs(a - b) > 1e-2 * max(abs(a), abs(b)):
            return eta * (a ** (d + 1) - b ** (d + 1)) / (a - b)
    from scipy.signal import lfilter  # lazy: importing mfnoise does not load scipy

    # prod_p (x - alpha_p), highest power first: the coefficients of prod_p (1 - alpha_p z^-1).
    denominator = np.poly(np.asarray(poles, np.float64))
    impulse = np.zeros(n)
    impulse[0] = eta
    return np.asarray(lfilter([1.0], denominator, impulse), np.float64)


class _ToeplitzColumn:
    """``Workload.coeffs``: a stored first column, or one built from ``Workload.rational`` on first read.

    A data descriptor (the dataclass field's default), so ``Workload(coeffs=...)`` keeps working and a
    rational workload at n = 10^9 costs nothing until something reads its n coefficients.
    """

    def __get__(self, obj: Workload | None, objtype: type | None = None) -> np.ndarray | None:
        if obj is None:
            return None  # the field's default
        c = obj.__dict__.get("_coeffs")
        if c is None and obj.rational is not None:
            c = rational_coeffs(obj.rational, obj.n)
            c.setflags(write=False)  # shared by every reader of this workload
            obj.__dict__["_coeffs"] = c
        return c

    def __set__(self, obj: Workload, value: np.ndarray | None) -> None:
        obj.__dict__["_coeffs"] = value


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Workload:
    """A lower-triangular workload A of size n.

    Exactly one of ``coeffs`` (Toeplitz: A[i, j] = coeffs[i - j]), ``rational`` (Toeplitz with the
    generating function eta / prod_p (1 - alpha_p x); ``coeffs`` is then built on first read),
    ``matrix`` (explicit) or ``learning_rates`` (momentum with a schedule, weight decay
    ``weight_decay``) describes A; ``name`` is the spec string recorded in strategy files (e.g.
    "prefix", "momentum:0.9", see ``parse``). Two workloads are equal when they have the same n, name
    and arrays (a rational one compares by its (eta, poles), never building its coefficients).
    """

    n: int
    name: str
    coeffs: _ToeplitzColumn | np.ndarray | None = _ToeplitzColumn()  # type: ignore[assignment]
    matrix: np.ndarray | None = None
    beta: float | None = None
    learning_rates: np.ndarray | None = None
    rational: Rational | None = None
    weight_decay: float = 0.0

    @property
    def is_toeplitz(self) -> bool:
        return self.rational is not None or self.__dict__.get("_coeffs") is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Workload):
            return NotImplemented
        if (self.n, self.name, self.beta, self.rational, self.weight_decay) != (
            other.n, other.name, other.beta, other.rational, other.weight_decay
        ):
            return False
        mine = [None if self.rational is not None else self.coeffs, self.matrix, self.learning_rates]
        theirs = [None if other.rational is not None else other.coeffs, other.matrix, other.learning_rates]
        return all((x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
                   for x, y in zip(mine, theirs))

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def __repr__(self) -> str:
        # Never builds a rational workload's coefficients (n may be 10^9).
        held = (f"rational={self.rational!r}" if self.rational is not None
                else ", ".join(f"{k}=<{np.shape(v)}>" for k, v in
                               (("coeffs", self.__dict__.get("_coeffs")), ("matrix", self.matrix),
                                ("learning_rates", self.learning_rates)) if v is not None))
        extra = (f", beta={self.beta!r}" if self.beta is not None else "") + (
            f", weight_decay={self.weight_decay!r}" if self.weight_decay else "")
        return f"Workload(n={self.n}, name={self.name!r}, {held}{extra})"

    def dense(self, max_n: int | None = None) -> np.ndarray:
        """The n×n float64 matrix A (refused above ``max_n``, default DENSE_LIMIT)."""
        if self.matrix is not None:
            return np.array(self.matrix, dtype=np.float64)
        check_dense_size(self.n, max_n, "workload")
        if self.is_toeplitz:
            return series.to_dense(np.asarray(self.coeffs), self.n)
        if self.beta is None or self.learning_rates is None:
            raise ValueError(f"workload {self.name!r} has neither coefficients, a matrix nor a schedule")
        # Row i (theta_{i+1}) = (1 - eta_i lambda) row i-1 + eta_i M[i, :], M[s, j] = beta^(s-j).
        m = series.to_dense(self.beta ** np.arange(self.n), self.n)
        if self.weight_decay == 0.0:
            return np.cumsum(self.learning_rates[:, None] * m, axis=0)
        keep = 1.0 - self.learning_rates * self.weight_decay
        a = self.learning_rates[:, None] * m
        for i in range(1, self.n):
            a[i] += keep[i] * a[i - 1]
        return a

    def to_dict(self) -> dict:
        d: dict = {"name": self.name, "n": self.n}
        if self.learning_rates is not None:
            d["learning_rates"] = [float(x) for x in self.learning_rates]
        if self.weight_decay:
            d["weight_decay"] = float(self.weight_decay)
        return d


def prefix_sum(n: int) -> Workload:
    """A[i, j] = 1 for j <= i (SGD with a constant learning rate): a(x) = 1 / (1 - x)."""
    check_n(n)
    return Workload(n=n, name="prefix", rational=(1.0, (1.0,)))


def momentum(n: int, beta: float, learning_rates: np.ndarray | float | None = None,
             weight_decay: float = 0.0) -> Workload:
    """SGD with heavy-ball momentum beta and weight decay lambda, as in "Banded Square Root Matrix
    Factorization for Differentially Private Model Training" (Kalinin & Lampert 2024, arXiv:2405.13763):

        m_t = beta m_{t-1} + g_t,    theta_{t+1} = (1 - eta_t lambda) theta_t - eta_t m_t,

    so that A[i, j] = sum_{s=j..i} eta_s beta^(s-j) prod_{r=s+1..i} (1 - eta_r lambda) (row i is
    theta_{i+1}; the decay multiplies the parameters, not the momentum).

    ``learning_rates``: None (eta = 1), a scalar, or an array of n values (see ``cooldown`` and
    ``warmup_cosine``). A constant eta gives a Toeplitz workload with the rational generating function
    a(x) = eta / ((1 - alpha x)(1 - beta x)), alpha = 1 - eta lambda (the paper's A_{alpha,beta}):
    a_d = eta (alpha^(d+1) - beta^(d+1)) / (alpha - beta); lambda = 0 gives eta (1 - beta^(d+1)) / (1 - beta).
    ``weight_decay``: lambda >= 0 with eta_t lambda < 1 (a decay factor in (0, 1]).
    """
    check_n(n)
    beta = float(beta)
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
    wd = float(weight_decay)
    if not (math.isfinite(wd) and wd >= 0.0):
        raise ValueError(f"weight_decay must be non-negative and finite, got {weight_decay!r}")
    tag = f":wd={wd!r}" if wd else ""
    if learning_rates is None or np.ndim(learning_rates) == 0:
        eta = 1.0 if learning_rates is None else float(learning_rates)
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"learning rate must be positive and finite, got {eta}")
        _check_decay(eta, wd)
        alpha = 1.0 - eta * wd
        poles = tuple(x for x in (alpha, beta) if x != 0.0)
        name = f"momentum:{beta!r}" + ("" if eta == 1.0 else f":lr={eta!r}") + tag
        return Workload(n=n, name=name, beta=beta, rational=(eta, poles), weight_decay=wd)
    eta = np.asarray(learning_rates, dtype=np.float64)
    if eta.shape != (n,):
        raise ValueError(f"learning_rates has shape {eta.shape}, expected ({n},)")
    if not np.all(np.isfinite(eta)) or np.any(eta < 0):
        bad = eta[~(np.isfinite(eta) & (eta >= 0))][0]
        raise ValueError(f"learning rates must be finite and non-negative, got {bad}")
    _check_decay(float(eta.max()), wd)
    if np.all(eta == eta[0]) and eta[0] > 0:
        return momentum(n, beta, float(eta[0]), wd)
    return Workload(n=n, name=f"momentum:{beta:g}{tag}:schedule", beta=beta, learning_rates=eta, weight_decay=wd)


def _check_decay(eta: float, weight_decay: float) -> None:
    if eta * weight_decay >= 1.0:
        raise ValueError(
            f"weight_decay={weight_decay!r} with learning rate {eta!r} gives a decay factor "
            f"1 - eta * weight_decay = {1.0 - eta * weight_decay!r}, not in (0, 1]"
        )


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


def warmup_cosine(n: int, peak: float = 1.0, warmup_steps: int = 0, final: float = 0.0) -> np.ndarray:
    """Learning rates: linear warmup to ``peak`` over ``warmup_steps`` steps, then cosine decay to ``final``.

    eta_t = peak (t + 1) / W for t < W, and eta_t = final + (peak - final) (1 + cos(pi (t + 1 - W) / (n - W))) / 2
    for W <= t < n: optax's ``warmup_cosine_decay_schedule(0, peak, W, n, final)`` read at count t + 1, so
    no step has learning rate 0 during warmup and the last step has ``final`` (as ``cooldown`` ends).
    """
    check_n(n)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or not 0 <= warmup_steps < n:
        raise ValueError(f"warmup_steps must be an integer in [0, n={n}), got {warmup_steps!r}")
    peak, final = float(peak), float(final)
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"peak learning rate must be positive and finite, got {peak!r}")
    if not (math.isfinite(final) and 0.0 <= final <= peak):
        raise ValueError(f"final learning rate must be in [0, peak={peak!r}], got {final!r}")
    w = int(warmup_steps)
    t = np.arange(n, dtype=np.float64)
    eta = final + (peak - final) * 0.5 * (1.0 + np.cos(np.pi * (t + 1 - w) / (n - w)))
    eta[:w] = peak * (t[:w] + 1) / w
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
    """A workload from its spec string (the names the constructors give, so files can be re-evaluated).

    Grammar: ``prefix`` or ``momentum:BETA[:lr=ETA][:wd=LAMBDA][:cooldown:F | :warmup-cosine:W]``:
    BETA the momentum (0 is plain SGD), ETA the (peak) learning rate (default 1), LAMBDA the weight
    decay (``momentum``), F the cooldown fraction (``cooldown``), W the number of warmup steps of a
    warmup + cosine schedule decaying to 0 (``warmup_cosine``). Examples: "momentum:0.9:wd=1e-4",
    "momentum:0.9:lr=0.1:warmup-cosine:100".
    """
    expected = ("expected 'prefix' or 'momentum:BETA[:lr=ETA][:wd=LAMBDA][:cooldown:F | :warmup-cosine:W]'")
    parts = spec.split(":")
    if parts == ["prefix"]:
        return prefix_sum(n)
    if parts[0] != "momentum" or len(parts) < 2:
        raise ValueError(f"unknown workload {spec!r}: {expected}")
    try:
        beta = float(parts[1])
    except ValueError:
        raise ValueError(f"bad momentum beta {parts[1]!r} in workload spec {spec!r}") from None
    rest = parts[2:]
    options: dict[str, float] = {}
    for key in ("lr", "wd"):
        if rest and rest[0].startswith(key + "="):
            try:
                options[key] = float(rest[0][len(key) + 1 :])
            except ValueError:
                raise ValueError(f"bad {key} {rest[0]!r} in workload spec {spec!r}") from None
            rest = rest[1:]
    lr, wd = options.get("lr", 1.0), options.get("wd", 0.0)
    if not rest:
        return momentum(n, beta, lr if "lr" in options else None, wd)
    if len(rest) == 2 and rest[0] in ("cooldown", "warmup-cosine"):
        try:
            if rest[0] == "cooldown":
                eta = cooldown(n, lr=lr, fraction=float(rest[1]))
            else:
                eta = warmup_cosine(n, peak=lr, warmup_steps=int(rest[1]))
        except ValueError as e:
            raise ValueError(f"bad schedule in workload spec {spec!r}: {e}") from None
        w = momentum(n, beta, eta, wd)
        return dataclasses.replace(w, name=spec)
    raise ValueError(f"unknown workload {spec!r}: {expected}")


def from_dict(d: dict, n: int) -> Workload:
    """The workload a ``Workload.to_dict()`` describes, for a strategy of size n (its learning rates and
    weight decay read back exactly; the name parsed otherwise)."""
    name = d.get("name")
    if not isinstance(name, str):
        raise ValueError(f"workload name {name!r} is not a string")
    if d.get("n", n) != n:
        raise ValueError(f"workload has n={d.get('n')}, strategy has n={n}")
    if "learning_rates" in d:
        parts = name.split(":")
        if parts[0] != "momentum" or len(parts) < 2:
            raise ValueError(f"workload {name!r} has learning rates but is not a momentum workload")
        w = momentum(n, float(parts[1]), np.asarray(d["learning_rates"], np.float64), float(d.get("weight_decay", 0.0)))
        return w if w.is_toeplitz else dataclasses.replace(w, name=name)
    return parse(name, n)


def check_n(n: int) -> int:
    """n as a positive int; a float, bool or non-positive n is refused, never truncated."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return int(n)


def _flatten(w: Workload) -> tuple[tuple, tuple]:
    # The stored column only: a rational workload's coefficients stay unbuilt across tree maps.
    return (w.__dict__.get("_coeffs"), w.matrix, w.learning_rates), (w.n, w.name, w.beta, w.rational, w.weight_decay)


def _unflatten(aux: tuple, children: tuple) -> Workload:
    n, name, beta, rational, weight_decay = aux
    coeffs, matrix, learning_rates = children
    return Workload(n=n, name=name, coeffs=coeffs, matrix=matrix, beta=beta, learning_rates=learning_rates,
                    rational=rational, weight_decay=weight_decay)


jax.tree_util.register_pytree_node(Workload, _flatten, _unflatten)
