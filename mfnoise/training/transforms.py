"""Optax transforms that add correlated (matrix-factorization) noise.

* ``dp_aggregate(strategy, l2_clip_norm, noise_multiplier, key, participation=p, expected_batch_size=B)``:
  per-example gradients in (leading batch axis, as ``optax.contrib.differentially_private_aggregate``);
  clips each example to global L2 norm ``l2_clip_norm`` = c, sums, and adds correlated noise:

      update_t = (sum_b clip_c(g_b) + sigma * c * S * (C'^{-1} W)_t) / B        (B = expected_batch_size)
      update_t =  sum_b clip_c(g_b) + sigma * c * S * (C'^{-1} W)_t             (expected_batch_size=None)

  C' = ``strategy.realised(dtype)`` is the strategy the noise generator actually runs (its
  coefficients rounded to the noise dtype) and S = ``strategy.noise_sensitivity(p, dtype)``
  >= sens(C', p) a proven bound (also >= sens(C, p)). Scaling C'^{-1} W by S is the same as using the
  normalised strategy C' / S, of sensitivity <= 1, so ``noise_multiplier`` sigma is exactly the
  Gaussian mechanism's noise multiplier that ``mfnoise.calibrate`` / dp-accounting reason about
  (docs/design.md, "Accounting"). The participation schema is a required argument: the sensitivity
  depends on it and is never assumed.
* ``correlated_noise(strategy, stddev, key)``: adds ``stddev * (C'^{-1} W)_t`` to an already clipped
  and summed gradient, C' = ``strategy.realised(dtype)`` (no normalisation).
* ``mf_sgd(...)``: ``optax.chain(dp_aggregate(...), optax.sgd(learning_rate, momentum))``.

Public quantities (threat model). The divisor B is a constant the caller states (e.g. the batch
size of fixed cyclic batches, or q * dataset_size for Poisson sampling when the dataset size is
public), never derived from the data: not from the number of real examples in a batch, and not
from the padded capacity of a batch plan (ceil(dataset_size / b), which changes when one example
is added, so dividing by it tells neighbouring datasets apart at every step). The clipped sum and
its noise are the only data-dependent terms of the update. With ``expected_batch_size=None`` the
noisy sum itself is returned (normalise downstream by a public constant, e.g. in the learning rate).

Non-finite per-example gradients: an example whose gradient has any NaN or inf entry contributes
zero (it is dropped before the sum, so it never reaches the parameters) and is counted in
``DPAggregateState.nonfinite``. Dropping an example is within the clipped-sum sensitivity (it is
the same as a zero gradient), so privacy is unaffected. (A finite gradient whose squared norm
overflows the accumulation dtype, |g| > ~1e19 in float32, is dropped and counted the same way.)

Input: either per-example gradients (leaf shapes (B, *param.shape), e.g. from
``mfnoise.training.per_example.per_example_grads``), or the ``mfnoise.training.clipping.ClippedSum`` that
``mfnoise.training.clipping.clipped_grad`` computes by ghost clipping without materialising them. Every leaf
is checked against the params (passed to ``update`` by optax, else those seen by ``init``): plain
``jax.grad`` output (no per-example axis) is refused, not silently clipped as a batch. A ClippedSum
must have been clipped to the same ``l2_clip_norm``.

Noise dtype: ``noise_dtype=None`` uses the params' dtype (one floating dtype for all leaves);
``noise_dtype=jnp.float32`` keeps the noise state and coefficients in float32 for bfloat16 params
(the usual choice for large models): the update is computed in float32 and cast to the parameters'
dtype. bfloat16 noise itself is refused for every strategy but the identity.

Refused, naming the argument: a clip norm that is not a positive finite number; a noise multiplier
(or ``correlated_noise`` stddev) that is negative, NaN or inf; a zero one unless
``allow_non_private=True``, which warns (``NonPrivateWarning``) and marks the transform
(``tx.info.private`` is False); an ``expected_batch_size`` that is not a positive finite number or
None; bools, strings and traced values for any of them.

All transforms are jittable, work inside ``optax.chain`` and with sharded params (the noise state
is sharded like the params; see ``mfnoise.training.noise``). Call ``mfnoise.training.noise.check(opt_state)`` on the
host to raise if the noise stepped past the strategy's n (the noise is NaN from then on).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer

from mfnoise.core.participation import Participation, check_participation
from mfnoise.core.sensitivity import Sensitivity
from mfnoise.strategies.base import Strategy
from mfnoise.training import noise as noise_lib
from mfnoise.training.clipping import ClippedSum, clipped_sum


class NonPrivateWarning(UserWarning):
    """A transform was built with no noise (``allow_non_private=True``): its updates are not private."""


class DPAggregateState(NamedTuple):
    """State of ``dp_aggregate``: the noise generator's state and the dropped-example count."""

    noise: noise_lib.NoiseState
    nonfinite: jax.Array  # int32 scalar: examples dropped so far for non-finite gradients


