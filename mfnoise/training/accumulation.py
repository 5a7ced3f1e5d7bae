"""Gradient accumulation: one logical batch of B examples processed as microbatches, noised once.

A logical batch is what the participation schema counts as one step: the noise generator steps once
per logical batch, and the released update is

    update_t = (sum_{j < k} S_j + sigma * c * S * (C'^{-1} W)_t) / B_expected,
    S_j = sum_{b in microbatch j} clip_c(g_b)                                   (a ``ClippedSum``)

so sum_j S_j = sum_{b < B} clip_c(g_b) is the clipped sum of the whole batch (clipping is per
example, so splitting the batch changes no example's weight s_b = min(1, c / N_b)), and the
sensitivity, the noise and the accounting are those of the unsplit batch (docs/design.md,
"Accumulation and data parallelism"). Only the summation order changes: with every partial sum in
the accumulation dtype (>= float32, unit roundoff u), each entry i of the accumulated sum differs
from the one-batch sum by at most 2 gamma_B sum_b s_b |g_b,i| (both are sums of the same B products
in some order; gamma_n = n eps / (1 - n eps), eps = 2u), and it is bit-identical where the partial
sums are exact (e.g. small-integer gradients).

Two ways to accumulate, for two kinds of training loop:

* ``accumulate(clipped_fn, microbatch_size)``: a function (params, *examples, shared=()) ->
  ``ClippedSum`` of the whole logical batch, computed as a ``jax.lax.scan`` over microbatches of
  ``microbatch_size`` examples (the activations of one microbatch are alive at a time), the
  remainder (B mod microbatch_size examples, if any) as one more, smaller call: no padding, so no
  padded example can contribute anything. ``clipped_fn`` is e.g.
  ``mfnoise.clipped_grad(loss_fn, c)`` or ``clipped_per_example(loss_fn, c)``. Feed the result to
  ``dp_aggregate`` (or ``mf_sgd``, ``plan.transform``) once per logical batch.
* ``multi_steps(tx, microbatches=k)``: for loops whose data arrives one microbatch at a time. It
  wraps a DP transform (``dp_aggregate``, ``mf_sgd``, ``plan.transform``: anything with a
  ``DPAggregateInfo`` in ``tx.info``) and takes one microbatch ``ClippedSum`` per call; it adds them
  up (in the accumulation dtype) and calls the DP transform once every k calls, with the sum of the
  k microbatches; in between it returns zero updates and leaves the DP transform's state (its noise
  generator, its optimizer) untouched. So the noise is added once per logical batch and the
  generator's step counts logical batches, as the participation schema does.

What is refused, loudly (each is a way to add the noise too often or too rarely, or to count a
microbatch as a step): a ``clipped_fn`` that does not return a ``ClippedSum`` (per-example gradients
here would be summed without clipping), or one whose ``batch_size`` is not the number of examples it
was given; a ``multi_steps`` around a transform that is not a DP transform (``tx.info`` missing) or
whose input is not a ``ClippedSum`` (plain gradients: nothing was clipped; per-example gradients:
clip them per microbatch first), a ``ClippedSum`` clipped to another norm, microbatches of
different sizes within one ``multi_steps`` (the logical batch must be k fixed-size microbatches;
pad a ragged last one with a zero-weight mask, e.g. ``plan.loss``, whose padded examples contribute
exact zeros), and any call inside ``shard_map`` (each device would add its own noise to its own
partial sum; and with shard_map's default ``check_vma=True`` the gradients of replicated params
are summed over the devices before they are clipped): clip and reduce with
``mfnoise.training.data_parallel.data_parallel`` and call the DP transform outside.
``optax.MultiSteps`` around ``dp_aggregate`` fails (optax 0.2.8: a pytree-structure error, its
params-shaped accumulator matching neither per-example gradients nor a ``ClippedSum``); were it to
run, it would average rows of different examples before clipping, or the ``nonfinite`` count. Use
``multi_steps``.

The divisor stays the public constant given to ``dp_aggregate`` (``expected_batch_size``: the
logical batch's, never the microbatch's, and never the count of examples seen).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.training.clipping import ClippedSum, clipped_sum
from mfnoise.training.per_example import batch_size, per_example_grads, shared_arguments
from mfnoise.training.per_example import varying_axes as _varying
from mfnoise.training.safe_rounding import _toward_zero as toward_zero
from mfnoise.training.transforms import DPAggregateInfo, DPGradientTransformation


def accumulation_dtype(dtype: Any) -> np.dtype:
    """The dtype partial clipped sums are added in: at least float32 (as clipping's own sums)."""
    return np.dtype(jnp.result_type(jnp.float32, dtype))


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _clipped(out: Any, has_aux: bool, where: str) -> tuple[ClippedSum, Any]:
    s, aux = out if has_aux else (out, None)
    if not isinstance(s, ClippedSum):
        raise TypeError(
            f"{where}: the clipped function must return a ClippedSum (mfnoise.clipped_grad(loss_fn, c) or "
            f"clipped_per_example(loss_fn, c)), got {type(s).__name__}: per-example or plain gradients would be "
            "summed without clipping" + (" (has_aux=True: it must return (ClippedSum, aux))" if has_aux else "")
        )
    return s, aux


def clipped_per_example(loss_fn: Callable[..., jax.Array], l2_clip_norm: float,
                        microbatch_size: int | None = None) -> Callable[..., ClippedSum]:
    """f(params, *examples, shared=()) -> ClippedSum from materialised per-example gradients:
    ``clipped_sum(per_example_grads(loss_fn, microbatch_size)(params, *examples, shared=shared), c)``
    (any model; costs B parameter-sized arrays per call). Arguments as for ``mfnoise.clipped_grad``."""
    grads = per_example_grads(loss_fn, microbatch_size)
    probe = clipped_sum({}, l2_clip_norm)  # checks the clip norm now, not at the first call
    del probe
    clip = float(l2_clip_norm)

    def f(params: Any, *examples: Any, shared: Any = ()) -> ClippedSum:
        size = batch_size(examples, "clipped_per_example")
        summed, dropped = clipped_sum(grads(params, *examples, shared=shared), clip)
        return ClippedSum(summed, dropped, size, clip)

    return f


def _varying_axes(tree: Any) -> set:
    """The manual mesh axes along which some leaf of ``tree`` still varies."""
    axes: set = set()
    for x in jax.tree.leaves(tree):
        axes |= _varying(x)
    return axes


def _manual_axes(tree: Any) -> set:
    """The manual (shard_map) axes of the meshes the leaves of ``tree`` are typed on (empty outside
    shard_map)."""
    axes: set = set()
    for x in jax.tree.leaves(tree):
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        for name, kind in zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ())):
            if kind == jax.sharding.AxisType.Manual:
                axes.add(name)
    return axes


