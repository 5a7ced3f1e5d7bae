"""The ``toeplitz`` family's problem: (banded) Toeplitz strategies C[i, j] = c_{i-j}, i - j < bands.

For a Toeplitz workload A (first column a) the decoder B = A C^{-1} is Toeplitz with first column
b = a / c (power series mod x^n), so

    ||B||_F^2 = sum_j (n - j) b_j^2,      max_i ||B[i, :]||^2 = sum_{j<n} b_j^2   (the last row).

b is computed by a blocked recurrence in O(n bands) (``decoder_coeffs``), or past
``_FFT_ABOVE_BANDS`` bands in O(n log n) by a Newton iteration for 1 / c (each step an FFT
product, doubling the number of exact coefficients) and one FFT product; JAX differentiates
through either. Banded Toeplitz is this family with ``bands`` < n (the family's one name in files,
the command line and the library: ``toeplitz``; ``banded-toeplitz`` is a deprecated alias).

Sensitivity ("Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning",
Choquette-Choo et al. 2023, arXiv:2211.06530):

* bands <= min_sep (or one participation): columns in one pattern have disjoint supports, so
  sens^2 = max_P sum_{t in P} ||C[:, t]||^2. ||C[:, t]||^2 = S(min(bands, n - t)) with
  S(l) = sum_{j<l} c_j^2 is non-increasing in t, so the pattern {0, b, ..., (m-1) b},
  m = reachable participations, is the worst: sens^2 = sum_{i<m} S(min(bands, n - i b)).
* bands > min_sep: c is kept non-negative and non-increasing by the parametrisation
  c_0 = 1, c_j = prod_{i<=j} sigmoid(u_i); then X = C^T C >= 0 and the same pattern is the worst
  (mfnoise.core.sensitivity.toeplitz): sens^2 = sum_{i,j in P} X[i, j], X[i, j] = sum_{l<=n-1-j} c_l c_{l+j-i}.

Objectives (``mfnoise.optim.objectives``): every one is sens^2 sum_j W_j b_j^2 for weights W
(``objectives.toeplitz_weights``): rmse W_j = (n - j) / n; max and last-iterate W_j = 1 (the rows of B
are prefixes of b, so the last row is the largest); Weighted(w) W_j = sum_{i>=j} w_i / sum w.
The loss is log(objective) (scale-invariant, so c_0 = 1 is fixed). The strategy's final
sensitivity and error are recomputed by mfnoise.strategies.error.evaluate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload
from mfnoise.optim import objectives
from mfnoise.optim.problem import FAST_COMPILE, Problem, check_arguments, register
from mfnoise.strategies import closed_forms
from mfnoise.strategies.toeplitz import Toeplitz

DEFAULT_MAX_BANDS = 64


# -- power series in JAX (float64 under jax.enable_x64) -----------------------------------------
def _fft_size(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def series_multiply(a: jax.Array, b: jax.Array, m: int) -> jax.Array:
    """First m coefficients of a(x) b(x), shape (m,) (an FFT product)."""
    a, b = a[:m], b[:m]
    size = _fft_size(a.shape[0] + b.shape[0] - 1)
    out = jnp.fft.irfft(jnp.fft.rfft(a, size) * jnp.fft.rfft(b, size), size)[:m]
    return jnp.pad(out, (0, m - out.shape[0]))


def series_reciprocal(t: jax.Array, n: int) -> jax.Array:
    """First n coefficients of 1 / t(x) (t_0 != 0), shape (n,).

    Newton's iteration g <- g (2 - t g) mod x^m with m doubling: each step keeps exactly the
    coefficients that are already correct (so nothing spurious can grow), ceil(log2 n) steps.
    """
    g = (1.0 / t[0])[None]
    m = 1
    while m < n:
        m = min(2 * m, n)
        e = -series_multiply(t, g, m)
        e = e.at[0].add(2.0)
        g = series_multiply(g, e, m)
    return g


_BLOCK = 128
"""Block size of the blocked recurrence for b = a / c."""

_FFT_ABOVE_BANDS = 8192
"""Above this many bands, b = a / c uses the FFT Newton reciprocal instead of the recurrence."""


def decoder_coeffs(a: jax.Array, c: jax.Array, n: int) -> jax.Array:
    """b = a / c mod x^n: first column of B = A C^{-1}, shape (n,), for c of length bands.

    Blocked recurrence (O(n * bands)): with blocks of s = min(bands - 1, _BLOCK) steps,
    L b_k = a_k - sum_{h=1..H} U_h b_{k-h}, L[i, i'] = c_{i-i'} (i >= i'),
    U_h[i, i'] = c_{h s + i - i'} (zero outside 1..bands-1), H = ceil((bands - 1) / s).
    One small triangular inverse and a scan over n / s blocks: quick to compile and to run.
    """
    bands = c.shape[0]
    a = jnp.asarray(a)[:n]
    if bands == 1:
        return a / c[0]
    if bands > _FFT_ABOVE_BANDS:
        return series_multiply(a, series_reciprocal(c, n), n)
    s = min(bands - 1, _BLOCK)
    h_count = -(-(bands - 1) // s)
    blocks = -(-n // s)
    i = np.arange(s)
    lag = i[:, None] - i[None, :]
    cpad = jnp.pad(c, (0, (h_count + 1) * s))
    low = jnp.where(lag >= 0, cpad[np.maximum(lag, 0)], 0.0)
    lags = np.arange(1, h_count + 1)[:, None, None] * s + lag[None]  # (H, s, s), in 1..(H+1)s-1
    ups = jnp.where((lags >= 1) & (lags < bands), cpad[np.clip(lags, 0, (h_count + 1) * s)], 0.0)
    low_inv = jax.scipy.linalg.solve_triangular(low, jnp.eye(s, dtype=c.dtype), lower=True)
    a_blocks = jnp.pad(a, (0, blocks * s - n)).reshape(blocks, s)

    def body(hist, a_k):
        # hist[h - 1] = b_{k-h}
        b_k = low_inv @ (a_k - jnp.einsum("hij,hj->i", ups, hist))
        return jnp.concatenate([b_k[None], hist[:-1]]), b_k

    _, out = jax.lax.scan(body, jnp.zeros((h_count, s), c.dtype), a_blocks)
    return out.reshape(-1)[:n]


# -- sensitivity ------------------------------------------------------------------------------
def _banded_sensitivity_squared(c: jax.Array, p: Participation) -> jax.Array:
    """sens^2 for bands = len(c) <= min_sep (or one participation): sum_{i<m} S(min(bands, n - i b))."""
    bands = c.shape[0]
    s = jnp.cumsum(c * c)
    m = p.reachable_participations
    idx = np.minimum(bands, p.n - np.arange(m) * p.min_sep) - 1
    return jnp.sum(s[idx])


def _monotone_sensitivity_squared(c: jax.Array, p: Participation) -> jax.Array:
    """sens^2 for non-negative non-increasing c: sum over i, j in {0, b, ..} of X[i, j]."""
    n, b = p.n, p.min_sep
    c = jnp.pad(c, (0, max(0, n - c.shape[0])))[:n]
    m = p.reachable_participations
    total = 0.0
    for q in range(m):
        d = q * b
        s = jnp.cumsum(c[: n - d] * c[d:])
        js = (np.arange(m - q) + q) * b
        contrib = jnp.sum(s[n - 1 - js])
        total = total + (contrib if q == 0 else 2.0 * contrib)
    return jnp.asarray(total)


# -- the problem ------------------------------------------------------------------------------
def workload_coeffs(workload: Workload) -> np.ndarray:
    """The first column of a Toeplitz workload A (ValueError for any other workload)."""
    if not workload.is_toeplitz:
        raise ValueError(
            f"Toeplitz strategies need a Toeplitz workload; {workload.name!r} is not "
            "(use --family banded or dense)"
        )
    return np.asarray(workload.coeffs, np.float64)


def _default_bands(p: Participation) -> int:
    return int(min(p.n, p.min_sep, DEFAULT_MAX_BANDS))


def problem(workload: Workload, participation: Participation, *, objective: objectives.Objective = "rmse",
            bands: int | None = None, buffers: int | None = None, init: np.ndarray | None = None) -> Problem:
    """min over c_1..c_{bands-1} (c_0 = 1) of log(objective): rmse, max, last-iterate or a Weighted
    (``mfnoise.optim.objectives``); see the module docstring.

    ``init``: initial coefficients (any length, scaled so c_0 = 1 and truncated / zero-padded to
    ``bands``), default the banded square root (the first ``bands`` coefficients of A^{1/2}).
    """
    p = participation
    n = check_arguments(workload, p, objective, supported=("rmse", "max", "last-iterate", "weighted"))
    if buffers is not None:
        raise ValueError("buffers applies to the blt family, not toeplitz")
    bands = _default_bands(p) if bands is None else int(bands)
    if not 1 <= bands <= n:
        raise ValueError(f"bands={bands} must be in [1, n={n}]")
    a = workload_coeffs(workload)
    monotone = bands > p.min_sep and p.reachable_participations > 1
    if init is None:
        c0 = closed_forms._workload_sqrt(n, workload, bands)
    else:
        init = np.asarray(init, np.float64)
        if init.ndim != 1 or init.size < 1 or init[0] == 0:
            raise ValueError("init must be a 1-D coefficient vector with c_0 != 0")
        c0 = np.zeros(bands)
        c0[: min(bands, init.size)] = init[:bands] / init[0]
    if monotone:
        c0 = np.clip(np.minimum.accumulate(np.maximum(c0, 0.0)), 1e-12, 1.0)
        c0[0] = 1.0
        ratios = np.clip(c0[1:] / c0[:-1], 1e-9, 1 - 1e-9)
        x0 = np.log(ratios) - np.log1p(-ratios)  # logit
    else:
        x0 = c0[1:].copy()

    def coeffs(x: jax.Array) -> jax.Array:
        if monotone:
            return jnp.concatenate([jnp.ones(1), jnp.exp(jnp.cumsum(jax.nn.log_sigmoid(x)))])
        return jnp.concatenate([jnp.ones(1), x])

    weights = objectives.toeplitz_weights(objective, n)

    def loss(x: jax.Array) -> jax.Array:
        c = coeffs(x)
        b = decoder_coeffs(jnp.asarray(a), c, n)
        err2 = jnp.sum(jnp.asarray(weights) * b * b)
        if monotone:
            sens2 = _monotone_sensitivity_squared(c, p)
        else:
            sens2 = _banded_sensitivity_squared(c, p)
        return 0.5 * (jnp.log(sens2) + jnp.log(err2))

    def to_strategy(x: np.ndarray) -> Toeplitz:
        x = np.asarray(x, np.float64)
        if monotone:  # the same map as coeffs(), in numpy: log_sigmoid(u) = -log(1 + e^-u)
            return Toeplitz(np.concatenate([[1.0], np.exp(np.cumsum(-np.logaddexp(0.0, -x)))]), n)
        return Toeplitz(np.concatenate([[1.0], x]), n)

    kind = "monotone" if monotone else "free"
    return Problem(
        x0=np.asarray(x0, np.float64),
        value_and_grad=jax.value_and_grad(loss),
        to_strategy=to_strategy,
        name=f"toeplitz({kind}, n={n}, bands={bands}, {objectives.name(objective)})",
        objective_from_loss=math.exp,
        cpu_compiler_options=FAST_COMPILE,
    )


register("toeplitz", problem, deprecated_aliases=("banded-toeplitz",))
