"""The Flax NNX example (examples/flax_nnx_train.py): it trains, its clipped sums are the per-example
loop's, and the update it applies is dp_aggregate's for the same key and the same clipped sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax", reason="flax is not installed (pip install 'mfnoise[flax]')")

from flax import nnx  # noqa: E402

import mfnoise  # noqa: E402

from conftest import DATASET, load_example  # noqa: E402

example = load_example("flax_nnx_train")


def test_training_reduces_the_loss(small_plan):
    x, y = example.make_data(DATASET)
    out = example.train(small_plan, x, y)
    assert out["loss_after"] < 0.5 * out["loss_before"], (out["loss_before"], out["loss_after"])
    _, params = nnx.split(out["model"], nnx.Param)  # nnx.update wrote the trained params back
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out["params"])):
        assert np.array_equal(a, b)


def test_clipped_sums_and_noise_match_dp_aggregate(small_plan):
    plan = small_plan
    x, y = (jnp.asarray(a) for a in example.make_data(DATASET))
    key = jax.random.key(7)
    trainer = example.build(plan, key=key, learning_rate=1.0, momentum=0.0)  # update = -(noisy aggregate)
    _, params = nnx.split(trainer.model, nnx.Param)
    reference = mfnoise.dp_aggregate(plan.strategy, plan.l2_clip_norm, plan.noise_multiplier, key,
                                     participation=plan.participation, expected_batch_size=plan.expected_batch_size)
    state, ref_state = trainer.tx.init(params), reference.init(params)

    def one(params, x1, y1):
        logits = nnx.merge(trainer.graphdef, params)(x1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y1)

    for batch in list(plan.batches(0))[:3]:  # the noise state carries from step to step
        idx, mask = batch.indices, batch.mask
        summed = trainer.clipped(params, (x[idx], y[idx]), mask)
        # the per-example loop: grad of each example, clipped in float64 numpy, masked, summed
        per_example = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x[idx], y[idx])
        flat = [np.asarray(g, np.float64).reshape(len(idx), -1) for g in jax.tree.leaves(per_example)]
        norms = np.sqrt(sum((f ** 2).sum(axis=1) for f in flat))
        scale = np.minimum(1.0, plan.l2_clip_norm / norms) * np.asarray(mask)
        for got, f in zip(jax.tree.leaves(summed.grads), flat):
            np.testing.assert_allclose(np.asarray(got).reshape(-1), scale @ f, rtol=2e-5, atol=2e-6)
        updates, state = trainer.tx.update(summed, state, params)
        noisy, ref_state = reference.update(summed, ref_state, params)
        for u, r, s in zip(jax.tree.leaves(updates), jax.tree.leaves(noisy), jax.tree.leaves(summed.grads)):
            assert np.array_equal(np.asarray(u), -np.asarray(r))
            assert np.any(np.asarray(r) * plan.expected_batch_size != np.asarray(s))  # noise was added
