"""Which parameter leaves ``clipped_grad`` handles by ghost norms: a walk of the loss's jaxpr.

The loss of one example is traced (``jax.make_jaxpr``) and each parameter leaf is followed through
``jit`` calls and ``transpose`` (a relabelling of the leaf's entries: a transposed leaf is a *view*
of it, with the permutation recorded). A *site* is an equation with a parameter operand of one of the
kinds whose per-example gradient has a ghost form:

* ``dot_general`` (with or without batch dimensions) whose other operand is not a parameter (nor a
  view of one): y = dot(h, W), per example grad_W = H^T G per batch index ("Large Language Models
  Can Be Strong Differentially Private Learners", Li et al. 2022, arXiv:2110.05679);
* an embedding lookup, a ``gather`` that takes whole rows of the leaf E (V x ...) at integer
  indices that are not parameters (``E[ids]``, ``jnp.take(E, ids, axis=0)``): per example
  grad_E = sum_t e_{x_t} g_t^T ("Differentially Private Optimization on Large Model at Small Cost",
  Bu et al. 2023, arXiv:2210.00038, book-keeping);
* a convolution whose kernel is the leaf (not a view) and whose input is not a parameter, with one
  feature group and one batch group: per example grad_W = H^T G with H the input's patches
  (``mfnoise.training.ghost_conv``).

A leaf goes the ghost way only if EVERY use of it (and of its views) is such a site; any other use (a
reshape, a cast, an elementwise op, a product with another parameter, a custom_jvp / custom_vjp /
checkpoint / scan / cond / while that receives it, being an output) sends it to the exact
materialised path, so the norm never misses a contribution. Sites are numbered in traversal order;
``evaluate`` walks in the same order, so the numbers agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp

from mfnoise.training.ghost_conv import is_conv

_CALLS = ("jit", "pjit", "closed_call", "core_call")
_LOOKUP_MODES = (
    jax.lax.GatherScatterMode.CLIP,
    jax.lax.GatherScatterMode.FILL_OR_DROP,
    jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
)

# the primitives that may be sites: walk and evaluate number every such equation with a parameter
# operand in the same order, sites or not
_SITE_PRIMITIVES = ("dot_general", "gather", "conv_general_dilated")

Source = tuple[int, "tuple[int, ...] | None"]  # (leaf, permutation of the view, None for the leaf itself)


def _inner(eqn: Any) -> Any | None:
    """The ClosedJaxpr of a call primitive we can see through, else None."""
    if eqn.primitive.name not in _CALLS:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return inner if isinstance(inner, jex.core.ClosedJaxpr) else None


def _is_var(v: Any) -> bool:
    return not isinstance(v, jex.core.Literal)


def _sources(atoms: list, src: dict) -> list[Source | None]:
    return [src.get(v) if _is_var(v) else None for v in atoms]


def _view(eqn: Any, eqn_src: list[Source | None]) -> Source | None:
    """The source of a transpose's output when its input is a leaf or a view of one, else None:
    y = transpose(x, p) has y.shape[i] = x.shape[p[i]]; with x = transpose(leaf, q), y = transpose(leaf, r),
    r[i] = q[p[i]]."""
    if eqn.primitive.name != "transpose" or eqn_src[0] is None:
        return None
    leaf, q = eqn_src[0]
    p = tuple(eqn.params["permutation"])
    return leaf, p if q is None else tuple(q[i] for i in p)


def is_lookup(eqn: Any) -> bool:
    """Whether a gather takes whole rows of its operand E (V, *rest) at integer indices (..., 1):
    output (..., *rest), row ids in the indices (clamped, or dropped in FILL_OR_DROP mode)."""
    if eqn.primitive.name != "gather":
        return False
    dn = eqn.params["dimension_numbers"]
    shape = tuple(eqn.invars[0].aval.shape)
    out = tuple(eqn.outvars[0].aval.shape)
    idx = eqn.invars[1].aval
    r = len(shape)
    return (
        r >= 1
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(dn.operand_batching_dims)
        and not tuple(dn.start_indices_batching_dims)
        and tuple(eqn.params["slice_sizes"]) == (1,) + shape[1:]
        and tuple(dn.offset_dims) == tuple(range(len(out) - (r - 1), len(out)))
        and eqn.params["mode"] in _LOOKUP_MODES
        and len(idx.shape) >= 1
        and idx.shape[-1] == 1
        and jnp.issubdtype(idx.dtype, jnp.integer)
    )


def lookup_rows(eqn: Any, indices: jax.Array) -> jax.Array:
    """(T,) int32: the row of E each of the T gathered slices is, as the gather itself resolves the
    indices (the same gather applied to the row numbers 0..V-1: clamped where it clamps), -1 where it
    fills (an out-of-bounds index in FILL_OR_DROP mode: that slice has no gradient)."""
    shape = eqn.invars[0].aval.shape
    iota = jax.lax.broadcasted_iota(jnp.int32, (shape[0],) + (1,) * (len(shape) - 1), 0)
    rows = jax.lax.gather(
        iota,
        indices,
        eqn.params["dimension_numbers"],
        (1,) * len(shape),
        indices_are_sorted=eqn.params["indices_are_sorted"],
        unique_indices=eqn.params["unique_indices"],
        mode=eqn.params["mode"],
        fill_value=-1,
    )
    return rows.reshape(-1)


@dataclasses.dataclass(frozen=True)
class _Ghost:
    """A ghost site: operand ``operand`` of ``eqn`` is parameter leaf ``leaf`` (or, where ``perm`` is
    set, its view transpose(leaf, perm)); ``kind`` is "dot" (a dot_general), "lookup" (a gather) or
    "conv" (a conv_general_dilated, the leaf its kernel)."""

    leaf: int
    operand: int
    eqn: Any
    kind: str = "dot"
    perm: tuple[int, ...] | None = None


class _Walk:
    """Uses of each parameter leaf, found by walking the loss's jaxpr through jit calls (module docstring).

    A use is ("site", site_index, operand, perm, kind) for a ghost site, else ("other",).
    """

    def __init__(self, num_params: int) -> None:
        self.uses: list[list[tuple]] = [[] for _ in range(num_params)]
        self.eqns: list[Any] = []

    def walk(self, jaxpr: Any, insrc: list[Source | None]) -> list[Source | None]:
        src: dict[Any, Source] = {v: s for v, s in zip(jaxpr.invars, insrc) if s is not None}
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
            view = _view(eqn, eqn_src)
            if view is not None:
                src[eqn.outvars[0]] = view
                continue
            name = eqn.primitive.name
            if name in _SITE_PRIMITIVES:
                index = len(self.eqns)
                self.eqns.append(eqn)
                single = sum(s is not None for s in eqn_src) == 1
                for operand, s in enumerate(eqn_src):
                    if s is None:
                        continue
                    leaf, perm = s
                    if name == "dot_general" and single:
                        self.uses[leaf].append(("site", index, operand, perm, "dot"))
                    elif name == "gather" and operand == 0 and single and perm is None and is_lookup(eqn):
                        self.uses[leaf].append(("site", index, operand, perm, "lookup"))
                    elif name == "conv_general_dilated" and operand == 1 and single and perm is None and is_conv(eqn):
                        self.uses[leaf].append(("site", index, operand, perm, "conv"))
                    else:
                        self.uses[leaf].append(("other",))
                continue
            for s in eqn_src:
                if s is not None:
                    self.uses[s[0]].append(("other",))
        return _sources(jaxpr.outvars, src)


def ghost_plan(closed: Any, num_params: int) -> dict[int, _Ghost]:
    """{site_index: _Ghost} for the leaves every use of which is a ghost site (module docstring).

    ``closed`` is the ClosedJaxpr of loss(params, example, ...) whose first ``num_params`` invars are
    the parameter leaves (in ``jax.tree.leaves`` order). A leaf may have several sites (tied weights).
    """
    w = _Walk(num_params)
    insrc: list[Source | None] = [(i, None) for i in range(num_params)]
    out = w.walk(closed.jaxpr, insrc + [None] * (len(closed.jaxpr.invars) - num_params))
    returned = {s[0] for s in out if s is not None}
    plan = {}
    for leaf, uses in enumerate(w.uses):
        if leaf in returned or not uses or any(u[0] != "site" for u in uses):
            continue
        for _, index, operand, perm, kind in uses:
            plan[index] = _Ghost(leaf, operand, w.eqns[index], kind, perm)
    return plan


def restrict(plan: dict[int, _Ghost], keep: Any) -> dict[int, _Ghost]:
    """The plan's sites of the leaves all of whose sites satisfy ``keep`` (a leaf goes ghost only whole)."""
    bad = {g.leaf for g in plan.values() if not keep(g)}
    return {j: g for j, g in plan.items() if g.leaf not in bad}


