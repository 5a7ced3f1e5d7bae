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
import math
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core import series
from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload, check_n
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


# -- closed forms: every sum over n steps is a sum of geometric sequences (O(d^2), any n) --------
# "Efficient and Near-Optimal Noise Generation for Streaming Differential Privacy" (Dvijotham et al.
# 2024, arXiv:2404.16706) evaluates a BLT's errors this way. The functions take numpy (float64, the
# strategy's numbers) or JAX arrays (mfnoise.optim.blt's differentiable loss, under jax.enable_x64).
SERIES_TERMS = 16
_SMALL_X = 0.5
CLOSED_FORM_PAIR_LIMIT = 2_000_000
"""Largest (pattern pairs) x buffers^2 for which the sensitivity is summed in closed form; beyond it
(thousands of participations) the materialised O(n m) routine is no slower."""


def _xp(*arrays: Any) -> Any:
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def power_sums(n: int, k_max: int) -> np.ndarray:
    """S_k = sum_{j<n} j^k for k = 0..k_max, exactly (sum_{i<=k} C(k+1, i) S_i = n^{k+1})."""
    s: list[Fraction] = []
    for k in range(k_max + 1):
        acc = Fraction(n) ** (k + 1) - sum(math.comb(k + 1, i) * s[i] for i in range(k))
        s.append(acc / (k + 1))
    return np.array([float(x) for x in s])


def _psi(eps: Any) -> Any:
    """-log1p(-eps) / eps (-> 1 as eps -> 0), eps in [0, 1)."""
    xp = _xp(eps)
    small = eps < 1e-8
    safe = xp.where(small, 0.5, eps)
    return xp.where(small, 1.0 + eps / 2, -xp.log1p(-safe) / safe)


def _phi(x: Any) -> Any:
    """-expm1(-x) / x (-> 1 as x -> 0), x >= 0."""
    xp = _xp(x)
    small = x < 1e-8
    safe = xp.where(small, 1.0, x)
    return xp.where(small, 1.0 - x / 2, -xp.expm1(-safe) / safe)


def geometric_sums(eps: Any, n: Any, sums: np.ndarray | None = None, weighted: bool = False) -> Any:
    """G_n(q) = sum_{j<n} q^j, or H_n(q) = sum_{j<n} (n - j) q^j if ``weighted``, q = 1 - eps.

    eps in [0, 1) (elementwise, any shape); n broadcasts (int or array) for G, must be a Python
    int for H (``sums`` = power_sums(n, SERIES_TERMS)). With L = -log(q), x = n L:
    G = n phi(x) psi(eps); H = G + (n - G) / eps with n - G = sum_{j<n} (1 - e^{-jL}) from its
    alternating series in L when x is small (no cancellation), else directly.
    """
    xp = _xp(eps)
    psi = _psi(eps)
    big_l = eps * psi
    x = xp.multiply(n, big_l)
    g = xp.multiply(n, _phi(x)) * psi
    if not weighted:
        return g
    if sums is None:
        raise ValueError("the weighted sums H_n need sums = power_sums(n, SERIES_TERMS)")
    small = x < _SMALL_X
    # (n - G) / eps = psi * sum_{k>=1} (-1)^{k+1} L^{k-1} S_k / k!
    l_small = xp.where(small, big_l, 0.0)
    series_sum: Any = 0.0
    for k in range(SERIES_TERMS, 0, -1):  # Horner in L
        series_sum = series_sum * l_small + (-1) ** (k + 1) * sums[k] / math.factorial(k)
    series_sum = series_sum * psi
    eps_safe = xp.where(small, 1.0, eps)
    direct = (n - g) / eps_safe
    return g + xp.where(small, series_sum, direct)


def pair_eps(eps: Any) -> Any:
    """1 - rho_m rho_l for all pairs of rho = 1 - eps, shape (M, M)."""
    return eps[:, None] + eps[None, :] - eps[:, None] * eps[None, :]


def residues(eps_poles: Any, eps_zeros: Any, extra_power: int = 0) -> Any:
    """A_m with P(x) / prod_m (1 - rho_m x) = sum_m A_m / (1 - rho_m x), P = prod_z (1 - zeta_z x),
    in 1 - decay coordinates (eps = 1 - rho, 1 - zeta).

    A_m = rho_m^extra_power prod_z (eps_z - eps_m) / prod_{l != m} (eps_l - eps_m), where the
    extra power is (#poles - 1 - #zeros) (rho_m^(M-1-Z) from clearing 1/rho_m factors).
    """
    xp = _xp(eps_poles, eps_zeros)
    diff_z = eps_zeros[None, :] - eps_poles[:, None]  # (M, Z)
    diff_p = eps_poles[None, :] - eps_poles[:, None]  # (M, M)
    diff_p = diff_p + xp.eye(eps_poles.shape[0])
    res = xp.prod(diff_z, axis=1) / xp.prod(diff_p, axis=1)
    if extra_power:
        res = res * (1.0 - eps_poles) ** extra_power
    return res