def _zeros_typed(s: Any, dtype: Any) -> jax.Array:
    """Zeros of s's shape in ``dtype``, varying across the same manual axes as s (a scan carry inside
    shard_map must keep its type)."""
    z = jnp.zeros(s.shape, dtype)
    axes = _varying(s)
    return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def accumulate(clipped_fn: Callable[..., Any], microbatch_size: int, *, has_aux: bool = False) -> Callable[..., Any]:
    """f(params, *examples, shared=()) -> the ``ClippedSum`` of the whole batch, microbatch by microbatch.

    With B examples (the leading axis of every per-example argument, as for ``clipped_grad``) and
    m = ``microbatch_size``, k = B // m microbatches of m examples run in a ``jax.lax.scan``
    (memory: one microbatch's) and the last B - k m examples, if any, in one more call; the
    results' ``grads`` are added in the accumulation dtype (>= float32) and rounded toward zero to
    the microbatch sums' own dtype (>= float32 from ``clipped_grad``: a no-op), their ``nonfinite``
    counts added; ``batch_size`` is B and
    ``l2_clip_norm`` that of ``clipped_fn``. The sum is sum_b s_b g_b over the whole batch with the
    same per-example weights s_b (module docstring). With ``has_aux``, ``clipped_fn`` returns
    (ClippedSum, aux) with per-example aux (leading axis the microbatch size), and f returns
    (ClippedSum, aux of all B examples in order). Jittable; call it once per logical batch and feed
    the result to ``dp_aggregate`` once.
    """
    m = _check_positive_int("microbatch_size", microbatch_size)
    if not callable(clipped_fn):
        raise TypeError(f"clipped_fn must be callable (e.g. mfnoise.clipped_grad(loss_fn, c)), got {clipped_fn!r}")

    def f(params: Any, *examples: Any, shared: Any = ()) -> Any:
        extra = shared_arguments(shared, "accumulate")
        size = batch_size(examples, "accumulate")
        k, rest = divmod(size, m)

        def call(ex: tuple, rows: int) -> tuple[ClippedSum, Any]:
            s, aux = _clipped(clipped_fn(params, *ex, shared=extra), has_aux, "accumulate")
            if s.batch_size != rows:
                raise ValueError(f"accumulate: the clipped function returned a ClippedSum of batch_size "
                                 f"{s.batch_size} for a microbatch of {rows} examples")
            return s, aux

        head = jax.tree.map(lambda x: jnp.reshape(x[: k * m], (k, m) + tuple(x.shape[1:])), examples)
        tail = jax.tree.map(lambda x: x[k * m:], examples)
        template, _ = jax.eval_shape(lambda ex: call(ex, m if k else rest),
                                     jax.tree.map(lambda x: x[0], head) if k else tail)
        clip = template.l2_clip_norm
        dtypes = jax.tree.map(lambda g: np.dtype(g.dtype), template.grads)
        total = jax.tree.map(lambda g: _zeros_typed(g, accumulation_dtype(g.dtype)), template.grads)
        dropped = _zeros_typed(template.nonfinite, jnp.int32)
        auxes = []

        def add(carry: tuple, s: ClippedSum) -> tuple:
            if s.l2_clip_norm != clip:
                raise ValueError(f"accumulate: microbatches clipped to {s.l2_clip_norm} and {clip}")
            acc, nf = carry
            return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, s.grads), nf + s.nonfinite

        if k:
            def body(carry: tuple, ex: tuple) -> tuple:
                s, aux = call(ex, m)
                return add(carry, s), aux

            (total, dropped), aux = jax.lax.scan(body, (total, dropped), head)
            if has_aux:
                auxes.append(jax.tree.map(lambda a: jnp.reshape(a, (k * m,) + tuple(a.shape[2:])), aux))
        if rest:
            s, aux = call(tail, rest)
            total, dropped = add((total, dropped), s)
            auxes.append(aux)
        grads = jax.tree.map(lambda a, d: toward_zero(a, d), total, dtypes)
        result = ClippedSum(grads, dropped, size, clip)
        if not has_aux:
            return result
        aux = auxes[0] if len(auxes) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *auxes)
        return result, aux

    return f


