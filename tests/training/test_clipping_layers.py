"""Ghost norms for the layers of a language model (issue 14): embedding lookups, tied embeddings,
products with batch dims (per-head weights), norm scales and biases, a whole transformer block in
plain jax and in Flax NNX, bfloat16 parameters, and the memory the lookup path does not use.

The reference is independent of the code under test: jax.grad of each example's loss separately (a
Python loop, no vmap, no ghost norms) in float64, flattened and clipped with numpy. Norms must be
>= the reference norm of the example's exact gradient and (where the norm is exact, i.e. not the
exact) within 1e-3 relative above it; the clipped sum must equal the
reference clipped sum. For tied weights the reference gradient P1 + P2 is taken from an untied copy
of the loss (the two uses' gradients at the same value).
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from mfnoise.training.clipping import TOLERANCE, clipped_grad, clipping_norms, ghost_leaves


def loop_grads(loss, params, batch):
    """[g_b] per example: jax.grad one example at a time, numpy float64 pytrees (``batch`` a tuple of
    per-example arguments)."""
    size = jax.tree.leaves(batch)[0].shape[0]
    grad = jax.jit(jax.grad(loss))
    return [
        jax.tree.map(lambda x: np.asarray(x, np.float64), grad(params, *jax.tree.map(lambda x, b=b: x[b], batch)))
        for b in range(size)
    ]


def flat(g) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])


def clip_sum(grads, norms, clip):
    """sum_b min(1, clip / norms_b) g_b in numpy float64."""
    total = jax.tree.map(np.zeros_like, grads[0])
    for g, n in zip(grads, norms):
        s = min(1.0, clip / n) if n > 0 else 1.0
        total = jax.tree.map(lambda t, x, s=s: t + s * x, total, g)
    return total


def check(loss, params, batch, ghost, rtol=1e-3, sum_rtol=None, norms=None, grads=None, clip=None):
    """Norms >= reference, within rtol above it; the clipped sum equals the reference's; ``ghost``
    leaves go the ghost way. ``norms`` overrides the reference norms (tied weights: the triangle bound)."""
    one = jax.tree.map(lambda x: x[0], batch)
    assert ghost_leaves(loss, params, *one) == sorted(ghost)
    grads = loop_grads(loss, params, batch) if grads is None else grads
    true = np.array([np.linalg.norm(flat(g)) for g in grads])
    want_norms = true if norms is None else norms
    clip = float(np.median(want_norms)) if clip is None else clip
    used = np.asarray(jax.jit(clipping_norms(loss, clip))(params, *batch), np.float64)
    assert np.all(used >= true * (1 - 1e-12)), (used, true)
    assert np.all(used <= want_norms * (1 + rtol)), (used / want_norms - 1)
    assert np.all(used >= want_norms * (1 - rtol)), (used / want_norms - 1)
    got = jax.jit(clipped_grad(loss, clip))(params, *batch)
    want = clip_sum(grads, want_norms, clip)
    scale = max(np.abs(flat(want)).max(), 1e-30)
    tol = rtol if sum_rtol is None else sum_rtol
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got.grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol * scale, err_msg=str(path))
    assert int(got.nonfinite) == 0
    return used, true


def rng_params(rng, shapes, dtype=jnp.float32):
    return {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-1]), dtype) for k, s in shapes.items()}


# -- 1. embedding lookups ----------------------------------------------------------------------------


def lookup_loss(p, ids, x):
    e = p["E"][ids] + jnp.take(p["E2"], ids[::-1], axis=0)  # (T, M): indexing and jnp.take
    return jnp.sum(jnp.sin(e @ p["W"] + x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_lookup_equals_the_loop(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        rng = np.random.default_rng(0)
        params = rng_params(rng, {"E": (13, 6), "E2": (13, 6), "W": (6, 5)}, dtype)
        ids = jnp.asarray(rng.integers(0, 4, size=(6, 7)), jnp.int32)  # many repeats in T = 7 of V = 13
        ids = ids.at[0].set(3).at[1, 0].set(-1)  # one example all one id; a negative (wrapped) index
        x = jnp.asarray(rng.normal(size=(6, 7, 5)), dtype)
        rtol = 1e-3 if dtype == jnp.float32 else 1e-9
        check(lookup_loss, params, (ids, x), ["['E']", "['E2']"], rtol=rtol)  # W: T (K + M) > K M


def one_hot_loss(p, ids, x):
    return jnp.sum(jnp.sin(jax.nn.one_hot(ids, p["E"].shape[0], dtype=p["E"].dtype) @ p["E"] + x))


def test_one_hot_product_is_the_ghost_product():
    # one_hot(ids) @ E reaches E as a dot_general with a one-hot operand: T (V + M) < V M, ghost
    rng = np.random.default_rng(1)
    params = rng_params(rng, {"E": (40, 30)})
    ids = jnp.asarray(rng.integers(0, 5, size=(5, 6)), jnp.int32)
    x = jnp.asarray(rng.normal(size=(5, 6, 30)), jnp.float32)
    check(one_hot_loss, params, (ids, x), ["['E']"])


def clip_mode_loss(p, ids, x):
    e = p["E"].at[ids].get(mode="clip") + p["E2"].at[ids].get(mode="fill", fill_value=0.0)
    return jnp.sum(jnp.cos(e) * x)


def test_out_of_bounds_ids_clamped_or_dropped():
    # mode="clip": the row read is the clamped one; mode="fill": an out-of-bounds slice has no gradient
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        params = rng_params(rng, {"E": (9, 4), "E2": (9, 4)}, jnp.float64)
        ids = jnp.asarray([[0, 9, 12, 8, 3], [1, 1, 20, 20, 2], [5, 6, 7, 8, 8]], jnp.int32)
        x = jnp.asarray(rng.normal(size=(3, 5, 4)))
        check(clip_mode_loss, params, (ids, x), ["['E']", "['E2']"], rtol=1e-9)


def target_loss(p, ids, t):
    """sum_t <E[x_t], t_t>: dl/dy_t = t_t exactly in any dtype, so P = sum_t e_{x_t} t_t^T is known exactly."""
    return jnp.sum(p["E"][ids] * t)


def exact_lookup_norm(ids, t):
    """||sum_t e_{x_t} t_t^T||_F per example, in float64 from the (dtype-rounded) targets."""
    out = []
    for i, tb in zip(np.asarray(ids), np.asarray(t, np.float64)):
        rows: dict[int, np.ndarray] = {}
        for v, g in zip(i, tb):
            rows[int(v)] = rows.get(int(v), 0) + g
        out.append(np.sqrt(sum(float(np.sum(r * r)) for r in rows.values())))
    return np.array(out)


@functools.cache
def _target_fns(clip: float):
    norms, sums = clipping_norms(target_loss, clip), clipped_grad(target_loss, clip)
    return jax.jit(lambda p, i, t: (norms(p, i, t), sums(p, i, t)))


@settings(max_examples=25, deadline=None)
@given(
    log_a=st.floats(-3, 6),
    log_d=st.floats(-6, 0),
    repeats=st.integers(2, 9),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_cancelling_lookup_rows_never_exceed_the_clip(log_a, log_d, repeats, dtype, seed):
    """Equal ids whose output gradients cancel (a, -a + d, ...): the norm used is >= the exact norm
    and one example's contribution stays within clip (1 + TOLERANCE), in float32 and bfloat16. The
    rows are scaled so that the example is clipped (true norm about 2, clip 1)."""
    rng = np.random.default_rng(seed)
    m, t = 8, 12
    u = rng.normal(size=m)
    a, d = 10.0**log_a, 10.0**log_d
    rows = [a * u * (1 if k % 2 == 0 else -1) for k in range(repeats)]
    rows[-1] = rows[-1] + d * rng.normal(size=m)
    rows += [rng.normal(size=m) * 10.0 ** rng.uniform(-3, 3) for _ in range(t - repeats)]
    ids = jnp.asarray(np.array([4] * repeats + list(rng.integers(0, 30, t - repeats)), np.int32)[None])
    rows = np.stack(rows)[None]
    rows = rows * 2 / exact_lookup_norm(ids, rows)[0]
    tt = jnp.asarray(rows, dtype)
    truth = exact_lookup_norm(ids, tt)
    p = {"E": jnp.zeros((30, m), dtype)}
    used, got = _target_fns(1.0)(p, ids, tt)
    assert float(used[0]) >= truth[0] * (1 - 1e-9), (used, truth)
    norm = np.linalg.norm(np.asarray(got.grads["E"], np.float64))
    assert norm <= 1.0 * (1 + TOLERANCE)


# -- 2. tied input / output embeddings ---------------------------------------------------------------


def tied_loss(p, ids, target, out_key="E", transposed=False):
    h = jnp.tanh(p["E"][ids] @ p["W"])  # (T, M)
    head = p[out_key]
    logits = h @ head.T if transposed else jnp.einsum("tm,vm->tv", h, head)  # (T, V)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1))


def tied_reference(loss, params, batch, tied="E", copy="E_out"):
    """(per-example gradients of the tied loss, triangle-bound norms) from an untied copy: the gradient
    of the tied weight is P1 + P2 with P1, P2 the gradients of the two copies at the same value."""
    untied = dict(params, **{copy: params[tied]})
    grads = loop_grads(lambda p, *ex: loss(p, *ex, out_key=copy), untied, batch)
    tied_grads, bounds = [], []
    for g in grads:
        g = dict(g)
        p1, p2 = g.pop(tied), g.pop(copy)
        rest = sum(float(np.sum(x * x)) for x in g.values())
        bounds.append(np.sqrt(rest + (np.linalg.norm(p1) + np.linalg.norm(p2)) ** 2))
        g[tied] = p1 + p2
        tied_grads.append(g)
    return tied_grads, np.array(bounds)


@pytest.mark.parametrize("transposed", [False, True])
def test_tied_embeddings_equal_the_loop(transposed):
    """The tied table's norm ||P1 + P2|| with the cross term (not the triangle bound), h E^T read
    through a transpose or as an einsum."""
    rng = np.random.default_rng(3)
    params = rng_params(rng, {"E": (50, 16), "W": (16, 16)})
    ids = jnp.asarray(rng.integers(0, 50, size=(6, 5)), jnp.int32).at[0, :3].set(2)
    target = jnp.asarray(rng.integers(0, 50, size=(6, 5)), jnp.int32).at[1].set(ids[1])  # output = input ids
    loss = lambda p, i, t, out_key="E": tied_loss(p, i, t, out_key, transposed)
    grads, bounds = tied_reference(loss, params, (ids, target))
    used, true = check(loss, params, (ids, target), ["['E']", "['W']"], grads=grads)
    print("triangle bound / true norm:", bounds / true)  # what the triangle bound would over-clip by
    assert np.all(bounds >= true * (1 - 1e-12))


def cross_loss(p, ids, t1, h, t2):
    """sum_t <E[x_t], t1_t> + <h E^T, t2>: P = sum_t e_{x_t} t1_t^T + t2^T h exactly, in any dtype."""
    return jnp.sum(p["E"][ids] * t1) + jnp.sum(jnp.einsum("sm,vm->sv", h, p["E"]) * t2)


@functools.cache
def _cross_fns(clip: float):
    norms, sums = clipping_norms(cross_loss, clip), clipped_grad(cross_loss, clip)
    return jax.jit(lambda *a: (norms(*a), sums(*a)))


@settings(max_examples=20, deadline=None)
@given(log_a=st.floats(-2, 5), log_d=st.floats(-6, 0), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 2**16))
def test_tied_cross_term_cancelling_never_exceeds_the_clip(log_a, log_d, dtype, seed):
    """The lookup rows cancel the output head's rows (t1 at id v = -P2[v] + d noise): the norm used is
    >= the exact ||P1 + P2|| (float64 from the dtype-rounded values) and the contribution <= clip."""
    rng = np.random.default_rng(seed)
    v, m, t, s = 20, 8, 6, 5
    ids = rng.integers(0, 4, size=t).astype(np.int32)  # rows 0..3 only
    h = rng.normal(size=(s, m)) * 10.0**log_a
    t2 = np.zeros((s, v))
    t2[:, :4] = rng.normal(size=(s, 4))  # P2 = t2^T h lives on rows 0..3 too
    h = np.asarray(jnp.asarray(h, dtype), np.float64)
    t2 = np.asarray(jnp.asarray(t2, dtype), np.float64)
    p2 = t2.T @ h
    t1 = np.zeros((t, m))
    first = {int(x): k for k, x in reversed(list(enumerate(ids)))}
    for x, k in first.items():
        t1[k] = -p2[x]
    t1 = t1 + 10.0**log_d * rng.normal(size=(t, m)) * np.abs(p2).max()
    t1 = np.asarray(jnp.asarray(t1, dtype), np.float64)
    def exact(t1, t2, h):
        p = t2.T @ h
        for x, g in zip(ids, t1):
            p[x] += g
        return np.linalg.norm(p)
    scale = 2 / exact(t1, t2, h)  # true norm about 2, clip 1 (scaling t1 and t2: P scales linearly)
    t1, t2 = (np.asarray(jnp.asarray(x * scale, dtype), np.float64) for x in (t1, t2))
    truth = exact(t1, t2, h)
    args = [jnp.asarray(ids[None])] + [jnp.asarray(x[None], dtype) for x in (t1, h, t2)]
    used, got = _cross_fns(1.0)({"E": jnp.zeros((v, m), dtype)}, *args)
    assert float(used[0]) >= truth * (1 - 1e-9), (used, truth)
    assert np.linalg.norm(np.asarray(got.grads["E"], np.float64)) <= 1.0 * (1 + TOLERANCE)


# -- 3. products with batch dims of their own (per-head weights) ------------------------------------


def heads_loss(p, x):
    q = jnp.einsum("td,dhk->thk", x, p["Wq"])  # no batch dims (contracting d): ghost already
    q = jnp.tanh(jnp.swapaxes(q, 0, 1))  # (H, T, K)
    o = jnp.einsum("htk,hkm->htm", q, p["Wo"])  # batch dim h: one T x K by K x M product per head
    return jnp.sum(jnp.sin(o))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_per_head_products_equal_the_loop(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        rng = np.random.default_rng(4)
        params = rng_params(rng, {"Wq": (8, 2, 12), "Wo": (2, 12, 10)}, dtype)
        x = jnp.asarray(rng.normal(size=(5, 3, 8)) * rng.uniform(0.2, 5, size=(5, 1, 1)), dtype)
        check(heads_loss, params, (x,), ["['Wo']", "['Wq']"], rtol=1e-3 if dtype == jnp.float32 else 1e-9)


def heads_left_loss(p, x):
    # the weight as the left operand, batch dim first on both sides: 'hkm,htk->hmt'
    q = jnp.tanh(jnp.broadcast_to(x, (2,) + x.shape))  # (H, T, K)
    o = jax.lax.dot_general(p["Wo"], q, (((1,), (2,)), ((0,), (0,))))  # (H, M, T)
    return jnp.sum(jnp.cos(o))


def test_per_head_weight_as_left_operand():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        params = rng_params(rng, {"Wo": (2, 12, 10)}, jnp.float64)
        x = jnp.asarray(rng.normal(size=(4, 3, 12)))
        check(heads_left_loss, params, (x,), ["['Wo']"], rtol=1e-9)


# -- 4. norm scales and biases (materialised: B x M) ---------------------------------------------------


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def layer_norm(x, scale, bias):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * scale + bias


def norms_loss(p, x):
    h = rms_norm(x @ p["W"], p["g"])
    return jnp.sum(jnp.sin(layer_norm(h, p["s"], p["b"])))


def test_norm_scales_and_biases_are_exact():
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        params = rng_params(rng, {"W": (8, 12), "g": (12,), "s": (12,), "b": (12,)}, jnp.float64)
        x = jnp.asarray(rng.normal(size=(5, 4, 8)))
        check(norms_loss, params, (x,), ["['W']"], rtol=1e-9)


# -- a whole transformer block (plain jax) ------------------------------------------------------------


def block_loss(p, ids, target, out_key="E"):
    """Embedding lookup, RMSNorm, causal attention (q, k, v by 'td,dhk->thk'; per-head output weights
    with batch dim h, 'htk,hkd->htd'), LayerNorm, MLP with biases, tied output head; next-token loss."""
    x = p["E"][ids]  # (T, M)
    h = rms_norm(x, p["g1"])
    q, k, v = (jnp.einsum("td,dhk->thk", h, p[w]) for w in ("Wq", "Wk", "Wv"))
    s = jnp.einsum("thk,shk->hts", q, k) / np.sqrt(q.shape[-1])
    t = ids.shape[0]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("hts,shk->htk", jax.nn.softmax(s, axis=-1), v)
    x = x + jnp.sum(jnp.einsum("htk,hkd->htd", o, p["Wo"]), axis=0)
    h = layer_norm(x, p["s2"], p["b2"])
    x = x + jax.nn.gelu(h @ p["W1"] + p["b1"]) @ p["W2"]
    logits = jnp.einsum("tm,vm->tv", rms_norm(x, p["g3"]), p[out_key])
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1))


BLOCK = {"E": (64, 16), "g1": (16,), "Wq": (16, 2, 16), "Wk": (16, 2, 16), "Wv": (16, 2, 16),
         "Wo": (2, 16, 16), "s2": (16,), "b2": (16,), "W1": (16, 32), "b1": (32,), "W2": (32, 16), "g3": (16,)}
BLOCK_GHOST = ["['E']", "['W1']", "['W2']", "['Wk']", "['Wo']", "['Wq']", "['Wv']"]


def block_case(dtype, seed=8, batch=5, t=6):
    rng = np.random.default_rng(seed)
    params = rng_params(rng, BLOCK, dtype)
    params.update({k: jnp.asarray(1 + 0.1 * rng.normal(size=BLOCK[k]), dtype) for k in ("g1", "s2", "g3")})
    ids = jnp.asarray(rng.integers(0, 64, size=(batch, t)), jnp.int32).at[0, :3].set(7)  # repeated ids
    target = jnp.asarray(rng.integers(0, 64, size=(batch, t)), jnp.int32)
    return params, (ids, target)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_transformer_block_equals_the_loop(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        params, batch = block_case(dtype)
        grads, _ = tied_reference(block_loss, params, batch)
        rtol = 1e-3 if dtype == jnp.float32 else 1e-9
        check(block_loss, params, batch, BLOCK_GHOST, rtol=rtol, grads=grads)


def test_transformer_block_in_bfloat16_is_safe():
    """bfloat16 params: every norm at least the exact norm of the gradient the bfloat16 model's
    backward pass gives (the loop's, in bfloat16, taken in float64), and close to it."""
    params, batch = block_case(jnp.bfloat16)
    grads, _ = tied_reference(block_loss, params, batch)
    true = np.array([np.linalg.norm(flat(g)) for g in grads])
    used = np.asarray(jax.jit(clipping_norms(block_loss, 1.0))(params, *batch), np.float64)
    # the tied gradient P1 + P2 is summed in float32 here, in bfloat16 by the loop: 1e-2 slack there
    assert np.all(used >= true * (1 - 1e-2)) and np.all(used <= true * 1.05), used / true
    got = jax.jit(clipped_grad(block_loss, 1.0))(params, *batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got.grads))  # float32 until the noise