class CorrelatedNoiseState(NamedTuple):
    """State of ``correlated_noise``."""

    noise: noise_lib.NoiseState


@dataclasses.dataclass(frozen=True, eq=False)
class DPAggregateInfo:
    """What a ``dp_aggregate`` (or ``mf_sgd``) transform was built with, and the noise it adds.

    ``private`` is False only for ``noise_multiplier == 0`` (``allow_non_private=True``).
    ``noise_dtype`` is the one requested (None: the params' dtype, known at ``init``).
    """

    strategy: Strategy
    participation: Participation
    l2_clip_norm: float
    noise_multiplier: float
    expected_batch_size: float | None
    noise_dtype: np.dtype | None
    private: bool
    _sensitivities: dict = dataclasses.field(default_factory=dict, repr=False)

    def sensitivity(self, dtype: Any) -> Sensitivity:
        """S = ``strategy.noise_sensitivity(participation, dtype)``: the bound the noise is scaled by."""
        dtype = np.dtype(dtype)
        if dtype not in self._sensitivities:
            self._sensitivities[dtype] = self.strategy.noise_sensitivity(self.participation, dtype)
        return self._sensitivities[dtype]

    def noise_stddev(self, dtype: Any) -> float:
        """sigma * c * S: the standard deviation multiplying (C'^{-1} W)_t for noise in ``dtype``."""
        return self.noise_multiplier * self.l2_clip_norm * float(self.sensitivity(dtype).value)


class DPGradientTransformation(optax.GradientTransformationExtraArgs):
    """The ``optax.GradientTransformationExtraArgs`` of ``dp_aggregate`` / ``mf_sgd``, with ``info``."""

    info: DPAggregateInfo

    def __new__(cls, init: Any, update: Any, info: DPAggregateInfo) -> DPGradientTransformation:
        self = super().__new__(cls, init, update)
        self.info = info
        return self


# -- argument checks -------------------------------------------------------------------------------


def _real(name: str, value: Any) -> float:
    """value as a Python float: a real number or a 0-d real array; not a bool, a string, or a traced value
    (a traced value is not a public constant)."""
    if isinstance(value, Tracer):
        raise TypeError(f"{name} must be a concrete public constant, not a traced value (got {value})")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.number) \
            and not jnp.issubdtype(value.dtype, jnp.complexfloating):
        return float(value)
    raise TypeError(f"{name} must be a number, got {value!r}")


def _check_clip_norm(l2_clip_norm: Any) -> float:
    value = _real("l2_clip_norm", l2_clip_norm)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"l2_clip_norm must be a positive finite number, got {l2_clip_norm!r}")
    return value


def _check_noise_scale(name: str, value: Any, allow_non_private: Any) -> float:
    """A noise multiplier / stddev: finite and >= 0; 0 only with allow_non_private=True (warned)."""
    if not isinstance(allow_non_private, (bool, np.bool_)):
        raise TypeError(f"allow_non_private must be True or False, got {allow_non_private!r}")
    v = _real(name, value)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    if v == 0:
        if not allow_non_private:
            raise ValueError(
                f"{name}={value!r} adds no noise, so the updates are not differentially private; pass "
                "allow_non_private=True to run without privacy (e.g. to debug)"
            )
        warnings.warn(f"{name}=0 with allow_non_private=True: the updates are NOT differentially private",
                      NonPrivateWarning, stacklevel=3)
    return v


