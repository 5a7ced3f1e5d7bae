"""What a plan builds for training: the transform is dp_aggregate + the optimizer with the plan's
numbers, the loss weights padded slots by 0, and a short run trains (docs/design.md, "Plan")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfnoise


@pytest.fixture(scope="module")
def plan() -> mfnoise.planning.Plan:
    return mfnoise.plan(8.0, 1e-5, dataset_size=200, batch_size=20, epochs=2, mechanism="bandmf", sampling="cyclic")


def test_transform_adds_dp_aggregates_noise_for_the_same_key(plan):
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    key = jax.random.key(7)
    tx = plan.transform(optax.sgd(0.5), key=key)
    reference = optax.chain(
        mfnoise.dp_aggregate(plan.strategy, 1.0, plan.noise_multiplier, key, participation=plan.participation,
                             expected_batch_size=20.0),
        optax.sgd(0.5))
    assert tx.info.noise_multiplier == plan.noise_multiplier and tx.info.expected_batch_size == 20.0
    state, ref_state = tx.init(params), reference.init(params)
    rng = np.random.default_rng(0)
    for _ in range(5):
        grads = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
        out, state = tx.update(grads, state, params)
        ref, ref_state = reference.update(grads, ref_state, params)
        for leaf, ref_leaf in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref_leaf))
    plan.check_state(state)


def test_loss_weights_each_example_by_its_mask(plan):
    def loss_fn(params, example):
        x, y = example
        return (x @ params["w"] - y) ** 2

    params = {"w": jnp.arange(3.0)}
    x, y = jnp.ones(3), jnp.asarray(2.0)
    weighted = plan.loss(loss_fn)
    assert float(weighted(params, ((x, y), 1.0))) == pytest.approx(float(loss_fn(params, (x, y))))
    assert float(weighted(params, ((x, y), 0.0))) == 0.0
    # the clipped sum over a padded batch equals the per-example loop over its real slots
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
    ys = jnp.asarray([1.0, -1.0, 3.0, 0.5])
    mask = np.array([True, False, True, True])
    got = plan.clipped_grad(loss_fn)(params, (xs, ys), mask)
    expected = np.zeros(3)
    for i in np.flatnonzero(mask):
        g = np.asarray(jax.grad(loss_fn)(params, (xs[i], ys[i]))["w"], np.float64)
        expected += g * min(1.0, 1.0 / np.linalg.norm(g))
    np.testing.assert_allclose(np.asarray(got.grads["w"]), expected, rtol=2e-3, atol=1e-5)


def test_a_plan_trains_a_linear_regression_under_scan(plan):
    x = jax.random.normal(jax.random.key(0), (200, 4))
    y = x @ jnp.asarray([1.0, -2.0, 0.5, 3.0])

    def loss_fn(params, example):
        xb, yb = example
        return (xb @ params["w"] - yb) ** 2

    tx = plan.transform(optax.sgd(0.2, momentum=0.5), key=jax.random.key(1))
    grad = plan.clipped_grad(loss_fn)
    indices, mask = plan.batches(seed=0).arrays()
    params = {"w": jnp.zeros(4)}

    def step(carry, batch):
        params, state = carry
        idx, m = batch
        updates, state = tx.update(grad(params, (x[idx], y[idx]), m), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.jit(lambda c, b: jax.lax.scan(step, c, b))((params, tx.init(params)),
                                                                       (indices, mask))
    plan.check_state(state)  # the fingerprint survives jit and scan
    before = float(jnp.mean(y ** 2))
    after = float(jnp.mean((x @ params["w"] - y) ** 2))
    assert after < 0.5 * before, (before, after)