# -- the same kind of block in Flax NNX, through nnx.split / nnx.merge to a pure loss -----------------


def nnx_case():
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(64, 16, rngs=rngs)
            self.norm1 = nnx.RMSNorm(16, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=32, decode=False, rngs=rngs)
            self.norm2 = nnx.LayerNorm(16, rngs=rngs)
            self.up = nnx.Linear(16, 32, rngs=rngs)
            self.down = nnx.Linear(32, 16, rngs=rngs)

        def __call__(self, ids):
            x = self.embed(ids)
            mask = nnx.make_causal_mask(ids)
            x = x + self.attn(self.norm1(x), mask=mask, deterministic=True)
            x = x + self.down(jax.nn.gelu(self.up(self.norm2(x))))
            return self.embed.attend(x)  # tied head: embedding.T

    graphdef, state = nnx.split(Block(nnx.Rngs(0)))

    def loss(state, ids, target):
        logits = nnx.merge(graphdef, state)(ids)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1))

    _, batch = block_case(jnp.float32)
    return loss, state, batch


def test_flax_nnx_block_norms_are_safe_and_the_sum_is_exact():
    loss, state, batch = nnx_case()
    ghost = ghost_leaves(loss, state, *jax.tree.map(lambda x: x[0], batch))
    for name in ("embedding", "query", "key", "value", "out", "up", "down"):
        assert any(name in g and "kernel" in g or name in g and "embedding" in g for g in ghost), (name, ghost)
    grads = loop_grads(loss, state, batch)
    true = np.array([np.linalg.norm(flat(g)) for g in grads])
    clip = float(np.median(true))
    used = np.asarray(jax.jit(clipping_norms(loss, clip))(state, *batch), np.float64)
    assert np.all(used >= true * (1 - 1e-6)) and np.all(used <= true * (1 + 1e-3)), used / true
    got = jax.jit(clipped_grad(loss, clip))(state, *batch)
    want = clip_sum(grads, used, clip)  # the sum given the norms used: exact
    for a, b in zip(jax.tree.leaves(got.grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-4, atol=1e-4 * np.abs(flat(want)).max())


# -- the lookup path keeps no B x V x M array ----------------------------------------------------------


def _largest_array(closed) -> int:
    """The largest array size of any variable in a ClosedJaxpr, its sub-jaxprs included."""
    best = 0

    def visit(jaxpr):
        nonlocal best
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else [param]:
                    if isinstance(sub, jex.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jex.core.Jaxpr):
                        visit(sub)

    visit(closed.jaxpr)
    return best


def embedding_loss(p, ids, target):
    return jnp.sum(jnp.sin(layer_norm(p["E"][ids], p["s"], p["b"])) * target)  # scale, bias: B x M each


def test_lookup_path_materialises_no_per_example_table():
    from mfnoise.training.per_example import per_example_grads

    v, m, t, b = 2048, 64, 16, 8
    params = {"E": jnp.zeros((v, m), jnp.float32), "s": jnp.ones((m,)), "b": jnp.zeros((m,))}
    ids = jnp.zeros((b, t), jnp.int32)
    target = jnp.zeros((b, t, m), jnp.float32)
    ghost = jax.make_jaxpr(clipped_grad(embedding_loss, 1.0))(params, ids, target)
    dense = jax.make_jaxpr(per_example_grads(embedding_loss))(params, ids, target)
    assert _largest_array(dense) >= b * v * m  # the check sees a B x V x M array where there is one
    assert _largest_array(ghost) <= max(v * m, b * t * m)  # one V x M table (the sum), B x T x M rows
    compiled = jax.jit(clipped_grad(embedding_loss, 1.0)).lower(params, ids, target).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < b * v * m * 4 / 2
