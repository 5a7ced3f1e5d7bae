"""Ghost clipping (mfnoise.training.clipping.clipped_grad) against per-example gradients computed one by one.

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
from mfnoise.training.clipping import ClippedSum, clipped_grad, clipped_sum, clipping_norms, ghost_leaves
from mfnoise.training.per_example import per_example_grads


def per_example_reference(loss, params, batch):
    """[g_b] with g_b = jax.grad(loss)(params, batch[b]) one example at a time (a Python loop, no vmap,
    no ghost norms), each a numpy float64 pytree."""
    size = jax.tree.leaves(batch)[0].shape[0]
    grad = jax.jit(jax.grad(loss))
    examples = [jax.tree.map(lambda x, b=b: x[b], batch) for b in range(size)]
    return [jax.tree.map(lambda x: np.asarray(x, np.float64), grad(params, ex)) for ex in examples]


def clip_reference(grads, clip):
    """(sum_b clip(g_b), dropped, norms) in numpy float64; a non-finite g_b is dropped."""
    total = jax.tree.map(np.zeros_like, grads[0])
    dropped, norms = 0, []
    for g in grads:
        flat = np.concatenate([x.ravel() for x in jax.tree.leaves(g)])
        if not np.all(np.isfinite(flat)):
            dropped += 1
            norms.append(np.inf)
            continue
        norm = np.linalg.norm(flat)
        norms.append(norm)
        s = min(1.0, clip / norm) if norm > 0 else 1.0
        total = jax.tree.map(lambda t, x, s=s: t + s * x, total, g)
    return total, dropped, np.asarray(norms)


def reference(loss, params, batch, clip):
    """(sum_b clip(g_b), dropped) with g_b = jax.grad(loss)(params, batch[b]) one at a time, numpy float64."""
    total, dropped, _ = clip_reference(per_example_reference(loss, params, batch), clip)
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


@settings(max_examples=15)
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
        assert ghost_leaves(loss, params, jax.tree.map(lambda x: x[0], data)) == sorted(
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
    m = 5 if not wide else 40  # wide: K M > T (K + M), Gram form; narrow: materialised
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
        # L (2 x 5, T = 3) and the narrow W, V: T (K + M) >= K M, materialised; the wide W, V: Gram form
        assert ghost_leaves(sequence_loss, params, data[0]) == (["['V']", "['W']"] if wide else [])


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
    tx = mfnoise.dp_aggregate(mfnoise.bsr(8, 2), 0.5, 1.3, 7, participation=part, expected_batch_size=7)
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


# -- which leaves take the ghost route, and every route equals the per-example loop --------------------
#
# Each model mixes one construct that must be materialised with weights that may go the ghost way
# (T = 3 rows, K = M = 8: T (K + M) < K M, the Gram form). The clip is the median of the reference
# norms, so that some examples are clipped and a wrong norm changes the result.


def _layer(h, w):
    return jnp.tanh(h @ w)


_jit_layer = jax.jit(_layer)


@jax.custom_vjp
def _custom_product(h, w):
    return h @ w


def _custom_fwd(h, w):
    return h @ w, (h, w)


def _custom_bwd(res, g):
    h, w = res
    return g @ w.T, h.T @ g


_custom_product.defvjp(_custom_fwd, _custom_bwd)


def _per_head(p, x):
    q = jnp.einsum("tk,hkd->htd", x, p["Wq"])  # an ordinary product (no batch dims): ghost
    pooled = jnp.tanh(jnp.mean(q, axis=1))  # (H, D)
    # per-head weights, batch dim h: ghost, one product per head, the norms of the heads' slices summed
    # (read as H rows of one D x M product there would be cross-head terms in the norm, a wrong clip)
    o = jnp.einsum("hd,hdm->hm", pooled, p["Wo"])
    return jnp.sum(jnp.tanh(o) ** 2)


def _scan(p, x):
    xs = x @ p["Win"]

    def step(h, xt):
        h = jnp.tanh(xt + h @ p["Wrec"])
        return h, h

    _, hs = jax.lax.scan(step, jnp.zeros(xs.shape[1], xs.dtype), xs)
    return jnp.sum(jnp.sin(hs @ p["Wout"]))


def _cond(p, x):
    h = _layer(x, p["W"])
    h = jax.lax.cond(jnp.sum(x) > 0, lambda: h @ p["A"], lambda: jnp.cos(h @ p["A"]))
    return jnp.sum(jnp.sin(h))


def _while(p, x):
    # reverse mode cannot differentiate a while_loop's carry, so the parameter enters it without a
    # tangent (stop_gradient); it is also used in a product, so it has two uses: materialised
    h = _layer(x, p["W"])
    a = jax.lax.stop_gradient(p["A"])

    def body(c):
        i, v = c
        return i + 1, jnp.tanh(v @ a)

    _, v = jax.lax.while_loop(lambda c: c[0] < 2, body, (0, x))
    return jnp.sum(jnp.sin(h + v)) + jnp.sum(jnp.cos(h @ p["A"]))


def _while_direct(p, x):
    h = _layer(x, p["W"])
    _, v = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["A"])), (0, h))
    return jnp.sum(v)


def test_a_parameter_inside_while_loop_is_materialised():
    # (jax.grad cannot differentiate this loss; the plan alone is checked here, the route above)
    params = {"W": jnp.ones((8, 8)), "A": jnp.ones((8, 8))}
    assert ghost_leaves(_while_direct, params, jnp.ones((3, 8))) == ["['W']"]


def _checkpoint(p, x):
    h = jax.checkpoint(_layer)(x, p["A"])
    return jnp.sum(jnp.sin(_layer(h, p["W"])))


def _custom(p, x):
    h = jnp.tanh(_custom_product(x, p["A"]))
    return jnp.sum(jnp.sin(_layer(h, p["W"])))


def _embedding(p, x):
    ids = (jnp.abs(x[:, :2]) * 3).astype(jnp.int32) % 5  # (T, 2) token ids with repeats
    e = p["E"][ids[:, 0]] + jnp.take(p["E2"], ids[:, 1], axis=0)  # lookups, T = 3 < V = 5: ghost
    return jnp.sum(jnp.sin(_layer(x + e, p["W"])))


def _jit_twice(p, x):
    h = _jit_layer(_jit_layer(x, p["S"]), p["S"])  # the same weight through one jitted layer twice
    return jnp.sum(jnp.sin(_jit_layer(_jit_layer(h, p["P1"]), p["P2"])))  # two weights, once each


def _two_params(p, x):
    h = jnp.tanh(x @ (p["A"] @ p["B"]))  # a product of two parameters: both materialised
    return jnp.sum(jnp.sin((h @ p["C"]) @ p["D"]))  # products of an activation: both ghost


ROUTES = {
    # name: (loss, parameter shapes, the leaves that go the ghost way)
    "per-head": (_per_head, {"Wq": (2, 8, 8), "Wo": (2, 8, 8)}, ["['Wo']", "['Wq']"]),
    "scan": (_scan, {"Win": (8, 8), "Wrec": (8, 8), "Wout": (8, 8)}, ["['Win']", "['Wout']"]),
    "cond": (_cond, {"W": (8, 8), "A": (8, 8)}, ["['W']"]),
    "while": (_while, {"W": (8, 8), "A": (8, 8)}, ["['W']"]),
    "checkpoint": (_checkpoint, {"W": (8, 8), "A": (8, 8)}, ["['W']"]),
    "custom_vjp": (_custom, {"W": (8, 8), "A": (8, 8)}, ["['W']"]),
    "embedding": (_embedding, {"W": (8, 8), "E": (5, 8), "E2": (5, 8)}, ["['E']", "['E2']", "['W']"]),
    "jit twice": (_jit_twice, {"S": (8, 8), "P1": (8, 8), "P2": (8, 8)}, ["['P1']", "['P2']"]),
    "two params": (_two_params, {"A": (8, 8), "B": (8, 8), "C": (8, 8), "D": (8, 8)}, ["['C']", "['D']"]),
}


def _route_case(name, dtype, seed=7):
    loss, shapes, ghost = ROUTES[name]
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-2]), dtype) for k, s in shapes.items()}
    data = jnp.asarray(rng.normal(size=(5, 3, 8)) * rng.uniform(0.2, 5, size=(5, 1, 1)), dtype)
    return loss, params, data, ghost


@pytest.mark.parametrize("name", list(ROUTES))
def test_route_equals_the_per_example_loop(name):
    with jax.enable_x64(True):
        loss, params, data, ghost = _route_case(name, jnp.float64)
        assert ghost_leaves(loss, params, data[0]) == ghost
        grads = per_example_reference(loss, params, data)
        clip = float(np.median(clip_reference(grads, 1.0)[2]))
        want, dropped, norms = clip_reference(grads, clip)
        got = jax.jit(clipped_grad(loss, clip))(params, data)
        assert_close(got, want)
        assert int(got.nonfinite) == dropped == 0
        used = np.asarray(jax.jit(clipping_norms(loss, clip))(params, data))
        assert np.all(used >= norms * (1 - 1e-12)) and np.all(used <= norms * (1 + 1e-9))


@pytest.mark.parametrize("name", ["per-head", "jit twice", "two params"])
def test_route_in_bfloat16_equals_the_per_example_loop(name):
    """bfloat16 params: the same routes; the reference clips bfloat16 per-example gradients in float64."""
    loss, params, data, ghost = _route_case(name, jnp.bfloat16)
    assert ghost_leaves(loss, params, data[0]) == ghost
    grads = per_example_reference(loss, params, data)
    clip = float(np.median(clip_reference(grads, 1.0)[2]))
    want, _, _ = clip_reference(grads, clip)
    got = jax.jit(clipped_grad(loss, clip))(params, data)
    for a, b in zip(jax.tree.leaves(got.grads), jax.tree.leaves(want)):
        assert a.dtype == jnp.float32  # the clipped sum stays in float32 until the noise is added
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=3e-2, atol=3e-2 * np.abs(b).max())


def test_per_example_grads_in_microbatches_equal_the_loop():
    with jax.enable_x64(True):
        loss, params, data, _ = _route_case("two params", jnp.float64)
        want = per_example_reference(loss, params, data)
        for size in (None, 1, 2, 5, 7):
            got = jax.jit(per_example_grads(loss, microbatch_size=size))(params, data)
            for b, g in enumerate(want):
                for k in g:
                    np.testing.assert_allclose(np.asarray(got[k][b]), g[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4", True])
def test_bad_microbatch_size_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="microbatch_size must be a positive integer"):
        per_example_grads(lambda p, ex: jnp.sum(p * ex), microbatch_size=bad)
