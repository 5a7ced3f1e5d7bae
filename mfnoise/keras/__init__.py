"""Keras 3 front-end (JAX backend): ``model.fit`` with the plan's per-example clipping and correlated noise.

    import mfnoise.keras                                    # sets KERAS_BACKEND=jax if keras is not loaded yet
    private = mfnoise.keras.make_private(model, plan, optimizer=optax.sgd(0.1, momentum=0.9), key=jax.random.key(0))
    private.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    private.fit(mfnoise.keras.PlanDataset(plan, x, y, seed=0))

(jax-privacy's Keras path is DP-SGD only.) Layer 5, beside the demo; keras is an optional
dependency (``pip install 'mfnoise[keras]'``) that ``import mfnoise`` never loads.
"""

from __future__ import annotations

from mfnoise.keras.private import PlanDataset, PrivateModel, make_private

__all__ = ["PlanDataset", "PrivateModel", "make_private"]
