"""``make_private(model, plan, optimizer=..., key=...)``: a Keras 3 model whose ``fit`` is the plan's mechanism.

Each training step t (the plan's batch t, from ``PlanDataset``: the batch's examples, labels and
mask) runs, as one jitted pure function of the Keras state:

    g_b = grad of loss(y_b, model(x_b)) for each example b (keras' ``stateless_call``), weighted by mask_b
    update_t = (sum_b clip_c(g_b) + sigma * c * S * (C'^{-1} W)_t) / B            (plan.transform)
    params <- optimizer(update_t)                                                   (the optax optimizer)

with the plan's strategy C (C' as it runs in float32), clip norm c, noise multiplier sigma,
S = sens(C', p) and B = ``plan.expected_batch_size`` ("Multi-Epoch Matrix Factorization Mechanisms for
Private Machine Learning", Choquette-Choo et al. 2023, arXiv:2211.06530). The clipping is
``plan.clipped_grad`` (ghost norms where the loss allows, "Large Language Models Can Be Strong
Differentially Private Learners", Li et al. 2022, arXiv:2110.05679); the noise and the optimizer are
``plan.transform(optimizer, key=key)``, whose state (the noise generator's buffers and step, the
optimizer's moments, the plan's fingerprint) lives in non-trainable Keras variables of the wrapper,
so it is carried from step to step and from one ``fit`` call to the next, and saved with the model's
weights. The Keras optimizer is not used (``compile`` refuses one): the strategy was chosen for the
optimizer's workload, so the optimizer belongs to the plan's side.

Order matters for privacy: batch t must meet noise row t. ``fit`` takes only a ``PlanDataset`` of
this plan, turns Keras' shuffling off, and checks that the noise generator's step is the dataset's
first step before and its last after. Refused: a model with non-trainable state (batch
normalisation statistics mix examples; dropout's seed state), a Keras backend other than JAX, a
dataset of another plan, ``y`` / ``batch_size`` / ``sample_weight`` / ``class_weight`` /
``validation_split`` arguments to ``fit`` (the plan decides the batches), and ``epochs`` other than 1
(one pass over a ``PlanDataset`` is the plan's whole run; its own epochs are inside it).

The logged ``loss`` is the mean loss of the batch's real examples: it is computed from the private
data and is not differentially private (like any training log); release only the model.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np

if "keras" not in sys.modules:  # keras reads its backend once, at first import
    if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
        raise ImportError(f"mfnoise.keras needs KERAS_BACKEND=jax, but it is {os.environ['KERAS_BACKEND']!r}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import optax  # noqa: E402

from mfnoise.training import noise as noise_lib  # noqa: E402

if keras.backend.backend() != "jax":
    raise ImportError(f"mfnoise.keras needs the JAX backend of Keras 3; keras was loaded with "
                      f"{keras.backend.backend()!r} (set KERAS_BACKEND=jax before the first import of keras)")

_REFUSED_FIT_ARGS = ("y", "batch_size", "sample_weight", "class_weight", "validation_split")


class PlanDataset(keras.utils.PyDataset):
    """The plan's batches of ``seed`` for Keras: item t is (x[indices_t], y[indices_t], mask_t as float32),
    the mask as Keras' sample weight (0 on padded slots). Steps ``start`` .. ``stop - 1`` of the plan
    (default: all of them)."""

    def __init__(self, plan: Any, x: Any, y: Any, *, seed: int = 0, start: int = 0, stop: int | None = None) -> None:
        super().__init__()
        self.x, self.y = np.asarray(x), np.asarray(y)
        if len(self.x) != plan.dataset_size or len(self.y) != plan.dataset_size:
            raise ValueError(f"x and y must hold the plan's dataset_size={plan.dataset_size} examples, got "
                             f"{len(self.x)} and {len(self.y)}")
        stop = plan.steps if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= plan.steps):
            raise ValueError(f"start={start!r} and stop={stop!r} must satisfy 0 <= start < stop <= {plan.steps} "
                             "(the plan's steps)")
        self.fingerprint = plan.fingerprint
        self.seed, self.start, self.stop = int(seed), start, stop
        self.indices, self.mask = plan.batches(seed).arrays()

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of a PlanDataset of {len(self)} batches")
        t = self.start + i
        idx = self.indices[t]
        return self.x[idx], self.y[idx], self.mask[t].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Fixed:
    tx: Any  # plan.transform(optimizer, key=key)
    treedef: Any  # of its state


class PrivateModel(keras.Model):
    """``model`` trained by the plan's mechanism (module doc); build it with ``make_private``."""

    def __init__(self, model: keras.Model, plan: Any, optimizer: optax.GradientTransformation, key: Any) -> None:
        super().__init__()
        if not model.built:
            raise ValueError("make_private needs a built model (give it an Input or call it once on data)")
        if model.non_trainable_variables:
            names = [v.path for v in model.non_trainable_variables]
            raise ValueError(f"make_private supports models without non-trainable state, got {names}: batch "
                             "statistics mix the examples of a batch (no per-example clipping bounds them)")
        self.inner = model
        self.plan = plan
        tx = plan.transform(optimizer, key=key)
        params = [jnp.asarray(v.value) for v in model.trainable_variables]
        leaves, treedef = jax.tree.flatten(tx.init(params))
        self._fixed = _Fixed(tx, treedef)  # (a plain object: Keras' attribute tracking would rebuild tuples)
        self._dp_state = [keras.Variable(np.asarray(leaf), trainable=False, dtype=str(leaf.dtype), name=f"dp_{i}")
                          for i, leaf in enumerate(leaves)]
        self._example_loss: Any = None

    def call(self, x: Any, training: bool = False) -> Any:
        return self.inner(x, training=training)

    def compile(self, optimizer: Any = None, loss: Any = None, **kwargs: Any) -> None:
        if optimizer is not None:
            raise ValueError(f"optimizer={optimizer!r}: the optimizer is the optax one given to make_private (the "
                             "plan's strategy was chosen for its workload); compile takes the loss and metrics")
        if loss is None:
            raise ValueError("compile needs loss=... (a Keras loss of (y_true, y_pred))")
        self._example_loss = keras.losses.get(loss)
        # Keras wants an optimizer to exist; this one is never applied (train_step uses the plan's transform)
        super().compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=loss, **kwargs)

    # -- the state of the plan's transform ------------------------------------------------------
    def _dp_positions(self) -> list[int]:
        ids = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
        return [ids[id(v)] for v in self._dp_state]

    def opt_state(self) -> Any:
        """The plan's transform state now (noise state included), read from the Keras variables."""
        return jax.tree.unflatten(self._fixed.treedef, [jnp.asarray(v.value) for v in self._dp_state])

    def noise_step(self) -> int:
        """The noise generator's step: the number of private updates done."""
        steps = {int(jax.device_get(s.step)) for s in noise_lib._noise_states(self.opt_state())}
        assert len(steps) == 1, steps
        return steps.pop()

    def train_step(self, state: Any, data: Any) -> Any:
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y, mask = keras.utils.unpack_x_y_sample_weight(data)
        if mask is None:
            raise ValueError("the private train step needs the plan's mask as the sample weight (use PlanDataset)")
        positions = self._dp_positions()
        opt_state = jax.tree.unflatten(self._fixed.treedef, [non_trainable[i] for i in positions])
        inner, loss_of = self.inner, self._example_loss

        def example_loss(params: Any, example: tuple[Any, Any]) -> Any:
            xe, ye = example
            y_pred = inner.stateless_call(params, [], xe[None], training=True)[0]
            return loss_of(ye[None], y_pred)

        params = list(trainable)
        summed = self.plan.clipped_grad(example_loss)(params, (x, y), mask)
        updates, opt_state = self._fixed.tx.update(summed, opt_state, params)
        params = optax.apply_updates(params, updates)

        non_trainable = list(non_trainable)
        for i, leaf in zip(positions, jax.tree.leaves(opt_state)):
            non_trainable[i] = leaf
        y_pred = inner.stateless_call(params, [], x, training=False)[0]
        per_example = jax.vmap(lambda a, b: loss_of(a[None], b[None]))(y, y_pred)
        loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        logs, metrics_vars = self._update_metrics_variables(metrics_vars, loss, x, y, y_pred, mask)
        return logs, (params, non_trainable, optimizer_vars, metrics_vars)

    def fit(self, x: Any = None, y: Any = None, *, epochs: int = 1, **kwargs: Any) -> Any:
        kwargs["y"] = y
        if not isinstance(x, PlanDataset):
            raise TypeError(f"fit takes a mfnoise.keras.PlanDataset of the plan's batches, got {type(x).__name__}")
        if x.fingerprint != self.plan.fingerprint:
            raise ValueError(f"the PlanDataset is from another plan (fingerprint {x.fingerprint[:16]}..., this "
                             f"model's plan {self.plan.fingerprint[:16]}...)")
        given = [k for k in _REFUSED_FIT_ARGS if kwargs.get(k) is not None]
        if given:
            raise ValueError(f"fit: {given} are decided by the plan (its PlanDataset holds the batches and masks)")
        if epochs != 1:
            raise ValueError(f"epochs={epochs!r}: one pass over a PlanDataset is the plan's whole run (its epochs are "
                             "inside it); run another fit with the next PlanDataset(start=...) to go on")
        if self._example_loss is None:
            raise ValueError("compile(loss=...) the private model before fit")
        if self.noise_step() != x.start:
            raise ValueError(f"the noise generator is at step {self.noise_step()} but the PlanDataset starts at "
                             f"step {x.start}: batch t must meet noise row t")
        kwargs["shuffle"] = False
        del kwargs["y"]
        history = super().fit(x, epochs=1, **kwargs)
        if self.noise_step() != x.stop:
            raise RuntimeError(f"after fit the noise generator is at step {self.noise_step()}, expected {x.stop}: "
                               "Keras ran a different number of batches than the PlanDataset holds")
        self.plan.check_state(self.opt_state())
        return history


def make_private(model: keras.Model, plan: Any, *, optimizer: optax.GradientTransformation, key: Any) -> PrivateModel:
    """A ``PrivateModel`` wrapping ``model`` (built, no non-trainable state) that trains with ``plan``'s
    per-example clipping and correlated noise and the optax ``optimizer``; ``key`` is the noise key.
    It shares ``model``'s variables: after ``fit``, ``model`` holds the trained weights."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    return PrivateModel(model, plan, optimizer, key)
