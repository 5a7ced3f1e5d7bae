"""Safety of the clipping norms in float32 and bfloat16: adversarial near-cancelling examples.

The model is the issue's: the MSE loss 0.5 ||x W - t||^2 with W = 0, so the forward pass is exact in
any dtype (x W = 0, dl/dy = -t) and the per-example gradient is P = -x^T t exactly, whatever the
dtype of x and t. The reference takes jax.grad of each example's loss separately (a Python loop,
no vmap, no ghost norms) in float64 on the same (dtype-rounded) values: the exact gradient of the
computation the float32 / bfloat16 code runs. Against it: the norm clipped_grad clips each example by
must be >= the true norm, and one example's contribution (a batch in which only that example is
nonzero) must have norm <= clip * (1 + TOLERANCE).
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from mfnoise.training.clipping import TOLERANCE, clip_weights, clipped_grad, clipped_sum, clipping_norms, ghost_leaves


def mse(p, ex):
    x, t = ex
    return 0.5 * jnp.sum((x @ p["W"] - t) ** 2)


def exact_gradients(x, t):
    """(B, K, M) float64 per-example gradients, jax.grad one example at a time on the float64 values."""
    with jax.enable_x64(True):
        w = {"W": jnp.zeros((x.shape[-1], t.shape[-1]), jnp.float64)}
        rows = []
        for b in range(x.shape[0]):
            ex = (jnp.asarray(np.asarray(x[b], np.float64)), jnp.asarray(np.asarray(t[b], np.float64)))
            rows.append(np.asarray(jax.grad(mse)(w, ex)["W"]))
        return np.stack(rows)


@functools.cache
def jitted(clip: float):
    """clipped_grad and the norms it clips by, jitted once per clip (cached across examples)."""
    return jax.jit(lambda p, batch: (clipped_grad(mse, clip)(p, batch), clipping_norms(mse, clip)(p, batch)))


def run(x, t, clip, jit=True):
    p = {"W": jnp.zeros((x.shape[-1], t.shape[-1]), x.dtype)}
    batch = (jnp.asarray(x), jnp.asarray(t))
    if jit:
        out, norms = jitted(clip)(p, batch)
    else:
        out, norms = clipped_grad(mse, clip)(p, batch), clipping_norms(mse, clip)(p, batch)
    return np.asarray(out.grads["W"], np.float64), int(out.nonfinite), np.asarray(norms, np.float64)


def issue_example(a, d, dtype=jnp.float32):
    """One example of the issue: 2 equal input rows, output gradients a and -a + d (times ones(8))."""
    x = np.ones((1, 2, 8), np.float32)
    g = np.stack([np.full(8, a), np.full(8, -a + d)])[None]
    return jnp.asarray(x, dtype), jnp.asarray(-g, dtype)  # dl/dy = -t = g


def dtype_gradients(x, t):
    """(B, K, M) per-example gradients as jax.grad computes them in x's dtype, one at a time."""
    w = {"W": jnp.zeros((x.shape[-1], t.shape[-1]), x.dtype)}
    return np.stack([np.asarray(jax.grad(mse)(w, (x[b], t[b]))["W"], np.float64) for b in range(x.shape[0])])


def assert_safe(x, t, clip, jit=True):
    """For every example alone in the batch: finite, nothing dropped, norm used >= true norm,
    contribution <= clip (1 + TOLERANCE). Returns the contributions and the true norms.

    The true gradient of a ghost weight is the exact H^T G of its operands (float64); that of a
    materialised one is what jax.grad returns in the params' dtype (what is clipped and summed)."""
    ghost = ghost_leaves(mse, {"W": jnp.zeros((x.shape[-1], t.shape[-1]), x.dtype)}, (x[0], t[0])) == ["['W']"]
    exact = exact_gradients(x, t) if ghost else dtype_gradients(x, t)
    true = np.linalg.norm(exact.reshape(exact.shape[0], -1), axis=1)
    out, dropped, norms = run(x, t, clip, jit)
    assert dropped == 0 and np.all(np.isfinite(out))
    assert np.all(norms >= true * (1 - 1e-6)), (norms, true)
    contributions = []
    for b in range(x.shape[0]):
        keep = (np.arange(x.shape[0]) == b).reshape(-1, 1, 1)
        alone, dropped, _ = run(jnp.where(keep, x, 0), jnp.where(keep, t, 0), clip, jit)
        assert dropped == 0 and np.all(np.isfinite(alone))
        assert np.linalg.norm(alone) <= clip * (1 + TOLERANCE), (b, np.linalg.norm(alone), true[b])
        contributions.append(alone)
    return contributions, true


