"""Per-example gradients, computed with ``vmap`` in microbatches to bound memory.

``dp_aggregate`` takes per-example gradients (leading batch axis). ``per_example_grads`` computes
them as ``vmap(grad(loss))`` over the batch, ``microbatch_size`` examples at a time
(``jax.lax.map(..., batch_size=microbatch_size)``), so the activations of only one microbatch are
alive at once; the (B, *param.shape) gradients themselves are the output.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def per_example_grads(
    loss_fn: Callable[..., jax.Array],
    microbatch_size: int | None = None,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Returns f(params, batch, *args) -> per-example gradients (and aux if ``has_aux``).

    ``loss_fn(params, example, *args)`` is the loss of ONE example (no batch axis); ``batch`` is a
    pytree whose leaves have a leading batch axis B. The result has, per parameter leaf, shape
    (B, *param.shape): row b is grad loss_fn(params, batch[b]). With ``microbatch_size`` m, the
    examples are processed m at a time (B need not be a multiple of m; m a positive integer). Jittable.
    """
    if microbatch_size is not None:
        if isinstance(microbatch_size, (bool, np.bool_)) or not isinstance(microbatch_size, numbers.Integral):
            raise TypeError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}")
        if microbatch_size < 1:
            raise ValueError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}")
        microbatch_size = int(microbatch_size)
    grad_fn = jax.grad(loss_fn, has_aux=has_aux)

    def f(params: Any, batch: Any, *args: Any) -> Any:
        one = lambda example: grad_fn(params, example, *args)
        if microbatch_size is None:
            return jax.vmap(one)(batch)
        return jax.lax.map(one, batch, batch_size=microbatch_size)

    return f
