"""Ghost norms and clipped sums of convolution kernels, by im2col: a convolution is a product.

A convolution y = conv(x, W) (``lax.conv_general_dilated``, any spatial rank d, strides s, padding,
input dilation l, kernel dilation r, any dimension layout; one feature group) computes, for each
output position p (T of them: the example's batch entries times the output's spatial positions),

    y_p = sum_k W_k^T x_pad[p s + k r]     (k over the kernel's spatial offsets, W_k of shape I x O),

with x_pad the input dilated by l and padded. So with the patch matrix H (T x K), row p the patch
(x_pad[p s + k r])_k flattened over (k, input feature), K = prod(kernel) I, and G (T x M) the output
gradients (M = O), the per-example kernel gradient is P = H^T G (K x M), exactly the product form of
``mfnoise.training.clipping`` ("Efficient Per-Example Gradient Computations", Goodfellow 2015,
arXiv:1510.01799, for convolutions; "Scalable and Efficient Training of Large Convolutional Neural
Networks with Differential Privacy", Bu et al. 2022, arXiv:2205.10683, for the choice between ghost
and materialised from the shapes). Its norm bounds (the Gram form with its rounding bound, T = 1,
the fallback from formed products) are the product path's, applied to H and G.

H is formed by padding (``lax.pad``: edge padding, negative where the convolution crops, interior
padding l - 1) and strided slicing: each entry is a copy of an input entry or an exact zero, no
arithmetic, so H is exact in any dtype (a patches *convolution* with a one-hot kernel would be exact
only at full precision). The clipped sum H^T diag(s) G is accumulated ``_ROWS`` rows of each
example at a time with compensated addition of the chunks, as for products, so the rounding floor
of ``clipping._norms`` holds with the same (rows, chunks). Memory: H is prod(kernel) / prod(s) times
the input per example (the im2col cost), which is why the leaf goes this way only where the Gram
form pays (T (K + M) < K M, as for products) and is materialised elsewhere.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mfnoise.training.safe_rounding import _HIGHEST, _compensated_sum


def is_conv(eqn: Any) -> bool:
    """Whether a ``conv_general_dilated`` has the product form above: one feature group, one batch group."""
    return (eqn.primitive.name == "conv_general_dilated"
            and eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1)


def conv_dims(eqn: Any) -> tuple[int, int, int]:
    """(T, K, M) of the site's product P = H^T G for one example."""
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    t = out[out_spec[0]] * math.prod(out[d] for d in out_spec[2:])
    k = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
    return t, k, kernel[rhs_spec[0]]


def conv_operands(eqn: Any, x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(H (T, K), G (T, M)) of one example: x the convolution's input, g its output's gradient.

    H's columns are ordered (kernel offset k in row-major order over the spatial dims, input feature).
    """
    lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    kernel = eqn.invars[1].aval.shape
    window = [kernel[d] for d in rhs_spec[2:]]
    out_shape = g.shape
    out_spatial = [out_shape[d] for d in out_spec[2:]]
    # (N, spatial..., C): batch first, features last
    xs = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    zero = jnp.zeros((), xs.dtype)
    pads = zip(eqn.params["padding"], eqn.params["lhs_dilation"])
    config = [(0, 0, 0)] + [(lo, hi, dil - 1) for (lo, hi), dil in pads] + [(0, 0, 0)]
    xs = jax.lax.pad(xs, zero, config)
    strides, rdil = eqn.params["window_strides"], eqn.params["rhs_dilation"]
    patches = []
    for offset in itertools.product(*(range(w) for w in window)):
        start = [0] + [k * r for k, r in zip(offset, rdil)] + [0]
        limit = [xs.shape[0]] + [b + (n - 1) * s + 1 for b, n, s in zip(start[1:-1], out_spatial, strides)]
        limit += [xs.shape[-1]]
        patches.append(jax.lax.slice(xs, start, limit, [1, *strides, 1]))
    h = jnp.stack(patches, axis=-2)  # (N, out spatial..., offsets, C)
    t = math.prod(h.shape[:-2])
    gm = jnp.transpose(g, (out_spec[0], *out_spec[2:], out_spec[1]))
    return h.reshape(t, -1), gm.reshape(t, -1)


def conv_kernel(eqn: Any, p: jax.Array) -> jax.Array:
    """The (K, M) product H^T G laid out as the kernel: K's (offsets, input feature) and M = output
    feature moved to the kernel's dims (rhs_spec: output feature, input feature, spatial...)."""
    _, rhs_spec, _ = eqn.params["dimension_numbers"]
    kernel = eqn.invars[1].aval.shape
    window = [kernel[d] for d in rhs_spec[2:]]
    q = p.reshape(*window, kernel[rhs_spec[1]], kernel[rhs_spec[0]])  # (spatial..., I, O)
    d = len(window)
    axis_of = {rhs_spec[0]: d + 1, rhs_spec[1]: d, **{rhs_spec[2 + i]: i for i in range(d)}}
    return jnp.transpose(q, [axis_of[a] for a in range(len(kernel))])


def conv_sum(eqn: Any, x: jax.Array, g: jax.Array, scale: jax.Array, acc: Any, rows: int) -> jax.Array:
    """sum_b scale_b H_b^T G_b in the kernel's layout, in acc: ``rows`` rows of every example at a
    time, the chunks added with compensation (x, g with the batch axis B first)."""
    hm, gm = jax.vmap(lambda a, b: conv_operands(eqn, a.astype(acc), b.astype(acc)))(x, g)
    gm = gm * scale.astype(acc)[:, None, None]
    t = hm.shape[1]
    rows, chunks = conv_chunking(eqn, rows)
    pad = chunks * rows - t
    if pad:
        hm = jnp.pad(hm, ((0, 0), (0, pad), (0, 0)))
        gm = jnp.pad(gm, ((0, 0), (0, pad), (0, 0)))

    def part(i: Any) -> jax.Array:
        hp = jax.lax.dynamic_slice_in_dim(hm, i * rows, rows, axis=1)
        gp = jax.lax.dynamic_slice_in_dim(gm, i * rows, rows, axis=1)
        return jnp.einsum("btk,btm->km", hp, gp, precision=_HIGHEST, preferred_element_type=acc)

    return conv_kernel(eqn, _compensated_sum(part, chunks))


def conv_chunking(eqn: Any, rows: int) -> tuple[int, int]:
    """(rows, chunks) of ``conv_sum``: at most ``rows`` rows of each example per chunk."""
    t = conv_dims(eqn)[0]
    if t <= rows:
        return t, 1
    return rows, -(-t // rows)
