"""Optax transforms (mfnoise.transforms) against independent numpy computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfnoise
from mfnoise import noise
from mfnoise.per_example import per_example_grads
from mfnoise.transforms import DPAggregateState

N = 10
P_SHAPES = {"w": (3, 4), "b": (4,)}


def per_example(rng, batch=6, scale=1.0):
    return {k: jnp.asarray(rng.normal(size=(batch, *v)) * scale, jnp.float32) for k, v in P_SHAPES.items()}


def numpy_clipped_mean(g: dict, clip: float) -> dict:
    """Independent reference: per-example global norms, clip, drop non-finite, mean over the batch."""
    keys = sorted(g)
    batch = g[keys[0]].shape[0]
    flat = np.concatenate([np.asarray(g[k], np.float64).reshape(batch, -1) for k in keys], axis=1)
    out = np.zeros(flat.shape[1])
    for row in flat:
        if not np.all(np.isfinite(row)):
            continue
        norm = np.linalg.norm(row)
        out += row * min(1.0, clip / norm) if norm > 0 else row
    out /= batch
    res, i = {}, 0
    for k in keys:
        size = int(np.prod(P_SHAPES[k]))
        res[k] = out[i : i + size].reshape(P_SHAPES[k])
        i += size
    return res


def params():
    return {k: jnp.zeros(v, jnp.float32) for k, v in P_SHAPES.items()}


@pytest.mark.parametrize("clip", [0.3, 1.0, 100.0])
def test_noise_free_dp_aggregate_is_the_clipped_mean(clip):
    rng = np.random.default_rng(0)
    g = per_example(rng, scale=1.0)
    g["w"] = g["w"].at[2].set(0.0)  # a zero gradient: must not divide by zero
    g["b"] = g["b"].at[2].set(0.0)
    tx = mfnoise.dp_aggregate(mfnoise.bsr(N, 3), clip, 0.0, 0, participation=mfnoise.Participation.epochs(N, 2))
    u, state = jax.jit(tx.update)(g, tx.init(params()))
    want = numpy_clipped_mean(jax.device_get(g), clip)
    for k in P_SHAPES:
        np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=1e-5, atol=1e-6)
    assert int(state.nonfinite) == 0


def test_non_finite_examples_are_dropped_and_counted():
    rng = np.random.default_rng(1)
    g = per_example(rng)
    g["w"] = g["w"].at[1, 0, 0].set(jnp.nan)
    g["b"] = g["b"].at[4, 2].set(jnp.inf)
    tx = mfnoise.dp_aggregate(mfnoise.Identity(N), 1.0, 0.0, 0, participation=mfnoise.Participation.single(N))
    step = jax.jit(tx.update)
    u, state = step(g, tx.init(params()))
    want = numpy_clipped_mean(jax.device_get(g), 1.0)
    for k in P_SHAPES:
        assert np.all(np.isfinite(np.asarray(u[k])))
        np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=1e-5, atol=1e-6)
    assert int(state.nonfinite) == 2
    _, state = step(g, state)
    assert int(state.nonfinite) == 4  # cumulative


@pytest.mark.parametrize(
    "strategy,part",
    [
        (mfnoise.bsr(N, 3), mfnoise.Participation.epochs(N, 2)),
        (mfnoise.BLT(np.array([0.9, 0.4]), np.array([0.3, 0.1]), N), mfnoise.Participation(N, 3, 3)),
        (mfnoise.Identity(N), mfnoise.Participation.epochs(N, 5)),
    ],
)
def test_dp_aggregate_noise_is_sensitivity_scaled_generator_noise(strategy, part):
    """With zero gradients, B * update = sigma * clip * sens(C, p) * (C^{-1} W)_t for every t."""
    sigma, clip, batch = 1.3, 0.7, 5
    key = jax.random.key(9)
    sens = strategy.sensitivity(part).value
    tx = mfnoise.dp_aggregate(strategy, clip, sigma, key, participation=part)
    gen = strategy.noise_generator(key)
    zeros = {k: jnp.zeros((batch, *v)) for k, v in P_SHAPES.items()}
    state, gstate = tx.init(params()), gen.init(params())
    step, gnext = jax.jit(tx.update), jax.jit(gen.next)
    for _ in range(N):
        u, state = step(zeros, state)
        z, gstate = gnext(gstate, params())
        for k in P_SHAPES:
            np.testing.assert_allclose(np.asarray(u[k]) * batch, sigma * clip * sens * np.asarray(z[k]), rtol=2e-6, atol=1e-6)


def test_correlated_noise_adds_stddev_times_generator_noise():
    s = mfnoise.bisr(N, 4)
    key = jax.random.key(3)
    tx = mfnoise.correlated_noise(s, 2.5, key)
    gen = s.noise_generator(key)
    g = per_example(np.random.default_rng(2), batch=1)
    g = {k: v[0] for k, v in g.items()}
    state, gs = tx.init(params()), gen.init(params())
    for _ in range(3):
        u, state = tx.update(g, state)
        z, gs = gen.next(gs, params())
        for k in P_SHAPES:
            np.testing.assert_allclose(np.asarray(u[k]), np.asarray(g[k]) + 2.5 * np.asarray(z[k]), rtol=1e-6, atol=1e-6)


def test_participation_is_required_and_checked():
    with pytest.raises(TypeError, match="participation"):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, 1.0, 0)
    with pytest.raises(TypeError, match="participation"):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, 1.0, 0, participation=None)
    with pytest.raises(ValueError, match="n="):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, 1.0, 0, participation=mfnoise.Participation.single(N + 1))
    with pytest.raises(ValueError):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, -1.0, 0, participation=mfnoise.Participation.single(N))


def test_in_optax_chain_under_jit_and_exhaustion():
    """mf_sgd (chain of dp_aggregate and momentum SGD) trains N steps; step N+1 is flagged."""
    rng = np.random.default_rng(4)
    data = {"x": jnp.asarray(rng.normal(size=(N, 8, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=(N, 8, 4)), jnp.float32)}

    def loss(p, ex):
        return jnp.sum((ex["x"] @ p["w"] + p["b"] - ex["y"]) ** 2)

    grads = per_example_grads(loss, microbatch_size=3)
    tx = mfnoise.mf_sgd(mfnoise.bsr(N, 2), 0.01, 1.0, 0.5, 0, participation=mfnoise.Participation.epochs(N, 2), momentum=0.9)

    @jax.jit
    def step(p, st, batch):
        u, st = tx.update(grads(p, batch), st, p)
        return optax.apply_updates(p, u), st

    p = params()
    st = tx.init(p)
    assert isinstance(st[0], DPAggregateState)
    for t in range(N):
        p, st = step(p, st, jax.tree.map(lambda a: a[t], data))
    noise.check(st)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(p))
    p2, st2 = step(p, st, jax.tree.map(lambda a: a[0], data))
    with pytest.raises(noise.ExhaustedError):
        noise.check(st2)
    assert all(np.all(np.isnan(np.asarray(v))) for v in jax.tree.leaves(p2))


def test_per_example_grads_microbatched_equals_loop():
    rng = np.random.default_rng(5)
    batch = {"x": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)}
    p = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.ones((4,), jnp.float32)}

    def loss(p, ex):
        return jnp.sum(jnp.tanh(ex["x"] @ p["w"] + p["b"]) * ex["y"])

    want = [jax.grad(loss)(p, jax.tree.map(lambda a: a[i], batch)) for i in range(7)]
    for mb in (None, 1, 3, 7):
        got = jax.jit(per_example_grads(loss, mb))(p, batch)
        for i in range(7):
            for k in p:
                np.testing.assert_allclose(np.asarray(got[k][i]), np.asarray(want[i][k]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        per_example_grads(loss, 0)(p, batch)
