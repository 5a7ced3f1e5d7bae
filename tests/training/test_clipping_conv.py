"""Ghost norms for convolution kernels (issue 14): the im2col patches against autodiff for random
convolutions (any rank, strides, padding, dilations, layouts), and end to end the norms and the
clipped sum against a per-example loop in float64 (``test_clipping_layers.check``), in plain jax and
Flax NNX, with bfloat16 parameters, a cancelling example, and the convolutions that stay materialised.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from mfnoise.training.clipping import TOLERANCE, clipped_grad, clipping_norms, ghost_leaves
from mfnoise.training.ghost_conv import conv_kernel, conv_operands
from tests.training.test_clipping_layers import check, clip_sum, flat, loop_grads

LAYOUTS = {1: [("NWC", "WIO", "NWC"), ("NCW", "OIW", "NCW")],
           2: [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")]}


def _shape(spec: str, sizes: dict[str, int], spatial: list[int]) -> tuple[int, ...]:
    it = iter(spatial)
    return tuple(sizes[c] if c in sizes else next(it) for c in spec)


@st.composite
def conv_configs(draw):
    d = draw(st.integers(1, 2))
    layout = draw(st.sampled_from(LAYOUTS[d]))
    window = [draw(st.integers(1, 3)) for _ in range(d)]
    spatial = [draw(st.integers(3, 7)) for _ in range(d)]
    cfg = {
        "window_strides": tuple(draw(st.integers(1, 3)) for _ in range(d)),
        "padding": draw(st.one_of(st.sampled_from(["SAME", "VALID"]),
                                  st.tuples(*[st.tuples(st.integers(-1, 2), st.integers(-1, 2)) for _ in range(d)]))),
        "lhs_dilation": tuple(draw(st.integers(1, 2)) for _ in range(d)),
        "rhs_dilation": tuple(draw(st.integers(1, 2)) for _ in range(d)),
        "dimension_numbers": layout,
    }
    if cfg["padding"] in ("SAME", "VALID") and any(x > 1 for x in cfg["lhs_dilation"]):
        cfg["lhs_dilation"] = (1,) * d  # lax refuses string padding with input dilation
    sizes = {"N": draw(st.integers(1, 2)), "C": draw(st.integers(1, 3))}
    x_shape = _shape(layout[0], sizes, spatial)
    w_shape = _shape(layout[1], {"I": sizes["C"], "O": draw(st.integers(1, 3))}, window)
    return cfg, x_shape, w_shape


def _conv(w, x, cfg):
    padding = cfg["padding"] if isinstance(cfg["padding"], str) else list(cfg["padding"])
    return jax.lax.conv_general_dilated(x, w, cfg["window_strides"], padding, cfg["lhs_dilation"],
                                        cfg["rhs_dilation"], cfg["dimension_numbers"],
                                        precision=jax.lax.Precision.HIGHEST)


@settings(max_examples=60, deadline=None)
@given(config=conv_configs(), seed=st.integers(0, 2**31 - 1))
def test_patches_times_output_gradient_is_the_kernel_gradient(config, seed):
    """H^T G from conv_operands, laid out by conv_kernel, equals jax.grad of <G, conv(x, W)> in W
    (float64; autodiff of lax's own convolution is the independent reference)."""
    cfg, x_shape, w_shape = config
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        x, w = jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.normal(size=w_shape))
        try:
            y = _conv(w, x, cfg)
        except (TypeError, ValueError):  # an empty output (padding crops everything): not a convolution
            return
        if y.size == 0:
            return
        g = jnp.asarray(rng.normal(size=y.shape))
        want = jax.grad(lambda w: jnp.sum(_conv(w, x, cfg) * g))(w)
        eqn = next(e for e in jax.make_jaxpr(lambda w, x: _conv(w, x, cfg))(w, x).jaxpr.eqns
                   if e.primitive.name == "conv_general_dilated")
        h, gm = conv_operands(eqn, x, g)
        got = conv_kernel(eqn, h.T @ gm)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
        # H holds copies of x's entries and zeros only: exact, no arithmetic
        assert set(np.unique(np.asarray(h))) <= set(np.unique(np.asarray(x))) | {0.0}


# -- end to end --------------------------------------------------------------------------------------


