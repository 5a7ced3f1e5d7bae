"""Data parallelism: the batch split over a mesh's data axis, clipped per device, summed, noised once.

With D devices along the data axis (or axes) and a global batch of B examples (B divisible by D),
device d holds examples [d B / D, (d + 1) B / D) and computes the ``ClippedSum`` of its shard with
the full parameters; the D sums are added (``jax.lax.psum``, in the accumulation dtype, >= float32)
and rounded toward zero to the per-device sums' dtype (>= float32 from ``clipped_grad``, for bfloat16
params too: the sum is never rounded to bfloat16 before the noise):

    sum_d sum_{b in shard d} clip_c(g_b) = sum_{b < B} clip_c(g_b)

the clipped sum of the whole batch, with every example clipped by the weight it would get on one
device (clipping is per example). The noise is then added once, to that global sum, by
``dp_aggregate`` outside the ``shard_map`` (one generator, one step, one draw of (C'^{-1} W)_t for
the whole mesh, its state sharded like the params, or across every device with
``state_sharding="all_devices"``: ZeRO style, for replicated params); the divisor and the accounting
are those of the one-device run (docs/design.md, "Accumulation and data parallelism"). The sum
differs from the one-device sum only in the order of its B terms: per entry by at most
2 gamma_B sum_b s_b |g_b,i|, and not at all where the partial sums are exact.

``data_parallel(clipped_fn, mesh, axis="data")`` returns f(params, *examples, shared=()) ->
``ClippedSum`` that does this with ``jax.shard_map`` manual over the data axis only (other mesh
axes, e.g. a "model" axis the params are sharded over, stay automatic). Compose it with
``mfnoise.training.accumulation.accumulate`` (``data_parallel(accumulate(clipped_grad(loss, c),
m), mesh)``) to accumulate microbatches on each device.

Two traps this avoids. (1) Inside ``shard_map`` (with its default ``check_vma=True``) JAX types
the replicated params, and any constant such as the zero probes ghost clipping differentiates
against, as invariant across the data axis, and the gradient with respect to an invariant value is
summed over the devices automatically (the transpose of its implicit ``pvary`` is a ``psum``): the
per-example gradients (or output gradients) taken there are the sums of the D devices' b-th
examples, clipped together, so one clipped "example" holds D real ones (dp_sharded_worker.py shows
the sum coming out wrong). ``data_parallel`` runs its ``shard_map`` with ``check_vma=False``, where
no gradient is reduced implicitly: each device's per-example gradients are its own examples', and
the clipped sums are reduced once, explicitly. (2) The noise is never added inside the
``shard_map``, where each device would add its own; ``multi_steps`` refuses a ``ClippedSum`` that
still varies across a manual axis.

The plain alternative, ``jax.jit`` of ``clipped_grad`` with the batch sharded over the data axis
(no ``shard_map``), also computes the global clipped sum (XLA partitions the batch reductions);
``data_parallel`` makes the per-device clipping and the one reduction explicit.

Mesh axes may be Auto or Explicit (``jax.sharding.AxisType``); with Explicit axes the examples are
resharded to the data axis if they are not already, and params split over the data axis are
gathered over it (their other axes kept).
Works across processes (``jax.distributed``) as on one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec

from mfnoise.training.accumulation import _clipped, accumulation_dtype, toward_zero
from mfnoise.training.clipping import ClippedSum
from mfnoise.training.per_example import batch_size, shared_arguments


def _axes(mesh: Any, axis: Any) -> tuple[str, ...]:
    axes: tuple[str, ...] = (axis,) if isinstance(axis, str) else tuple(axis)
    if not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"axis must be a mesh axis name or a tuple of them, got {axis!r}")
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"data axis {missing} is not an axis of the mesh (axes {tuple(mesh.axis_names)})")
    return axes


def _explicit(mesh: Any) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _replicated_over(x: Any, axes: tuple[str, ...]) -> Any:
    """x resharded (Explicit axes) so that no dimension is split over ``axes`` (other axes kept)."""
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    if spec is None:
        return x

    def keep(entry: Any) -> Any:
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n is not None and n not in axes)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    new = PartitionSpec(*(keep(e) for e in spec))
    return x if tuple(new) == tuple(spec) else jax.sharding.reshard(x, new)


def data_parallel(clipped_fn: Callable[..., Any], mesh: jax.sharding.Mesh, *, axis: str | tuple[str, ...] = "data",
                  has_aux: bool = False) -> Callable[..., Any]:
    """f(params, *examples, shared=()) -> the ``ClippedSum`` of the global batch, clipped shard by shard.

    ``clipped_fn(params, *examples, shared=())`` returns a ``ClippedSum`` (``mfnoise.clipped_grad``,
    ``accumulation.clipped_per_example`` or ``accumulation.accumulate`` of either); ``mesh`` a
    ``jax.sharding.Mesh``; ``axis`` the data axis name (or names). Every per-example argument's
    leading axis B (the global batch) must be divisible by the number of devices D along ``axis``;
    each device runs ``clipped_fn`` on its B / D examples with the whole params (replicated over
    ``axis``; sharded over other axes as they are) and the shared arguments, and the D results'
    grads and nonfinite counts are summed over ``axis``. Result: ``ClippedSum(sum, dropped, B, c)``,
    replicated over ``axis``, its grads in the per-device sums' dtype (rounded toward zero from the
    accumulation dtype; >= float32 from ``clipped_grad``).
    With ``has_aux``, ``clipped_fn`` returns (ClippedSum, per-example aux) and f
    returns (ClippedSum, aux of all B examples, sharded over ``axis``). Feed the result to
    ``dp_aggregate`` once per step, under the same ``jax.jit``: the noise is added once. Jittable.
    """
    if not callable(clipped_fn):
        raise TypeError(f"clipped_fn must be callable (e.g. mfnoise.clipped_grad(loss_fn, c)), got {clipped_fn!r}")
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    axes = _axes(mesh, axis)
    devices = math.prod(mesh.shape[a] for a in axes)
    name: Any = axes[0] if len(axes) == 1 else axes  # P("data") for one axis, P(("a", "b")) for several
    spec = PartitionSpec(name)

    def f(params: Any, *examples: Any, shared: Any = ()) -> Any:
        extra = shared_arguments(shared, "data_parallel")
        size = batch_size(examples, "data_parallel")
        if size % devices:
            raise ValueError(
                f"data_parallel: the batch of {size} examples does not split over the {devices} devices of mesh axis "
                f"{name!r}; pad it to a multiple of {devices} with zero-weight examples "
                "(e.g. the mask of plan.loss), whose contributions are exact zeros"
            )
        if _explicit(mesh):
            examples = jax.tree.map(lambda x: jax.sharding.reshard(x, spec), examples)
            params = jax.tree.map(lambda x: _replicated_over(x, axes), params)
        seen: dict[str, Any] = {}

        def local(params: Any, examples: tuple, extra: tuple) -> Any:
            s, aux = _clipped(clipped_fn(params, *examples, shared=extra), has_aux, "data_parallel")
            if s.batch_size != size // devices:
                raise ValueError(f"data_parallel: the clipped function returned a ClippedSum of batch_size "
                                 f"{s.batch_size} for a shard of {size // devices} examples")
            seen["clip"] = s.l2_clip_norm
            seen["dtypes"] = jax.tree.map(lambda g: g.dtype, s.grads)
            sums = jax.tree.map(lambda g: jax.lax.psum(g.astype(accumulation_dtype(g.dtype)), axes), s.grads)
            dropped = jax.lax.psum(s.nonfinite, axes)
            return (sums, dropped, aux) if has_aux else (sums, dropped)

        out_specs = (PartitionSpec(), PartitionSpec(), spec) if has_aux else (PartitionSpec(), PartitionSpec())
        in_specs = (PartitionSpec(), jax.tree.map(lambda _: spec, examples), PartitionSpec())
        # check_vma=False: no implicit psum of gradients with respect to replicated values (module docstring)
        out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                            axis_names=frozenset(axes), check_vma=False)(params, examples, extra)
        sums, dropped = out[0], out[1]
        grads = jax.tree.map(lambda g, d: toward_zero(g, d), sums, seen["dtypes"])
        result = ClippedSum(grads, dropped, size, seen["clip"])
        return (result, out[2]) if has_aux else result

    return f