def sum_squares(amps: Any, eps: Any, n: int, sums: np.ndarray | None, weighted: bool) -> Any:
    """sum_{j<n} w_j s_j^2 for s_j = sum_m amps_m (1 - eps_m)^j, w = 1 or n - j."""
    g = geometric_sums(pair_eps(eps), n, sums, weighted)
    return amps @ g @ amps


def decoder_terms(delta: Any, delta_inv: Any, eta: float, poles: Any) -> tuple[Any, Any]:
    """(A, eps): b_j = sum_m A_m (1 - eps_m)^j, the first column of B = A C^{-1} for a workload
    a(x) = eta / prod_p (1 - alpha_p x) and the BLT c = N / D, D = prod_i (1 - theta_i x),
    N = prod_k (1 - theta'_k x) (delta = 1 - theta, delta_inv = 1 - theta'): b = eta D / (prod_p
    (1 - alpha_p x) N), partial fractions over the poles (alpha, theta')."""
    xp = _xp(delta, delta_inv)
    eps_poles = xp.concatenate([xp.asarray(1.0 - np.asarray(poles, np.float64)), delta_inv])
    return eta * residues(eps_poles, delta, extra_power=eps_poles.shape[0] - 1 - delta.shape[0]), eps_poles


def sensitivity_squared(omega: Any, delta: Any, p: Participation) -> Any:
    """sum_{i, j in P} X[i, j] for P = {0, b, ..., (m-1) b}, X = C^T C, C the BLT of scales omega and
    decays 1 - delta (sens^2 when c is non-negative and non-increasing: omega >= 0, sum omega <= 1).

    X[i, j] = sum_{t <= n-1-j} c_t c_{t+l} (l = j - i) = [l = 0] + [l > 0] c_l
    + sum_{i', k} omega_i' omega_k theta_k^l G_{n-1-j}(theta_i' theta_k): O(m^2 d^2) for any n.
    """
    xp = _xp(omega, delta)
    n, b, m = p.n, p.min_sep, p.reachable_participations
    # Pairs (a b, (a + q) b): lag q b, last row index n - 1 - j, j = (a + q) b. The m diagonal pairs
    # (lag 0: X[j, j] = 1 + omega^T G omega) and the others (weight 2: X = X^T) are summed apart, so
    # that single participation (m = 1) traces no lag terms (half the loss's graph in optim.blt).
    pair = pair_eps(delta)
    diag_count = (n - 1 - np.arange(m) * b).astype(np.float64)
    g_diag = geometric_sums(pair[None], diag_count[:, None, None])  # (m, d, d)
    total = m + xp.einsum("i,k,pik->", omega, omega, g_diag)
    if m == 1:
        return total
    qs = np.concatenate([np.full(m - q, q) for q in range(1, m)])
    js = np.concatenate([np.arange(q, m) for q in range(1, m)]) * b
    lag = (qs * b).astype(np.float64)
    count = (n - 1 - js).astype(np.float64)
    log_theta = xp.log1p(-delta)
    g = geometric_sums(pair[None], count[:, None, None])  # (P, d, d)
    theta_lag = xp.exp(lag[:, None] * log_theta[None, :])  # (P, d)
    geo = xp.einsum("i,k,pk,pik->p", omega, omega, theta_lag, g)
    c_lag = xp.exp((lag - 1.0)[:, None] * log_theta[None, :]) @ omega  # c_l, l = lag >= 1
    return total + 2.0 * xp.sum(geo + c_lag)


