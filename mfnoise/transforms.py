"""Optax transforms that add correlated (matrix-factorization) noise.

* ``dp_aggregate(strategy, l2_clip_norm, noise_multiplier, key, participation=p)``: per-example
  gradients in (leading batch axis, as ``optax.contrib.differentially_private_aggregate``); clips each
  example to global L2 norm ``l2_clip_norm``, sums, adds
  ``noise_multiplier * l2_clip_norm * sens(C, p) * (C^{-1} W)_t`` and divides by the batch size.
  Scaling C^{-1} W by sens(C, p) is the same as using the normalised strategy C / sens(C, p), whose
  sensitivity is 1, so ``noise_multiplier`` is exactly the Gaussian mechanism's noise multiplier that
  ``mfnoise.calibrate`` / dp-accounting reason about (DESIGN.md, "Accounting"). The participation
  schema is a required argument: the sensitivity depends on it and is never assumed.
* ``correlated_noise(strategy, stddev, key)``: adds ``stddev * (C^{-1} W)_t`` to an already clipped
  and summed gradient, C exactly as ``strategy.dense()`` returns it (no normalisation).
* ``mf_sgd(...)``: ``optax.chain(dp_aggregate(...), optax.sgd(learning_rate, momentum))``.

Non-finite per-example gradients: an example whose gradient has any NaN or inf entry contributes
zero (it is dropped before the sum, so it never reaches the parameters) and is counted in
``DPAggregateState.nonfinite``. Dropping an example is within the clipped-sum sensitivity (it is
the same as a zero gradient), so privacy is unaffected. (A finite gradient whose squared norm
overflows the accumulation dtype, |g| > ~1e19 in float32, is dropped and counted the same way.)

Input: either per-example gradients (B x params, e.g. from ``mfnoise.per_example.per_example_grads``,
vmap in microbatches), or the ``mfnoise.clipping.ClippedSum`` that ``mfnoise.clipping.clipped_grad``
computes by ghost clipping without materialising them (about the cost of an ordinary minibatch
gradient for dense layers). A ClippedSum must have been clipped to the same ``l2_clip_norm``.

All transforms are jittable, work inside ``optax.chain`` and with sharded params (the noise state
is sharded like the params; see ``mfnoise.noise``). Call ``mfnoise.noise.check(opt_state)`` on the
host to raise if the noise stepped past the strategy's n (the noise is NaN from then on).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mfnoise import noise as noise_lib
from mfnoise.clipping import ClippedSum, clipped_sum
from mfnoise.participation import Participation
from mfnoise.strategy import Strategy


class DPAggregateState(NamedTuple):
    """State of ``dp_aggregate``: the noise generator's state and the dropped-example count."""

    noise: noise_lib.NoiseState
    nonfinite: jax.Array  # int32 scalar: examples dropped so far for non-finite gradients


class CorrelatedNoiseState(NamedTuple):
    """State of ``correlated_noise``."""

    noise: noise_lib.NoiseState


def _sensitivity(strategy: Strategy, participation: Participation | None) -> float:
    if participation is None:
        raise TypeError(
            "dp_aggregate needs participation=Participation(...): the noise is scaled by sens(C, p), "
            "which depends on how often an example takes part; it is never assumed"
        )
    if not isinstance(participation, Participation):
        raise TypeError(f"participation must be a mfnoise.Participation, got {type(participation).__name__}")
    sens = strategy.sensitivity(participation)
    value = float(sens.value)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"strategy sensitivity {value} for {participation} is not a positive finite number")
    return value