def cnn_loss(p, image, label):
    """Two 3x3 convolutions (the second strided), a bias, a linear head: a small CNN on one image."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(image[None], p["c1"], (1, 1), "SAME", dimension_numbers=dn)
    h = jax.nn.relu(h + p["b1"])
    h = jax.lax.conv_general_dilated(h, p["c2"], (2, 2), "SAME", rhs_dilation=(1, 1), dimension_numbers=dn)
    logits = jnp.mean(jax.nn.relu(h), axis=(0, 1, 2)) @ p["W"]
    return -jax.nn.log_softmax(logits)[label]


# c1: T = 16 positions, K = 9 * 3 = 27, M = 8: T (K + M) = 560 > K M = 216, materialised;
# c2: T = 4, K = 72, M = 32: 416 < 2304, ghost
CNN = {"c1": (3, 3, 3, 8), "b1": (8,), "c2": (3, 3, 8, 32), "W": (32, 5)}


def cnn_case(dtype, seed=0, batch=6):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(np.prod(s[:-1])), dtype) for k, s in CNN.items()}
    images = jnp.asarray(rng.normal(size=(batch, 4, 4, 3)), dtype)
    labels = jnp.asarray(rng.integers(0, 5, size=batch), jnp.int32)
    return params, (images, labels)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cnn_equals_the_loop(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        params, batch = cnn_case(dtype)
        check(cnn_loss, params, batch, ["['W']", "['c2']"], rtol=1e-3 if dtype == jnp.float32 else 1e-9)


def test_cnn_in_bfloat16_is_safe():
    """bfloat16 parameters: the norms bound the exact gradient of the bfloat16 model (computed in
    float32 by the loop at the same bfloat16 values)."""
    params, (images, labels) = cnn_case(jnp.bfloat16, seed=1)
    grads = loop_grads(cnn_loss, params, (images, labels))
    true = np.array([np.linalg.norm(flat(g)) for g in grads])
    clip = float(np.median(true))
    used = np.asarray(jax.jit(clipping_norms(cnn_loss, clip))(params, images, labels), np.float64)
    assert np.all(used >= true * (1 - 2e-2)), used / true  # the loop itself runs in bfloat16
    got = jax.jit(clipped_grad(cnn_loss, clip))(params, images, labels)
    assert jax.tree.leaves(got.grads)[0].dtype == jnp.float32
    for g in jax.tree.leaves(got.grads):
        assert np.all(np.isfinite(np.asarray(g)))


def test_a_cancelling_example_never_exceeds_the_clip():
    """Two output positions see the same patch with gradients a and -a + d: the Gram form cancels
    (|h|^2 d^2 from terms of size |h|^2 a^2); the norm must still bound the exact one, so that the
    example's contribution stays within the clip (TOLERANCE)."""

    def loss(p, image, gy):
        y = jax.lax.conv_general_dilated(image[None], p["k"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
        return jnp.sum(y * gy)

    rng = np.random.default_rng(3)
    k_in, k_out = 24, 24
    patch = rng.normal(size=(1, k_in))
    image = np.concatenate([patch, patch], axis=0)  # width 2, window 1: positions 0 and 1 see the same patch
    a, d = 5e3, 1.0
    ga = rng.normal(size=k_out)
    ga *= a / np.linalg.norm(ga)
    gd = rng.normal(size=k_out)
    gd *= d / np.linalg.norm(gd)
    gy = np.stack([ga, -ga + gd])[None]  # (1, 2, M)
    params = {"k": jnp.asarray(rng.normal(size=(1, k_in, k_out)), jnp.float32)}
    images = jnp.asarray(np.stack([image, image + 1e-3]), jnp.float32)
    gys = jnp.asarray(np.concatenate([gy, gy]), jnp.float32)
    assert ghost_leaves(loss, params, images[0], gys[0]) == ["['k']"]
    grads = loop_grads(loss, params, (images, gys))
    true = np.array([np.linalg.norm(flat(g)) for g in grads])
    clip = 0.5 * float(true.min())
    used = np.asarray(jax.jit(clipping_norms(loss, clip))(params, images, gys), np.float64)
    assert np.all(used >= true * (1 - 1e-12)), used / true
    got = jax.jit(clipped_grad(loss, clip))(params, images, gys)
    for b in range(2):  # each example alone: its contribution's norm
        one = jax.jit(clipped_grad(loss, clip))(params, images[b:b + 1], gys[b:b + 1])
        assert np.linalg.norm(flat(one.grads)) <= clip * (1 + TOLERANCE)
    want = clip_sum(grads, used, clip)
    np.testing.assert_allclose(flat(got.grads), flat(want), rtol=1e-3, atol=1e-3 * np.abs(flat(want)).max())


def test_grouped_and_shared_convolutions_stay_materialised():
    """A depthwise (grouped) convolution and a kernel used twice are materialised (exact norms)."""
    dn = ("NWC", "WIO", "NWC")

    def loss(p, x):
        y = jax.lax.conv_general_dilated(x[None], p["dw"], (1,), "SAME", dimension_numbers=dn, feature_group_count=4)
        z = jax.lax.conv_general_dilated(y, p["k"], (1,), "SAME", dimension_numbers=dn)
        z = jax.lax.conv_general_dilated(z, p["k"], (1,), "SAME", dimension_numbers=dn)
        return jnp.sum(jnp.tanh(z))

    rng = np.random.default_rng(4)
    params = {"dw": jnp.asarray(rng.normal(size=(3, 1, 4)), jnp.float32),
              "k": jnp.asarray(rng.normal(size=(1, 4, 4)) / 2, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(5, 6, 4)), jnp.float32)
    check(loss, params, (x,), [], rtol=1e-4)


def test_flax_nnx_cnn_norms_are_safe_and_the_sum_is_exact():
    nnx = pytest.importorskip("flax.nnx", reason="the flax extra")

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.c2 = nnx.Conv(8, 32, (3, 3), strides=2, rngs=rngs)
            self.head = nnx.Linear(32, 5, rngs=rngs)

        def __call__(self, x):
            h = jax.nn.relu(self.c2(jax.nn.relu(self.c1(x))))
            return self.head(jnp.mean(h, axis=(0, 1, 2)))

    graphdef, state = nnx.split(CNN(nnx.Rngs(0)))

    def loss(s, image, label):
        return -jax.nn.log_softmax(nnx.merge(graphdef, s)(image[None]))[label]

    _, (images, labels) = cnn_case(jnp.float32, seed=5)
    ghost = ghost_leaves(loss, state, images[0], labels[0])
    assert any("c2" in g and "kernel" in g for g in ghost), ghost
    assert not any("c1" in g for g in ghost), ghost
    grads = loop_grads(loss, state, (images, labels))
    true = np.array([np.linalg.norm(flat(g)) for g in grads])
    clip = float(np.median(true))
    used = np.asarray(jax.jit(clipping_norms(loss, clip))(state, images, labels), np.float64)
    assert np.all(used >= true * (1 - 1e-6)) and np.all(used <= true * (1 + 1e-3)), used / true
    got = jax.jit(clipped_grad(loss, clip))(state, images, labels)
    want = clip_sum(grads, used, clip)
    for a, b in zip(jax.tree.leaves(got.grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-4, atol=1e-4 * np.abs(flat(want)).max())


def test_ghost_kernel_path_materialises_no_per_example_kernel():
    """A 3x3 kernel 64 -> 128 on a 4x4 input, stride 2 (T = 4, K = 576, M = 128): the traced step
    holds no array as large as the B x K x M per-example kernel gradients (B = 8), which the
    materialised path (per_example_grads) does hold: B times less memory."""
    from mfnoise.training.per_example import per_example_grads
    from tests.training.test_clipping_layers import _largest_array

    def loss(p, x):
        y = jax.lax.conv_general_dilated(x[None], p["k"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y))

    rng = np.random.default_rng(6)
    params = {"k": jnp.asarray(rng.normal(size=(3, 3, 64, 128)) / 24, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(8, 4, 4, 64)), jnp.float32)
    per_example = 8 * 3 * 3 * 64 * 128
    assert ghost_leaves(loss, params, x[0]) == ["['k']"]
    ghost = _largest_array(jax.make_jaxpr(clipped_grad(loss, 1.0))(params, x))
    materialised = _largest_array(jax.make_jaxpr(per_example_grads(loss))(params, x))
    # the ghost step's largest arrays are kernel-sized, whatever B is
    assert materialised >= per_example and ghost <= params["k"].size, (ghost, materialised)