# -- microbatches arriving one call at a time --------------------------------------------------------


class MultiStepsState(NamedTuple):
    """State of ``multi_steps``: the DP transform's state (stepped once per logical batch), the running
    sum of this logical batch's microbatches (params-shaped, accumulation dtype), its dropped-example
    count, and the index of the next microbatch within the logical batch (0 .. k - 1)."""

    inner: Any
    acc: Any
    nonfinite: jax.Array  # int32
    microbatch: jax.Array  # int32


class MultiStepsTransformation(DPGradientTransformation):
    """A ``DPGradientTransformation`` (``info`` is the wrapped DP transform's) that takes k microbatches
    per logical batch; ``microbatches`` is k."""

    microbatches: int

    def __new__(cls, init: Any, update: Any, info: DPAggregateInfo, microbatches: int) -> MultiStepsTransformation:
        self = cast(MultiStepsTransformation, super().__new__(cls, init, update, info))
        self.microbatches = microbatches
        return self


def _zeros(s: jax.ShapeDtypeStruct) -> jax.Array:
    """Zeros of s's shape and dtype, with s's sharding when its mesh has Explicit axes (so that both
    branches of the ``lax.cond`` have one type)."""
    sharding = getattr(s, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and not sharding.mesh.empty and any(
            t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
        return jnp.zeros(s.shape, s.dtype, out_sharding=sharding)
    return jnp.zeros(s.shape, s.dtype)


def multi_steps(tx: Any, microbatches: int) -> MultiStepsTransformation:
    """Wrap a DP transform so that k = ``microbatches`` calls, one per microbatch, make one logical step.

    ``update(clipped, state, params)`` with ``clipped`` the ``ClippedSum`` of one microbatch (all k of
    the same size m): the sum is kept in the state; on the k-th call the DP transform ``tx`` is
    called once with ``ClippedSum(sum of the k, their nonfinite counts, k m, c)`` and its update is
    returned; on the other calls the update is zero and ``tx``'s state is unchanged (its noise
    generator does not step). So ``tx``'s noise state counts logical batches, the noise is added
    once per logical batch, and ``tx.info`` (strategy, participation, divisor) is unchanged:
    ``expected_batch_size`` stays the logical batch's public constant. ``tx`` must carry a
    ``DPAggregateInfo`` (``dp_aggregate``, ``mf_sgd``, ``plan.transform``). Jittable (the step is a
    ``lax.cond``); the returned transform has ``info`` and ``microbatches``.
    """
    k = _check_positive_int("microbatches", microbatches)
    info = getattr(tx, "info", None)
    if not isinstance(info, DPAggregateInfo):
        raise TypeError(
            "multi_steps wraps a DP transform (mfnoise.dp_aggregate, mf_sgd or plan.transform, whose .info is a "
            f"DPAggregateInfo), got {type(tx).__name__}: accumulating around anything else would add the noise "
            "per microbatch, or not at all"
        )
    seen: list[int] = []  # the microbatch size, fixed by the first call traced

    def init_fn(params: Any) -> MultiStepsState:
        acc = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), accumulation_dtype(p.dtype)), params)
        return MultiStepsState(tx.init(params), acc, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update_fn(updates: Any, state: MultiStepsState, params: Any = None,
                  **extra_args: Any) -> tuple[Any, MultiStepsState]:
        if not isinstance(updates, ClippedSum):
            raise TypeError(
                "multi_steps takes the ClippedSum of one microbatch (mfnoise.clipped_grad or clipped_per_example), "
                f"got {type(updates).__name__}: clip each microbatch's examples first (per-example gradients cannot "
                "be added across microbatches before clipping)"
            )
        if updates.l2_clip_norm != info.l2_clip_norm:
            raise ValueError(f"multi_steps: the ClippedSum was clipped to {updates.l2_clip_norm}, the DP transform's "
                             f"l2_clip_norm is {info.l2_clip_norm}")
        if not seen:
            seen.append(updates.batch_size)
        elif updates.batch_size != seen[0]:
            raise ValueError(
                f"multi_steps: a microbatch of {updates.batch_size} examples after microbatches of {seen[0]}: a "
                f"logical batch is {k} microbatches of one size (pad a ragged last microbatch with zero-weight "
                "examples, e.g. the mask of plan.loss)"
            )
        manual = _manual_axes(updates.grads)
        if manual:
            varying = sorted(_varying_axes((updates.grads, updates.nonfinite)))
            raise ValueError(
                f"multi_steps inside shard_map (manual mesh axes {sorted(manual)}): call the DP transform outside it, "
                "on the reduced sum (mfnoise.training.data_parallel.data_parallel does the per-device clipping and "
                "the one reduction). Inside, each device would add its own noise to its own partial sum"
                + (f" (this ClippedSum still varies across {varying})" if varying else "")
                + ", and with shard_map's default check_vma=True the per-example gradients of replicated params are "
                "already summed over the devices before clipping"
            )
        acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), state.acc, updates.grads)
        nonfinite = state.nonfinite + updates.nonfinite

        def emit(operands: tuple) -> tuple:
            acc, nonfinite, inner = operands
            grads = jax.tree.map(lambda a, g: toward_zero(a, g.dtype), acc, updates.grads)
            logical = ClippedSum(grads, nonfinite, k * updates.batch_size, updates.l2_clip_norm)
            out, inner = tx.update(logical, inner, params, **extra_args)
            zeros = jax.tree.map(jnp.zeros_like, acc)
            return out, inner, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)

        shapes = jax.eval_shape(emit, (acc, nonfinite, state.inner))[0]

        def hold(operands: tuple) -> tuple:
            acc, nonfinite, inner = operands
            out = jax.tree.map(_zeros, shapes)
            return out, inner, acc, nonfinite, state.microbatch + 1

        last = state.microbatch >= k - 1
        out, inner, acc, nonfinite, micro = jax.lax.cond(last, emit, hold, (acc, nonfinite, state.inner))
        return out, MultiStepsState(inner, acc, nonfinite, micro)

    return MultiStepsTransformation(init_fn, update_fn, info, k)
