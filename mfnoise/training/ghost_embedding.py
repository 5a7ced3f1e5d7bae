"""Ghost norms and clipped sums of embedding lookups, by book-keeping (no V x M table per example).

A lookup y_t = E[x_t] (t < T; E of shape (V, *rest), M = prod(rest); ``E[ids]``, ``jnp.take``) with
output gradient g_t = dl/dy_t has the per-example gradient

    P = sum_t e_{x_t} g_t^T  (V x M),   rows P[v] = sum_{t: x_t = v} g_t,

at most T non-zero rows ("Differentially Private Optimization on Large Model at Small Cost", Bu et
al. 2023, arXiv:2210.00038, book-keeping). Instead of the Gram form ||P||^2 = sum_{t,s: x_t = x_s}
<g_t, g_s> (which cancels), the rows are formed: each example's ids are sorted and the g_t of equal
ids summed (``jax.ops.segment_sum``): S (T x M, one row per distinct id, zero rows after them), so
||P|| = ||S|| exactly and the cost is T x M per example (the cheaper of this and V x M is chosen:
T < V).

Rounding (u' = eps = 2u of the accumulation dtype, as in ``safe_rounding``): segment j gathers n_j
terms; any summation order of n_j terms into an exact zero rounds at most n_j - 1 times, so
|fl(S_j) - S_j| <= gamma_{n_j} A_j entrywise with A_j = sum_{t in j} |g_t| (entrywise) and
fl(A_j) >= (1 - gamma_{n_j}) A_j (non-negative terms). Hence

    ||fl(S) - S||_F <= E := sqrt(sum_j gamma_{n_j}^2 ||A_j||^2)
                      <= sqrt(SS(c)) (1 + 2 gamma_T) (1 + gamma_8),   c_j = fl(fl(gamma_{n_j}) fl(A_j)),

SS the upper bound on a sum of squares of ``_sum_squares_upper`` (fl(gamma_n) is within gamma_2 of
gamma_n: n eps is exact, one subtraction and one division; the product and the square root add u
each). Ids that occur once give n_j = 1 and an exact row (E counts them with gamma_1 all the same).
The norm clipped by is

    N = (sqrt(SS(fl(S))) (1 + gamma_1) + E) (1 + gamma_1)  >=  max(||S||, ||fl(S)||),

so both the exact gradient and the rows actually summed are within N: the example's contribution
s_b fl(S_b) scattered into E's rows has norm <= s_b N_b <= c up to the rounding of the product
s_b g (relative u). The clipped sum is one scatter-add of s_b fl(S_b) over the batch (V x M once);
the rounding of a row's sum over examples is that of any floating-point sum over examples, outside
the per-example statement (``mfnoise.training.clipping``). Slices whose index the gather drops
(FILL_OR_DROP mode out of bounds) have no gradient: their g_t are zeroed and their id V is dropped
by the scatter; clamped indices (CLIP, PROMISE_IN_BOUNDS) count as the row the forward pass read.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mfnoise.training.ghost_plan import _Ghost
from mfnoise.training.safe_rounding import _gamma, _sum_squares_upper


def lookup_dims(ghost: _Ghost) -> tuple[int, int, int]:
    """(T, V, M) of a lookup site: T slices of M entries from a (V, *rest) table."""
    shape = ghost.eqn.invars[0].aval.shape
    m = math.prod(shape[1:])
    t = math.prod(ghost.eqn.outvars[0].aval.shape) // max(m, 1)
    return t, shape[0], m


def lookup_usable(ghost: _Ghost, acc: Any) -> bool:
    """Book-keeping pays where T < V (T x M rows per example instead of V x M) and its bounds stay tight."""
    t, v, m = lookup_dims(ghost)
    return 1 <= t < v and m >= 1 and _gamma(t + 8, acc) <= 1e-2


def lookup_rows_sums(ghost: _Ghost, rows: jax.Array, g: jax.Array, acc: Any) -> tuple[jax.Array, ...]:
    """For ONE example: (S, ids, C) with S (T, M) the segment sums of g over equal row ids (sorted),
    ids (T,) the row of E each segment adds to (V for empty segments and dropped slices), and
    C (T, M) = fl(gamma_{n_j}) fl(A_j), the terms of the rounding bound E (module docstring)."""
    t, v, m = lookup_dims(ghost)
    gm = g.reshape(t, m).astype(acc)
    valid = rows >= 0
    key = jnp.where(valid, rows, v)
    gm = jnp.where(valid[:, None], gm, jnp.zeros((), acc))
    order = jnp.argsort(key, stable=True)
    skey, gs = key[order], gm[order]
    start = jnp.concatenate([jnp.ones((1,), bool), skey[1:] != skey[:-1]])
    seg = jnp.cumsum(start.astype(jnp.int32)) - 1
    sums = jax.ops.segment_sum(gs, seg, num_segments=t, indices_are_sorted=True)
    abs_sums = jax.ops.segment_sum(jnp.abs(gs), seg, num_segments=t, indices_are_sorted=True)
    counts = jax.ops.segment_sum(jnp.ones((t,), acc), seg, num_segments=t, indices_are_sorted=True)
    eps = float(jnp.finfo(acc).eps)
    gam = counts * eps / (1 - counts * eps)
    ids = jnp.full((t,), v, jnp.int32).at[seg].set(skey.astype(jnp.int32))  # equal within a segment
    return sums, ids, gam[:, None] * abs_sums


def lookup_sq(sums: jax.Array, terms: jax.Array, t: int, acc: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sq, N, E), each (B,), from the batch's (B, T, M) sums and bound terms: N >= max(||S_b||,
    ||fl(S_b)||), E >= ||fl(S_b) - S_b||_F (module docstring) and sq >= N^2."""
    err = jnp.sqrt(_sum_squares_upper(terms, acc)) * (1 + 2 * _gamma(t, acc)) * (1 + _gamma(8, acc))
    norm = (jnp.sqrt(_sum_squares_upper(sums, acc)) * (1 + _gamma(1, acc)) + err) * (1 + _gamma(1, acc))
    return jnp.square(norm) * (1 + _gamma(1, acc)), norm, err


def lookup_sum(ghost: _Ghost, sums: jax.Array, ids: jax.Array, scale: jax.Array, acc: Any) -> jax.Array:
    """sum_b scale_b fl(S_b) scattered into E's rows (V, *rest) in acc: one scatter-add over the batch."""
    shape = ghost.eqn.invars[0].aval.shape
    _, v, m = lookup_dims(ghost)
    weighted = sums * scale.astype(acc)[:, None, None]
    table = jnp.zeros((v, m), acc).at[ids.reshape(-1)].add(weighted.reshape(-1, m), mode="drop")
    return table.reshape(shape)