def dp_aggregate(
    strategy: Strategy,
    l2_clip_norm: float,
    noise_multiplier: float,
    key: jax.Array | int,
    *,
    participation: Participation,
    state_sharding: str = "params",
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformation:
    """Clip per-example gradients, sum, add sensitivity-normalised correlated noise, average.

    update(g) = (sum_b clip(g_b) + noise_multiplier * l2_clip_norm * sens(C, p) * (C^{-1} W)_t) / B
    for per-example gradients g of shape (B, *param.shape) per leaf; t counts update calls.

    Args:
      strategy: the strategy C (any streamable family, see ``mfnoise.noise``).
      l2_clip_norm: per-example global L2 clipping norm.
      noise_multiplier: the Gaussian mechanism's noise multiplier sigma for the normalised strategy
        (from ``mfnoise.calibrate``).
      key: PRNG key or int seed of the noise.
      participation: the participation schema the batches honour (required; the sensitivity is
        computed from it, exactly or as a proven upper bound).
      state_sharding, mesh: see ``mfnoise.noise.generator``.
    """
    sens = _sensitivity(strategy, participation)
    gen = noise_lib.generator(strategy, key, state_sharding=state_sharding, mesh=mesh)
    stddev = float(noise_multiplier) * float(l2_clip_norm) * sens
    if not stddev >= 0:
        raise ValueError(f"noise stddev must be non-negative, got {stddev}")

    def init_fn(params: Any) -> DPAggregateState:
        return DPAggregateState(gen.init(params), jnp.zeros((), jnp.int32))

    def update_fn(updates: Any, state: DPAggregateState, params: Any = None) -> tuple[Any, DPAggregateState]:
        del params
        if isinstance(updates, ClippedSum):
            if updates.l2_clip_norm != float(l2_clip_norm):
                raise ValueError(
                    f"the ClippedSum was clipped to {updates.l2_clip_norm}, but dp_aggregate's "
                    f"l2_clip_norm is {l2_clip_norm}: the noise would not match the sensitivity"
                )
            summed, dropped, batch = updates.grads, updates.nonfinite, updates.batch_size
        else:
            batch = jax.tree.leaves(updates)[0].shape[0]
            summed, dropped = clipped_sum(updates, l2_clip_norm)
        z, noise_state = gen.next(state.noise, summed)
        out = jax.tree.map(lambda s, e: (s + jnp.asarray(stddev, s.dtype) * e) / jnp.asarray(batch, s.dtype), summed, z)
        return out, DPAggregateState(noise_state, state.nonfinite + dropped)

    return optax.GradientTransformation(init_fn, update_fn)


def correlated_noise(
    strategy: Strategy,
    stddev: float,
    key: jax.Array | int,
    *,
    state_sharding: str = "params",
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformation:
    """update(g) = g + stddev * (C^{-1} W)_t, C as ``strategy.dense()`` returns it (not normalised).

    For gradients that are already clipped and summed (or averaged: scale ``stddev`` to match).
    """
    gen = noise_lib.generator(strategy, key, state_sharding=state_sharding, mesh=mesh)
    stddev = float(stddev)
    if not stddev >= 0:
        raise ValueError(f"stddev must be non-negative, got {stddev}")

    def init_fn(params: Any) -> CorrelatedNoiseState:
        return CorrelatedNoiseState(gen.init(params))

    def update_fn(updates: Any, state: CorrelatedNoiseState, params: Any = None) -> tuple[Any, CorrelatedNoiseState]:
        del params
        z, noise_state = gen.next(state.noise, updates)
        out = jax.tree.map(lambda g, e: g + jnp.asarray(stddev, g.dtype) * e, updates, z)
        return out, CorrelatedNoiseState(noise_state)

    return optax.GradientTransformation(init_fn, update_fn)


def mf_sgd(
    strategy: Strategy,
    learning_rate: optax.ScalarOrSchedule,
    l2_clip_norm: float,
    noise_multiplier: float,
    key: jax.Array | int,
    *,
    participation: Participation,
    momentum: float | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """DP-MF SGD: ``optax.chain(dp_aggregate(...), optax.sgd(learning_rate, momentum, nesterov))``.

    Takes per-example gradients or a ``ClippedSum`` (``mfnoise.clipped_grad``) like ``dp_aggregate``.
    Choose the strategy for the workload the optimizer implies (``mfnoise.workloads.momentum`` for momentum).
    """
    return optax.chain(
        dp_aggregate(strategy, l2_clip_norm, noise_multiplier, key, participation=participation),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
