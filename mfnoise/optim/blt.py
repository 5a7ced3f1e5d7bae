"""The ``blt`` family's problem: BLT (buffered linear Toeplitz) strategies, in closed form.

A BLT with d buffers is the Toeplitz C with c(x) = N(x) / D(x), D = prod_i (1 - theta_i x),
N = prod_k (1 - theta'_k x), and C^{-1} is the BLT with decays theta' ("Efficient and Near-Optimal
Noise Generation for Streaming Differential Privacy", Dvijotham et al. 2024, arXiv:2404.16706;
mfnoise.strategies.blt).

Parametrisation. The 2d decays interlace, 0 < theta'_1 < theta_1 < theta'_2 < ... < theta'_d <
theta_d < 1, which is exactly the set of BLTs with output scales omega_i > 0 whose inverse has
positive decays. Then c_0 = 1 >= c_1 = sum_i omega_i = sum_i (theta_i - theta'_i) > 0 and
c_j > 0 decreases, so the exact Toeplitz sensitivity (pattern {0, b, 2b, ...}) applies to any
participation schema. The decays are held as delta = 1 - theta in log space (precision next to
1 for n up to 10^7 and more): y_k = softplus(v_1) + ... + softplus(v_k) (increasing), log delta_(k)
= -(TAU + h(y_k)), the odd-ranked ones theta', the even-ranked ones theta. Any v in R^{2d} is valid
in exact arithmetic; in float64, gaps below its resolution can make two poles coincide, where the
loss is NaN (a wall for the line search) and to_strategy refuses (_blt_from_params).
h(y) = y / (1 + (y / L)^p)^(1/p) (p = SATURATION_POWER, L = LOG_DELTA_RANGE) is the identity up to
a relative 5e-4 for y < L / 2 and saturates smoothly below L, so every decay lies in
[1 - e^-TAU, 1 - e^-(TAU + L)] ~ [1e-7, 1 - 9e-14]: a decay whose optimum is 1 (a constant column,
which some multi-epoch max-error optima approach) stays a float64 number below 1 with a finite
output scale, instead of rounding to theta = 1.0. h is strictly increasing (in float64 up to
y ~ 40 L, far past where the loss is flat) and acts on each y_k alone, so distinct decays stay
distinct and a cancelled pair (two equal y) stays exactly cancelled.

Closed forms (no loss term touches n elements). Every sequence is a sum of geometric ones:
* c_j = s_0 [j = 0] + sum_i r_i theta_i^j, r_i = omega_i / theta_i = res_{1/theta_i} N / D.
* for a rational workload a(x) = eta / prod_p (1 - alpha_p x) (prefix sum: alpha = 1; momentum
  beta with constant learning rate: alpha = 1, beta), b = a / c = eta D / (prod_p (1 - alpha_p x) N)
  = sum_m A_m rho_m^j over the poles rho = (alpha, theta'), by partial fractions.
* sum_{j<n} s_j^2 and sum_{j<n} (n - j) s_j^2 of s_j = sum_m A_m rho_m^j are
  sum_{m,l} A_m A_l G_n(rho_m rho_l) and sum A_m A_l H_n(rho_m rho_l) with
  G_n(q) = sum_{j<n} q^j, H_n(q) = sum_{j<n} (n - j) q^j, evaluated stably for q next to 1.
* sens^2 = sum_{i, j in P} X[i, j], P = {0, b, ..., (m-1) b}, X[i, j] = sum_{l<=n-1-j} c_l c_{l+j-i}:
  O(m^2 d^2).
Other Toeplitz workloads use the materialised b = a * (1 / c) (O(n d + n log n)).

Stages. Without an ``init``, d buffers are found in d rounds (``Problem.stages``): round s
optimises s active buffers (the others cancelled pairs, exactly no buffer), starting from the best
(s-1)-buffer solution with one buffer inserted at each of several places (``_next_stage``); the
best point over all rounds is kept, so d buffers are never worse than d - 1 (the paper above grows
buffers the same way).

The loss is log(objective), objective = max_error or rmse. The final strategy's numbers come from
mfnoise.strategies.error.evaluate.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload
from mfnoise.optim.problem import FAST_COMPILE, Problem, check_arguments, register
from mfnoise.optim.toeplitz import series_multiply, workload_coeffs
from mfnoise.strategies.blt import BLT, blt_inverse

DEFAULT_BUFFERS = 4
SERIES_TERMS = 16
_SMALL_X = 0.5
_CANCEL = -40.0
"""Gap parameter of a cancelled pair: softplus(-40) ~ 4e-18 is below float64 resolution of log(1 - decay),
so theta' == theta exactly, omega = 0, and the pair contributes exactly nothing (a BLT with one buffer fewer)."""