def _check_expected_batch_size(expected_batch_size: Any) -> float | None:
    if expected_batch_size is None:
        return None
    value = _real("expected_batch_size", expected_batch_size)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"expected_batch_size must be a positive finite public constant (or None to return the noisy sum), "
            f"got {expected_batch_size!r}"
        )
    return value


def _check_sensitivity(strategy: Strategy, participation: Participation | None) -> None:
    """The schema is given, and sens(C, p) is a positive finite number."""
    if participation is None:
        raise TypeError(
            "dp_aggregate needs participation=Participation(...): the noise is scaled by sens(C, p), "
            "which depends on how often an example takes part; it is never assumed"
        )
    check_participation(participation, strategy.n, f"the {strategy.family} strategy")
    value = float(strategy.sensitivity(participation).value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"strategy sensitivity {value} for {participation} is not a positive finite number")


def _params_dtype(reference: Any) -> np.dtype:
    """The one floating dtype of the params (the default noise dtype)."""
    dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(reference)}
    if not dtypes:
        return np.dtype(np.float32)  # no parameters: nothing is streamed
    if len(dtypes) != 1:
        names = sorted(d.name for d in dtypes)
        raise ValueError(
            f"the params have dtypes {names}; pass noise_dtype= (e.g. jnp.float32): the noise of all leaves must "
            "come from one realised strategy for its sensitivity bound to hold"
        )
    return dtypes.pop()


_EXPECTS = "dp_aggregate expects per-example gradients (B, *param.shape) or a ClippedSum"


def _check_tree(updates: Any, reference: Any, what: str) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """[(leaf path, update shape, param shape)] after checking that the trees have one structure."""
    ref_def = jax.tree.structure(reference)
    upd_def = jax.tree.structure(updates)
    if upd_def != ref_def:
        raise ValueError(f"{_EXPECTS}: the {what} have tree structure {upd_def}, the params {ref_def}")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
    return [(p, tuple(u.shape), tuple(r.shape))
            for p, u, r in zip(paths, jax.tree.leaves(updates), jax.tree.leaves(reference))]


def _check_per_example(updates: Any, reference: Any) -> int:
    """The batch size B after checking every leaf is (B, *param.shape), with one B across leaves."""
    batch = None
    for path, shape, pshape in _check_tree(updates, reference, "gradients"):
        if len(shape) != len(pshape) + 1 or shape[1:] != pshape:
            hint = (" (it has the parameter's own shape: plain jax.grad output has no per-example axis; use "
                    "mfnoise.per_example_grads or mfnoise.clipped_grad)") if shape == pshape else ""
            raise ValueError(f"{_EXPECTS}; leaf {path or '<root>'} has shape {shape} for a parameter of shape "
                             f"{pshape}{hint}")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise ValueError(f"{_EXPECTS} with one batch size B across leaves; leaf {path} has {shape[0]} examples, "
                             f"the first leaf {batch}")
    return 0 if batch is None else batch


def _check_clipped_sum(updates: ClippedSum, reference: Any, l2_clip_norm: float) -> None:
    if updates.l2_clip_norm != l2_clip_norm:
        raise ValueError(
            f"the ClippedSum was clipped to {updates.l2_clip_norm}, but dp_aggregate's "
            f"l2_clip_norm is {l2_clip_norm}: the noise would not match the sensitivity"
        )
    for path, shape, pshape in _check_tree(updates.grads, reference, "ClippedSum's grads"):
        if shape != pshape:
            raise ValueError(f"{_EXPECTS}; the ClippedSum's leaf {path or '<root>'} has shape {shape} for a "
                             f"parameter of shape {pshape}")


def _shapes(params: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), params)


# -- the transforms --------------------------------------------------------------------------------


