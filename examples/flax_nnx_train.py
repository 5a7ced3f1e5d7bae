"""Private training of a Flax NNX model with correlated noise, from a privacy budget (``mfnoise.plan``).

    python examples/flax_nnx_train.py            # needs flax: pip install -e '.[flax]'

A small NNX MLP learns a synthetic 3-class problem. Everything private comes from one plan:

* ``plan.batches(seed)``: the fixed-shape, masked batches that honour the plan's participation schema;
* ``plan.clipped_grad(loss_fn)``: each example's gradient clipped to ``plan.l2_clip_norm`` and summed
  (ghost clipping, "Large Language Models Can Be Strong Differentially Private Learners", Li et al.
  2022, arXiv:2110.05679), padded slots weighted 0 (``plan.loss``);
* ``plan.transform(optimizer, key=...)``: ``dp_aggregate`` (the plan's strategy C, noise multiplier
  sigma, clip c, S = sens(C', p)) then the optimizer, so the update before the optimizer is

      (sum_b clip_c(g_b) + sigma * c * S * (C'^{-1} W)_t) / B,     B = plan.expected_batch_size

  ("Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning", Choquette-Choo et
  al. 2023, arXiv:2211.06530).

NNX modules are stateful objects; jax transforms want pure functions of arrays. ``nnx.split`` gives
the static graph and the parameters as an ``nnx.State`` pytree; the per-example loss rebuilds the
module from them with ``nnx.merge`` (a pure function of the parameters), and after training
``nnx.update`` writes the parameters back into the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mfnoise

FEATURES, CLASSES = 8, 3


class MLP(nnx.Module):
    """x (FEATURES,) -> logits (CLASSES,): Linear, tanh, Linear."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(FEATURES, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def make_data(dataset_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x (dataset_size, FEATURES) float32, y (dataset_size,) int32): three Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, size=dataset_size)
    x = centres[y] + rng.normal(size=(dataset_size, FEATURES))
    return x.astype(np.float32), y.astype(np.int32)


@dataclasses.dataclass
class Trainer:
    """What one training step needs: the model's graph, the clipped-gradient function, the transform."""

    model: MLP
    graphdef: Any
    clipped: Any  # (params, (x, y), mask) -> ClippedSum
    tx: Any  # plan.transform(optimizer)
    loss: Any  # (params, x, y) -> mean cross-entropy over the rows (for reporting only)


def build(plan: Any, *, key: jax.Array, hidden: int = 16, learning_rate: float = 0.5, momentum: float = 0.9,
          init_seed: int = 0) -> Trainer:
    model = MLP(hidden, rngs=nnx.Rngs(init_seed))
    graphdef, _ = nnx.split(model, nnx.Param)

    def example_loss(params: Any, example: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = example
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def mean_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(jax.vmap(lambda a, b: example_loss(params, (a, b)))(x, y))

    tx = plan.transform(optax.sgd(learning_rate, momentum=momentum), key=key)
    return Trainer(model, graphdef, plan.clipped_grad(example_loss), tx, mean_loss)


def train(plan: Any, x: np.ndarray, y: np.ndarray, *, seed: int = 0, **build_args: Any) -> dict[str, Any]:
    """Train on ``plan.batches(seed)``; returns the trained model, its params and opt_state, and the
    mean loss over the whole data before and after."""
    trainer = build(plan, key=jax.random.key(seed), **build_args)
    _, params = nnx.split(trainer.model, nnx.Param)
    state = trainer.tx.init(params)
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def step(params: Any, state: Any, indices: jax.Array, mask: jax.Array) -> tuple[Any, Any]:
        summed = trainer.clipped(params, (xs[indices], ys[indices]), mask)
        updates, state = trainer.tx.update(summed, state, params)
        return optax.apply_updates(params, updates), state

    before = float(trainer.loss(params, xs, ys))
    for batch in plan.batches(seed):
        plan.check_batch(batch)
        params, state = step(params, state, batch.indices, batch.mask)
    plan.check_state(state)  # this plan's state, and the noise never ran past the strategy's n
    nnx.update(trainer.model, params)
    return {"model": trainer.model, "params": params, "opt_state": state, "loss_before": before,
            "loss_after": float(trainer.loss(params, xs, ys))}


def main() -> None:
    dataset_size = 2048
    plan = mfnoise.plan(4.0, 1e-5, dataset_size=dataset_size, batch_size=64, epochs=4,
                        optimizer=("momentum", 0.9))
    print(plan.report())
    x, y = make_data(dataset_size)
    out = train(plan, x, y)
    accuracy = float(jnp.mean(jnp.argmax(jax.vmap(out["model"])(jnp.asarray(x)), axis=-1) == y))
    print(f"loss {out['loss_before']:.4f} -> {out['loss_after']:.4f}, training accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