def rational_workload(workload: Workload) -> tuple[float, np.ndarray] | None:
    """(eta, alpha) with a(x) = eta / prod_p (1 - alpha_p x), alpha in (0, 1], for a workload that
    describes itself so (``Workload.rational``: prefix sums, momentum with a constant learning
    rate), else None. Poles at 0 are factors 1 and are dropped; other poles (negative, above 1)
    are outside the closed forms' geometric sums."""
    rational = getattr(workload, "rational", None)
    if rational is None or not workload.is_toeplitz:
        return None
    eta, poles = rational
    alpha = np.asarray(poles, np.float64).reshape(-1)
    alpha = alpha[alpha != 0.0]
    if not (math.isfinite(eta) and np.all((alpha > 0) & (alpha <= 1))):
        return None
    return float(eta), alpha


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
        """sens(C, p): in closed form (``sensitivity_squared``, O(m^2 d^2), no array of length n)
        when omega > 0 and, for m > 1 participations, c_1 = sum omega <= c_0 = 1 (then c is positive
        and decreasing, so the pattern {0, b, ..., (m-1) b} is the worst and the value is exact;
        for m = 1 it is the first column's norm, the largest); otherwise from the materialised
        coefficients (``toeplitz_sensitivity``)."""
        self._check_participation(p)
        theta, omega = np.asarray(self.theta), np.asarray(self.omega)
        m = p.reachable_participations
        if (np.all(omega > 0) and (m == 1 or float(np.sum(omega)) <= 1.0)
                and m * (m + 1) // 2 * omega.size**2 <= CLOSED_FORM_PAIR_LIMIT):
            value = float(sensitivity_squared(omega, 1.0 - theta, p))
            if math.isfinite(value) and value >= 1.0:  # c_0 = 1: sens >= 1 whatever the pattern
                return sens_lib.Sensitivity(math.sqrt(value), True, "blt-closed-form")
        return toeplitz_sensitivity(self, self.toeplitz_coeffs(), p)

    def closed_form_decoder_norms(self, workload: Workload) -> tuple[float, float] | None:
        """(||B||_F^2, ||B[n-1, :]||^2) of B = A C^{-1} for a rational workload (``rational_workload``)
        and omega > 0: B is Toeplitz with b_j = sum_m A_m rho_m^j (``decoder_terms``), so
        ||B||_F^2 = sum_j (n - j) b_j^2 = A^T H_n(rho rho^T) A and the last (largest) row's
        sum_j b_j^2 = A^T G_n(rho rho^T) A: O(d^2), no array of length n. None otherwise (and when
        an inverse decay theta' is not positive, or coincides with a workload pole)."""
        rational = rational_workload(workload)
        if rational is None or workload.n != self.n or not np.all(np.asarray(self.omega) > 0):
            return None
        try:
            theta_inv, _ = self.inverse()
        except ValueError:
            return None
        if not np.all(theta_inv > 0):  # the geometric sums take ratios in (0, 1]
            return None
        eta, alpha = rational
        with np.errstate(divide="ignore", invalid="ignore"):  # a pole of C^{-1} on a workload pole: None
            amps, eps = decoder_terms(1.0 - np.asarray(self.theta), 1.0 - theta_inv, eta, alpha)
            frobenius = float(sum_squares(amps, eps, self.n, power_sums(self.n, SERIES_TERMS), True))
            last_row = float(sum_squares(amps, eps, self.n, None, False))
        if not (math.isfinite(frobenius) and math.isfinite(last_row) and frobenius >= 0 and last_row >= 0):
            return None
        return frobenius, last_row

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
        """c = 1 / r as a power series (O(n log n)); entries that rounding left below 0 are set to 0
        where C is provably entrywise positive (``reciprocal_is_positive``: the realisation of a BLT
        with omega > 0). The series reciprocal is accurate to ~1e-16 absolute, so far in the tail,
        where c_j ~ 1e-18, it can return c_j < 0 for a true c_j > 0 (seen: c_3841 = -2.7e-18 for a
        float32-rounded BLT at n = 5850); 0 is nearer the truth, and MMCC needs C >= 0."""
        c = series.reciprocal(self.inverse_coeffs(), self.n)
        if reciprocal_is_positive(np.asarray(self.theta), np.asarray(self.omega)):
            c = np.maximum(c, 0.0)
        return c

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


def reciprocal_is_positive(theta: np.ndarray, omega: np.ndarray) -> bool:
    """Whether 1 / r, r(x) = 1 + sum_i omega_i x / (1 - theta_i x), has every coefficient >= 0.

    A sufficient condition: every omega_i < 0, the theta_i distinct, and g(0) < 0 if a theta_i is
    negative, where g(y) = r(1 / y) = 1 + sum_i omega_i / (y - theta_i). Proof: g' = sum_i |omega_i| /
    (y - theta_i)^2 > 0, so g rises from -inf to +inf between consecutive theta_i and from -inf to 1
    above the largest, and stays above 1 below the smallest: d simple roots y_1 < ... < y_d with
    y_1 > theta_1 (sorted). Hence 1 / g = 1 + sum_k rho_k / (y - y_k), rho_k = 1 / g'(y_k) > 0, so
    1 / r is the BLT with decays y_k and scales rho_k > 0, whose coefficients sum_k rho_k y_k^(j-1)
    are >= 0 when every y_k >= 0: always if theta_1 >= 0; if theta_1 < 0 < theta_2 (one negative
    decay; two put y_1 < 0) exactly when g(0) <= 0, asked here with a margin (g(0) < -1e-9) so that
    rounding cannot decide it. The inverse of a BLT with omega > 0 has omega' < 0, so its rounded
    realisations qualify.
    """
    theta = np.asarray(theta, np.float64).reshape(-1)
    omega = np.asarray(omega, np.float64).reshape(-1)
    if not (theta.size > 0 and np.all(np.isfinite(theta)) and np.all(np.isfinite(omega)) and np.all(omega < 0)):
        return False
    th = np.sort(theta)
    if np.any(np.diff(th) <= 0):
        return False
    if th[0] >= 0:
        return True
    if th.size > 1 and th[1] <= 0:
        return False
    return bool(1.0 + float(np.sum(omega / -theta)) < -1e-9)


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
