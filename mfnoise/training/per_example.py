"""Per-example gradients, computed with ``vmap`` in microbatches to bound memory.

``dp_aggregate`` takes per-example gradients (leading batch axis). ``per_example_grads`` computes
them as ``vmap(grad(loss))`` over the batch, ``microbatch_size`` examples at a time
(``jax.lax.map(..., batch_size=microbatch_size)``), so the activations of only one microbatch are
alive at once; the (B, *param.shape) gradients themselves are the output.

Which arguments are per-example (the rule of ``per_example_grads``, ``clipped_grad``,
``clipping_norms``): in ``f(params, *examples, shared=())`` every positional argument after
``params`` is per-example, a pytree whose every leaf has the same leading batch axis B, and row b of
each is example b's; ``shared`` (keyword only) holds the arguments every example sees whole.
``loss_fn(params, *example, *shared)`` is the loss of ONE example. So ``f(params, x, y)`` pairs x[b]
with y[b]; a positional argument without that leading axis (a scalar, a (3,) array with B = 8) is
refused, naming it and its shape, instead of being silently shared by every example.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def batch_size(examples: Sequence[Any], where: str) -> int:
    """The leading batch axis B shared by every leaf of every per-example argument (module docstring).

    Raises ValueError naming the argument (its position after params and its pytree path) and its
    shape when there is none, a leaf is a scalar, or two leaves disagree on B.
    """
    if not examples:
        raise ValueError(f"{where}: no per-example argument: call f(params, examples, ..., shared=(...))")
    first: tuple[str, tuple[int, ...]] | None = None
    hint = ("every positional argument after params is per-example, with a leading batch axis; pass the arguments "
            "that every example shares as shared=(...)")
    for i, arg in enumerate(examples):
        leaves = jax.tree_util.tree_leaves_with_path(arg)
        if not leaves:
            raise ValueError(f"{where}: per-example argument {i + 1} (after params) holds no arrays; {hint}")
        for path, x in leaves:
            shape = tuple(np.shape(x))
            name = f"per-example argument {i + 1} (after params){jax.tree_util.keystr(path)}"
            if not shape:
                raise ValueError(f"{where}: {name} is a scalar (shape ()), it has no batch axis; {hint}")
            if first is None:
                first = (name, shape)
            elif shape[0] != first[1][0]:
                raise ValueError(f"{where}: {name} has shape {shape} but {first[0]} has shape {first[1]}: their "
                                 f"leading (batch) axes differ ({shape[0]} vs {first[1][0]}); {hint}")
    assert first is not None
    return int(first[1][0])


def shared_arguments(shared: Any, where: str) -> tuple[Any, ...]:
    """``shared`` as the tuple of extra loss arguments (a list or tuple; a single non-sequence is refused,
    since a tuple there would be ambiguous with a tuple-valued argument)."""
    if not isinstance(shared, (tuple, list)):
        raise TypeError(f"{where}: shared must be a tuple of the arguments every example shares, got "
                        f"{type(shared).__name__}; write shared=(value,) for one")
    return tuple(shared)


def varying_axes(x: Any) -> frozenset:
    """The manual (shard_map) mesh axes along which x (an array, tracer or ShapeDtypeStruct) varies
    (JAX's varying-manual-axes type: ``manual_axis_type.varying``, formerly ``vma``); empty outside
    ``shard_map`` and under ``check_vma=False``."""
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    varying = getattr(manual, "varying", None) if manual is not None else getattr(aval, "vma", None)
    return frozenset(varying or ())


def check_not_summed_over_devices(params: Any, examples: Any, where: str) -> None:
    """Refuse per-example gradients that JAX would sum over devices.

    Inside ``shard_map`` with ``check_vma=True`` (its default), the gradient with respect to a value
    that does not vary along a manual axis (replicated params, ghost clipping's zero probes) of a loss
    of values that do vary along it is summed over that axis implicitly (the transpose of ``pvary``
    is ``psum``). A "per-example" gradient would then be the sum of one example from each of the D
    devices, clipped as one: an example could move the release by 2c, not c (its own device's slot,
    clipped jointly with D - 1 others), a sensitivity the noise is not scaled for."""
    ex_axes: frozenset = frozenset()
    for x in jax.tree.leaves(examples):
        ex_axes |= varying_axes(x)
    if not ex_axes:
        return
    for p in jax.tree.leaves(params):
        missing = ex_axes - varying_axes(p)
        if missing:
            raise ValueError(
                f"{where}: called inside shard_map with check_vma=True, with examples varying over the manual "
                f"mesh axes {sorted(missing)} along which the params do not vary: JAX would sum their per-example "
                "gradients over the devices (each 'example' a sum of one per device, clipped jointly). Use "
                "mfnoise.data_parallel(clipped_fn, mesh) (a shard_map with check_vma=False, sums reduced once), or "
                "jax.jit with the batch sharded over the data axis"
            )


def per_example_grads(
    loss_fn: Callable[..., jax.Array],
    microbatch_size: int | None = None,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Returns f(params, *examples, shared=()) -> per-example gradients (and aux if ``has_aux``).

    ``loss_fn(params, *example, *shared)`` is the loss of ONE example (no batch axis). Every
    positional argument after params is per-example: a pytree whose leaves share a leading batch
    axis B (checked; the module docstring has the rule); ``shared`` (keyword only) is passed whole to
    every example. The result has, per parameter leaf, shape (B, *param.shape): row b is
    grad loss_fn(params, examples[0][b], examples[1][b], ..., *shared). With ``microbatch_size`` m,
    the examples are processed m at a time (B need not be a multiple of m; m a positive integer).
    Jittable.
    """
    if microbatch_size is not None:
        if isinstance(microbatch_size, (bool, np.bool_)) or not isinstance(microbatch_size, numbers.Integral):
            raise TypeError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}")
        if microbatch_size < 1:
            raise ValueError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}")
        microbatch_size = int(microbatch_size)
    grad_fn = jax.grad(loss_fn, has_aux=has_aux)

    def f(params: Any, *examples: Any, shared: Sequence[Any] = ()) -> Any:
        batch_size(examples, "per_example_grads")
        check_not_summed_over_devices(params, examples, "per_example_grads")
        extra = shared_arguments(shared, "per_example_grads")
        one = lambda example: grad_fn(params, *example, *extra)
        if microbatch_size is None:
            return jax.vmap(one)(examples)
        return jax.lax.map(one, examples, batch_size=microbatch_size)

    return f
