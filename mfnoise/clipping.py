"""Per-example clipping: the clipped sum of per-example gradients, with or without materialising them.

For per-example gradients g_b (b < B) and clipping norm c,

    clipped_sum = sum_b g_b * min(1, c / ||g_b||),   ||g_b|| the global L2 norm over all parameters.

Two ways to compute it, with the same result:

* ``clipped_sum(per_example, c)``: from materialised per-example gradients (B x params), e.g. from
  ``mfnoise.per_example.per_example_grads``. Works for any model; costs B parameter-sized arrays.
* ``clipped_grad(loss_fn, c)``: from the loss, by ghost clipping ("Efficient Per-Example Gradient
  Computations", Goodfellow 2015; "Large Language Models Can Be Strong Differentially Private
  Learners", Li et al. 2022). A weight W used exactly once in the loss, as an operand of a matrix
  product y = h W (any ``dot_general`` without batch dimensions), has per-example gradient
  grad_W l_b = H_b^T G_b with H_b (T x K) the other operand and G_b = dl_b/dy_b (T x M) the output's
  gradient, flattened. Its squared norm needs neither grad_W l_b nor its B copies:

      ||H^T G||_F^2 = ||h||^2 ||g||^2                 (T = 1)
                    = <H H^T, G G^T>_F                (Gram form, T (K + M) < K M)

  and the clipped sum is one matrix product, sum_b s_b H_b^T G_b = H^T diag(s) G. So one forward and
  one backward pass (without the weight gradients) give the norms, and one product per weight gives
  the clipped sum: about the cost of an ordinary minibatch gradient. Every other parameter (biases,
  convolutions, shared or transformed weights, anything inside a control-flow primitive) gets
  materialised per-example gradients in the same backward pass; its norm is added exactly.

Which weights qualify is decided from the loss's jaxpr (``jax.make_jaxpr``), following each
parameter leaf through ``jit`` calls: a leaf qualifies only if its one and only use is as an operand
of a ``dot_general`` whose other operand does not hold a parameter. Any other use (a reshape, a
cast, a second product, a custom_jvp or scan that receives it) sends the leaf to the exact
materialised path, so the norm never misses a contribution.

An example whose gradient has a non-finite entry (so a non-finite squared norm) gets weight 0 and is
counted; ``mfnoise.dp_aggregate`` takes either the per-example gradients or a ``ClippedSum``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.extend as jex
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClippedSum:
    """sum_b clip(g_b) (pytree like the params), the number of dropped non-finite examples, and the
    batch size B and clipping norm it was computed with (static)."""

    grads: Any
    nonfinite: jax.Array  # int32 scalar
    batch_size: int = dataclasses.field(metadata=dict(static=True))
    l2_clip_norm: float = dataclasses.field(metadata=dict(static=True))


def _check_clip_norm(l2_clip_norm: float) -> float:
    value = float(l2_clip_norm)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"l2_clip_norm must be a positive finite number, got {l2_clip_norm}")
    return value


def _accumulation_dtype(*dtypes: Any) -> Any:
    return jnp.result_type(jnp.float32, *dtypes)  # norms in >= float32


def clip_weights(sq: jax.Array, l2_clip_norm: float) -> tuple[jax.Array, jax.Array]:
    """(s, finite) for squared per-example norms sq (B,): s_b = min(1, c / sqrt(sq_b)), 0 if non-finite."""
    finite = jnp.isfinite(sq)
    norm = jnp.sqrt(jnp.where(finite, sq, 0.0))
    scale = jnp.where(finite, jnp.minimum(1.0, l2_clip_norm / jnp.maximum(norm, 1e-30)), 0.0)
    return scale, finite


def _select_rows(finite: jax.Array, x: jax.Array) -> jax.Array:
    keep = finite.reshape((finite.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _weighted_rows(finite: jax.Array, fn: Callable[..., jax.Array], *rows: jax.Array) -> jax.Array:
    """fn(*rows), first zeroing the rows of non-finite examples (NaN * 0 = NaN), only when there are any."""
    fast = lambda: fn(*rows)  # noqa: E731
    slow = lambda: fn(*(_select_rows(finite, r) for r in rows))  # noqa: E731
    return jax.lax.cond(jnp.all(finite), fast, slow)


def _row_squares(x: jax.Array, acc: Any) -> jax.Array:
    """sum of squares of each example's row of x (B, ...), in dtype acc."""
    # no reshapes: merging sharded dimensions is not allowed with Explicit mesh axes
    return jnp.sum(jnp.square(x.astype(acc)), axis=tuple(range(1, x.ndim)))