# -- stable geometric sums -----------------------------------------------------------------------
def power_sums(n: int, k_max: int) -> np.ndarray:
    """S_k = sum_{j<n} j^k for k = 0..k_max, exactly (sum_{i<=k} C(k+1, i) S_i = n^{k+1})."""
    s: list[Fraction] = []
    for k in range(k_max + 1):
        acc = Fraction(n) ** (k + 1) - sum(math.comb(k + 1, i) * s[i] for i in range(k))
        s.append(acc / (k + 1))
    return np.array([float(x) for x in s])


def _psi(eps: jax.Array) -> jax.Array:
    """-log1p(-eps) / eps (-> 1 as eps -> 0), eps in [0, 1)."""
    small = eps < 1e-8
    safe = jnp.where(small, 0.5, eps)
    return jnp.where(small, 1.0 + eps / 2, -jnp.log1p(-safe) / safe)


def _phi(x: jax.Array) -> jax.Array:
    """-expm1(-x) / x (-> 1 as x -> 0), x >= 0."""
    small = x < 1e-8
    safe = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 - x / 2, -jnp.expm1(-safe) / safe)


def geometric_sums(eps: jax.Array, n: jax.Array | np.ndarray | int, sums: np.ndarray | None = None,
                   weighted: bool = False) -> jax.Array:
    """G_n(q) = sum_{j<n} q^j, or H_n(q) = sum_{j<n} (n - j) q^j if ``weighted``, q = 1 - eps.

    eps in [0, 1) (elementwise, any shape); n broadcasts (int or array) for G, must be a Python
    int for H (``sums`` = power_sums(n, SERIES_TERMS)). With L = -log(q), x = n L:
    G = n phi(x) psi(eps); H = G + (n - G) / eps with n - G = sum_{j<n} (1 - e^{-jL}) from its
    alternating series in L when x is small (no cancellation), else directly.
    """
    big_l = eps * _psi(eps)
    x = jnp.multiply(n, big_l)
    g = jnp.multiply(n, _phi(x)) * _psi(eps)
    if not weighted:
        return g
    if sums is None:
        raise ValueError("the weighted sums H_n need sums = power_sums(n, SERIES_TERMS)")
    small = x < _SMALL_X
    # (n - G) / eps = psi * sum_{k>=1} (-1)^{k+1} L^{k-1} S_k / k!
    l_small = jnp.where(small, big_l, 0.0)
    series = 0.0
    for k in range(SERIES_TERMS, 0, -1):  # Horner in L
        series = series * l_small + (-1) ** (k + 1) * sums[k] / math.factorial(k)
    series = series * _psi(eps)
    eps_safe = jnp.where(small, 1.0, eps)
    direct = (n - g) / eps_safe
    return g + jnp.where(small, series, direct)


# -- decays and residues -------------------------------------------------------------------------
LOG_DELTA_RANGE = 30.0
"""L: 1 - decay >= e^-(TAU + L) ~ 9.4e-14, about 850 float64 steps below 1 (n * 9.4e-14 < 1e-6
for n up to 10^7: a decay there is a constant column for any practical n)."""
TAU = 1e-7
"""log(1 - decay) <= -TAU: every decay (and inverse decay) is at least about 1e-7, so that products
of two decays (the geometric sums' ratios q) stay above float64 resolution (1 - q < 1 exactly)."""
SATURATION_POWER = 8
LOG_DELTA_MIN = -(TAU + LOG_DELTA_RANGE)


def saturate(y, xp=jnp):
    """h(y) = y / (1 + (y / L)^p)^(1/p) for y >= 0: increasing from 0 to L (exclusive).

    Written as min(y, L) / (1 + r^p)^(1/p), r = min(y, L) / max(y, L) <= 1, so that no power
    overflows for huge y (an overshooting line-search step) and both forms share one expression."""
    lo = xp.minimum(y, LOG_DELTA_RANGE)
    r = lo / xp.maximum(y, LOG_DELTA_RANGE)
    return lo * (1.0 + r**SATURATION_POWER) ** (-1.0 / SATURATION_POWER)