# -- the issue's reproductions -------------------------------------------------------------------


@pytest.mark.parametrize("a", [5e3, 1e4, 1.5e4])
def test_issue_cancelling_example_is_clipped(a):
    # old code: the Gram form gave a norm ~0, the example passed unclipped with norm 8 (a = 5e3, 1e4)
    x, t = issue_example(a, 1.0)
    out, dropped, norms = run(x, t, 1.0, jit=False)
    assert dropped == 0 and np.linalg.norm(out) <= 1 + TOLERANCE
    assert norms[0] >= np.linalg.norm(exact_gradients(x, t))


def test_issue_cancelling_example_under_jit():
    # old code under jit: contribution norm 65536 for a clip of 1
    x, t = issue_example(1e8, 8192.0)
    out, dropped, norms = run(x, t, 1.0)
    assert dropped == 0 and np.linalg.norm(out) <= 1 + TOLERANCE
    assert norms[0] >= np.linalg.norm(exact_gradients(x, t))


def test_issue_nan_batch_is_impossible():
    # old code: a negative Gram value, sqrt -> NaN, the whole batch NaN while nonfinite said 0
    xa, ta = issue_example(1.5e4, 0.25)
    rng = np.random.default_rng(0)
    xb = jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32)
    tb = jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32)
    x, t = jnp.concatenate([xa, xb]), jnp.concatenate([ta, tb])
    out, dropped, _ = run(x, t, 1.0)
    assert dropped == 0 and np.all(np.isfinite(out))
    # the benign examples are clipped exactly: the sum minus the cancelling example's bounded
    # contribution is the float64 reference of the other three, up to the rounding that the
    # cancelling example's large rows (s a ~ 1e3 c) add to the batch's float32 sum (~1e-4 c)
    exact = exact_gradients(xb, tb)
    norms = np.linalg.norm(exact.reshape(3, -1), axis=1)
    want = np.einsum("b,bkm->km", np.minimum(1, 1.0 / norms), exact)
    alone, _, _ = run(xa, ta, 1.0)
    np.testing.assert_allclose(out - alone, want, rtol=0, atol=1e-4)
    assert_safe(x, t, 1.0)


# -- adversarial search ------------------------------------------------------------------------------

# (T, K, M): T = 1; the Gram form; the Gram form with T > 32 (chunked accumulation of the product);
# T (K + M) >= K M (materialised)
SHAPES = [(1, 8, 8), (2, 8, 8), (3, 16, 8), (5, 12, 24), (40, 96, 96), (4, 2, 3)]