def _weighted_sum(scale: jax.Array, finite: jax.Array, x: jax.Array) -> jax.Array:
    """sum_b scale_b x_b, non-finite rows dropped."""
    # The weighted sum over examples as a dot (XLA:CPU reduces over a major axis ~30x slower).
    return _weighted_rows(finite, lambda r: jnp.tensordot(scale.astype(r.dtype), r, axes=1), x)


def clipped_sum(per_example: Any, l2_clip_norm: float) -> tuple[Any, jax.Array]:
    """(sum_b clip(g_b), number of non-finite examples) for per-example grads with batch axis 0."""
    leaves = jax.tree.leaves(per_example)
    if not leaves:
        return per_example, jnp.zeros((), jnp.int32)
    acc = _accumulation_dtype(*[x.dtype for x in leaves])
    scale, finite = clip_weights(sum(_row_squares(x, acc) for x in leaves), l2_clip_norm)
    return jax.tree.map(lambda x: _weighted_sum(scale, finite, x), per_example), jnp.sum(~finite).astype(jnp.int32)


# -- which parameter leaves get ghost norms ----------------------------------------------------------

_CALLS = ("jit", "pjit", "closed_call", "core_call")


def _inner(eqn: Any) -> Any | None:
    """The ClosedJaxpr of a call primitive we can see through, else None."""
    if eqn.primitive.name not in _CALLS:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return inner if isinstance(inner, jex.core.ClosedJaxpr) else None


def _is_var(v: Any) -> bool:
    return not isinstance(v, jex.core.Literal)


def _sources(atoms: list, src: dict) -> list[int | None]:
    return [src.get(v) if _is_var(v) else None for v in atoms]


@dataclasses.dataclass(frozen=True)
class Ghost:
    """A parameter leaf whose only use is operand ``operand`` of the product ``eqn`` (a dot_general)."""

    leaf: int
    operand: int
    eqn: Any


class _Walk:
    """Uses of each parameter leaf, found by walking the loss's jaxpr through jit calls.

    A use is ('dot', dot_index, operand) for a dot_general without batch dims whose other operand
    holds no parameter, else ('other',). Dot indices count the dot_general eqns with a parameter
    operand in traversal order; ``_evaluate`` walks in the same order, so the indices agree.
    """

    def __init__(self, num_params: int) -> None:
        self.uses: list[list[tuple]] = [[] for _ in range(num_params)]
        self.eqns: list[Any] = []

    def walk(self, jaxpr: Any, insrc: list[int | None]) -> list[int | None]:
        src: dict[Any, int] = {v: s for v, s in zip(jaxpr.invars, insrc) if s is not None}
        for eqn in jaxpr.eqns:
            eqn_src = _sources(eqn.invars, src)
            if all(s is None for s in eqn_src):
                continue
            inner = _inner(eqn)
            if inner is not None:
                for v, s in zip(eqn.outvars, self.walk(inner.jaxpr, eqn_src)):
                    if s is not None:
                        src[v] = s
                continue
            if eqn.primitive.name == "dot_general":
                index = len(self.eqns)
                self.eqns.append(eqn)
                _, (lb, rb) = eqn.params["dimension_numbers"]
                ghostable = not lb and not rb and sum(s is not None for s in eqn_src) == 1
                for operand, s in enumerate(eqn_src):
                    if s is not None:
                        self.uses[s].append(("dot", index, operand) if ghostable else ("other",))
                continue
            for s in eqn_src:
                if s is not None:
                    self.uses[s].append(("other",))
        return _sources(jaxpr.outvars, src)