def unsaturate(z: np.ndarray) -> np.ndarray:
    """h^-1(z) = z / (1 - (z / L)^p)^(1/p) for 0 <= z < L (numpy; z is clipped just below L)."""
    z = np.clip(np.asarray(z, np.float64), 0.0, LOG_DELTA_RANGE * (1 - 1e-9))
    return z / (1.0 - (z / LOG_DELTA_RANGE) ** SATURATION_POWER) ** (1.0 / SATURATION_POWER)


def _log_deltas(v, xp=jnp):
    """log(1 - decay) of the 2d interlaced decays, decreasing (decays increasing), shape (2d,)."""
    softplus = jax.nn.softplus if xp is jnp else (lambda x: np.logaddexp(0.0, x))
    return -(TAU + saturate(xp.cumsum(softplus(v)), xp))


def _split(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(delta, delta') = 1 - (theta, theta') from the parameters (each shape (d,))."""
    ld = _log_deltas(v)
    return jnp.exp(ld[1::2]), jnp.exp(ld[0::2])


def _residues(eps_poles, eps_zeros, extra_power: int = 0):
    """A_m of P / prod_m (1 - rho_m x), P = prod_z (1 - zeta_z x), in 1 - decay coordinates.

    A_m = rho_m^extra_power prod_z (eps_z - eps_m) / prod_{l != m} (eps_l - eps_m), where the
    extra power is (#poles - 1 - #zeros) (rho_m^(M-1-Z) from clearing 1/rho_m factors).
    numpy in, numpy out (for to_strategy); JAX otherwise.
    """
    xp = np if isinstance(eps_poles, np.ndarray) else jnp
    diff_z = eps_zeros[None, :] - eps_poles[:, None]  # (M, Z)
    diff_p = eps_poles[None, :] - eps_poles[:, None]  # (M, M)
    diff_p = diff_p + xp.eye(eps_poles.shape[0])
    res = xp.prod(diff_z, axis=1) / xp.prod(diff_p, axis=1)
    if extra_power:
        res = res * (1.0 - eps_poles) ** extra_power
    return res


def _strategy_terms(delta: jax.Array, delta_inv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s0, r): c_j = s0 [j = 0] + sum_i r_i theta_i^j, with c_0 = s0 + sum r = 1."""
    theta = 1.0 - delta
    # r_i = prod_k (theta_i - theta'_k) / (theta_i prod_{l != i} (theta_i - theta_l))
    r = _residues(delta, delta_inv) / theta
    s0 = 1.0 - jnp.sum(r)
    return s0, r


def _rational_workload(workload: Workload) -> tuple[float, np.ndarray] | None:
    """(eta, alpha) with a(x) = eta / prod_p (1 - alpha_p x), or None for other workloads."""
    if not workload.is_toeplitz:
        return None
    a = np.asarray(workload.coeffs, np.float64)
    n = a.size
    d = np.arange(n)
    if workload.beta is not None and 0.0 < workload.beta < 1.0:
        beta = float(workload.beta)
        eta = float(a[0])
        if np.allclose(a, eta * (1.0 - beta ** (d + 1)) / (1.0 - beta), rtol=1e-12, atol=0):
            return eta, np.array([1.0, beta])
    if np.all(a == a[0]) and a[0] > 0:
        return float(a[0]), np.array([1.0])
    return None


def _decoder_terms(delta: jax.Array, delta_inv: jax.Array, eta: float, alpha: np.ndarray):
    """(A, eps): b_j = sum_m A_m (1 - eps_m)^j for a = eta / prod_p (1 - alpha_p x)."""
    eps_poles = jnp.concatenate([jnp.asarray(1.0 - alpha), delta_inv])
    m = eps_poles.shape[0]
    d = delta.shape[0]
    return eta * _residues(eps_poles, delta, extra_power=m - 1 - d), eps_poles


def _pair_eps(eps: jax.Array) -> jax.Array:
    """1 - rho_m rho_l for all pairs, shape (M, M)."""
    return eps[:, None] + eps[None, :] - eps[:, None] * eps[None, :]


def _sum_squares(amps: jax.Array, eps: jax.Array, n: int, sums: np.ndarray, weighted: bool) -> jax.Array:
    """sum_{j<n} w_j s_j^2 for s_j = sum_m amps_m (1 - eps_m)^j, w = 1 or n - j."""
    g = geometric_sums(_pair_eps(eps), n, sums, weighted)
    return amps @ g @ amps


def _sensitivity_squared(s0: jax.Array, r: jax.Array, delta: jax.Array, p: Participation) -> jax.Array:
    """sens^2 = sum_{i,j in {0, b, ..}} X[i, j] for c_j = s0 [j = 0] + sum_i r_i theta_i^j (c >= 0 decreasing)."""
    n, b = p.n, p.min_sep
    m = p.reachable_participations
    # Pairs (i, j) = (a b, (a + q) b): lag d = q b, last index L = n - 1 - j (terms l = 0..L).
    qs, lens, weights = [], [], []
    for q in range(m):
        for a_ in range(m - q):
            j = (a_ + q) * b
            qs.append(q * b)
            lens.append(n - j)  # number of terms L + 1
            weights.append(1.0 if q == 0 else 2.0)
    lag = np.array(qs, np.float64)
    count = np.array(lens, np.float64)
    w = np.array(weights)
    eps2 = _pair_eps(delta)  # (d, d)
    big_l = -jnp.log1p(-delta)  # -log theta
    # sum_{l<=L} c_l c_{l+lag}: s0 c_lag + sum_{i,k} r_i r_k theta_k^lag G_{L+1}(theta_i theta_k), plus
    # s0^2 + 2 s0 sum r for lag = 0 (c_0 = s0 + sum r).
    g = geometric_sums(eps2[None], count[:, None, None])  # (P, d, d)
    theta_lag = jnp.exp(-lag[:, None] * big_l[None, :])  # (P, d)
    geo = jnp.einsum("i,k,pk,pik->p", r, r, theta_lag, g)
    c_lag = theta_lag @ r
    head = jnp.where(lag == 0, s0 * s0 + 2.0 * s0 * jnp.sum(r), s0 * c_lag)
    return jnp.sum(w * (geo + head))


# -- the problem -----------------------------------------------------------------------------------
def params_from_log_deltas(ld: np.ndarray) -> np.ndarray:
    """v for decreasing log-deltas within (LOG_DELTA_MIN, -TAU) (the inverse of _log_deltas)."""
    y = unsaturate(-np.asarray(ld, np.float64) - TAU)
    gaps = np.diff(np.concatenate([[0.0], y]))
    return np.log(np.expm1(np.maximum(gaps, 1e-300)))  # softplus^{-1}


_INIT_TOP = 0.4571
"""1 - the largest initial decay; not a round number, so that it does not coincide with a
workload pole (momentum beta = 0.5 would make a double pole)."""


def init_params(buffers: int, n: int) -> np.ndarray:
    """v whose 2d decays have 1 - decay log-spaced from about 1/2 down to about 1/n (an
    exponential-sum quadrature of the square root's j^(-1/2) decay)."""
    k = 2 * buffers
    ld = np.linspace(np.log(_INIT_TOP), np.log(0.5 / n), k)
    return params_from_log_deltas(ld)


def _with_cancelled(active_ld: np.ndarray, buffers: int) -> np.ndarray:
    """v for the active (interlaced) log-deltas followed by cancelled pairs (omega = 0) below them."""
    v = list(params_from_log_deltas(active_ld))
    for _ in range(buffers - active_ld.size // 2):
        v += [math.log(math.expm1(1.0)), _CANCEL]
    return np.array(v)


def _staged_start(buffers: int, n: int) -> np.ndarray:
    """Round 1: one active buffer (log-spaced init), the other pairs cancelled."""
    return _with_cancelled(np.log([_INIT_TOP, 0.5 / n]), buffers)


_NEAR_ONE = math.log(1e-12)
"""log(1 - decay) of the near-constant buffer that each round also tries (1 - decay = 1e-12)."""


def _next_stage(v: np.ndarray, stage: int, buffers: int, n: int) -> list[np.ndarray]:
    """Starts for round ``stage``: the active pairs of v plus one new pair, inserted either inside
    each log gap between pairs (and above / below all), right next to an existing decay (optima often
    hold two nearly equal decays, approximating a double pole theta^j j, which local steps from a
    distant insertion miss), or next to 1 (1 - decay = 1e-12: a nearly constant column)."""
    ld = _log_deltas(np.asarray(v, np.float64), np)
    pairs = ld.reshape(-1, 2)
    active = pairs[pairs[:, 0] - pairs[:, 1] > 1e-12][: stage - 1].reshape(-1)
    # Slots where a pair may go without breaking interlacing: above the first, between pairs, below
    # the last (at most 3 lower in log(1 - decay), and within the saturated range).
    bottom = max(active[-1] - 3.0, 0.5 * (active[-1] + LOG_DELTA_MIN)) if active.size else math.log(0.5 / n)
    bounds = np.concatenate([[0.0], active, [bottom]])
    slots = [(bounds[2 * i], bounds[2 * i + 1]) for i in range(active.size // 2 + 1)]
    news = [np.array([hi - (hi - lo) / 3, hi - 2 * (hi - lo) / 3]) for hi, lo in slots]
    for i in range(active.size // 2):  # just below decay i (theta slightly larger), inside its slot
        hi, lo = slots[i + 1]
        eta = min(1e-2, (hi - lo) / 3)
        news.append(np.array([hi - eta, hi - 2 * eta]))
    if active.size and active[-1] > _NEAR_ONE + 2.0:
        # A decay next to 1 (a nearly constant column): multi-epoch max-error optima often hold one,
        # and from the slots above, local steps rarely get that far into the saturated range.
        # Its inverse decay (the zero) below the others, so that its scale omega ~ 1 - zero is not tiny.
        news.append(np.array([max(active[-1] - 2.0, _NEAR_ONE + 1.0), _NEAR_ONE]))
    return [_with_cancelled(np.sort(np.concatenate([active, new]))[::-1], buffers) for new in news]


def _params_from_blt(theta: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """v for a BLT with omega > 0 (its inverse decays must be positive and distinct)."""
    order = np.argsort(np.asarray(theta, np.float64))
    theta = np.asarray(theta, np.float64)[order]
    inv_theta, _ = blt_inverse(theta, np.asarray(omega, np.float64)[order])
    decays = np.empty(2 * theta.size)
    decays[0::2], decays[1::2] = np.sort(inv_theta), theta
    if np.any(np.diff(decays) <= 0) or decays[0] <= 0 or decays[-1] >= 1:
        raise ValueError("init BLT must have omega > 0 and positive inverse decays (interlacing)")
    return params_from_log_deltas(np.log1p(-decays))


def problem(workload: Workload, participation: Participation, *, objective: str = "rmse",
            bands: int | None = None, buffers: int | None = None, init=None) -> Problem:
    """min over v in R^{2d} of log(objective) for the BLT with d = ``buffers`` (see module docstring).

    ``init``: None (log-spaced decays), a parameter vector v of length 2 * buffers, or a BLT
    (its decays must interlace with its inverse's, i.e. omega > 0).
    """
    p = participation
    n = check_arguments(workload, p, objective)
    if bands is not None:
        raise ValueError("bands applies to banded families, not blt (use buffers)")
    d = DEFAULT_BUFFERS if buffers is None else int(buffers)
    if d < 1:
        raise ValueError(f"buffers must be positive, got {d}")
    stages = 1
    if init is None:
        v0, stages = _staged_start(d, n), d
    elif isinstance(init, BLT):
        if init.buffers != d:
            raise ValueError(f"init BLT has {init.buffers} buffers, expected {d}")
        v0 = _params_from_blt(init.theta, init.omega)
    else:
        v0 = np.asarray(init, np.float64)
        if v0.shape != (2 * d,):
            raise ValueError(f"init has shape {v0.shape}, expected ({2 * d},)")
    rational = _rational_workload(workload)
    a = None if rational is not None else workload_coeffs(workload)
    weighted = objective == "rmse"
    sums = power_sums(n, SERIES_TERMS)

    def loss(v: jax.Array) -> jax.Array:
        delta, delta_inv = _split(v)
        s0, r = _strategy_terms(delta, delta_inv)
        sens2 = _sensitivity_squared(s0, r, delta, p)
        if rational is not None:
            amps, eps = _decoder_terms(delta, delta_inv, *rational)
            err2 = _sum_squares(amps, eps, n, sums, weighted)
        else:
            b = _materialized_decoder(delta, delta_inv, jnp.asarray(a), n)
            w = jnp.arange(n, 0, -1, dtype=b.dtype) if weighted else 1.0
            err2 = jnp.sum(w * b * b)
        if weighted:
            err2 = err2 / n
        return 0.5 * (jnp.log(sens2) + jnp.log(err2))

    def to_strategy(v: np.ndarray) -> BLT:
        return _blt_from_params(v, n)

    return Problem(
        x0=np.asarray(v0, np.float64),
        value_and_grad=jax.value_and_grad(loss),
        to_strategy=to_strategy,
        name=f"blt(n={n}, buffers={d}, {objective})",
        stages=stages,
        next_stage=lambda v, stage: _next_stage(v, stage, d, n),
        objective_from_loss=math.exp,
        cpu_compiler_options=FAST_COMPILE,
    )


def _blt_from_params(v: np.ndarray, n: int) -> BLT:
    """The BLT of parameters v (numpy float64).

    Cancelled pairs (omega = 0 exactly) are no buffers at all. Decays within _MERGE_GAP of each other
    (only possible next to the saturation bound 1 - 9e-14, or for gaps below float64 resolution) are
    one buffer with the summed scale.
    """
    ld = _log_deltas(np.asarray(v, np.float64), np)
    delta, delta_inv = np.exp(ld[1::2]), np.exp(ld[0::2])
    theta = 1.0 - delta
    with np.errstate(invalid="ignore", divide="ignore"):  # coinciding poles: refused just below
        omega = np.asarray(_residues(delta, delta_inv))  # r_i theta_i
    # A cancelled pair has omega = 0 exactly; a pair whose gap is below float64 resolution of its
    # decays, omega ~ 1e-20 or less: neither changes any c_j by more than 1e-16 / n (for j < n), and the
    # latter's inverse decays are not resolvable in float64, so neither is a buffer.
    keep = ~(np.abs(omega) <= 1e-16 / n)
    theta, omega = theta[keep], omega[keep]
    if not np.all(np.isfinite(omega)):
        # Two poles that coincide in float64 (gaps below its resolution): the loss is NaN there too.
        raise ValueError(f"BLT parameters give non-finite output scales {omega}")
    if theta.size == 0:
        raise ValueError("BLT parameters cancel every buffer (the identity strategy, not a BLT)")
    if theta.size > 1 and np.any(np.diff(theta) < _MERGE_GAP):
        # Consecutive decays closer than _MERGE_GAP: one buffer, omega-weighted decay (first-order
        # exact: sum_i omega_i theta_i^j = (sum omega) theta_bar^j + O(j^2 gap^2)).
        group = np.concatenate([[0], np.cumsum(np.diff(theta) >= _MERGE_GAP)])
        total = np.bincount(group, weights=omega)
        theta, omega = np.bincount(group, weights=omega * theta) / total, total
    while theta.size > 1:
        try:
            blt_inverse(theta, omega)  # what the noise generator and mfnoise.evaluate stream with
            break
        except ValueError:
            # Two poles so close (relative to 1 - theta) that the inverse decay between them is not
            # resolvable in float64: one buffer (a near-double pole costs digits, not accuracy).
            i = int(np.argmin(np.diff(theta) / (1.0 - theta[1:])))
            w = omega[i] + omega[i + 1]
            merged = (omega[i] * theta[i] + omega[i + 1] * theta[i + 1]) / w
            theta = np.concatenate([theta[:i], [merged], theta[i + 2:]])
            omega = np.concatenate([omega[:i], [w], omega[i + 2:]])
    return BLT(theta, omega, n)


_MERGE_GAP = 2.0**-46
"""Decays closer than 64 float64 steps below 1 (~1.4e-14) are one buffer: their inverse's decays,
between them, are not resolvable in float64 (the noise generator streams with those), and merging
them changes c_j by at most omega j 1.4e-14 (omega > 0: no cancellation)."""


def _inverse_coeffs(delta: jax.Array, delta_inv: jax.Array, n: int) -> jax.Array:
    """First n coefficients of 1 / c = D / N (materialised, O(n d))."""
    amps = _residues(delta_inv, delta, extra_power=-1)  # prod (eps_z - eps_m) / (rho_m prod ...)
    s0_inv = 1.0 - jnp.sum(amps)
    j = jnp.arange(n, dtype=delta.dtype)
    geo = jnp.exp(-j[:, None] * (-jnp.log1p(-delta_inv))[None, :]) @ amps
    return geo.at[0].add(s0_inv)


def _materialized_decoder(delta: jax.Array, delta_inv: jax.Array, a: jax.Array, n: int) -> jax.Array:
    """b = a * (1 / c) mod x^n, shape (n,) (any Toeplitz workload)."""
    return series_multiply(a, _inverse_coeffs(delta, delta_inv, n), n)


register("blt", problem)
