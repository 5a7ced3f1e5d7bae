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

Closed forms (no loss term touches n elements; they live in mfnoise.strategies.blt, which
evaluates the returned strategy with the same sums, numpy there, JAX here). Every sequence is a
sum of geometric ones:
* c_j = sum_i omega_i theta_i^(j-1) (j >= 1), omega_i = res_{1/theta_i} N / D.
* for a rational workload a(x) = eta / prod_p (1 - alpha_p x) (prefix sum: alpha = 1; momentum
  beta with constant learning rate: alpha = 1, beta), b = a / c = eta D / (prod_p (1 - alpha_p x) N)
  = sum_m A_m rho_m^j over the poles rho = (alpha, theta'), by partial fractions.
* sum_{j<n} s_j^2 and sum_{j<n} (n - j) s_j^2 of s_j = sum_m A_m rho_m^j are
  sum_{m,l} A_m A_l G_n(rho_m rho_l) and sum A_m A_l H_n(rho_m rho_l) with
  G_n(q) = sum_{j<n} q^j, H_n(q) = sum_{j<n} (n - j) q^j, evaluated stably for q next to 1.
* sens^2 = sum_{i, j in P} X[i, j], P = {0, b, ..., (m-1) b}, X[i, j] = sum_{l<=n-1-j} c_l c_{l+j-i}:
  O(m^2 d^2).
The workload is rational when it says so (``Workload.rational``: no coefficient of it is read).
Other Toeplitz workloads use the materialised b = a * (1 / c) (O(n d + n log n)).

Stages. Without an ``init``, d buffers are found in d rounds (``Problem.stages``): round s
optimises s active buffers (the others cancelled pairs, exactly no buffer), starting from the best
(s-1)-buffer solution with one buffer inserted at each of several places (``_next_stage``); the
best point over all rounds is kept, so d buffers are never worse than d - 1 (the paper above grows
buffers the same way).

Objectives (mfnoise.optim.objectives). B = A C^{-1} is Toeplitz with first column b, row i is
b_0..b_i, so with r_i = ||B[i, :]||^2 = sum_{j<=i} b_j^2 every objective is sens^2 sum_j W_j b_j^2:
* "max" and "last-iterate": W = 1 (the rows grow, so the largest is the last: the same objective,
  sum_{j<n} b_j^2 = A^T G_n A in closed form);
* "rmse": W_j = (n - j) / n (A^T H_n A / n in closed form);
* Weighted(w): W_j = sum_{i>=j} w_i / sum w (``objectives.toeplitz_weights``), summed over the
  materialised b (O(n d + n log n): the weights are n numbers anyway).

The loss is log(objective). The final strategy's numbers come from mfnoise.strategies.error.evaluate.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload
from mfnoise.optim import objectives
from mfnoise.optim.problem import FAST_COMPILE, Problem, check_arguments, register
from mfnoise.optim.toeplitz import series_multiply, workload_coeffs
from mfnoise.strategies.blt import (
    BLT,
    SERIES_TERMS,
    blt_inverse,
    decoder_terms,
    power_sums,
    rational_workload,
    residues,
    sensitivity_squared,
    sum_squares,
)
from mfnoise.strategies.blt import geometric_sums as geometric_sums  # re-exported (tests read it here)

DEFAULT_BUFFERS = 4
_CANCEL = -40.0
"""Gap parameter of a cancelled pair: softplus(-40) ~ 4e-18 is below float64 resolution of log(1 - decay),
so theta' == theta exactly, omega = 0, and the pair contributes exactly nothing (a BLT with one buffer fewer)."""


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


_COMPILER_OPTIONS = {**FAST_COMPILE, "xla_cpu_use_fusion_emitters": False, "xla_cpu_parallel_codegen_split_count": 1}
"""The loss is a few hundred scalar-sized operations: XLA's CPU fusion emitters spend about 5x longer
compiling them (measured at 8 buffers) than the classic emitters, and the compiled loss runs as fast;
splitting so small a module for parallel code generation costs more than it saves (about a third of
the compile's CPU time, n = 10^7, 8 buffers)."""

SUPPORTED_OBJECTIVES = ("rmse", "max", "last-iterate", "weighted")


def problem(workload: Workload, participation: Participation, *, objective: objectives.Objective = "rmse",
            bands: int | None = None, buffers: int | None = None, init=None) -> Problem:
    """min over v in R^{2d} of log(objective) for the BLT with d = ``buffers`` (see module docstring).

    ``objective``: "rmse", "max", "last-iterate" (the same objective as "max" here) or a
    ``mfnoise.optim.objectives.Weighted``.

    ``init``: None (log-spaced decays), a parameter vector v of length 2 * buffers, or a BLT
    (its decays must interlace with its inverse's, i.e. omega > 0).
    """
    p = participation
    n = check_arguments(workload, p, objective, supported=SUPPORTED_OBJECTIVES)
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
    name = objectives.name(objective)
    # W_j of the module docstring: None for the closed forms ("max" / "last-iterate": W = 1; rmse).
    step_weights = objectives.toeplitz_weights(objective, n) if name == "weighted" else None
    rational = rational_workload(workload) if step_weights is None else None
    a = None if rational is not None else workload_coeffs(workload)
    weighted = name == "rmse"
    sums = power_sums(n, SERIES_TERMS) if weighted else None

    def loss(v: jax.Array) -> jax.Array:
        delta, delta_inv = _split(v)
        sens2 = sensitivity_squared(residues(delta, delta_inv), delta, p)  # omega_i = res of N / D
        if rational is not None:
            amps, eps = decoder_terms(delta, delta_inv, *rational)
            err2 = sum_squares(amps, eps, n, sums, weighted)
            if weighted:
                err2 = err2 / n
        else:
            b = _materialized_decoder(delta, delta_inv, jnp.asarray(a), n)
            if step_weights is not None:
                w = jnp.asarray(step_weights)
            else:
                w = jnp.arange(n, 0, -1, dtype=b.dtype) / n if weighted else 1.0
            err2 = jnp.sum(w * b * b)
        return 0.5 * (jnp.log(sens2) + jnp.log(err2))

    def to_strategy(v: np.ndarray) -> BLT:
        return _blt_from_params(v, n)[0]

    def extra_report(v: np.ndarray, result: Any) -> dict[str, Any]:
        _, cancelled, merged = _blt_from_params(v, n)
        dropped = " and ".join(w for w, k in (("cancelled", cancelled), ("merged", merged)) if k)
        return {"buffers_requested": d, "buffers_dropped": dropped or None}

    return Problem(
        x0=np.asarray(v0, np.float64),
        value_and_grad=_flat_value_and_grad(loss),
        to_strategy=to_strategy,
        name=f"blt(n={n}, buffers={d}, {name})",
        stages=stages,
        next_stage=lambda v, stage: _next_stage(v, stage, d, n),
        objective_from_loss=math.exp,
        extra_report=extra_report,
        cpu_compiler_options=_COMPILER_OPTIONS,
        method="lbfgs",  # 2d parameters: scipy's import and per-iteration wrapper cost more than the loss
    )


def _flat_value_and_grad(loss):
    """jax.value_and_grad(loss), differentiated through loss's jaxpr.

    The loss is a few hundred jnp operations, each an (inlined) jit of its own: differentiating the
    Python function linearizes every one of those calls, differentiating its traced jaxpr (primitives
    only) does not, which cuts the first call's tracing by about a quarter (0.26 -> 0.19 s of CPU,
    n = 10^7, 8 buffers; the compiled function and its values are the same)."""
    from jax.extend.core import jaxpr_as_fun

    def value_and_grad(v):
        flat = jaxpr_as_fun(jax.make_jaxpr(loss)(v))
        return jax.value_and_grad(lambda u: flat(u)[0])(v)

    return value_and_grad


def _blt_from_params(v: np.ndarray, n: int) -> tuple[BLT, int, int]:
    """(the BLT of parameters v (numpy float64), pairs cancelled, buffers merged away).

    Cancelled pairs (omega = 0 exactly) are no buffers at all. Decays within _MERGE_GAP of each other
    (only possible next to the saturation bound 1 - 9e-14, or for gaps below float64 resolution) are
    one buffer with the summed scale.
    """
    ld = _log_deltas(np.asarray(v, np.float64), np)
    delta, delta_inv = np.exp(ld[1::2]), np.exp(ld[0::2])
    theta = 1.0 - delta
    with np.errstate(invalid="ignore", divide="ignore"):  # coinciding poles: refused just below
        omega = np.asarray(residues(delta, delta_inv))
    # A cancelled pair has omega = 0 exactly; a pair whose gap is below float64 resolution of its
    # decays, omega ~ 1e-20 or less: neither changes any c_j by more than 1e-16 / n (for j < n), and the
    # latter's inverse decays are not resolvable in float64, so neither is a buffer.
    keep = ~(np.abs(omega) <= 1e-16 / n)
    theta, omega = theta[keep], omega[keep]
    cancelled, uncancelled = int(np.sum(~keep)), int(theta.size)
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
    return BLT(theta, omega, n), cancelled, uncancelled - int(theta.size)


_MERGE_GAP = 2.0**-46
"""Decays closer than 64 float64 steps below 1 (~1.4e-14) are one buffer: their inverse's decays,
between them, are not resolvable in float64 (the noise generator streams with those), and merging
them changes c_j by at most omega j 1.4e-14 (omega > 0: no cancellation)."""


def _inverse_coeffs(delta: jax.Array, delta_inv: jax.Array, n: int) -> jax.Array:
    """First n coefficients of 1 / c = D / N (materialised, O(n d))."""
    amps = residues(delta_inv, delta, extra_power=-1)  # prod (eps_z - eps_m) / (rho_m prod ...)
    s0_inv = 1.0 - jnp.sum(amps)
    j = jnp.arange(n, dtype=delta.dtype)
    geo = jnp.exp(-j[:, None] * (-jnp.log1p(-delta_inv))[None, :]) @ amps
    return geo.at[0].add(s0_inv)


def _materialized_decoder(delta: jax.Array, delta_inv: jax.Array, a: jax.Array, n: int) -> jax.Array:
    """b = a * (1 / c) mod x^n, shape (n,) (any Toeplitz workload)."""
    return series_multiply(a, _inverse_coeffs(delta, delta_inv, n), n)


register("blt", problem)