# -- evaluation with probes on the ghost sites -------------------------------------------------------


class _Probe:
    """One instrumented evaluation: probes added to the ghost sites' outputs, and what each site's
    gradient needs recorded (a product's other operand; a lookup's resolved row ids)."""

    def __init__(self, plan: dict[int, _Ghost], probes: dict[int, jax.Array]) -> None:
        self.plan = plan
        self.probes = probes
        self.sites = 0
        self.operands: dict[int, jax.Array] = {}


def evaluate(jaxpr: Any, consts: list, args: list, insrc: list[Source | None], probe: _Probe) -> tuple[list, list]:
    """``jax.core.eval_jaxpr`` that adds probes[j] to the j-th site's output and records its operand."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    src: dict[Any, Source] = {v: s for v, s in zip(jaxpr.invars, insrc) if s is not None}

    def read(v: Any) -> Any:
        return env[v] if _is_var(v) else v.val

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        eqn_src = _sources(eqn.invars, src)
        held = any(s is not None for s in eqn_src)
        inner = _inner(eqn) if held else None
        if inner is not None:
            outs, outsrc = evaluate(inner.jaxpr, inner.consts, invals, eqn_src, probe)
            src.update((v, s) for v, s in zip(eqn.outvars, outsrc) if s is not None)
        else:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = ans if eqn.primitive.multiple_results else [ans]
            view = _view(eqn, eqn_src) if held else None
            if view is not None:
                src[eqn.outvars[0]] = view
            elif held and eqn.primitive.name in _SITE_PRIMITIVES:
                index = probe.sites
                probe.sites += 1
                ghost = probe.plan.get(index)
                if ghost is not None:
                    if ghost.kind == "lookup":
                        probe.operands[index] = lookup_rows(eqn, invals[1])
                    elif ghost.kind == "conv":
                        probe.operands[index] = invals[0]
                    else:
                        probe.operands[index] = invals[1 - ghost.operand]
                    outs = [outs[0] + probe.probes[index]]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars], _sources(jaxpr.outvars, src)
