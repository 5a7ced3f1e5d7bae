"""Per-example clipping: the clipped sum of per-example gradients, with or without materialising them.

For per-example gradients g_b (b < B) and clipping norm c,

    clipped_sum = sum_b g_b * s_b,   s_b = min(1, c / N_b),   N_b >= ||g_b||  (global L2 norm over all parameters).

Two ways to compute it:

* ``clipped_sum(per_example, c)``: from materialised per-example gradients (B x params), e.g. from
  ``mfnoise.training.per_example.per_example_grads``. Works for any model; costs B parameter-sized arrays.
* ``clipped_grad(loss_fn, c)``: from the loss, by ghost clipping ("Efficient Per-Example Gradient
  Computations", Goodfellow 2015, arXiv:1510.01799; "Large Language Models Can Be Strong
  Differentially Private Learners", Li et al. 2022, arXiv:2110.05679). A weight W used in the
  loss as an operand of a matrix product y = h W (any ``dot_general``) has per-example gradient
  P_b = grad_W l_b = H_b^T G_b with H_b (T x K) the other operand and G_b = dl_b/dy_b (T x M) the
  output's gradient, flattened, rows h_t, g_t (with batch dimensions of the product's own, e.g.
  per-head weights 'htk,hkm->htm', one such product per batch index i, ||P_b||^2 = sum_i
  ||H_bi^T G_bi||^2). Its norm needs neither P_b nor its B copies (below), and the clipped sum is
  one matrix product, sum_b s_b H_b^T G_b = H^T diag(s) G. An embedding table E used by a lookup
  E[ids] (a ``gather`` of whole rows, ``jnp.take``) has P_b = sum_t e_{x_t} g_t^T, at most T
  non-zero rows: its norm and clipped sum come from the rows themselves, T x M per example
  (``mfnoise.training.ghost_embedding``, book-keeping). So one forward and one backward pass
  (without the weight gradients) give the norms, and one product (or one scatter-add) per weight
  gives the clipped sum: about the cost of an ordinary minibatch gradient. Per weight the cheaper
  way is chosen from the shapes (products: the Gram regime below; lookups: T < V). Every other
  parameter (biases and layer-norm / RMS-norm scales, whose per-example gradients are only B x
  their size; grouped convolutions; reshaped, cast or shared weights; anything inside a control-flow,
  checkpoint or custom-derivative primitive) gets materialised per-example gradients in the same
  backward pass; its norm is added exactly.

Safety of the norms (the privacy guarantee rests on it)
-------------------------------------------------------
N_b is a rigorous upper bound on the norm of the exact gradient of the example, for any finite
input, in any float dtype (bfloat16 parameters are handled in float32, lookups included), under
``jit``: with u the unit roundoff of the accumulation dtype (float32 for float32 and bfloat16 parameters) and the
rounding model |fl(sum of n terms) - sum| <= gamma_n sum |terms| of any summation order and of any
dot product, gamma_n = n u / (1 - n u), every formula below is inflated by its own gamma (computed
with 2u, a margin for products that are not IEEE-exact such as FMA and multi-pass emulations; the
norm dots run at ``Precision.HIGHEST``):

* materialised gradients: sums of squares, reduced one axis at a time with optimisation barriers
  between the stages (so the longest chain is the sum of the axis lengths, not their product);
  s_true <= s_computed (1 + gamma_{sum of axis lengths + 1}). Summands are non-negative: no
  cancellation, the bound is tight. (An axis too long for a useful gamma is split when it is not
  sharded; else n max_i x_i^2 is used.)
* lookups: the rows of P, formed by sorting the ids and summing the g_t of equal ids; the bound on
  the rounding of those sums is derived in ``mfnoise.training.ghost_embedding`` and N covers both
  the exact P and the rows the clipped sum adds (no cancellation in the norm: a sum of squares).
* products with batch dimensions: each slice bounded as below, the nb-term sums of the slices'
  bounds inflated by (1 + gamma_{nb+1}).
* tied input/output embeddings (a table E with one lookup and one product reading E's rows, the
  output head h E^T): ||P1 + P2||^2 = ||P1||^2 + ||P2||^2 + 2 <P1, P2>, the cross term
  <P1, P2> = sum_{s,j} G[s, v_j] <h_s, S_j> over the example's distinct ids v_j (segment sums S_j),
  never forming V x M; it cancels, so its rounding is bounded (derived in ``_tied_sq``), the result
  capped by the triangle bound (N1 + N2)^2, and the rounding of the rows fl(S) the clipped sum adds
  joins the floor below. Any other leaf with a lookup and further uses takes the triangle
  inequality N = sum_u N_u (square roots and sum inflated by gamma_{n+1}): safe, but it over-clips
  by sum ||P_u|| / ||sum P_u|| (1.26-1.32 for the tied tables of the tests, where the exact form is
  used). A weight used in several products only is materialised (exact).
* ghost, T = 1: ||P||^2 = ||h||^2 ||g||^2, a product of two such sums (no cancellation).
* ghost, T > 1, only where T (K + M) < K M (elsewhere P_b is no larger than the operands ghost
  clipping keeps, and the leaf is materialised instead): the Gram form
  ||P||^2 = <H H^T, G G^T>_F = sum_{t,s} A_ts B_ts. This sum cancels: with both input rows equal and
  output gradients a and -a + d it is |h|^2 d^2 computed from terms of size |h|^2 a^2 (in float32
  it came out 0 or negative for a = 5e3, d = 1). Its rounding error is bounded, with
  alpha_t >= ||h_t||, beta_t >= ||g_t||, U = sum_t alpha_t beta_t >= ||P|| (triangle inequality), by
      E = g_K alpha^T |B| alpha + g_M beta^T |A| beta + g_K g_M U^2 + gamma_{2T+1} sum |A o B|
  (|A_ts - fl(A_ts)| <= g_K alpha_t alpha_s by Cauchy-Schwarz, g_K = gamma_K; for K > 128 the Gram
  matrices are accumulated 128 columns at a time with compensated (TwoSum) addition of the C parts,
  g_K = gamma_128 + gamma_C^2 + u; the sum over (t, s) runs in two stages), and
  N^2 <= min(max(fl(S), 0) + 2E, U^2) (the factor 2 covers the rounding of E itself). For ordinary
  examples E / S is about 2 g_K (1 + T / sqrt(M)) + 2 g_M (1 + T / sqrt(K)) + 2 gamma_{2T}. Where
  E > 1e-2 S (a cancelling example) and the bound decides whether an example is clipped, that
  weight's norms are recomputed for the batch (``lax.cond``: only then) from the formed products
  fl(P_b), one example at a time, accumulated 32 rows at a time with compensated (TwoSum) addition
  of the chunks: ||P - fl(P)|| <= (gamma_32 + gamma_C^2) U + u ||P|| (C chunks), so
  N <= ||fl(P)|| (1 + ...) + (gamma_32 + gamma_C^2) U.
A negative or NaN squared norm cannot occur for finite input: every bound is a sum of non-negative
terms (and ``clip_weights`` drops any value that is not a finite non-negative number). The one
absolute error is underflow: squares below the smallest normal number (1.2e-38 in float32) may be
flushed to zero, hiding at most n * 1.2e-38 of a squared norm over n entries; the guarantee is
stated for l2_clip_norm >= 1e-10 in float32 (1e-140 in float64), where that is negligible.

Safety of the contribution. The sum H^T diag(s) G is itself computed in floating point, and the
exact P_b can be much smaller than U_b (above): example b's own rows add rounding of up to
gamma_{r+1} s_b U_b (the weighting s_b g_t, then r rows summed). So the product is accumulated
r <= 32 rows of each example at a time (a slice of the T axis) with compensated addition of the
chunks, and N_b is also at least R_b / 8e-4, R_b = sum over the example's ghost weights of
(gamma_{r+1} + 2 gamma_C^2) U: then s_b R_b <= 8e-4 c (the rest of the tolerance covers the
rounding of s_b itself). For ordinary examples U / N is about sqrt(T) and this floor is far below N
(it binds only for T above ~10^4 or for cancelling examples, which it over-clips). Weighted sums
are computed and returned in the accumulation dtype (``ClippedSum.grads`` is float32 for bfloat16
parameters): rounding the batch's sum to bfloat16 before the noise is added would move the released
sum by up to 2^-8 |sum| per entry, a data-dependent change that exceeds c once |sum| > 2^7 c (a batch
of aligned gradients), i.e. a sensitivity above the one the noise is scaled for. ``dp_aggregate``
adds the noise in that dtype and rounds the noisy update to the parameters' dtype (post-processing).
Together: one example's contribution to the clipped sum has norm <= c (1 + TOLERANCE),
TOLERANCE = 1e-3, counting the rounding of its own rows (the rounding of the batch's sum over
examples, as of any floating-point sum, is not part of it). Over-clipping (N_b above the true norm)
is privacy-safe and for ordinary examples below about 5e-3 relative (1e-4 in the tests' models).

Which weights qualify is decided from the loss's jaxpr (``jax.make_jaxpr``), following each
parameter leaf through ``jit`` calls and ``transpose`` (``mfnoise.training.ghost_plan``): a leaf
qualifies only if every use of it is a product whose other operand is not a parameter or a lookup
at integer ids. Any other use (a reshape, a cast, a product with another parameter, an elementwise
op, a custom_jvp / custom_vjp / checkpoint / scan / cond / while that receives it) sends the leaf to
the exact materialised path, so the norm never misses a contribution. ``ghost_leaves`` says which
leaves a loss sends the ghost way. A convolution kernel (``conv_general_dilated``, one feature
group) is a product of the input's patches and the output gradients (``mfnoise.training.ghost_conv``,
im2col, exact): its norm and clipped sum are the product's, with the same bounds and chunking.

An example whose bound is not finite (a NaN or inf gradient entry, or finite values whose squares
overflow the accumulation dtype: entries of a gradient or of a ghost product's operands above ~1e19
in float32) gets weight 0 and is counted in ``nonfinite``. With finite input (and, in float32,
l2_clip_norm <= 1e25 and B < 1e9) the clipped sum is finite. ``mfnoise.dp_aggregate`` takes either
the per-example gradients or a ``ClippedSum``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from mfnoise.training.ghost_conv import conv_chunking, conv_dims, conv_operands, conv_sum
from mfnoise.training.ghost_embedding import lookup_dims, lookup_rows_sums, lookup_sq, lookup_sum, lookup_usable
from mfnoise.training.ghost_plan import Source, _Ghost, _Probe, evaluate, ghost_plan, restrict
from mfnoise.training.per_example import batch_size, check_not_summed_over_devices, shared_arguments
from mfnoise.training.safe_rounding import (
    _CHUNK,  # noqa: F401  (re-exported: the former names stay importable)
    _HIGHEST,
    _accumulation_dtype,
    _add_compensated,  # noqa: F401
    _axis_sharded,
    _compensated_sum,
    _gamma,
    _matmul,
    _sum_squares_upper,
)

_ghost_plan = ghost_plan  # the former private name

TOLERANCE = 1e-3  # one example's contribution has norm <= l2_clip_norm * (1 + TOLERANCE)
_ROUNDING_SHARE = 8e-4  # of TOLERANCE, for the rounding of an example's own rows in a ghost product
_CERTIFIED = 1e-2  # a Gram-form value is used as is when its error bound E <= _CERTIFIED * value
_GRAM_COLS = 128  # columns per chunk of a Gram matrix's compensated accumulation
_ROWS = 32  # rows of each example per chunk when a ghost product is accumulated (shorter rounding chains)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClippedSum:
    """sum_b clip(g_b) (pytree like the params), the number of dropped non-finite examples, and the
    batch size B and clipping norm it was computed with (static)."""

    grads: Any
    nonfinite: jax.Array  # int32 scalar
    batch_size: int = dataclasses.field(metadata={"static": True})
    l2_clip_norm: float = dataclasses.field(metadata={"static": True})


def _check_clip_norm(l2_clip_norm: Any, name: str = "l2_clip_norm") -> float:
    """float(l2_clip_norm) if it is a positive finite real number (a Python or numpy scalar, or a
    concrete 0-d array), else a ValueError / TypeError naming ``name`` and the value."""
    if isinstance(l2_clip_norm, Tracer):
        raise TypeError(f"{name} must be a concrete number (it is static: it sets the sensitivity), got a traced value")
    value = l2_clip_norm
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and np.issubdtype(value.dtype, np.number):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        kind = type(l2_clip_norm).__name__
        raise TypeError(f"{name} must be a positive finite number, got {l2_clip_norm!r} of type {kind}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {l2_clip_norm!r}")
    return value



def clip_weights(sq: jax.Array, l2_clip_norm: float) -> tuple[jax.Array, jax.Array]:
    """(s, valid) for per-example squared norms (upper bounds) sq (B,): s_b = min(1, c / sqrt(sq_b)).

    An entry that is not a valid squared norm (NaN, inf, or negative: none of this module's bounds
    can be negative, so a negative value is never trusted) gets s_b = 0 and valid_b = False.
    """
    valid = jnp.isfinite(sq) & (sq >= 0)
    norm = jnp.sqrt(jnp.where(valid, sq, 0.0))
    scale = jnp.where(valid, jnp.minimum(1.0, l2_clip_norm / jnp.maximum(norm, 1e-30)), 0.0)
    return scale, valid


def _select_rows(finite: jax.Array, x: jax.Array) -> jax.Array:
    keep = finite.reshape((finite.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _weighted_rows(finite: jax.Array, fn: Callable[..., jax.Array], *rows: jax.Array) -> jax.Array:
    """fn(*rows), first zeroing the rows of non-finite examples (NaN * 0 = NaN), only when there are any."""
    fast = lambda: fn(*rows)
    slow = lambda: fn(*(_select_rows(finite, r) for r in rows))
    return jax.lax.cond(jnp.all(finite), fast, slow)


def _weighted_sum(scale: jax.Array, finite: jax.Array, x: jax.Array) -> jax.Array:
    """sum_b scale_b x_b, non-finite rows dropped; in and returned in >= float32 (the accumulation dtype:
    no rounding to a coarser parameter dtype before the noise, see the module doc)."""
    acc = _accumulation_dtype(x.dtype, scale.dtype)

    def fn(r: jax.Array) -> jax.Array:
        # The weighted sum over examples as a dot (XLA:CPU reduces over a major axis ~30x slower).
        return jnp.tensordot(scale.astype(acc), r.astype(acc), axes=1, precision=_HIGHEST)

    return _weighted_rows(finite, fn, x)


def _total_upper(terms: list[jax.Array], acc: Any) -> jax.Array:
    """An upper bound on the sum of a few (at least one) non-negative (B,) bounds."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total * (1 + _gamma(len(terms) + 1, acc))


