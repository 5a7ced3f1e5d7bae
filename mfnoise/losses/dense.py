"""The dense problem: any lower-triangular C, single or multi-epoch participation.

The classic formulation ("Improved Differential Privacy for SGD via Optimal Private Linear
Operators on Adaptive Streams", Denisov et al. 2022; "Multi-Epoch Matrix Factorization Mechanisms
for Private Machine Learning", Choquette-Choo et al. 2023) optimises X = C^T C over positive
definite matrices. We parametrise X by its factor: x holds the lower triangle of C (n (n+1) / 2
entries), so X = C^T C is positive definite whenever diag(C) != 0, and C is exactly the strategy
(the "reverse Cholesky" factor of X: C^T C = X with C lower triangular).

Sensitivity by normalisation, inside the loss:

* cyclic participation (k epochs, b = n // k; single participation is b = n): the pattern of
  residue c is P_c = {c, c + b, ...}, and sens^2 <= max_c S_c with S_c = sum_{i, j in P_c} |X_ij|
  (equality when X >= 0 on each pattern). Scaling the columns of pattern c by S_c^{-1/2} makes every
  S_c = 1, so sens <= 1 and the loss is

      rmse^2 = ||A C^{-1} diag(S_{t mod b})^{1/2}||_F^2 / n.

  This is the per-pattern normalisation of the multi-epoch paper (each pattern's sum equals 1);
  for single participation it is column normalisation, diag(X) = 1. Only the within-pattern
  blocks X[P_c, P_c] are formed: O(n^2 k), not O(n^3).
* min-sep participation with k > 1: sens^2 <= best(r), r_i = best_j(|X_ij|), the row bound that
  ``mfnoise.sensitivity.dense`` uses when there are too many patterns to enumerate (a dynamic
  programme over separated steps, ``best_pattern_sum``); loss = rmse with that bound. Its max is
  not smooth: L-BFGS follows a subgradient.

The max objective uses ``mfnoise.losses.banded.smooth_max`` (an l_p norm within 1% above the max).
A loss costs one triangular inversion and a product with A (O(n^3)); the returned strategy's
sensitivity is recomputed by ``mfnoise.error.evaluate``. Single participation: exact (max column
norm). Cyclic: the value is max_c S_c = 1, the same bound the loss used; it is attained (the value
is exact) when X >= 0 within each pattern, which the optima satisfy up to rounding (some
within-pattern entries settle at the kink X_ij = 0, around -1e-11), but
``mfnoise.sensitivity.dense`` labels it exact only when all of X >= 0, and the optima have small
negative entries across patterns (which the sensitivity does not involve), so it reports
``exact=False`` ("cyclic-abs-bound") with the correct value.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise import closed_forms
from mfnoise.dense import Dense
from mfnoise.losses import Problem, check_arguments
from mfnoise.losses.banded import smooth_max
from mfnoise.participation import Participation
from mfnoise.strategy import Strategy
from mfnoise.workloads import Workload

DENSE_LIMIT = 4096
"""Largest n for the dense family (its loss is O(n^3) time and O(n^2) memory)."""


def pattern_sums(c: jax.Array, b: int) -> jax.Array:
    """S_c = sum_{i, j in P_c} |X_ij|, X = C^T C, for the cyclic patterns P_c = {c, c + b, ...}.

    Shape (b,). Columns past n are zero-padded, so the ragged last epoch needs no special case.
    """
    n = c.shape[0]
    k = -(-n // b)
    cols = jnp.pad(c, ((0, 0), (0, k * b - n))).reshape(n, k, b)  # cols[:, q, r] = C[:, q b + r]
    x = jnp.einsum("iqr,ipr->rqp", cols, cols)  # X[q b + r, p b + r]
    return jnp.sum(jnp.abs(x), axis=(1, 2))


def best_pattern_sum(w: jax.Array, n: int, b: int, k: int) -> jax.Array:
    """max over min-sep patterns P (|P| <= k, gaps >= b) of sum_{t in P} w[..., t], w >= 0.

    The dynamic programme of ``mfnoise.sensitivity.best_pattern_sum``, in JAX.
    """
    def cummax(v):
        return jax.lax.cummax(v, axis=v.ndim - 1)

    g = cummax(w)
    for _ in range(k - 1):
        shifted = jnp.concatenate([jnp.zeros(w.shape[:-1] + (b,), w.dtype), g[..., : n - b]], axis=-1)
        g = cummax(jnp.maximum(g, shifted + w))
    return g[..., -1]


def _decoder(c: jax.Array, a: np.ndarray | None, scale: jax.Array | None = None) -> jax.Array:
    """B = A (C D)^{-1} = A D^{-1} C^{-1} for D = diag(scale)^{-1} (None: D = I).

    a None means the prefix sum (B = cumulative sum of the rows of D^{-1} C^{-1}).
    """
    n = c.shape[0]
    cinv = jax.scipy.linalg.solve_triangular(c, jnp.eye(n, dtype=c.dtype), lower=True)
    if scale is not None:
        cinv = scale[:, None] * cinv
    if a is None:
        return jnp.cumsum(cinv, axis=0)
    return jnp.asarray(a) @ cinv


def problem(
    workload: Workload,
    participation: Participation,
    *,
    objective: str = "rmse",
    bands: int | None = None,
    buffers: int | None = None,
    init: Strategy | np.ndarray | None = None,
) -> Problem:
    """The dense problem for ``workload`` under ``participation``.

    Args:
      workload: A (n×n lower triangular), n <= DENSE_LIMIT.
      participation: single, cyclic (per-pattern normalisation) or min-sep (row bound).
      objective: "rmse" or "max" (smoothed; see the module docstring).
      bands, buffers: not used by this family (must be None).
      init: any Strategy (its dense matrix), an n×n lower-triangular array, or None
        (sqrt-Toeplitz: A^{1/2} for a Toeplitz A, the prefix sum's otherwise).

    Returns:
      Problem over the n (n+1) / 2 lower-triangular entries of C (row-major, numpy.tril_indices),
      to_strategy -> Dense(C) with C scaled to sensitivity <= 1.
    """
    n = check_arguments(workload, participation, objective)
    if bands is not None or buffers is not None:
        raise ValueError(f"the dense family takes neither bands nor buffers (got bands={bands}, buffers={buffers})")
    if n > DENSE_LIMIT:
        raise ValueError(f"the dense family is limited to n <= {DENSE_LIMIT} (O(n^3) loss), got n={n}")
    b, k = participation.min_sep, participation.reachable_participations
    cyclic = participation.cyclic or k == 1
    if k == 1:
        b = n
    rows, cols = np.tril_indices(n)
    a = None if workload.name == "prefix" and workload.is_toeplitz else workload.dense()

    def unpack(x):
        # Indices are static, sorted and unique: saying so spares XLA a slow constant-folded check.
        return jnp.zeros((n, n), x.dtype).at[rows, cols].set(
            x, indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")

    def normalisation(c):
        """(sqrt(S_{t mod b}): column t of C is divided by it, or None; the sens^2 bound, or None)."""
        if cyclic:
            s = pattern_sums(c, b)
            return jnp.sqrt(jnp.tile(s, -(-n // b))[:n]), None
        return None, best_pattern_sum(best_pattern_sum(jnp.abs(c.T @ c), n, b, k), n, b, k)

    def loss(x):
        c = unpack(x)
        scale, sens2 = normalisation(c)
        bmat = _decoder(c, a, scale)
        sq = bmat * bmat
        if objective == "rmse":
            val = jnp.sum(sq) / n
        else:
            val = smooth_max(jnp.sum(sq, axis=1))
        return jnp.sqrt(val if sens2 is None else val * sens2)

    value_and_grad = jax.jit(jax.value_and_grad(loss))

    def to_strategy(x: np.ndarray) -> Dense:
        c = np.zeros((n, n))
        c[rows, cols] = np.asarray(x, dtype=np.float64)
        return Dense(normalize(c, participation))

    x0 = _initial_matrix(workload, init)[rows, cols]
    how = "cyclic pattern normalisation" if cyclic else "min-sep row bound"
    name = f"dense(n={n}, {objective}, {participation}, {how})"
    return Problem(x0=x0, value_and_grad=value_and_grad, to_strategy=to_strategy, name=name)


def normalize(c: np.ndarray, participation: Participation) -> np.ndarray:
    """C scaled so that the sensitivity bound of the loss is 1 (numpy float64).

    Cyclic / single: columns of pattern P_c divided by sqrt(S_c). Min-sep: C / sqrt(row bound).
    """
    from mfnoise import sensitivity as sens_lib

    c = np.asarray(c, dtype=np.float64)
    n = c.shape[0]
    b, k = participation.min_sep, participation.reachable_participations
    if k == 1 or participation.cyclic:
        b = n if k == 1 else b
        s = _pattern_sums_np(c, b)
        return c / np.sqrt(np.tile(s, -(-n // b))[:n])[None, :]
    ax = np.abs(c.T @ c)
    sens2 = float(sens_lib.best_pattern_sum(sens_lib.best_pattern_sum(ax, participation), participation))
    return c / math.sqrt(sens2)


def _pattern_sums_np(c: np.ndarray, b: int) -> np.ndarray:
    n = c.shape[0]
    k = -(-n // b)
    cols = np.pad(c, ((0, 0), (0, k * b - n))).reshape(n, k, b)
    return np.abs(np.einsum("iqr,ipr->rqp", cols, cols)).sum(axis=(1, 2))


def _initial_matrix(workload: Workload, init) -> np.ndarray:
    n = workload.n
    if init is None:
        init = closed_forms.sqrt_toeplitz(n, workload if workload.is_toeplitz else None)
    if isinstance(init, Strategy):
        if init.n != n:
            raise ValueError(f"init strategy has n={init.n}, expected n={n}")
        c = init.dense()
    else:
        c = np.asarray(init, dtype=np.float64)
        if c.shape != (n, n):
            raise ValueError(f"init matrix has shape {c.shape}, expected ({n}, {n})")
    if np.any(np.triu(c, 1) != 0) or not np.all(np.isfinite(c)) or np.any(np.diag(c) == 0):
        raise ValueError("init must be lower triangular, finite, with a non-zero diagonal")
    return c
