"""The ``banded`` family's problem (BandMF): column-normalised banded C, O(n * bands^2) loss.

Parameters: the raw columns x of shape (n, bands), x[t, j] ~ C[t + j, t], flattened. Inside the
loss every column is scaled to unit norm, C[:, t] = x[t] / ||x[t]||, so with bands <= min_sep the
columns of one participation pattern have disjoint supports and sens^2 = k (the reachable number
of participations), a constant ("Multi-Epoch Matrix Factorization Mechanisms for Private Machine
Learning", Choquette-Choo et al. 2023, arXiv:2211.06530; "(Amplified) Banded Matrix
Factorization: A unified approach to private training", Choquette-Choo et al. 2023,
arXiv:2306.08153). The objectives are then

    rmse^2    = k ||A C^{-1}||_F^2 / n,
    max_err^2 = k max_i ||(A C^{-1})[i, :]||^2,
    last-iterate^2 = k ||(A C^{-1})[n-1, :]||^2,   Weighted(w)^2 = k sum_i w_i ||(A C^{-1})[i, :]||^2 / sum w

(``mfnoise.optim.objectives``; the last two from the row norms below).

How it is computed without forming n×n. When A^{-1} is banded (prefix sum: (1 - x); momentum:
(1 - x)(1 - beta x) / eta; with weight decay (1 - alpha x)(1 - beta x) / eta; momentum with a
positive learning-rate schedule, with or without weight decay: 3 diagonals), so is
U = C A^{-1} (w = bands + q - 1 diagonals), and the decoder is B = A C^{-1} = U^{-1}. So

    ||B||_F^2 = tr(U^{-T} U^{-1}),    ||B[i, :]||^2 = (U^{-1} U^{-T})_{ii},

the trace / diagonal of the inverse of a banded Gram matrix, found by selected inversion
(Takahashi's recurrence) in blocks of size m >= w - 1. With U block lower bidiagonal (diagonal
blocks L_k, sub-diagonal blocks E_k) and Z = U^{-T} U^{-1}:

    Z_kk = L_k^{-T} L_k^{-1} + F_k^T Z_{k+1,k+1} F_k,   F_k = E_k L_k^{-1}      (backwards in k)

and for Z' = U^{-1} U^{-T}:

    Z'_kk = L_k^{-1} L_k^{-T} + G_k Z'_{k-1,k-1} G_k^T,  G_k = L_k^{-1} E_{k-1}   (forwards in k)

(block k of U^{-1}'s column k is L_k^{-1} and each block below multiplies by -E L^{-1}). Each step
costs O(m^3), so a loss costs O(n m^2) = O(n bands^2) time and O(n m) memory, and reverse-mode
differentiation through the scan keeps that order (jax-privacy's BandMF loss is O(n^2 bands) time
and O(n^2) memory). Other workloads (an explicit A, a schedule with a zero learning rate) fall back
to the dense formula, O(n^3), for n up to ``DENSE_FALLBACK_LIMIT``.

The max objective is smoothed: the l_p norm of the squared row norms with
p = ceil(log n / log 1.01), which lies within 1% above the max (and never below it). It is smooth,
so L-BFGS applies; the reported max_error is always the exact one, recomputed by
``mfnoise.strategies.error.evaluate``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core import series
from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload
from mfnoise.optim import objectives
from mfnoise.optim.problem import Problem, check_arguments, register
from mfnoise.strategies import closed_forms
from mfnoise.strategies.banded import Banded
from mfnoise.strategies.base import Strategy

DEFAULT_BANDS = 64
"""Bands used when none are given: min(DEFAULT_BANDS, min_sep)."""

MAX_INVERSE_BANDS = 16
"""Largest band count of A^{-1} for which the fast O(n bands^2) path is used."""

DENSE_FALLBACK_LIMIT = 4096
"""Largest n for the O(n^3) dense fallback (workloads whose inverse is not banded)."""

_MIN_BLOCK = 16


def workload_inverse_columns(workload: Workload, max_bands: int = MAX_INVERSE_BANDS) -> np.ndarray | None:
    """Columns (n, q) of A^{-1} (cols[t, i] = A^{-1}[t + i, t]) when A^{-1} has q <= max_bands
    diagonals, else None.

    Toeplitz A: the reciprocal series of A's first column, cut where it vanishes (relative 1e-12).
    Momentum with a positive schedule eta and weight decay lambda: K A = D_eta M with K = I - J D_keep
    (keep_i = 1 - eta_i lambda multiplies row i - 1), so A^{-1} = (I - beta J) D_eta^{-1} K.
    An explicit matrix (n <= DENSE_FALLBACK_LIMIT): its inverse, if banded.
    """
    n = workload.n
    if workload.coeffs is not None:  # Toeplitz
        r = series.reciprocal(workload.coeffs, n)
        band = _band_of(r[None, :], max_bands)
        if band is None:
            return None
        return _cut_columns(np.tile(r[:band], (n, 1)))
    if workload.learning_rates is not None:
        eta = np.asarray(workload.learning_rates, dtype=np.float64)
        if np.any(eta <= 0):
            return None
        beta = 0.0 if workload.beta is None else float(workload.beta)
        keep = 1.0 - eta * workload.weight_decay
        cols = np.zeros((n, 3))
        cols[:, 0] = 1.0 / eta
        cols[:-1, 1] = -keep[1:] / eta[1:] - beta / eta[:-1]
        cols[:-2, 2] = beta * keep[1:-1] / eta[1:-1]
        return cols
    if workload.matrix is not None and n <= DENSE_FALLBACK_LIMIT:
        a = np.asarray(workload.matrix, dtype=np.float64)
        if np.any(np.diag(a) == 0):
            return None
        inv = np.linalg.inv(a)
        diags = np.stack([np.pad(np.diagonal(inv, -i), (0, i)) for i in range(n)])  # diags[i, t]
        band = _band_of(diags.T, max_bands)
        if band is None:
            return None
        return _cut_columns(diags[:band].T.copy())
    return None


def _band_of(rows: np.ndarray, max_bands: int) -> int | None:
    """Number of leading entries (along axis 1) that are not negligible, or None above max_bands."""
    scale = np.max(np.abs(rows))
    big = np.flatnonzero(np.max(np.abs(rows), axis=0) > 1e-12 * scale)
    band = int(big[-1]) + 1 if big.size else 1
    return band if band <= max_bands else None


def _cut_columns(cols: np.ndarray) -> np.ndarray:
    """Zeroes entries cols[t, j] with t + j >= n (they lie below the matrix)."""
    n, b = cols.shape
    t, j = np.meshgrid(np.arange(n), np.arange(b), indexing="ij")
    return np.where(t + j < n, cols, 0.0)


def _normalized(x: jax.Array, mask: jax.Array) -> jax.Array:
    """C's columns from raw parameters: x[t] masked to rows < n and scaled to unit norm."""
    cols = x * mask
    return cols / jnp.sqrt(jnp.sum(cols * cols, axis=1, keepdims=True))


