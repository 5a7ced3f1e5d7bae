"""Floating-point helpers for rigorous norm bounds (``mfnoise.training.clipping``'s rounding model).

With u the unit roundoff of the accumulation dtype, a sum of n terms in any order, or a dot product
of length n, is within gamma_n sum |terms| of the exact value, gamma_n = n u / (1 - n u) ("Accuracy
and Stability of Numerical Algorithms", Higham 2002, Lemma 3.1); ``_gamma`` uses u' = eps = 2u, a
margin for products that are not IEEE-exact (FMA, multi-pass emulations). ``_sum_squares_upper``
bounds a sum of squares from above; ``_compensated_sum`` adds parts with TwoSum ("Accurate Sum and
Dot Product", Ogita, Rump and Oishi 2005); ``_toward_zero`` rounds without growing any entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

_CHUNK = 4096  # axes longer than this are summed in chunks of this length (shorter rounding chains)
_HIGHEST = jax.lax.Precision.HIGHEST

def _accumulation_dtype(*dtypes: Any) -> Any:
    return jnp.result_type(jnp.float32, *dtypes)  # norms and weighted sums in >= float32


def _gamma(n: int, dtype: Any) -> float:
    """gamma_n = n u' / (1 - n u') with u' = eps = 2u: a bound on the relative rounding of n operations."""
    nu = n * float(jnp.finfo(dtype).eps)
    return nu / (1 - nu) if nu < 0.5 else math.inf


def _toward_zero(x: jax.Array, dtype: Any) -> jax.Array:
    """x rounded to ``dtype`` toward zero: |result| <= |x| entrywise, so no norm grows."""
    if x.dtype == dtype:
        return x
    y = x.astype(dtype)
    grew = jnp.abs(y.astype(x.dtype)) > jnp.abs(x)
    return jnp.where(grew, jnp.nextafter(y, jnp.zeros((), dtype)), y)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b at full precision; with Explicit mesh axes, a replicated output where an operand is sharded
    (the products here are small, per example: T x T Grams and K x M per-example gradients)."""
    sharded = any(_axis_sharded(a, d) for d in range(a.ndim)) or any(_axis_sharded(b, d) for d in range(b.ndim))
    if sharded:
        return jnp.matmul(a, b, precision=_HIGHEST, out_sharding=jax.sharding.PartitionSpec())
    return jnp.matmul(a, b, precision=_HIGHEST)


def _axis_sharded(x: jax.Array, axis: int) -> bool:
    try:
        spec = jax.typeof(x).sharding.spec
        return axis < len(spec) and spec[axis] is not None
    except (AttributeError, TypeError):  # pragma: no cover - no sharding information
        return False


def _sum_squares_upper(x: jax.Array, acc: Any) -> jax.Array:
    """(B,) upper bounds on sum of squares of each example's row of x (B, ...), computed in acc.

    One axis at a time, last first, with optimisation barriers between the stages so that XLA can
    neither merge nor reorder them: a sum of n non-negative terms in any order has relative error
    <= gamma_{n-1}, so the chain is bounded by the sum of the axis lengths (+1 for the squares).
    Unsharded axes longer than _CHUNK are first split into chunks (zero padding adds exactly 0).
    """
    # no merging reshapes: merging sharded dimensions is not allowed with Explicit mesh axes
    y = jnp.square(x.astype(acc))
    chain = 1
    for axis in range(x.ndim - 1, 0, -1):
        d = y.shape[axis]
        if d > _CHUNK and not _axis_sharded(x, axis):
            pad = (-d) % _CHUNK
            if pad:
                y = jnp.pad(y, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (y.ndim - axis - 1))
            y = y.reshape(y.shape[:axis] + ((d + pad) // _CHUNK, _CHUNK) + y.shape[axis + 1 :])
            y = jax.lax.optimization_barrier(jnp.sum(y, axis=axis + 1))
            chain += _CHUNK
            d = y.shape[axis]
        y = jnp.sum(y, axis=axis)
        chain += d
        if axis > 1:
            y = jax.lax.optimization_barrier(y)
    gamma = _gamma(chain, acc)
    if gamma > 0.1:  # a sharded axis too long for a useful bound: n max x^2 >= sum x^2, exactly
        size = math.prod(x.shape[1:])
        biggest = jnp.max(jnp.square(x.astype(acc)), axis=tuple(range(1, x.ndim))) if x.ndim > 1 else y
        return biggest * size * (1 + _gamma(2, acc))
    return y * (1 + gamma)

def _add_compensated(carry: tuple[jax.Array, jax.Array], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s, c) + x by TwoSum: s + x = s' + e exactly, the errors e summed in c ("Accurate Sum and Dot
    Product", Ogita, Rump and Oishi 2005: the result s + c of n additions is within u |sum| +
    gamma_{n-1}^2 sum |x_i| of the exact sum)."""
    s, c = carry
    total = s + x
    back = total - s
    return total, c + ((s - (total - back)) + (x - back))


def _compensated_sum(part: Callable[[Any], jax.Array], chunks: int) -> jax.Array:
    """sum_{i < chunks} part(i), the parts added with compensation (``_add_compensated``); the carry
    takes the first part's type (with its sharding, under Explicit mesh axes)."""
    first = part(0)
    body = lambda i, carry: _add_compensated(carry, part(i))
    s, c = jax.lax.fori_loop(1, chunks, body, (first, jnp.zeros_like(first)))
    return s + c