def clipped_sum(per_example: Any, l2_clip_norm: float) -> tuple[Any, jax.Array]:
    """(sum_b clip(g_b), number of dropped examples) for per-example grads with batch axis 0.

    The norm of each example is a rigorous upper bound (module docstring); an example whose bound is
    not finite is dropped (weight 0) and counted.
    """
    clip = _check_clip_norm(l2_clip_norm)
    leaves = jax.tree.leaves(per_example)
    if not leaves:
        return per_example, jnp.zeros((), jnp.int32)
    acc = _accumulation_dtype(*[x.dtype for x in leaves])
    scale, finite = clip_weights(_total_upper([_sum_squares_upper(x, acc) for x in leaves], acc), clip)
    return jax.tree.map(lambda x: _weighted_sum(scale, finite, x), per_example), jnp.sum(~finite).astype(jnp.int32)


# -- ghost products: dot_general sites ----------------------------------------------------------------


def _dot_dims(ghost: _Ghost) -> tuple[list[int], list[int], list[int], int]:
    """(hb, hfree, hc, wfree): the other operand h's batch, free and contracting dims, and the number of
    the weight's free dims. y = dot_general(lhs, rhs) has dims (batch..., lhs free..., rhs free...)."""
    (lc, rc), (lb, rb) = ghost.eqn.params["dimension_numbers"]
    hc, hb = (rc, rb) if ghost.operand == 0 else (lc, lb)
    wc, wb = (lc, lb) if ghost.operand == 0 else (rc, rb)
    hrank = len(ghost.eqn.invars[1 - ghost.operand].aval.shape)
    wrank = len(ghost.eqn.invars[ghost.operand].aval.shape)
    hfree = [d for d in range(hrank) if d not in hc and d not in hb]
    return list(hb), hfree, list(hc), wrank - len(wc) - len(wb)