@settings(max_examples=100)
@given(
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    log_a=st.floats(0, 9),
    log_d=st.floats(-4, 4),
    spread=st.sampled_from([0.0, 1e-3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_near_cancelling_examples_never_exceed_the_clip(shape, dtype, log_a, log_d, spread, seed):
    """Rows h_t = h + spread * noise (near-equal inputs) and g_t = a z_t v + d w_t with sum_t z_t = 0
    (output gradients of size a that cancel to size d): the Gram form cancels by a / d."""
    t_len, k, m = shape
    rng = np.random.default_rng(seed)
    a, d = 10.0**log_a, 10.0**log_d
    x = np.zeros((3, t_len, k))
    g = np.zeros((3, t_len, m))
    for b in range(3):
        x[b] = rng.normal(size=k) + spread * rng.normal(size=(t_len, k))
        z = rng.normal(size=t_len)
        z[-1] = -z[:-1].sum()
        g[b] = a * np.outer(z, rng.normal(size=m)) + d * rng.normal(size=(t_len, m))
    g[1] *= rng.uniform(1e-3, 1e3)  # examples of different sizes: some clipped, some not
    x, t = jnp.asarray(x, dtype), jnp.asarray(-g, dtype)
    assert ghost_leaves(mse, {"W": jnp.zeros((k, m), dtype)}, (x[0], t[0])) == (["['W']"] if shape != (4, 2, 3) else [])
    assert_safe(x, t, 1.0)


# -- ordinary examples are clipped accurately -------------------------------------------------------


def test_ordinary_float32_examples_are_clipped_to_their_norm():
    """Random rows, Gram form with T = 40 > 32 (chunked product): the norms used are within 1e-3 above
    the true norms and the clipped sum matches the float64 reference."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, 40, 96)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(6, 40, 96)) * rng.uniform(0.1, 10, size=(6, 1, 1)), jnp.float32)
    example = (x[0], t[0])
    assert ghost_leaves(mse, {"W": jnp.zeros((96, 96), jnp.float32)}, example) == ["['W']"]
    exact = exact_gradients(x, t)
    true = np.linalg.norm(exact.reshape(6, -1), axis=1)
    clip = float(np.median(true))
    out, dropped, norms = run(x, t, clip)
    assert dropped == 0
    assert np.all(norms >= true) and np.all(norms <= true * (1 + 1e-3)), norms / true
    want = np.einsum("b,bkm->km", np.minimum(1, clip / true), exact)
    np.testing.assert_allclose(out, want, rtol=2e-3, atol=1e-4 * np.abs(want).max())


def test_moderately_cancelling_example_gets_its_norm_not_a_loose_bound():
    """Output gradients a and -a + d with a / d = 30: the Gram form's error bound is ~1% of the value,
    so the norms come from the formed product (fallback); the norm used is then within 1e-4 above."""
    x, t = issue_example(30.0, 1.0)
    exact = exact_gradients(x, t)
    true = np.linalg.norm(exact)
    _, _, norms = run(x, t, 0.1 * true)
    assert true <= norms[0] <= true * (1 + 1e-4)
    out, _, _ = run(x, t, 0.1 * true)
    np.testing.assert_allclose(out, 0.1 * exact[0], rtol=2e-4, atol=1e-6)


# -- rounding of the weighted sums, invalid norms, refusals -------------------------------------------


def test_bfloat16_weight_never_rounds_up():
    """c / N = 1/3 rounds up in bfloat16 (0.33398): the old weighted sum in bfloat16 gave 1.002 c."""
    g = jnp.asarray(np.full((1, 9), 1.0), jnp.bfloat16)  # norm 3
    out, dropped = clipped_sum({"w": g}, 1.0)
    assert int(dropped) == 0 and out["w"].dtype == jnp.float32  # kept in float32 until the noise is added
    assert np.linalg.norm(np.asarray(out["w"], np.float64)) <= 1.0
    x, t = jnp.ones((1, 1, 3), jnp.bfloat16), -jnp.ones((1, 1, 3), jnp.bfloat16)  # T = 1 ghost, norm 3
    got, _, _ = run(x, t, 1.0)
    assert np.linalg.norm(got) <= 1.0


def test_invalid_squared_norms_get_weight_zero():
    scale, valid = clip_weights(jnp.asarray([-1.0, jnp.nan, jnp.inf, 4.0, 0.0]), 1.0)
    np.testing.assert_array_equal(np.asarray(valid), [False, False, False, True, True])
    np.testing.assert_array_equal(np.asarray(scale), [0.0, 0.0, 0.0, 0.5, 1.0])


def test_dropped_examples_are_counted_and_the_sum_stays_finite():
    """A NaN input, an input whose squares overflow float32 (1e30), and three ordinary examples."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 3, 8)).astype(np.float32)
    t = rng.normal(size=(5, 3, 8)).astype(np.float32)
    x[1, 0, 0] = np.nan
    x[3] *= 1e30
    out, dropped, _ = run(jnp.asarray(x), jnp.asarray(t), 1.0)
    assert dropped == 2 and np.all(np.isfinite(out))
    keep = [0, 2, 4]
    exact = exact_gradients(x[keep], t[keep])
    norms = np.linalg.norm(exact.reshape(3, -1), axis=1)
    np.testing.assert_allclose(out, np.einsum("b,bkm->km", np.minimum(1, 1 / norms), exact), rtol=1e-4, atol=1e-5)


def test_long_axis_sum_of_squares_is_an_upper_bound():
    """A leaf of 2^20 entries: one of size 1 and the rest 2^-13, whose squares are below half an ulp
    of 1: a sequential float32 sum stagnates at 1, 0.78% below the true norm (XLA:CPU's reduction
    happens not to; the bound must not depend on that). The norm used must be >= the true norm."""
    g = np.full((1, 1 << 20), 2.0**-13, np.float32)
    g[0, 0] = 1.0
    true = np.sqrt(1 + ((1 << 20) - 1) * 2.0**-26)
    clip = 0.5
    out, _ = jax.jit(lambda x: clipped_sum({"w": x}, clip))(jnp.asarray(g))
    norm = np.linalg.norm(np.asarray(out["w"], np.float64))
    assert norm <= clip * (1 + 1e-6)
    np.testing.assert_allclose(norm, clip, rtol=1e-3)  # and not grossly over-clipped
    np.testing.assert_allclose(np.asarray(out["w"], np.float64) * true / norm, g[0], rtol=1e-6)


BAD = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), "1.0", None, True, 1 + 0j, np.asarray([1.0, 2.0])]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_clip_norm_is_refused_by_every_entry_point(bad):
    g = {"w": jnp.ones((2, 3))}
    for call in (lambda: clipped_sum(g, bad), lambda: clipped_grad(mse, bad), lambda: clipping_norms(mse, bad)):
        with pytest.raises((ValueError, TypeError), match="l2_clip_norm"):
            call()


def test_traced_clip_norm_is_refused():
    with pytest.raises(TypeError, match="l2_clip_norm must be a concrete number"):
        jax.jit(lambda c: clipped_sum({"w": jnp.ones((2, 3))}, c))(1.0)


def test_numpy_and_zero_d_clip_norms_are_accepted():
    g = {"w": jnp.asarray(np.full((1, 4), 1.0), jnp.float32)}  # norm 2
    for clip in (np.float32(1.0), np.asarray(1.0), jnp.asarray(1.0), 1):
        out, _ = clipped_sum(g, clip)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out["w"])), 1.0, rtol=1e-6)


@pytest.mark.parametrize("path", ["clipped_sum", "clipped_grad"])
def test_bfloat16_sum_is_not_rounded_before_the_noise(path):
    """The adversary's neighbours: 512 aligned unit gradients against 511 of them. Rounded to bfloat16
    (8 bits) before the noise, 511 becomes 510 (toward zero): the release would move by 2c for one
    example removed. The ClippedSum stays in float32, so it moves by c."""
    w = {"w": jnp.zeros((3,), jnp.bfloat16)}
    loss = lambda p, x: jnp.sum(p["w"].astype(jnp.float32) * x)

    def summed(batch):
        x = jnp.tile(jnp.asarray([1.0, 0.0, 0.0], jnp.float32), (batch, 1))
        if path == "clipped_sum":
            out, _ = clipped_sum({"w": x.astype(jnp.bfloat16)}, 1.0)
            return np.asarray(out["w"], np.float64)
        return np.asarray(jax.jit(clipped_grad(loss, 1.0))(w, x).grads["w"], np.float64)

    diff = np.linalg.norm(summed(512) - summed(511))
    assert diff <= 1.0 * (1 + 1e-3), diff