def ghost_plan(closed: Any, num_params: int) -> dict[int, Ghost]:
    """{dot_index: Ghost} for the leaves whose one and only use is one ghostable dot_general.

    ``closed`` is the ClosedJaxpr of loss(params, example, ...) whose first ``num_params`` invars are
    the parameter leaves (in ``jax.tree.leaves`` order).
    """
    w = _Walk(num_params)
    out = w.walk(closed.jaxpr, list(range(num_params)) + [None] * (len(closed.jaxpr.invars) - num_params))
    plan = {}
    for leaf, uses in enumerate(w.uses):
        if leaf not in out and len(uses) == 1 and uses[0][0] == "dot":
            _, index, operand = uses[0]
            plan[index] = Ghost(leaf, operand, w.eqns[index])
    return plan


# -- evaluation with probes on the ghost products ----------------------------------------------------


class _Probe:
    """One instrumented evaluation: probes added to the ghost products, and their other operands."""

    def __init__(self, plan: dict[int, Ghost], probes: dict[int, jax.Array]) -> None:
        self.plan = plan
        self.probes = probes
        self.dots = 0
        self.operands: dict[int, jax.Array] = {}


def _evaluate(jaxpr: Any, consts: list, args: list, insrc: list[int | None], probe: _Probe) -> tuple[list, list]:
    """``jax.core.eval_jaxpr`` that adds probes[j] to the j-th ghost product and records its other operand."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    src: dict[Any, int] = {v: s for v, s in zip(jaxpr.invars, insrc) if s is not None}

    def read(v: Any) -> Any:
        return env[v] if _is_var(v) else v.val

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        eqn_src = _sources(eqn.invars, src)
        held = any(s is not None for s in eqn_src)
        inner = _inner(eqn) if held else None
        if inner is not None:
            outs, outsrc = _evaluate(inner.jaxpr, inner.consts, invals, eqn_src, probe)
            src.update((v, s) for v, s in zip(eqn.outvars, outsrc) if s is not None)
        else:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = ans if eqn.primitive.multiple_results else [ans]
            if held and eqn.primitive.name == "dot_general":
                index = probe.dots
                probe.dots += 1
                if index in probe.plan:
                    probe.operands[index] = invals[1 - probe.plan[index].operand]
                    outs = [outs[0] + probe.probes[index]]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars], _sources(jaxpr.outvars, src)


def _flat_operands(h: jax.Array, g: jax.Array, ghost: Ghost) -> tuple[jax.Array, jax.Array]:
    """(H, G) of shapes (T, K), (T, M) for one example: grad_W = H^T G up to an ordering of entries.

    y = dot_general(lhs, rhs) has dims (lhs free..., rhs free...); the weight is operand
    ``ghost.operand``, h the other one, with contracting dims ``hc``.
    """
    (lc, rc), _ = ghost.eqn.params["dimension_numbers"]
    hc = list(rc if ghost.operand == 0 else lc)
    free = [d for d in range(h.ndim) if d not in hc]
    t = math.prod(h.shape[d] for d in free)
    hm = jnp.transpose(h, free + hc).reshape(t, -1)
    m = g.size // t
    gm = g.reshape(t, m) if ghost.operand == 1 else g.reshape(m, t).T
    return hm, gm


def _ghost_sq(h: jax.Array, g: jax.Array, ghost: Ghost, acc: Any) -> jax.Array:
    """||grad_W||_F^2 = ||H^T G||_F^2 for one example, without forming H^T G when that is cheaper."""
    hm, gm = _flat_operands(h.astype(acc), g.astype(acc), ghost)
    t, k = hm.shape
    m = gm.shape[1]
    if t == 1:
        return jnp.sum(jnp.square(hm)) * jnp.sum(jnp.square(gm))
    if t * (k + m) < k * m:
        return jnp.sum((hm @ hm.T) * (gm @ gm.T))
    return jnp.sum(jnp.square(hm.T @ gm))


def _product_vjp(ghost: Ghost, w: jax.Array, h: jax.Array, g: jax.Array, scale: jax.Array) -> jax.Array:
    """sum_b scale_b grad_W <G_b, dot(h_b, W)> = H^T diag(scale) G, as one product (the vjp in W)."""
    params = ghost.eqn.primitive.get_bind_params(ghost.eqn.params)

    def product(weight: jax.Array) -> jax.Array:
        def one(hb: jax.Array) -> jax.Array:
            args = (weight, hb) if ghost.operand == 0 else (hb, weight)
            return ghost.eqn.primitive.bind(*args, **params)

        return jax.vmap(one)(h)

    out, vjp = jax.vjp(product, w)
    weighted = g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
    if jax.typeof(weighted) != jax.typeof(out):
        # Explicit mesh axes: the probe's type (hence g's) lacks the product's sharding
        weighted = jax.sharding.reshard(weighted, jax.typeof(out).sharding)
    return vjp(weighted)[0]


def clipped_grad(
    loss_fn: Callable[..., jax.Array],
    l2_clip_norm: float,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Returns f(params, batch, *args) -> ClippedSum (and the per-example aux if ``has_aux``).

    ``loss_fn(params, example, *args)`` is the loss of ONE example (no batch axis), as for
    ``mfnoise.per_example.per_example_grads``; ``batch`` is a pytree of arrays with a leading batch
    axis B; ``args`` are shared by all examples. The result's ``grads`` equal
    ``clipped_sum(per_example_grads(loss_fn)(params, batch), l2_clip_norm)`` up to float rounding,
    computed by ghost clipping where the loss allows it (module docstring). Jittable.
    """
    clip = _check_clip_norm(l2_clip_norm)

    def f(params: Any, batch: Any, *args: Any) -> Any:
        leaves, treedef = jax.tree.flatten(params)
        batch_leaves = jax.tree.leaves(batch)
        if not batch_leaves:
            raise ValueError("clipped_grad: the batch has no arrays to take the batch size from")
        size = int(batch_leaves[0].shape[0])
        for x in batch_leaves:
            if x.shape[:1] != (size,):
                raise ValueError(f"clipped_grad: batch leaves disagree on the batch size: shape {x.shape}, batch {size}")
        flat_loss = lambda p, ex: loss_fn(jax.tree.unflatten(treedef, p), ex, *args)  # noqa: E731
        one = jax.tree.map(lambda x: x[0], batch)
        closed, out_shape = jax.make_jaxpr(flat_loss, return_shape=True)(leaves, one)
        out_tree = jax.tree.structure(out_shape)
        plan = ghost_plan(closed, len(leaves))
        dense = sorted(set(range(len(leaves))) - {g.leaf for g in plan.values()})

        def single(probes: dict, dense_params: list, example: Any) -> Any:
            flat = list(leaves)
            for i, x in zip(dense, dense_params):
                flat[i] = x
            probe = _Probe(plan, probes)
            invals = flat + jax.tree.leaves(example)
            insrc = list(range(len(leaves))) + [None] * (len(invals) - len(leaves))
            outs, _ = _evaluate(closed.jaxpr, closed.consts, invals, insrc, probe)
            out = jax.tree.unflatten(out_tree, outs)
            value, aux = out if has_aux else (out, None)
            return value, (probe.operands, aux)

        probes = {j: jnp.zeros(g.eqn.outvars[0].aval.shape, g.eqn.outvars[0].aval.dtype) for j, g in plan.items()}
        grad_fn = jax.grad(single, argnums=(0, 1), has_aux=True)
        (g_probe, g_dense), (operands, aux) = jax.vmap(grad_fn, in_axes=(None, None, 0))(
            probes, [leaves[i] for i in dense], batch
        )

        acc = _accumulation_dtype(*[x.dtype for x in leaves])
        sq = jnp.zeros((size,), acc)
        for j, ghost in plan.items():
            sq = sq + jax.vmap(lambda h, g, ghost=ghost: _ghost_sq(h, g, ghost, acc))(operands[j], g_probe[j])
        for x in g_dense:
            sq = sq + _row_squares(x, acc)
        scale, finite = clip_weights(sq, clip)

        out = list(leaves)
        for i, x in zip(dense, g_dense):
            out[i] = _weighted_sum(scale, finite, x)
        for j, ghost in plan.items():
            fn = lambda h, g, ghost=ghost: _product_vjp(ghost, leaves[ghost.leaf], h, g, scale)  # noqa: E731
            out[ghost.leaf] = _weighted_rows(finite, fn, operands[j], g_probe[j])
        result = ClippedSum(jax.tree.unflatten(treedef, out), jnp.sum(~finite).astype(jnp.int32), size, clip)
        return (result, aux) if has_aux else result

    return f