def _dims(ghost: _Ghost) -> tuple[int, int, int]:
    """(T, K, M) of one batch slice of the ghost product: grad_W[i] = H_i^T G_i, H_i (T x K), G_i (T x M)."""
    if ghost.kind == "conv":
        return conv_dims(ghost.eqn)
    hb, hfree, hc, _ = _dot_dims(ghost)
    hshape = ghost.eqn.invars[1 - ghost.operand].aval.shape
    t = math.prod(hshape[d] for d in hfree)
    k = math.prod(hshape[d] for d in hc)
    nb = math.prod(hshape[d] for d in hb)
    m = math.prod(ghost.eqn.outvars[0].aval.shape) // max(t * nb, 1)
    return t, k, m


def _usable(ghost: _Ghost, acc: Any) -> bool:
    """Whether ghost norms pay and their rounding bounds are tight enough; else the leaf is materialised.

    Lookups: ``ghost_embedding.lookup_usable`` (T < V). Products: T = 1 always; T > 1 only in the Gram
    regime T (K + M) < K M per batch slice (elsewhere H^T G per example is no larger than the operands
    that ghost clipping keeps, so the materialised path costs no more).
    """
    if ghost.kind == "lookup":
        return lookup_usable(ghost, acc)
    t, k, m = _dims(ghost)
    # the bounds' own factors (row norms over K or M terms, the Gram value over 2T) must stay small
    if t < 1 or _gamma(max(k, m) + 2, acc) > 5e-2 or _gamma(2 * t + 2, acc) > 1e-2:
        return False
    return t == 1 or t * (k + m) < k * m


def _flat_operands(h: jax.Array, g: jax.Array, ghost: _Ghost) -> tuple[jax.Array, jax.Array]:
    """(H, G) of shapes (T, K), (T, M) for one example and a product without batch dims:
    grad_W = H^T G up to an ordering of entries (the weight is operand ``ghost.operand``, h the other)."""
    _, free, hc, _ = _dot_dims(ghost)
    t = math.prod(h.shape[d] for d in free)
    hm = jnp.transpose(h, free + hc).reshape(t, -1)
    m = g.size // t
    gm = g.reshape(t, m) if ghost.operand == 1 else g.reshape(m, t).T
    return hm, gm