def _banded_product(c: jax.Array, ainv: np.ndarray) -> jax.Array:
    """Columns (n, bands + q - 1) of U = C A^{-1} for banded C (n, bands) and A^{-1} (n, q).

    U[s + j, s] = sum_i A^{-1}[s + i, s] C[s + j, s + i] = sum_i ainv[s, i] c[s + i, j - i].
    """
    n, bands = c.shape
    q = ainv.shape[1]
    u = jnp.zeros((n, bands + q - 1), c.dtype)
    for i in range(q):
        shifted = jnp.concatenate([c[i:], jnp.zeros((i, bands), c.dtype)], axis=0)  # c[s + i]
        u = u.at[:, i : i + bands].add(jnp.asarray(ainv[:, i : i + 1]) * shifted)
    return u[:, :n]  # columns j >= n lie below the matrix (zero)


class _Blocking:
    """Static gather indices that cut banded columns (n, w) into K blocks of size m.

    panel[k, r, s] = U[k m + r, k m + s] for r < 2m: rows :m are L_k, rows m: are E_k. Indices
    past n are padded with the identity, which adds (N - n) to tr(Z) and leaves rows < n alone.
    """

    def __init__(self, n: int, w: int, block: int | None = None):
        m = max(w - 1, _MIN_BLOCK, 1) if block is None else block
        m = min(m, max(n, 1))
        if m < w - 1:
            raise ValueError(f"block size {m} is smaller than the bandwidth {w - 1}")
        k = -(-n // m)
        self.n, self.w, self.m, self.k, self.pad = n, w, m, k, k * m - n
        s = np.arange(m)
        r = np.arange(2 * m)
        off = r[:, None] - s[None, :]
        self.valid = (off >= 0) & (off < w)
        self.off = np.clip(off, 0, w - 1)
        self.t = np.arange(k)[:, None, None] * m + s[None, None, :]  # (K, 1, m)

    def panels(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(L, E), each (K, m, m), from columns u of shape (n, w)."""
        pad_cols = jnp.zeros((self.pad, self.w), u.dtype).at[:, 0].set(1.0)
        full = jnp.concatenate([u, pad_cols], axis=0)
        panel = jnp.where(self.valid[None], full[self.t, self.off[None]], 0.0)
        return panel[:, : self.m], panel[:, self.m :]


def _inverse_blocks(lower: jax.Array) -> jax.Array:
    """L_k^{-1} for a batch (K, m, m) of lower-triangular blocks, by recursive 2×2 blocking.

    [[P, 0], [R, S]]^{-1} = [[P^{-1}, 0], [-S^{-1} R P^{-1}, S^{-1}]], log2(m) levels of batched
    matmuls (the same arithmetic as a triangular inversion): XLA's batched triangular_solve on
    CPU is far slower than batched matmuls, and matmuls suit GPUs.
    """
    k, m, _ = lower.shape
    size = 1 << max(m - 1, 0).bit_length()  # next power of two; pad with an identity block
    if size != m:
        pad = jnp.zeros((k, size, size), lower.dtype).at[:, m:, m:].set(jnp.eye(size - m, dtype=lower.dtype))
        lower = pad.at[:, :m, :m].set(lower)
    inv = (1.0 / jnp.diagonal(lower, axis1=1, axis2=2))[:, :, None, None]  # (K, size, 1, 1)
    s = 1
    while s < size:
        nb = size // (2 * s)
        blocks = lower.reshape(k, nb, 2 * s, nb, 2 * s)
        idx = np.arange(nb)
        sub = jnp.moveaxis(blocks[:, idx, s:, idx, :s], 0, 1)  # (K, nb, s, s): R of each pair
        p_inv, s_inv = inv[:, 0::2], inv[:, 1::2]
        off = -(s_inv @ sub @ p_inv)
        top = jnp.concatenate([p_inv, jnp.zeros_like(p_inv)], axis=-1)
        bottom = jnp.concatenate([off, s_inv], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    return inv[:, 0, :m, :m]


def frobenius_sq(u: jax.Array, blocking: _Blocking) -> jax.Array:
    """||U^{-1}||_F^2 = tr(U^{-T} U^{-1}) for banded lower-triangular U given by its columns."""
    lower, sub = blocking.panels(u)
    linv = _inverse_blocks(lower)
    f = sub @ linv  # F_k = E_k L_k^{-1}
    q = jnp.einsum("kij,kil->kjl", linv, linv)  # L_k^{-T} L_k^{-1}
    return _trace_recursion(q, f) - blocking.pad


def row_norms_sq(u: jax.Array, blocking: _Blocking) -> jax.Array:
    """||U^{-1}[i, :]||^2 = (U^{-1} U^{-T})_{ii} for i < n, shape (n,)."""
    lower, sub = blocking.panels(u)
    linv = _inverse_blocks(lower)
    prev = jnp.concatenate([jnp.zeros_like(sub[:1]), sub[:-1]], axis=0)  # E_{k-1}
    g = linv @ prev  # G_k = L_k^{-1} E_{k-1}
    q = linv @ jnp.swapaxes(linv, -1, -2)  # L_k^{-1} L_k^{-T}
    return _diag_recursion(q, g).reshape(-1)[: blocking.n]


# The two recurrences carry an m×m state through K steps. Their adjoints are written out (a
# custom VJP) because reverse-mode through lax.scan was 40x slower than the forward pass on CPU.


@jax.custom_vjp
def _trace_recursion(q: jax.Array, f: jax.Array) -> jax.Array:
    """sum_k tr(Z_k), Z_k = Q_k + F_k^T Z_{k+1} F_k (k = K-1..0, Z_K = 0); q, f: (K, m, m)."""
    return _trace_forward(q, f)[0]


def _trace_forward(q, f):
    def step(z, inputs):
        qk, fk = inputs
        z_next = z  # Z_{k+1}
        z = qk + fk.T @ z @ fk
        return z, (jnp.trace(z), z_next)

    z0 = jnp.zeros(q.shape[1:], q.dtype)
    _, (traces, z_next) = jax.lax.scan(step, z0, (q, f), reverse=True)
    return jnp.sum(traces), z_next


def _trace_fwd(q, f):
    total, z_next = _trace_forward(q, f)
    return total, (f, z_next)


def _trace_bwd(res, g):
    # W_k = dT/dZ_k = I + F_{k-1} W_{k-1} F_{k-1}^T (W_0 = I); dT/dQ_k = W_k,
    # dT/dF_k = 2 Z_{k+1} F_k W_k (Z and W symmetric).
    f, z_next = res
    eye = jnp.eye(f.shape[-1], dtype=f.dtype)
    prev_f = jnp.concatenate([jnp.zeros_like(f[:1]), f[:-1]], axis=0)

    def step(w, fprev):
        w = eye + fprev @ w @ fprev.T
        return w, w

    _, w = jax.lax.scan(step, jnp.zeros_like(eye), prev_f)
    return g * w, g * 2.0 * (z_next @ f @ w)


_trace_recursion.defvjp(_trace_fwd, _trace_bwd)


@jax.custom_vjp
def _diag_recursion(q: jax.Array, g: jax.Array) -> jax.Array:
    """diag(Z_k) for k = 0..K-1, Z_k = Q_k + G_k Z_{k-1} G_k^T (Z_{-1} = 0); shape (K, m)."""
    return _diag_forward(q, g)[0]


def _diag_forward(q, g):
    def step(z, inputs):
        qk, gk = inputs
        z_prev = z
        z = qk + gk @ z @ gk.T
        return z, (jnp.diagonal(z), z_prev)

    z0 = jnp.zeros(q.shape[1:], q.dtype)
    _, (diags, z_prev) = jax.lax.scan(step, z0, (q, g))
    return diags, z_prev


def _diag_fwd(q, g):
    diags, z_prev = _diag_forward(q, g)
    return diags, (g, z_prev)


def _diag_bwd(res, d_bar):
    # V_k = d/dZ_k = diag(d_bar_k) + G_{k+1}^T V_{k+1} G_{k+1} (backwards); d/dQ_k = V_k,
    # d/dG_k = 2 V_k G_k Z_{k-1}.
    g, z_prev = res
    next_g = jnp.concatenate([g[1:], jnp.zeros_like(g[:1])], axis=0)

    def step(v, inputs):
        dk, gnext = inputs
        v = jnp.diag(dk) + gnext.T @ v @ gnext
        return v, v

    _, v = jax.lax.scan(step, jnp.zeros(g.shape[1:], g.dtype), (d_bar, next_g), reverse=True)
    return v, 2.0 * (v @ g @ z_prev)


_diag_recursion.defvjp(_diag_fwd, _diag_bwd)


def smooth_max(r: jax.Array) -> jax.Array:
    """||r||_p with p = ceil(log n / log 1.01): max(r) <= ||r||_p <= 1.01 max(r), for r >= 0."""
    p = float(math.ceil(math.log(max(r.shape[0], 2)) / math.log(1.01)))
    top = jax.lax.stop_gradient(jnp.max(r))  # the value is exactly ||r||_p; top only avoids overflow
    return top * jnp.sum((r / top) ** p) ** (1.0 / p)


def _dense_from_columns(c: jax.Array) -> jax.Array:
    """The n×n lower-triangular matrix with columns c[t, j] = C[t + j, t] (for the fallback)."""
    n, bands = c.shape
    t, j = np.meshgrid(np.arange(n), np.arange(bands), indexing="ij")
    ok = t + j < n
    return jnp.zeros((n, n), c.dtype).at[(t + j)[ok], t[ok]].set(c[ok])


def _decoder_dense(c: jax.Array, a: np.ndarray) -> jax.Array:
    """B = A C^{-1} densely (fallback): solves C^T B^T = A^T."""
    cd = _dense_from_columns(c)
    return jax.scipy.linalg.solve_triangular(cd.T, jnp.asarray(a).T, lower=False).T


def problem(
    workload: Workload,
    participation: Participation,
    *,
    objective: objectives.Objective = "rmse",
    bands: int | None = None,
    buffers: int | None = None,
    init: Strategy | np.ndarray | None = None,
) -> Problem:
    """The column-normalised BandMF problem for ``workload`` under ``participation``.

    Args:
      workload: A (n×n lower triangular).
      participation: the schema; requires bands <= min_sep (ValueError otherwise), so that
        sens^2 = reachable participations exactly.
      objective: "rmse" (loss = rmse), "max" (loss = smoothed max_error, see module docstring),
        "last-iterate" or a ``Weighted`` (loss = that error, from the row norms).
      bands: number of diagonals of C; default min(DEFAULT_BANDS, min_sep, n).
      buffers: not used by this family (must be None).
      init: a Banded strategy, any Strategy (its banded part), raw columns (n, bands), or None
        (BSR, the banded square root of A, or of the prefix sum for a non-Toeplitz A).

    Returns:
      Problem over x = raw columns (n * bands,), x0 the initial columns, to_strategy -> Banded.
    """
    n = check_arguments(workload, participation, objective, supported=("rmse", "max", "last-iterate", "weighted"))
    if buffers is not None:
        raise ValueError(f"the banded family takes bands, not buffers (got buffers={buffers})")
    b = participation.min_sep
    if bands is None:
        bands = min(DEFAULT_BANDS, b, n)
    if isinstance(bands, bool) or not isinstance(bands, (int, np.integer)) or not 1 <= bands <= n:
        raise ValueError(f"bands={bands!r} must be an integer in [1, n={n}]")
    bands = int(bands)
    if bands > b and participation.reachable_participations > 1:
        raise ValueError(
            f"bands={bands} exceeds min_sep={b}: the column-normalised banded sensitivity "
            f"(sens^2 = participations) needs bands <= min_sep"
        )
    k = participation.reachable_participations

    x0 = _initial_columns(workload, bands, init)
    mask = jnp.asarray(_cut_columns(np.ones((n, bands))))
    ainv = workload_inverse_columns(workload)

    if ainv is not None:
        blocking = _Blocking(n, min(bands + ainv.shape[1] - 1, n))

        def fro(c):
            return frobenius_sq(_banded_product(c, ainv), blocking)

        def rows(c):
            return row_norms_sq(_banded_product(c, ainv), blocking)

        how = f"banded-inverse O(n bands^2), block {blocking.m}"
    else:
        if n > DENSE_FALLBACK_LIMIT:
            raise ValueError(
                f"workload {workload.name!r} has no banded inverse, and the dense fallback is limited "
                f"to n <= {DENSE_FALLBACK_LIMIT} (got n={n})"
            )
        a = workload.dense()

        def fro(c):
            bmat = _decoder_dense(c, a)
            return jnp.sum(bmat * bmat)

        def rows(c):
            bmat = _decoder_dense(c, a)
            return jnp.sum(bmat * bmat, axis=1)

        how = "dense fallback O(n^3)"

    weights = objectives.row_weights(objective, n)
    if objective == "rmse":

        def loss(x):
            c = _normalized(x.reshape(n, bands), mask)
            return jnp.sqrt(k * fro(c) / n)

    elif weights is None:  # max

        def loss(x):
            c = _normalized(x.reshape(n, bands), mask)
            return jnp.sqrt(k * smooth_max(rows(c)))

    else:  # last-iterate, weighted: sum_i w_i ||B[i, :]||^2 with w summing to 1

        def loss(x):
            c = _normalized(x.reshape(n, bands), mask)
            return jnp.sqrt(k * jnp.dot(jnp.asarray(weights), rows(c)))

    value_and_grad = jax.jit(jax.value_and_grad(loss))

    def to_strategy(x: np.ndarray) -> Banded:
        cols = _cut_columns(np.asarray(x, dtype=np.float64).reshape(n, bands))
        return Banded.normalized_columns(cols)

    name = f"banded(n={n}, bands={bands}, {objectives.name(objective)}, {participation}, {how})"
    return Problem(x0=x0.reshape(-1), value_and_grad=value_and_grad, to_strategy=to_strategy, name=name)


def _initial_columns(workload: Workload, bands: int, init) -> np.ndarray:
    """Raw initial columns (n, bands), zero below row n - 1."""
    n = workload.n
    if init is None:
        init = closed_forms.bsr(n, bands, workload if workload.is_toeplitz else None)
    if isinstance(init, Strategy):
        if init.n != n:
            raise ValueError(f"init strategy has n={init.n}, expected n={n}")
        if isinstance(init, Banded):
            cols = np.asarray(init.columns)
        elif init.is_toeplitz:
            c = np.zeros(bands)
            coeffs = np.asarray(init.toeplitz_coeffs(), dtype=np.float64)[:bands]
            c[: coeffs.size] = coeffs
            cols = np.tile(c, (n, 1))
        else:
            cols = Banded.from_dense(init.dense(), bands).columns
    else:
        cols = np.asarray(init, dtype=np.float64)
        if cols.ndim != 2 or cols.shape[0] != n:
            raise ValueError(f"init columns have shape {cols.shape}, expected ({n}, {bands})")
    out = np.zeros((n, bands))
    w = min(bands, cols.shape[1])
    out[:, :w] = cols[:, :w]
    out = _cut_columns(out)
    if not np.all(np.isfinite(out)) or np.any(out[:, 0] == 0):
        raise ValueError("init has a zero diagonal entry or non-finite values")
    return out


register("banded", problem)
