"""mfnoise.keras.make_private: Keras 3 (JAX backend) ``fit`` with the plan's clipping and correlated noise.

The reference is written without Keras' training machinery: per-example gradients of the same loss
(jax.vmap of jax.grad over the model's stateless_call), masked, fed to ``mfnoise.dp_aggregate``
with the same key, and plain gradient steps.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("keras", reason="keras is not installed (pip install 'mfnoise[keras]')")

import keras  # noqa: E402

import mfnoise  # noqa: E402
import mfnoise.keras as mk  # noqa: E402

from conftest import DATASET  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(3, 8))
    y = rng.integers(0, 3, DATASET).astype(np.int32)
    return (centres[y] + rng.normal(size=(DATASET, 8))).astype(np.float32), y


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])


def test_fit_trains_with_the_plan(small_plan):
    x, y = _data()
    model = _model()
    before = float(LOSS(y, model(x)))
    private = mk.make_private(model, small_plan, optimizer=optax.sgd(0.5, momentum=0.9), key=jax.random.key(0))
    private.compile(loss=LOSS)
    private.fit(mk.PlanDataset(small_plan, x, y, seed=0), verbose=0)
    assert private.noise_step() == small_plan.steps
    after = float(LOSS(y, model(x)))  # the wrapped model holds the trained weights
    assert after < 0.5 * before, (before, after)


def _reference(plan, model, weights, x, y, key, steps: int) -> list[np.ndarray]:
    """``steps`` plain SGD(1) steps on dp_aggregate of masked per-example gradients."""
    agg = mfnoise.dp_aggregate(plan.strategy, plan.l2_clip_norm, plan.noise_multiplier, key,
                               participation=plan.participation, expected_batch_size=plan.expected_batch_size)
    params = [jnp.asarray(w) for w in weights]
    state = agg.init(params)

    def one(params, xe, ye):
        y_pred, _ = model.stateless_call(params, [], xe[None], training=True)
        return LOSS(ye[None], y_pred)

    indices, mask = plan.batches(0).arrays()
    for t in range(steps):
        grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x[indices[t]], y[indices[t]])
        grads = [g * jnp.asarray(mask[t], g.dtype).reshape((-1,) + (1,) * (g.ndim - 1)) for g in grads]
        noisy, state = agg.update(grads, state, params)
        params = [p - u for p, u in zip(params, noisy)]
    return [np.asarray(p) for p in params]


def test_update_is_dp_aggregate_for_the_same_key(small_plan):
    x, y = _data()
    model = _model(1)
    weights = [np.array(v.value) for v in model.trainable_variables]
    key = jax.random.key(5)
    private = mk.make_private(model, small_plan, optimizer=optax.sgd(1.0), key=key)
    private.compile(loss=LOSS)
    private.fit(mk.PlanDataset(small_plan, x, y, seed=0, stop=3), verbose=0)
    assert private.noise_step() == 3
    got = [np.asarray(v.value) for v in model.trainable_variables]
    want = _reference(small_plan, model, weights, x, y, key, 3)
    for g, w in zip(got, want):  # ghost vs materialised clipping: rounding apart, the noise is the same
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    other = _reference(small_plan, model, weights, x, y, jax.random.key(6), 3)
    assert max(np.abs(g - o).max() for g, o in zip(got, other)) > 1e-3  # the noise is what was compared
    # the state carries into the next fit: steps 3..5 go on from noise row 3
    private.fit(mk.PlanDataset(small_plan, x, y, seed=0, start=3, stop=6), verbose=0)
    want = _reference(small_plan, model, weights, x, y, key, 6)
    for g, w in zip([np.asarray(v.value) for v in model.trainable_variables], want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_problem(small_plan):
    x, y = _data()
    private = mk.make_private(_model(), small_plan, optimizer=optax.sgd(0.1), key=jax.random.key(0))
    with pytest.raises(ValueError, match="the optimizer is the optax one given to make_private"):
        private.compile(optimizer="adam", loss=LOSS)
    with pytest.raises(ValueError, match="compile"):
        private.fit(mk.PlanDataset(small_plan, x, y))
    private.compile(loss=LOSS)
    with pytest.raises(TypeError, match="PlanDataset"):
        private.fit(x, y)
    with pytest.raises(ValueError, match="epochs=2"):
        private.fit(mk.PlanDataset(small_plan, x, y), epochs=2)
    with pytest.raises(ValueError, match=r"\['batch_size'\] are decided by the plan"):
        private.fit(mk.PlanDataset(small_plan, x, y), batch_size=8)
    with pytest.raises(ValueError, match="noise generator is at step 0 but the PlanDataset starts at step 4"):
        private.fit(mk.PlanDataset(small_plan, x, y, start=4))
    with pytest.raises(ValueError, match="dataset_size=512"):
        mk.PlanDataset(small_plan, x[:10], y[:10])
    batchnorm = keras.Sequential([keras.Input((8,)), keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="non-trainable state"):
        mk.make_private(batchnorm, small_plan, optimizer=optax.sgd(0.1), key=jax.random.key(0))


def test_another_keras_backend_is_refused():
    env = dict(os.environ, KERAS_BACKEND="torch")
    proc = subprocess.run([sys.executable, "-c", "import mfnoise.keras"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and "mfnoise.keras needs KERAS_BACKEND=jax, but it is 'torch'" in proc.stderr