def _flat_batched(h: jax.Array, g: jax.Array, ghost: _Ghost) -> tuple[jax.Array, jax.Array]:
    """(H, G) of shapes (nb, T, K), (nb, T, M) for one example of a product with nb batch indices
    (h's batch dims in the order the output lists them): grad_W[i] = H_i^T G_i."""
    hb, free, hc, _ = _dot_dims(ghost)
    nb = math.prod(h.shape[d] for d in hb)
    t = math.prod(h.shape[d] for d in free)
    hm = jnp.transpose(h, hb + free + hc).reshape(nb, t, -1)
    m = g.size // (nb * t)
    gm = g.reshape(nb, t, m) if ghost.operand == 1 else jnp.swapaxes(g.reshape(nb, m, t), 1, 2)
    return hm, gm


def _row_norms_upper(x: jax.Array, acc: Any) -> jax.Array:
    """(T,) upper bounds on the row norms of x (T, n)."""
    sq = jnp.sum(jnp.square(x), axis=1) * (1 + _gamma(x.shape[1] + 1, acc))
    return jnp.sqrt(sq) * (1 + _gamma(1, acc))


def _rows_bound(hm: jax.Array, gm: jax.Array, acc: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(alpha, beta, U): upper bounds on ||h_t||, ||g_t|| and U = sum_t ||h_t|| ||g_t|| >= ||H^T G||_F."""
    alpha, beta = _row_norms_upper(hm, acc), _row_norms_upper(gm, acc)
    return alpha, beta, jnp.sum(alpha * beta) * (1 + _gamma(hm.shape[0] + 1, acc))


def _chunked_product(hm: jax.Array, gm: jax.Array, acc: Any) -> tuple[jax.Array, float]:
    """(fl(H^T G), g) for one example, with ||fl(H^T G) - H^T G||_F <= g U + u ||H^T G||.

    _ROWS rows at a time with compensated accumulation of the C chunks: g = gamma_{_ROWS} + gamma_C^2
    (a plain product, g = gamma_T, where the rows are few or sharded).
    """
    t = hm.shape[0]
    if t <= _ROWS or _axis_sharded(hm, 0) or _axis_sharded(gm, 0):
        return _matmul(hm.T, gm), _gamma(t, acc)
    chunks = -(-t // _ROWS)
    pad = chunks * _ROWS - t
    hc = jnp.pad(hm, ((0, pad), (0, 0))).reshape(chunks, _ROWS, -1)
    gc = jnp.pad(gm, ((0, pad), (0, 0))).reshape(chunks, _ROWS, -1)
    return _compensated_sum(lambda i: _matmul(hc[i].T, gc[i]), chunks), _gamma(_ROWS, acc) + _gamma(chunks, acc) ** 2


def _exact_sq(hm: jax.Array, gm: jax.Array, acc: Any) -> jax.Array:
    """Upper bound on ||H^T G||_F^2 for one example from the formed product (module docstring)."""
    _, _, rows = _rows_bound(hm, gm, acc)
    p, margin = _chunked_product(hm, gm, acc)
    norm = (jnp.sqrt(_sum_squares_upper(p[None], acc)[0]) + margin * rows) * (1 + _gamma(2, acc))
    return jnp.square(jnp.minimum(norm, rows)) * (1 + _gamma(2, acc))


def _gram(x: jax.Array, acc: Any) -> tuple[jax.Array, float]:
    """(fl(X X^T), g) with |fl(X X^T) - X X^T|_ts <= g ||x_t|| ||x_s|| for X (T, n).

    A plain product has g = gamma_n. For n > _GRAM_COLS the columns are taken _GRAM_COLS at a time
    and the C partial Grams added with compensation: g = gamma_{_GRAM_COLS} + gamma_C^2 + u, much
    smaller for wide X (so that few examples need the fallback of ``_norms``).
    """
    t, n = x.shape
    if n <= _GRAM_COLS or _axis_sharded(x, 1):  # (no reshapes of a sharded axis: Explicit mesh axes)
        return _matmul(x, x.T), _gamma(n, acc)
    chunks = -(-n // _GRAM_COLS)
    xc = jnp.pad(x, ((0, 0), (0, chunks * _GRAM_COLS - n))).reshape(t, chunks, _GRAM_COLS)

    def part(i: Any) -> jax.Array:
        cols = jax.lax.dynamic_index_in_dim(xc, i, axis=1, keepdims=False)
        return _matmul(cols, cols.T)

    return _compensated_sum(part, chunks), _gamma(_GRAM_COLS, acc) + _gamma(chunks, acc) ** 2 + _gamma(1, acc)


def _slice_bound(hm: jax.Array, gm: jax.Array, acc: Any) -> tuple[jax.Array, ...]:
    """(sq, U, E, S) for one example's H (T, K), G (T, M): sq >= ||H^T G||_F^2 (module docstring),
    U >= sum_t ||h_t|| ||g_t||, and for the Gram form its value S and error bound E (T = 1: E = S = 0)."""
    t = hm.shape[0]
    alpha, beta, rows = _rows_bound(hm, gm, acc)
    zero = jnp.zeros((), acc)
    if t == 1:  # ||h g^T|| = ||h|| ||g||: no cancellation
        return jnp.square(rows) * (1 + _gamma(1, acc)), rows, zero, zero
    (a, gk), (b, gm_) = _gram(hm, acc), _gram(gm, acc)
    terms = a * b
    # two stages (rows, then their sum), so the rounding chain is 2T, not T^2
    value = jnp.sum(jax.lax.optimization_barrier(jnp.sum(terms, axis=1)))
    err = (
        gk * jnp.dot(alpha, _matmul(jnp.abs(b), alpha), precision=_HIGHEST)
        + gm_ * jnp.dot(beta, _matmul(jnp.abs(a), beta), precision=_HIGHEST)
        + gk * gm_ * jnp.square(rows)
        + _gamma(2 * t + 1, acc) * jnp.sum(jnp.abs(terms))
    ) * 2  # the factor 2 covers the rounding in computing the bound itself
    sq = jnp.minimum(jnp.maximum(value, 0) + err, jnp.square(rows)) * (1 + _gamma(2, acc))
    return sq, rows, err, value


def _ghost_bound(h: jax.Array, g: jax.Array, ghost: _Ghost, acc: Any) -> tuple[jax.Array, ...]:
    """(sq, U, E, S) of ``_slice_bound`` for one example; with batch dims (nb slices, e.g. per-head
    weights 'htd,hdk->htk') the sums over the slices: ||grad_W||^2 = sum_i ||H_i^T G_i||^2, each
    slice bounded on its own, the nb-term sums inflated by (1 + gamma_{nb+1}) (non-negative terms)."""
    if ghost.kind == "conv":
        return _slice_bound(*conv_operands(ghost.eqn, h.astype(acc), g.astype(acc)), acc)
    if not _dot_dims(ghost)[0]:
        return _slice_bound(*_flat_operands(h.astype(acc), g.astype(acc), ghost), acc)
    hm, gm = _flat_batched(h.astype(acc), g.astype(acc), ghost)
    sq, rows, err, value = jax.vmap(lambda x, y: _slice_bound(x, y, acc))(hm, gm)
    up = 1 + _gamma(hm.shape[0] + 1, acc)
    return jnp.sum(sq) * up, jnp.sum(rows) * up, jnp.sum(err), jnp.sum(value)


def _exact_bounds(h: jax.Array, g: jax.Array, ghost: _Ghost, acc: Any) -> jax.Array:
    """(B,) bounds from the formed products H_b^T G_b, one example at a time (memory K M per slice)."""

    def one(hg: tuple[jax.Array, jax.Array]) -> jax.Array:
        if ghost.kind == "conv":
            return _exact_sq(*conv_operands(ghost.eqn, hg[0].astype(acc), hg[1].astype(acc)), acc)
        if not _dot_dims(ghost)[0]:
            return _exact_sq(*_flat_operands(hg[0].astype(acc), hg[1].astype(acc), ghost), acc)
        hm, gm = _flat_batched(hg[0].astype(acc), hg[1].astype(acc), ghost)
        parts = jax.lax.map(lambda xy: _exact_sq(xy[0], xy[1], acc), (hm, gm))
        return jnp.sum(parts) * (1 + _gamma(hm.shape[0] + 1, acc))

    return jax.lax.map(one, (h, g))


def _chunking(ghost: _Ghost, h: jax.Array, g: jax.Array) -> tuple[int, int, int, int, int]:
    """How the batch product H^T diag(s) G is accumulated: (h axis, y axis, length, chunks, rows).

    Rows (the T axis, h's free dims, not its batch dims) are taken ``length`` indices of the largest free axis at a time
    (``rows`` <= max(_ROWS, T / that axis) rows of each example per chunk), and the chunks' products
    are added with compensation, so the rounding of one example's rows is within
    (gamma_{rows+1} + 2 gamma_chunks^2) s_b U_b (the floor in ``_norms``). One chunk of all T rows
    where T <= _ROWS or that axis of the batched operands h, g is sharded (Explicit mesh axes).
    """
    hb, free, _, wfree = _dot_dims(ghost)
    hshape = ghost.eqn.invars[1 - ghost.operand].aval.shape
    t = math.prod(hshape[d] for d in free)
    if t <= _ROWS:
        return -1, -1, 1, 1, t
    axis = max(free, key=lambda d: hshape[d])
    other = t // hshape[axis]
    length = max(1, _ROWS // other)
    chunks = -(-hshape[axis] // length)
    i = free.index(axis)
    yaxis = len(hb) + (i if ghost.operand == 1 else wfree + i)
    if _axis_sharded(h, 1 + axis) or _axis_sharded(g, 1 + yaxis):
        return -1, -1, 1, 1, t
    return axis, yaxis, length, chunks, length * other


def _product_vjp(ghost: _Ghost, w: jax.Array, h: jax.Array, g: jax.Array, scale: jax.Array, acc: Any) -> jax.Array:
    """sum_b scale_b grad_W <G_b, dot(h_b, W)> = H^T diag(scale) G, as products (the vjp in W).

    In acc (>= float32) at full precision, chunk by chunk (``_chunking``) with compensated
    accumulation (returned in acc; the caller rounds toward zero to W's dtype): the rounding of an
    example's rows stays within the bound that the floor in ``_norms`` accounts for. Where the
    product's operand is a view transpose(W, perm), the vjp goes through the transpose (a relabelling).
    """
    dims = ghost.eqn.params["dimension_numbers"]
    out_sharding = ghost.eqn.params.get("out_sharding")
    extra = {} if out_sharding is None else {"out_sharding": out_sharding}
    wa = w.astype(acc)

    def contribution(hpart: jax.Array, gpart: jax.Array) -> jax.Array:
        def product(weight: jax.Array) -> jax.Array:
            view = weight if ghost.perm is None else jnp.transpose(weight, ghost.perm)

            def one(hb: jax.Array) -> jax.Array:
                args = (view, hb) if ghost.operand == 0 else (hb, view)
                return jax.lax.dot_general(*args, dims, precision=_HIGHEST, preferred_element_type=acc, **extra)

            return jax.vmap(one)(hpart)

        out, vjp = jax.vjp(product, wa)
        if jax.typeof(gpart) != jax.typeof(out):
            # Explicit mesh axes: the probe's type (hence g's) lacks the product's sharding
            gpart = jax.sharding.reshard(gpart, jax.typeof(out).sharding)
        return vjp(gpart)[0]

    weighted = g.astype(acc) * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(acc)
    ha = h.astype(acc)
    haxis, yaxis, length, chunks, _ = _chunking(ghost, h, g)
    if chunks == 1:
        return contribution(ha, weighted)

    def padded(x: jax.Array, axis: int) -> jax.Array:
        pad = chunks * length - x.shape[axis]
        return jnp.pad(x, [(0, pad) if d == axis else (0, 0) for d in range(x.ndim)]) if pad else x

    hp, gp = padded(ha, 1 + haxis), padded(weighted, 1 + yaxis)

    def part(i: Any) -> jax.Array:
        hpart = jax.lax.dynamic_slice_in_dim(hp, i * length, length, axis=1 + haxis)
        gpart = jax.lax.dynamic_slice_in_dim(gp, i * length, length, axis=1 + yaxis)
        return contribution(hpart, gpart)

    return _compensated_sum(part, chunks)


def _tied_layout(ghost: _Ghost) -> bool:
    """Whether a product site reads its weight, a view of a lookup table E (V, *rest), as E's rows:
    no batch dims, the weight's free dims E's axis 0 and its contracting dims E's other axes in order
    (h @ E.T, einsum 'tm,vm->tv'), so that its gradient is P2 = G^T H, rows P2[v] = sum_s G[s, v] h_s."""
    if ghost.kind != "dot" or _dot_dims(ghost)[0]:
        return False
    (lc, rc), _ = ghost.eqn.params["dimension_numbers"]
    wc = list(lc if ghost.operand == 0 else rc)
    rank = len(ghost.eqn.invars[ghost.operand].aval.shape)
    perm = ghost.perm if ghost.perm is not None else tuple(range(rank))
    free = [d for d in range(rank) if d not in wc]
    return [perm[d] for d in free] == [0] and [perm[d] for d in wc] == list(range(1, rank))


def _tied_pairs(plan: dict[int, _Ghost]) -> dict[int, tuple[int, int]]:
    """{leaf: (lookup site, product site)} for the leaves with exactly these two sites in the tied layout."""
    sites: dict[int, list[int]] = {}
    for j, g in plan.items():
        sites.setdefault(g.leaf, []).append(j)
    pairs = {}
    for leaf, js in sites.items():
        kinds = sorted((plan[j].kind, j) for j in js)
        if [k for k, _ in kinds] == ["dot", "lookup"] and _tied_layout(plan[kinds[0][1]]):
            pairs[leaf] = (kinds[1][1], kinds[0][1])
    return pairs


def _tied_sq(ghost: _Ghost, sums: jax.Array, ids: jax.Array, n1: jax.Array, e1: jax.Array, h: jax.Array,
             g: jax.Array, sq2: jax.Array, acc: Any) -> jax.Array:
    """Upper bound on ||P1 + P2||_F^2 for ONE example of a tied table: P1 the lookup's gradient
    (segment sums S (T, M) at rows ids, N1 >= ||S||, E1 >= ||fl(S) - S||), P2 = G^T H the product's
    (``_tied_layout``; sq2 >= ||P2||^2).

    ||P1 + P2||^2 = ||P1||^2 + ||P2||^2 + 2 c,  c = <P1, P2> = sum_j <S_j, P2[v_j]> = sum_{s,j} Q_sj R_sj
    with Q_sj = G[s, v_j] (a gather: exact) and R_sj = <h_s, fl(S_j)> (a dot of length M), never forming
    V x M. The cross term cancels, so its rounding is bounded (alpha_s >= ||h_s||, sigma_j >= ||fl(S_j)||):
        |c - fl(c)| <= E1 sqrt(sq2) + gamma_M alpha^T |Q| sigma + gamma_{S+T+2} sum |Q o R|  (times 2 for
    the rounding of the bound itself), the first term for fl(S) in place of S (Cauchy-Schwarz). Then
    N^2 <= N1^2 + sq2 + 2 (fl(c) + err_c) + gamma_4 (N1^2 + sq2 + 2 |fl(c)| + 2 err_c), every term an
    upper bound on its exact counterpart, capped by the triangle bound (N1 + sqrt(sq2))^2."""
    hm, gm = _flat_operands(h.astype(acc), g.astype(acc), ghost)  # (S, M), (S, V)
    rows, m = hm.shape
    t = sums.shape[0]
    alpha = _row_norms_upper(hm, acc)
    sigma = _row_norms_upper(sums, acc)
    q = jnp.take(gm, ids, axis=1, mode="fill", fill_value=0)  # (S, T); id V (empty segment) -> 0
    qr = q * _matmul(hm, sums.T)
    c = jnp.sum(jax.lax.optimization_barrier(jnp.sum(qr, axis=1)))  # two stages: chain S + T
    u2 = jnp.sqrt(sq2)
    err_c = (
        e1 * u2
        + _gamma(m, acc) * jnp.dot(alpha, _matmul(jnp.abs(q), sigma), precision=_HIGHEST)
        + _gamma(rows + t + 2, acc) * jnp.sum(jnp.abs(qr))
    ) * 2
    term1 = jnp.square(n1)
    total = term1 + sq2 + 2 * (c + err_c)
    total = total + _gamma(4, acc) * (term1 + sq2 + 2 * jnp.abs(c) + 2 * err_c)
    cap = jnp.square((n1 + u2) * (1 + _gamma(2, acc))) * (1 + _gamma(1, acc))
    return jnp.minimum(jnp.maximum(total, 0), cap)  # total >= the exact value >= 0 (each term bounds its own)


@dataclasses.dataclass
class _Pass:
    """What one instrumented forward/backward pass over a batch gives."""

    leaves: list
    treedef: Any
    plan: dict[int, _Ghost]
    dense: list[int]
    operands: dict[int, jax.Array]
    g_probe: dict[int, jax.Array]
    g_dense: list[jax.Array]
    aux: Any
    size: int
    acc: Any


def _plan(closed: Any, num_params: int, acc: Any) -> dict[int, _Ghost]:
    """The ghost sites of the leaves whose every site is usable (``_usable``); a leaf goes ghost only whole.

    A leaf with several sites goes ghost only if one of them is a lookup (tied input/output
    embeddings, where materialising costs B copies of the V x M table); its norm is then exact with
    the cross term (``_tied_sq``: one lookup and one product in the tied layout) or else the triangle
    inequality bound of ``_leaf_terms``. A weight used in several products only is materialised (its
    norm exact: the triangle bound would over-clip it, and it is no larger than its operands).
    """
    plan = restrict(ghost_plan(closed, num_params), lambda g: _usable(g, acc))
    sites: dict[int, list[_Ghost]] = {}
    for g in plan.values():
        sites.setdefault(g.leaf, []).append(g)
    keep = {leaf for leaf, gs in sites.items() if len(gs) == 1 or any(g.kind == "lookup" for g in gs)}
    return {j: g for j, g in plan.items() if g.leaf in keep}


def _run(loss_fn: Callable[..., jax.Array], has_aux: bool, params: Any, batch: tuple, args: tuple,
         where: str = "clipped_grad") -> _Pass:
    """``batch``: the per-example arguments (a tuple, each with the leading batch axis); ``args``: shared."""
    leaves, treedef = jax.tree.flatten(params)
    size = batch_size(batch, where)
    check_not_summed_over_devices(params, batch, where)
    acc = _accumulation_dtype(*[x.dtype for x in leaves])
    flat_loss = lambda p, ex: loss_fn(jax.tree.unflatten(treedef, p), *ex, *args)
    one = jax.tree.map(lambda x: x[0], batch)
    closed, out_shape = jax.make_jaxpr(flat_loss, return_shape=True)(leaves, one)
    out_tree = jax.tree.structure(out_shape)
    plan = _plan(closed, len(leaves), acc)
    dense = sorted(set(range(len(leaves))) - {g.leaf for g in plan.values()})

    def single(probes: dict, dense_params: list, example: Any) -> Any:
        flat = list(leaves)
        for i, x in zip(dense, dense_params):
            flat[i] = x
        probe = _Probe(plan, probes)
        invals = flat + jax.tree.leaves(example)
        insrc: list[Source | None] = [(i, None) for i in range(len(leaves))]
        insrc += [None] * (len(invals) - len(leaves))
        outs, _ = evaluate(closed.jaxpr, closed.consts, invals, insrc, probe)
        out = jax.tree.unflatten(out_tree, outs)
        value, aux = out if has_aux else (out, None)
        return value, (probe.operands, aux)

    probes = {j: jnp.zeros(g.eqn.outvars[0].aval.shape, g.eqn.outvars[0].aval.dtype) for j, g in plan.items()}
    grad_fn = jax.grad(single, argnums=(0, 1), has_aux=True)
    (g_probe, g_dense), (operands, aux) = jax.vmap(grad_fn, in_axes=(None, None, 0))(
        probes, [leaves[i] for i in dense], batch
    )
    return _Pass(leaves, treedef, plan, dense, operands, g_probe, g_dense, aux, size, acc)


def _leaf_terms(plan: dict[int, _Ghost], site_sq: dict[int, jax.Array], acc: Any,
                exact: dict[int, jax.Array] | None = None) -> list[jax.Array]:
    """(B,) squared-norm bounds per ghost leaf from its sites' bounds. A leaf with several sites (tied
    weights: a lookup and an output product, or two products) takes the triangle inequality
    ||sum_u P_u|| <= sum_u ||P_u||: safe, and it over-clips where the uses' gradients are not aligned
    (by up to sqrt(n) for n orthogonal uses of equal norm); the n square roots and the n-term sum
    round by at most gamma_{n+1}, the square by u. ``exact`` gives leaves' bounds computed whole
    (tied tables with the cross term, ``_tied_sq``)."""
    by_leaf: dict[int, list[jax.Array]] = {}
    for j, ghost in plan.items():
        by_leaf.setdefault(ghost.leaf, []).append(site_sq[j])
    out = []
    for leaf, sqs in by_leaf.items():
        if exact is not None and leaf in exact:
            out.append(exact[leaf])
            continue
        if len(sqs) == 1:
            out.append(sqs[0])
            continue
        norm = sqs[0] ** 0.5
        for sq in sqs[1:]:
            norm = norm + sq**0.5
        out.append(jnp.square(norm * (1 + _gamma(len(sqs) + 1, acc))) * (1 + _gamma(1, acc)))
    return out


def _norms(run: _Pass, clip: float) -> tuple[jax.Array, dict[int, tuple[jax.Array, jax.Array]]]:
    """(B,) squared norms to clip by: rigorous upper bounds, at least the rounding floor (module
    docstring); and for each lookup site its (B, T, M) segment sums and (B, T) row ids (the clipped sum
    scatters those)."""
    acc = run.acc
    products = {j: g for j, g in run.plan.items() if g.kind in ("dot", "conv")}
    bounds = {
        j: jax.vmap(lambda h, g, ghost=ghost: _ghost_bound(h, g, ghost, acc))(run.operands[j], run.g_probe[j])
        for j, ghost in products.items()
    }
    lookups: dict[int, tuple[jax.Array, jax.Array]] = {}
    lookup_norms: dict[int, tuple[jax.Array, jax.Array]] = {}
    site_sq: dict[int, jax.Array] = {j: b[0] for j, b in bounds.items()}
    for j, ghost in run.plan.items():
        if ghost.kind == "lookup":
            rows_sums = lambda r, g, ghost=ghost: lookup_rows_sums(ghost, r, g, acc)
            sums, ids, terms = jax.vmap(rows_sums)(run.operands[j], run.g_probe[j])
            lookups[j] = (sums, ids)
            site_sq[j], n1, e1 = lookup_sq(sums, terms, lookup_dims(ghost)[0], acc)
            lookup_norms[j] = (n1, e1)
    tied = _tied_pairs(run.plan)
    zero = jnp.zeros((run.size,), acc)
    floor = zero
    for jl, _ in tied.values():
        # the norm of a tied table bounds ||P1 + P2||, not the rows summed: fl(S) differs by <= E1
        floor = floor + lookup_norms[jl][1]
    for j, ghost in products.items():
        if ghost.kind == "conv":
            rows, chunks = conv_chunking(ghost.eqn, _ROWS)
        else:
            _, _, _, chunks, rows = _chunking(ghost, run.operands[j], run.g_probe[j])
        floor = floor + (_gamma(rows + 1, acc) + 2 * _gamma(chunks, acc) ** 2) * bounds[j][1]
    floor = floor / _ROUNDING_SHARE
    dense_sq = [_sum_squares_upper(x, acc) for x in run.g_dense]

    def total_of(sq: dict[int, jax.Array]) -> jax.Array:
        whole = {}
        for leaf, (jl, jd) in tied.items():
            ghost = run.plan[jd]
            fn = lambda s, i, n1, e1, h, g, sq2, ghost=ghost: _tied_sq(ghost, s, i, n1, e1, h, g, sq2, acc)
            whole[leaf] = jax.vmap(fn)(*lookups[jl], *lookup_norms[jl], run.operands[jd], run.g_probe[jd], sq[jd])
        terms = _leaf_terms(run.plan, sq, acc, whole) + dense_sq
        return _total_upper(terms, acc) if terms else zero

    total = total_of(site_sq)
    # Where a Gram-form value is not certified accurate and the bound decides the clipping, that
    # weight's norms come from the formed products instead (rare: a cancelling example in the batch).
    deciding = total > jnp.maximum(clip**2, jnp.square(floor))
    for j, ghost in products.items():
        sq, _, err, value = bounds[j]
        if _dims(ghost)[0] == 1:
            continue
        needed = jnp.any(deciding & (err > _CERTIFIED * value))
        h, g = run.operands[j], run.g_probe[j]
        exact = lambda sq=sq, h=h, g=g, ghost=ghost: jnp.minimum(sq, _exact_bounds(h, g, ghost, acc))
        site_sq[j] = jax.lax.cond(needed, exact, lambda sq=sq: sq)
    total = total_of(site_sq)
    return jnp.maximum(total, jnp.square(floor)), lookups  # NaN stays NaN: an invalid example stays invalid


def clipping_norms(loss_fn: Callable[..., jax.Array], l2_clip_norm: float) -> Callable[..., jax.Array]:
    """Returns f(params, *examples, shared=()) -> (B,) the norms ``clipped_grad(loss_fn, l2_clip_norm)``
    clips each example by (NaN or inf for a dropped example): each at least the norm of the example's
    exact gradient (module docstring). Arguments as for ``clipped_grad``. For tests and diagnostics;
    ``clipped_grad`` computes them itself."""
    clip = _check_clip_norm(l2_clip_norm)

    def f(params: Any, *examples: Any, shared: Any = ()) -> jax.Array:
        args = shared_arguments(shared, "clipping_norms")
        return jnp.sqrt(_norms(_run(loss_fn, False, params, examples, args, "clipping_norms"), clip)[0])

    return f


def ghost_leaves(loss_fn: Callable[..., jax.Array], params: Any, *example: Any, shared: Any = ()) -> list[str]:
    """The parameter leaves (``jax.tree_util.keystr`` paths, sorted) that ``clipped_grad`` handles by
    ghost norms for ``loss_fn(params, *example, *shared)``, ``example`` ONE example's arguments (no
    batch axis); all others are materialised per example."""
    leaves, treedef = jax.tree.flatten(params)
    acc = _accumulation_dtype(*[x.dtype for x in leaves])
    args = shared_arguments(shared, "ghost_leaves")
    flat_loss = lambda p, ex: loss_fn(jax.tree.unflatten(treedef, p), *ex, *args)
    closed = jax.make_jaxpr(flat_loss)(leaves, example)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return sorted({names[g.leaf] for g in _plan(closed, len(leaves), acc).values()})


def clipped_grad(
    loss_fn: Callable[..., jax.Array],
    l2_clip_norm: float,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Returns f(params, *examples, shared=()) -> ClippedSum (and the per-example aux if ``has_aux``).

    ``loss_fn(params, *example, *shared)`` is the loss of ONE example (no batch axis), as for
    ``mfnoise.training.per_example.per_example_grads``. Every positional argument after params is
    per-example: a pytree whose leaves all have the same leading batch axis B, row b being example
    b's (``f(params, x, y)`` pairs x[b] with y[b]); one that has not (a scalar, another leading
    size) is refused with an error naming it and its shape. ``shared`` (keyword only, a tuple) holds
    the arguments every example sees whole, passed after the example's. The result's ``grads`` equal
    ``clipped_sum(per_example_grads(loss_fn)(params, *examples, shared=shared), l2_clip_norm)`` up to
    float rounding, computed by ghost clipping where the loss allows it; each example is clipped by
    an upper bound on its norm, and contributes at most l2_clip_norm * (1 + TOLERANCE) (module
    docstring). Jittable.

    Memory: until the clipped sums are formed, the ghost path holds every ghost site's operand and
    output gradient for all B examples (B x T x (K + M) per product) next to the activations of the
    backward pass. ``mfnoise.training.accumulation.accumulate(f, k)`` computes the same sum over
    microbatches of k examples (one microbatch's arrays alive at a time; the noise is still added
    once per logical batch): for the 30M-parameter transformer of ``benchmarks/transformer.py``
    (B = 16) it is the difference between 1.7x and 1.05x the non-private step's peak memory.
    """
    clip = _check_clip_norm(l2_clip_norm)

    def f(params: Any, *examples: Any, shared: Any = ()) -> Any:
        run = _run(loss_fn, has_aux, params, examples, shared_arguments(shared, "clipped_grad"))
        sq, lookups = _norms(run, clip)
        scale, finite = clip_weights(sq, clip)
        out = list(run.leaves)
        for i, x in zip(run.dense, run.g_dense):
            out[i] = _weighted_sum(scale, finite, x)
        sums: dict[int, jax.Array] = {}  # per ghost leaf, in acc: the sites' contributions added
        for j, ghost in run.plan.items():
            w = run.leaves[ghost.leaf]
            if ghost.kind == "lookup":
                fn = lambda s, i, ghost=ghost: lookup_sum(ghost, s, i, scale, run.acc)
                part = _weighted_rows(finite, fn, *lookups[j])
            elif ghost.kind == "conv":
                fn = lambda h, g, ghost=ghost: conv_sum(ghost.eqn, h, g, scale, run.acc, _ROWS)
                part = _weighted_rows(finite, fn, run.operands[j], run.g_probe[j])
            else:
                fn = lambda h, g, ghost=ghost, w=w: _product_vjp(ghost, w, h, g, scale, run.acc)
                part = _weighted_rows(finite, fn, run.operands[j], run.g_probe[j])
            sums[ghost.leaf] = part if ghost.leaf not in sums else sums[ghost.leaf] + part
        for leaf, total in sums.items():
            out[leaf] = total  # in the accumulation dtype (module doc: no rounding before the noise)
        result = ClippedSum(jax.tree.unflatten(run.treedef, out), jnp.sum(~finite).astype(jnp.int32), run.size, clip)
        return (result, run.aux) if has_aux else result

    return f
