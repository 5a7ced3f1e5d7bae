"""The ``dense`` family's problem: any lower-triangular C, single or multi-epoch participation.

The classic formulation ("Improved Differential Privacy for SGD via Optimal Private Linear
Operators on Adaptive Streams", Denisov et al. 2022, arXiv:2202.08312; "Multi-Epoch Matrix
Factorization Mechanisms for Private Machine Learning", Choquette-Choo et al. 2023,
arXiv:2211.06530) optimises X = C^T C over positive
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
  ``mfnoise.core.sensitivity.dense`` uses when there are too many patterns to enumerate (a dynamic
  programme over separated steps, ``_best_pattern_sum``); loss = rmse with that bound. Its max is
  not smooth: L-BFGS follows a subgradient.

The max objective uses ``mfnoise.optim.banded.smooth_max`` (an l_p norm within 1% above the max);
last-iterate and ``Weighted`` (``mfnoise.optim.objectives``) weight the squared row norms of B:
loss^2 = sens^2 sum_i w_i ||B[i, :]||^2 / sum w (the primal; the dual below is rmse only).
A loss costs one triangular inversion and a product with A (O(n^3)); the returned strategy's
sensitivity is recomputed by ``mfnoise.strategies.error.evaluate``. Single participation: exact (max column
norm). Cyclic: the value is max_c S_c = 1, the same bound the loss used; it is attained (the value
is exact) when X >= 0 within each pattern, which the optima satisfy up to rounding (some
within-pattern entries settle at the kink X_ij = 0, around -1e-11), but
``mfnoise.core.sensitivity.dense`` labels it exact only when all of X >= 0, and the optima have small
negative entries across patterns (which the sensitivity does not involve), so it reports
``exact=False`` ("cyclic-abs-bound") with the correct value.

The dual (``formulation="dual"``; what ``mfnoise.optimize`` uses for the rmse objective under
cyclic or single participation: the family registers ``formulation="auto"``). The problem above is convex in X:

    min_X tr(M X^{-1})  s.t.  X > 0,  sum_{i, j in P_c} |X_ij| <= 1 for every c,   M = A^T A,

and rmse^2 = tr(M X^{-1}) / n at its optimum. Writing the constraint as max over symmetric Z_c
with |Z_c| <= 1 of <Z_c, X[P_c, P_c]>, its Lagrange dual ("Improved Differential Privacy for SGD
via Optimal Private Linear Operators on Adaptive Streams", Denisov et al. 2022, arXiv:2202.08312,
for the diagonal case) is

    q(Lambda) = min_X tr(M X^{-1}) + tr(Lambda X) - sum_c mu_c = 2 tr((Y^T M Y)^{1/2}) - sum_c mu_c,

over block-diagonal Lambda = Y Y^T whose pattern blocks Lambda[P_c, P_c] = mu_c R_c are PSD with
equal diagonal mu_c (R_c a correlation matrix; the largest |entry| of a PSD block is its largest
diagonal entry, and raising a diagonal entry only raises q). Every q(Lambda) / n is a lower bound
on the optimal rmse^2 (weak duality), and the minimiser for a given Lambda is

    X(Lambda) = Y^{-T} (Y^T M Y)^{1/2} Y^{-1}        (the solution of X Lambda X = M),

which at the dual optimum is the primal optimum (the problem is convex and strictly feasible).
Parameters: mu_c = exp(theta_c) and R_c = L_c L_c^T with L_c lower triangular, unit diagonal before
its rows are scaled to unit norm (so Y = diag(sqrt(mu)) L is lower triangular in step order). That
is k (k - 1) / 2 + 1 numbers per pattern (1792 for n = 1024, 4 epochs, against 524,800 entries of
C for the primal), and q is smooth there: no kinks, unlike the primal's |X_ij|. A loss costs one
symmetric eigendecomposition of Y^T M Y (n×n), with the gradient d tr(K^{1/2}) = tr(K^{-1/2} dK) / 2
written out. The strategy is C with C^T C = X(Lambda) (a QR factorisation of
diag(w^{1/4}) Q^T Y^{-1}, K = Q diag(w) Q^T, so X is never squared), then ``_normalize``d: the
returned strategy is feasible at any Lambda, and the report gives the certified gap between its
exact rmse (``mfnoise.strategies.error.evaluate``) and the dual bound sqrt(q / n).

Both formulations run with a single-threaded BLAS (``Problem.single_threaded_blas``): their
O(n^3) LAPACK calls (eigh, QR, Cholesky) gain little from a second thread and lose much when other
work shares the cores.
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
from mfnoise.optim.banded import smooth_max
from mfnoise.optim.problem import Problem, check_arguments, register, single_threaded_blas
from mfnoise.optim.result import OptimizeResult
from mfnoise.strategies import closed_forms, error
from mfnoise.strategies.base import Strategy
from mfnoise.strategies.dense import Dense

DENSE_LIMIT = 4096
"""Largest n for the dense family (its loss is O(n^3) time and O(n^2) memory)."""

FORMULATIONS = ("primal", "dual", "auto")


def _pattern_sums(c: jax.Array, b: int) -> jax.Array:
    """S_c = sum_{i, j in P_c} |X_ij|, X = C^T C, for the cyclic patterns P_c = {c, c + b, ...}.

    Shape (b,). Columns past n are zero-padded, so the ragged last epoch needs no special case.
    """
    n = c.shape[0]
    k = -(-n // b)
    cols = jnp.pad(c, ((0, 0), (0, k * b - n))).reshape(n, k, b)  # cols[:, q, r] = C[:, q b + r]
    x = jnp.einsum("iqr,ipr->rqp", cols, cols)  # X[q b + r, p b + r]
    return jnp.sum(jnp.abs(x), axis=(1, 2))


def _best_pattern_sum(w: jax.Array, n: int, b: int, k: int) -> jax.Array:
    """max over min-sep patterns P (|P| <= k, gaps >= b) of sum_{t in P} w[..., t], w >= 0.

    The dynamic programme of ``mfnoise.core.sensitivity.best_pattern_sum`` (min-sep branch):
    g_j = cummax(max(g_{j-1}, shift_b(g_{j-1}) + w)). It is written again here because the loss
    needs it in JAX, traced under jit and differentiated (a subgradient of the max), which the
    core routine, numpy float64 with its argument checks, cannot be; the final strategy's
    sensitivity comes from the core routine. tests/optim/test_losses_banded.py checks that the
    two agree.
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
    objective: objectives.Objective = "rmse",
    bands: int | None = None,
    buffers: int | None = None,
    init: Strategy | np.ndarray | None = None,
    formulation: str = "primal",
) -> Problem:
    """The dense problem for ``workload`` under ``participation``.

    Args:
      workload: A (n×n lower triangular), n <= DENSE_LIMIT.
      participation: single, cyclic (per-pattern normalisation) or min-sep (row bound).
      objective: "rmse", "max" (smoothed; see the module docstring), "last-iterate" or a ``Weighted``.
      bands, buffers: not used by this family (must be None).
      init: any Strategy (its dense matrix), an n×n lower-triangular array, or None
        (sqrt-Toeplitz: A^{1/2} for a Toeplitz A, the prefix sum's otherwise). Primal only.
      formulation: "primal" (the loss over C), "dual" (``dual_problem``: rmse objective, cyclic
        or single participation), or "auto": the dual where it applies and no init is given.

    Returns:
      Primal: a Problem over the n (n+1) / 2 lower-triangular entries of C (row-major,
      numpy.tril_indices), to_strategy -> Dense(C) with C scaled to sensitivity <= 1.
      Dual: see ``dual_problem``.
    """
    n = check_arguments(workload, participation, objective, supported=("rmse", "max", "last-iterate", "weighted"))
    if bands is not None or buffers is not None:
        raise ValueError(f"the dense family takes neither bands nor buffers (got bands={bands}, buffers={buffers})")
    if n > DENSE_LIMIT:
        raise ValueError(f"the dense family is limited to n <= {DENSE_LIMIT} (O(n^3) loss), got n={n}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    b, k = participation.min_sep, participation.reachable_participations
    cyclic = participation.cyclic or k == 1
    dual_applies = objective == "rmse" and cyclic
    if formulation == "dual" and not dual_applies:
        raise ValueError("the dense dual formulation needs the rmse objective and cyclic or single participation "
                         f"(got objective={objective!r}, {participation})")
    if formulation == "dual" and init is not None:
        raise ValueError("the dense dual formulation takes no init (it starts from a scaled identity)")
    if formulation == "dual" or (formulation == "auto" and dual_applies and init is None):
        return dual_problem(workload, participation)
    if k == 1:
        b = n
    weights = objectives.row_weights(objective, n)
    rows, cols = np.tril_indices(n)
    a = None if workload.name == "prefix" and workload.is_toeplitz else workload.dense()

    def unpack(x):
        # Indices are static, sorted and unique: saying so spares XLA a slow constant-folded check.
        return jnp.zeros((n, n), x.dtype).at[rows, cols].set(
            x, indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")

    def normalisation(c):
        """(sqrt(S_{t mod b}): column t of C is divided by it, or None; the sens^2 bound, or None)."""
        if cyclic:
            s = _pattern_sums(c, b)
            return jnp.sqrt(jnp.tile(s, -(-n // b))[:n]), None
        return None, _best_pattern_sum(_best_pattern_sum(jnp.abs(c.T @ c), n, b, k), n, b, k)

    def loss(x):
        c = unpack(x)
        scale, sens2 = normalisation(c)
        bmat = _decoder(c, a, scale)
        sq = bmat * bmat
        if objective == "rmse":
            val = jnp.sum(sq) / n
        elif weights is None:  # max
            val = smooth_max(jnp.sum(sq, axis=1))
        else:  # last-iterate, weighted (w sums to 1)
            val = jnp.dot(jnp.asarray(weights), jnp.sum(sq, axis=1))
        return jnp.sqrt(val if sens2 is None else val * sens2)

    value_and_grad = jax.jit(jax.value_and_grad(loss))

    def to_strategy(x: np.ndarray) -> Dense:
        c = np.zeros((n, n))
        c[rows, cols] = np.asarray(x, dtype=np.float64)
        return Dense(_normalize(c, participation))

    x0 = _initial_matrix(workload, init)[rows, cols]
    how = "cyclic pattern normalisation" if cyclic else "min-sep row bound"
    name = f"dense(n={n}, {objectives.name(objective)}, {participation}, {how})"
    return Problem(x0=x0, value_and_grad=value_and_grad, to_strategy=to_strategy, name=name,
                   single_threaded_blas=True, formulation="primal")


def _normalize(c: np.ndarray, participation: Participation) -> np.ndarray:
    """C scaled so that the sensitivity bound of the loss is 1 (numpy float64).

    Cyclic / single: columns of pattern P_c divided by sqrt(S_c). Min-sep: C / sqrt(row bound).
    """
    from mfnoise.core import sensitivity as sens_lib

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


# -- the dual (rmse objective, cyclic or single participation) -----------------------------------


@jax.custom_vjp
def _twice_nuclear_norm(b: jax.Array) -> jax.Array:
    """2 ||B||_* = 2 tr((B^T B)^{1/2}) for a square B of full rank (one symmetric eigendecomposition)."""
    return 2.0 * jnp.sum(jnp.sqrt(jnp.linalg.eigvalsh(b.T @ b)))


def _twice_nuclear_norm_fwd(b):
    w, q = jnp.linalg.eigh(b.T @ b)
    # d 2 tr(K^{1/2}) = tr(K^{-1/2} dK), dK = dB^T B + B^T dB: the gradient is 2 B K^{-1/2}.
    grad = 2.0 * ((b @ q) * jax.lax.rsqrt(w)[None, :]) @ q.T
    return 2.0 * jnp.sum(jnp.sqrt(w)), grad


_twice_nuclear_norm.defvjp(_twice_nuclear_norm_fwd, lambda grad, ct: (ct * grad,))


class DualLayout:
    """Where the dual parameters go. Pattern c = {c, c + b, ...} ∩ [0, n); in step order Y is
    lower triangular with Y[i, j] != 0 only for i, j in one pattern: the diagonal and the strictly
    lower pairs (rows[m], cols[m]), i = j + d b for d = 1..k-1."""

    def __init__(self, n: int, b: int):
        self.n, self.b = n, b
        k = -(-n // b)
        pairs = [(np.arange(d * b, n), np.arange(n - d * b)) for d in range(1, k)]
        self.rows = np.concatenate([r for r, _ in pairs]).astype(np.int64) if pairs else np.zeros(0, np.int64)
        self.cols = np.concatenate([c for _, c in pairs]).astype(np.int64) if pairs else np.zeros(0, np.int64)
        self.pattern = np.arange(n) % b
        self.m = len(self.rows)

    def row_scale(self, v, log_mu, xp):
        """sqrt(mu_{c(i)}) / ||row i of L||, shape (n,): rows of L are scaled to unit norm."""
        if xp is np:
            r = np.ones(self.n)
            np.add.at(r, self.rows, v * v)
        else:
            r = jnp.ones(self.n, v.dtype).at[self.rows].add(v * v)
        return xp.exp(0.5 * log_mu)[self.pattern] / xp.sqrt(r)

    def y(self, theta, xp=jnp):
        """Y = diag(sqrt(mu)) L̂ (n×n, lower triangular), Lambda = Y Y^T."""
        v, log_mu = theta[: self.m], theta[self.m:]
        s = self.row_scale(v, log_mu, xp)
        diag = np.arange(self.n)
        if xp is np:
            y = np.zeros((self.n, self.n))
            y[diag, diag] = s
            y[self.rows, self.cols] = v * s[self.rows]
            return y
        y = jnp.zeros((self.n, self.n), theta.dtype).at[diag, diag].set(s, unique_indices=True)
        return y.at[self.rows, self.cols].set(v * s[self.rows], unique_indices=True)


def dual_problem(workload: Workload, participation: Participation) -> Problem:
    """The Lagrange dual of the pattern-normalised rmse problem (module docstring), as a minimisation.

    Parameters theta (shape (m + b,)): the strictly lower entries of the L_c (m = sum over patterns
    of k_c (k_c - 1) / 2) and log mu_c (b). loss(theta) = -q(Lambda) / n <= -(optimal rmse)^2.
    to_strategy(theta) -> Dense(C), C^T C = X(Lambda), normalised: a valid strategy for any theta.
    """
    n = check_arguments(workload, participation, "rmse")
    k = participation.reachable_participations
    if not (participation.cyclic or k == 1):
        raise ValueError(f"the dense dual needs cyclic or single participation, got {participation}")
    b = n if k == 1 else participation.min_sep
    layout = DualLayout(n, b)
    prefix = workload.name == "prefix" and workload.is_toeplitz
    a = None if prefix else np.asarray(workload.dense(), np.float64)

    def apply_a(y, xp):
        if a is None:
            return xp.cumsum(y, axis=0)
        return (jnp.asarray(a) if xp is jnp else a) @ y

    def loss(theta):
        y = layout.y(theta)
        return -(_twice_nuclear_norm(apply_a(y, jnp)) - jnp.sum(jnp.exp(theta[layout.m:]))) / n

    # Start: Lambda = mu I (R_c = I) with the best uniform mu: q(mu) = 2 sqrt(mu) ||A||_* - b mu.
    import scipy.linalg  # here, not at module level: the CLI's help and start stay free of scipy

    a_dense = apply_a(np.eye(n), np)
    nuclear = float(np.sum(np.sqrt(np.maximum(scipy.linalg.eigvalsh(a_dense.T @ a_dense), 0.0))))
    x0 = np.concatenate([np.zeros(layout.m), np.full(b, 2.0 * math.log(nuclear / b))])

    def to_strategy(theta: np.ndarray) -> Dense:
        raw = Dense(_normalize(primal_matrix(theta), participation))
        cleaned = clean_kinks(raw.matrix, b)
        if cleaned is None:
            return raw
        cleaned = Dense(_normalize(cleaned, participation))
        # Keep the cleaned strategy only if its exact rmse is no worse: never worse than the raw one.
        better = error.rmse(cleaned, workload, participation) <= error.rmse(raw, workload, participation)
        return cleaned if better else raw

    def primal_matrix(theta: np.ndarray) -> np.ndarray:
        y = np.asarray(layout.y(np.asarray(theta, np.float64), np))
        return primal_from_dual(y, np.asarray(apply_a(y, np)))

    def extra_report(theta: np.ndarray, result: OptimizeResult) -> dict[str, Any]:
        bound = _rmse_bound(result.loss)  # theta is the best point: its loss
        history = result.history
        change = (abs(history[-1] - history[-2]) / max(abs(history[-1]), abs(history[-2]), 1e-300)
                  if len(history) >= 2 else None)
        return {"formulation": "dual", "dual_bound": bound,
                "duality_gap": result.rmse / bound - 1.0 if bound > 0 else math.inf,
                "final_relative_change": change}

    name = f"dense(n={n}, rmse, {participation}, dual of the pattern normalisation)"
    return Problem(x0=x0, value_and_grad=jax.value_and_grad(loss), to_strategy=to_strategy, name=name,
                   objective_from_loss=_rmse_bound, extra_report=extra_report, single_threaded_blas=True,
                   formulation="dual")


def _rmse_bound(loss: float) -> float:
    """The lower bound sqrt(q / n) on the optimal rmse that a dual loss -q / n certifies."""
    return math.sqrt(max(-float(loss), 0.0))


def primal_from_dual(y: np.ndarray, ay: np.ndarray) -> np.ndarray:
    """Lower-triangular C with C^T C = X = Y^{-T} K^{1/2} Y^{-1}, K = (A Y)^T (A Y): X Lambda X = M.

    y: Y (n×n, lower triangular, non-zero diagonal), ay: A Y. numpy float64.
    """
    import scipy.linalg  # here, not at module level: the CLI's help and start stay free of scipy

    w, q = scipy.linalg.eigh(ay.T @ ay)
    if not (np.all(np.isfinite(w)) and w[0] > 0):
        raise ValueError("the dual point gives a singular Y^T M Y (is the workload invertible?)")
    # X = F^T F with F = diag(w^{1/4}) Q^T Y^{-1}; F[:, ::-1] = Q' R (R upper) gives
    # X = P R^T R P (P the reversal), so C = P R P is lower triangular.
    f = (w ** 0.25)[:, None] * scipy.linalg.solve_triangular(y, q, lower=True, trans=1).T  # Y^{-T} Q
    r = np.asarray(scipy.linalg.qr(f[:, ::-1], mode="r", check_finite=False)[0])
    c = r[::-1, ::-1]
    return c * np.sign(np.diag(c))[:, None]  # row signs do not change C^T C


KINK_TOLERANCE = 1e-6
"""Within-pattern entries X_ij < 0 with |X_ij| <= KINK_TOLERANCE sqrt(X_ii X_jj) are read as kinks."""


def clean_kinks(c: np.ndarray, b: int) -> np.ndarray | None:
    """C' with C'^T C' = X except that tiny negative within-pattern entries of X = C^T C are set to 0.

    The optima put some within-pattern X_ij exactly at the kink 0 of |X_ij|; the dual reaches them
    to its accuracy (~1e-8 relative), from either side. The negative ones add to the pattern sums
    sum |X_ij| and make ``mfnoise.core.sensitivity.dense`` call the value a bound; zeroing them (a change
    far below the smallest eigenvalue of X) lowers the sums and makes the sensitivity exact. Returns
    None if there is nothing to clean or X' is not numerically positive definite.
    """
    n = c.shape[0]
    x = c.T @ c
    d = np.sqrt(np.diag(x))
    same = (np.arange(n)[:, None] % b) == (np.arange(n)[None, :] % b)
    kinks = same & (x < 0) & (-x <= KINK_TOLERANCE * np.outer(d, d))
    if not kinks.any():
        return None
    x = np.where(kinks, 0.0, x)
    try:
        c2 = np.linalg.cholesky(x[::-1, ::-1]).T[::-1, ::-1]  # reverse Cholesky: C'^T C' = X'
    except np.linalg.LinAlgError:
        return None
    return c2 if np.all(np.isfinite(c2)) and np.all(np.diag(c2) > 0) else None


def _problem(workload: Workload, participation: Participation, *, objective: objectives.Objective = "rmse",
             bands: int | None = None, buffers: int | None = None,
             init: Strategy | np.ndarray | None = None) -> Problem:
    """What the family registers: ``problem`` with ``formulation="auto"`` (the dual where it
    applies), built with a single-threaded BLAS like the rest of the run."""
    with single_threaded_blas():
        return problem(workload, participation, objective=objective, bands=bands, buffers=buffers, init=init,
                       formulation="auto")


register("dense", _problem)
