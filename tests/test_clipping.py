"""Ghost clipping (mfnoise.clipping.clipped_grad) against per-example gradients computed one by one.

The reference takes jax.grad of the loss of each example separately (a Python loop, no vmap, no
ghost norms), flattens, clips with numpy in float64 and sums: independent of the code under test.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import mfnoise
from mfnoise.clipping import ClippedSum, clipped_grad, clipped_sum, ghost_plan
from mfnoise.per_example import per_example_grads


def reference(loss, params, batch, clip):
    """(sum_b clip(g_b), dropped) with g_b = jax.grad(loss)(params, batch[b]) one at a time, numpy float64."""
    size = jax.tree.leaves(batch)[0].shape[0]
    total = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    dropped = 0
    for b in range(size):
        g = jax.grad(loss)(params, jax.tree.map(lambda x: x[b], batch))
        flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])
        if not np.all(np.isfinite(flat)):
            dropped += 1
            continue
        norm = np.linalg.norm(flat)
        s = min(1.0, clip / norm) if norm > 0 else 1.0
        total = jax.tree.map(lambda t, x: t + s * np.asarray(x, np.float64), total, g)
    return total, dropped


def assert_close(got: ClippedSum, want, rtol=1e-9, atol=1e-12):
    for a, b in zip(jax.tree.leaves(got.grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol)


def mlp_params(rng, sizes):
    p = {f"w{i}": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a)) for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}
    p.update({f"b{i}": jnp.asarray(rng.normal(size=(b,))) for i, b in enumerate(sizes[1:])})
    return p


def mlp_loss(sizes):
    def loss(p, ex):
        h = ex[0]
        for i in range(len(sizes) - 1):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i < len(sizes) - 2:
                h = jax.nn.relu(h)
        return -jax.nn.log_softmax(h)[ex[1]]

    return loss


def plan_leaves(loss, params, example):
    leaves, treedef = jax.tree.flatten(params)
    closed = jax.make_jaxpr(lambda p, ex: loss(jax.tree.unflatten(treedef, p), ex))(leaves, example)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return sorted(names[g.leaf] for g in ghost_plan(closed, len(leaves)).values())


@settings(max_examples=25)
@given(
    hidden=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    batch=st.integers(1, 6),
    clip=st.sampled_from([1e-3, 0.3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_mlp_equals_one_by_one_reference(hidden, batch, clip, seed):
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        sizes = [5, *hidden, 3]
        params = mlp_params(rng, sizes)
        data = (jnp.asarray(rng.normal(size=(batch, 5))), jnp.asarray(rng.integers(0, 3, batch)))
        loss = mlp_loss(sizes)
        got = jax.jit(clipped_grad(loss, clip))(params, data)
        want, dropped = reference(loss, params, data, clip)
        assert_close(got, want)
        assert int(got.nonfinite) == dropped == 0
        assert got.batch_size == batch and got.l2_clip_norm == clip
        # every weight matrix goes the ghost way, every bias the materialised way
        assert plan_leaves(loss, params, jax.tree.map(lambda x: x[0], data)) == sorted(
            f"['w{i}']" for i in range(len(sizes) - 1)
        )


def sequence_loss(q, ex):
    """Products with T > 1 rows, the weight as left operand, a shared weight, a transposed weight,
    a weight inside a jitted layer, a convolution and an einsum: ghost and materialised paths mixed."""
    layer = jax.jit(lambda h, w: jnp.tanh(h @ w))
    h = layer(ex, q["W"])  # (T, 5), through a jit call
    h = jnp.einsum("tk,km->tm", h, q["V"])  # einsum product, T = 3
    h = jnp.tanh(h) @ q["S"] + jnp.tanh(h @ q["S"])  # S used twice: materialised
    h = jnp.dot(q["L"], h.T)  # weight as the left operand: (2, T)
    h = h + q["E"].T @ h  # E transposed before the product: materialised
    conv = jax.lax.conv_general_dilated(h[None, None], q["K"][None, None], (1, 1), "SAME")
    return jnp.sum(jnp.sin(conv)) + jnp.sum(h**2)


def sequence_params(rng, wide):
    m = 5 if not wide else 40  # wide: K M > T (K + M), Gram form; narrow: forms H^T G
    return {
        "W": jnp.asarray(rng.normal(size=(4, m)) / 2),
        "V": jnp.asarray(rng.normal(size=(m, 5)) / 2),
        "S": jnp.asarray(rng.normal(size=(5, 5)) / 2),
        "L": jnp.asarray(rng.normal(size=(2, 5)) / 2),
        "E": jnp.asarray(rng.normal(size=(2, 2)) / 2),
        "K": jnp.asarray(rng.normal(size=(2, 2))),
    }


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("clip", [0.05, 1.0, 1e4])
def test_mixed_model_equals_reference(wide, clip):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        params = sequence_params(rng, wide)
        data = jnp.asarray(rng.normal(size=(4, 3, 4)))
        got = jax.jit(clipped_grad(sequence_loss, clip))(params, data)
        want, _ = reference(sequence_loss, params, data, clip)
        assert_close(got, want)
        assert plan_leaves(sequence_loss, params, data[0]) == ["['L']", "['V']", "['W']"]


def test_float32_matches_materialised_path():
    rng = np.random.default_rng(2)
    sizes = [20, 16, 8, 4]
    params = jax.tree.map(lambda x: x.astype(jnp.float32), mlp_params(rng, sizes))
    data = (jnp.asarray(rng.normal(size=(8, 20)), jnp.float32), jnp.asarray(rng.integers(0, 4, 8)))
    loss = mlp_loss(sizes)
    got = jax.jit(clipped_grad(loss, 0.5))(params, data)
    want, _ = clipped_sum(per_example_grads(loss)(params, data), 0.5)
    for a, b in zip(jax.tree.leaves(got.grads), jax.tree.leaves(want)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


def test_non_finite_examples_are_dropped_and_counted():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        sizes = [5, 4, 3]
        params = mlp_params(rng, sizes)
        x = rng.normal(size=(5, 5))
        x[1, 2] = np.nan
        x[3, 0] = np.inf
        data = (jnp.asarray(x), jnp.asarray(rng.integers(0, 3, 5)))
        loss = mlp_loss(sizes)
        got = jax.jit(clipped_grad(loss, 0.7))(params, data)
        want, dropped = reference(loss, params, data, 0.7)
        assert dropped == 2 and int(got.nonfinite) == 2
        assert_close(got, want)


def test_has_aux_returns_the_per_example_aux():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        sizes = [3, 2]
        params = mlp_params(rng, sizes)
        data = (jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.integers(0, 2, 4)))
        loss = mlp_loss(sizes)
        got, aux = clipped_grad(lambda p, ex: (loss(p, ex), {"x0": ex[0][0]}), 1.0, has_aux=True)(params, data)
        np.testing.assert_array_equal(np.asarray(aux["x0"]), np.asarray(data[0][:, 0]))
        assert_close(got, reference(loss, params, data, 1.0)[0])


def test_dp_aggregate_takes_a_clipped_sum():
    rng = np.random.default_rng(5)
    sizes = [6, 4, 3]
    params = jax.tree.map(lambda x: x.astype(jnp.float32), mlp_params(rng, sizes))
    data = (jnp.asarray(rng.normal(size=(7, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, 7)))
    loss = mlp_loss(sizes)
    part = mfnoise.Participation.epochs(8, 2)
    tx = mfnoise.dp_aggregate(mfnoise.bsr(8, 2), 0.5, 1.3, 7, participation=part)
    u_ghost, s_ghost = jax.jit(tx.update)(clipped_grad(loss, 0.5)(params, data), tx.init(params))
    u_mat, s_mat = jax.jit(tx.update)(per_example_grads(loss)(params, data), tx.init(params))
    for a, b in zip(jax.tree.leaves(u_ghost), jax.tree.leaves(u_mat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert int(s_ghost.nonfinite) == int(s_mat.nonfinite) == 0
    with pytest.raises(ValueError, match="clipped to 1.0.*l2_clip_norm is 0.5"):
        tx.update(clipped_grad(loss, 1.0)(params, data), tx.init(params))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_clip_norm_is_refused(bad):
    with pytest.raises(ValueError, match="l2_clip_norm"):
        clipped_grad(lambda p, ex: jnp.sum(p * ex), bad)