def dp_aggregate(
    strategy: Strategy,
    l2_clip_norm: float,
    noise_multiplier: float,
    key: jax.Array | int,
    *,
    participation: Participation,
    expected_batch_size: float | None,
    state_sharding: str = "params",
    mesh: jax.sharding.Mesh | None = None,
    noise_dtype: Any = None,
    allow_non_private: bool = False,
) -> DPGradientTransformation:
    """Clip per-example gradients, sum, add sensitivity-normalised correlated noise, divide by a public constant.

    update_t = (sum_b clip(g_b) + noise_multiplier * l2_clip_norm * S * (C'^{-1} W)_t) / expected_batch_size
    for per-example gradients g of shape (B, *param.shape) per leaf (or a ClippedSum); t counts
    update calls; C' = ``strategy.realised(noise dtype)``, S = ``strategy.noise_sensitivity(p, noise dtype)``
    (see the module docstring). With ``expected_batch_size=None`` the noisy sum is returned.

    Args:
      strategy: the strategy C (any streamable family, see ``mfnoise.training.noise``).
      l2_clip_norm: per-example global L2 clipping norm (positive, finite).
      noise_multiplier: the Gaussian mechanism's noise multiplier sigma for the normalised strategy
        (from ``mfnoise.calibrate``); finite, > 0 (0 only with ``allow_non_private=True``).
      key: PRNG key or int seed of the noise.
      participation: the participation schema the batches honour (required; the sensitivity is
        computed from it, exactly or as a proven upper bound).
      expected_batch_size: required, keyword-only: the public constant the noisy sum is divided by
        (e.g. the batch size of fixed batches, q * dataset_size for Poisson), or None for the sum.
        Never the data's shape: the number of rows of the per-example gradients plays no part.
      state_sharding, mesh: see ``mfnoise.training.noise.generator``.
      noise_dtype: dtype of the noise state, coefficients and noise (None: the params' dtype).
        jnp.float32 for bfloat16 params; the update is cast to the parameters' dtype (a ClippedSum
        stays in >= float32 until the noise is added).
      allow_non_private: permit ``noise_multiplier=0`` (warns; ``info.private`` is False).

    Returns a ``DPGradientTransformation``; ``tx.info`` holds the arguments, ``tx.info.private`` and
    ``tx.info.noise_stddev(dtype)`` (sigma * c * S).
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a mfnoise.Strategy, got {type(strategy).__name__}")
    clip = _check_clip_norm(l2_clip_norm)
    sigma = _check_noise_scale("noise_multiplier", noise_multiplier, allow_non_private)
    divisor = _check_expected_batch_size(expected_batch_size)
    _check_sensitivity(strategy, participation)
    fixed_dtype = None if noise_dtype is None else noise_lib.check_noise_dtype(strategy, noise_dtype)
    info = DPAggregateInfo(strategy, participation, clip, sigma, divisor, fixed_dtype, sigma > 0)
    if fixed_dtype is not None:
        info.sensitivity(fixed_dtype)  # fail here, not at the first step, if it cannot be bounded
    generators: dict[np.dtype, noise_lib.NoiseGenerator] = {}
    seen: list[Any] = []  # the params' shapes and dtypes from init, for update calls without params

    def generator(dtype: np.dtype) -> noise_lib.NoiseGenerator:
        if dtype not in generators:
            generators[dtype] = noise_lib.generator(strategy, key, state_sharding=state_sharding, mesh=mesh,
                                                    dtype=dtype)
        return generators[dtype]

    def noise_dtype_for(reference: Any) -> np.dtype:
        return fixed_dtype if fixed_dtype is not None else noise_lib.check_noise_dtype(strategy,
                                                                                      _params_dtype(reference))

    def init_fn(params: Any) -> DPAggregateState:
        dtype = noise_dtype_for(params)
        info.sensitivity(dtype)
        seen[:] = [_shapes(params)]
        return DPAggregateState(generator(dtype).init(params), jnp.zeros((), jnp.int32))

    def update_fn(updates: Any, state: DPAggregateState, params: Any = None,
                  **extra_args: Any) -> tuple[Any, DPAggregateState]:
        del extra_args
        if params is not None:
            reference = params
        elif seen:
            reference = seen[0]
        else:
            raise ValueError(f"{_EXPECTS}; pass params to update (optax.chain does) or call init first, so that "
                             "the gradients' shapes can be checked")
        if isinstance(updates, ClippedSum):
            _check_clipped_sum(updates, reference, clip)
            summed, dropped = updates.grads, updates.nonfinite
        else:
            _check_per_example(updates, reference)
            summed, dropped = clipped_sum(updates, clip)
        dtype = noise_dtype_for(reference)
        z, noise_state = generator(dtype).next(state.noise, summed)
        stddev = jnp.asarray(info.noise_stddev(dtype), dtype)

        def combine(s: jax.Array, e: jax.Array, ref: Any) -> jax.Array:
            # The noise is added in the finer of the sum's and the noise's dtypes: a ClippedSum arrives in
            # >= float32 (clipping's accumulation dtype) and is never rounded to bfloat16 params before the
            # noise (clipping.py: that rounding is data-dependent and can exceed the clip norm); the noisy
            # update is then rounded to the parameter's (gradient's) dtype, a post-processing.
            work = jnp.result_type(dtype, s.dtype)
            noisy = s.astype(work) + stddev.astype(work) * e.astype(work)
            if divisor is not None:
                noisy = noisy / jnp.asarray(divisor, work)
            return noisy.astype(ref.dtype)

        out = jax.tree.map(combine, summed, z, reference)
        return out, DPAggregateState(noise_state, state.nonfinite + dropped)

    return DPGradientTransformation(init_fn, update_fn, info)


def correlated_noise(
    strategy: Strategy,
    stddev: float,
    key: jax.Array | int,
    *,
    state_sharding: str = "params",
    mesh: jax.sharding.Mesh | None = None,
    noise_dtype: Any = None,
    allow_non_private: bool = False,
) -> optax.GradientTransformation:
    """update(g) = g + stddev * (C'^{-1} W)_t, C' = ``strategy.realised(noise dtype)`` (not normalised).

    For gradients that are already clipped and summed (or averaged: scale ``stddev`` to match).
    C' is C with its coefficients rounded to the noise dtype; for the sensitivity the noise
    should be scaled by, use ``strategy.noise_sensitivity(p, dtype)`` (``dp_aggregate`` does).
    ``stddev`` must be finite and > 0 (0 only with ``allow_non_private=True``, which warns).
    ``noise_dtype``: as in ``dp_aggregate`` (None: the updates' dtype); the sum is computed in it and
    cast back to the updates' dtype.
    """
    stddev = _check_noise_scale("stddev", stddev, allow_non_private)
    gen = noise_lib.generator(strategy, key, state_sharding=state_sharding, mesh=mesh, dtype=noise_dtype)

    def init_fn(params: Any) -> CorrelatedNoiseState:
        return CorrelatedNoiseState(gen.init(params))

    def update_fn(updates: Any, state: optax.OptState, params: Any = None) -> tuple[Any, CorrelatedNoiseState]:
        del params
        z, noise_state = gen.next(cast(CorrelatedNoiseState, state).noise, updates)
        out = jax.tree.map(lambda g, e: (g.astype(e.dtype) + jnp.asarray(stddev, e.dtype) * e).astype(g.dtype),
                           updates, z)
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
    expected_batch_size: float | None,
    momentum: float | None = None,
    nesterov: bool = False,
    state_sharding: str = "params",
    mesh: jax.sharding.Mesh | None = None,
    noise_dtype: Any = None,
    allow_non_private: bool = False,
) -> DPGradientTransformation:
    """DP-MF SGD: ``optax.chain(dp_aggregate(...), optax.sgd(learning_rate, momentum, nesterov))``.

    Takes per-example gradients or a ``ClippedSum`` (``mfnoise.clipped_grad``) like ``dp_aggregate``,
    with the same required ``participation`` and ``expected_batch_size``. Choose the strategy for the
    workload the optimizer implies (``mfnoise.workloads.momentum`` for momentum). ``tx.info`` is the
    ``dp_aggregate`` info.
    """
    agg = dp_aggregate(strategy, l2_clip_norm, noise_multiplier, key, participation=participation,
                       expected_batch_size=expected_batch_size, state_sharding=state_sharding, mesh=mesh,
                       noise_dtype=noise_dtype, allow_non_private=allow_non_private)
    chain = optax.chain(agg, optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
    return DPGradientTransformation(chain.init, chain.update, agg.info)
