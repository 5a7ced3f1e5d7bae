"""Which arguments are per-example: f(params, *examples, shared=()) for clipped_grad, per_example_grads
and clipping_norms (mfnoise/training/per_example.py states the rule).

The references are computed independently: a linear model's per-example gradients in closed form
(float64 numpy: loss = (x.w + b - y)^2 s gives grad_w = 2 r s x, grad_b = 2 r s with r = x.w + b - y),
clipped one example at a time in a Python loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfnoise.training.clipping import clipped_grad, clipping_norms, ghost_leaves
from mfnoise.training.per_example import batch_size, per_example_grads

B, D = 8, 5


def loss(params, x, y, scale=1.0):
    """The loss of ONE example: x (D,), y () ."""
    return scale * (x @ params["w"] + params["b"] - y) ** 2


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D))
    y = rng.normal(size=(B,)) * 3
    params = {"w": rng.normal(size=(D,)), "b": np.array(0.3)}
    return x, y, params


def _per_example(x, y, params, scale=1.0) -> dict[str, np.ndarray]:
    """Per-example gradients in float64 from the closed form, one example at a time."""
    gw, gb = [], []
    for b in range(x.shape[0]):
        r = float(x[b] @ params["w"] + params["b"] - y[b])
        gw.append(2 * r * scale * x[b])
        gb.append(2 * r * scale)
    return {"w": np.array(gw), "b": np.array(gb)}


def _norms(g: dict[str, np.ndarray]) -> np.ndarray:
    return np.sqrt(np.sum(g["w"] ** 2, axis=1) + g["b"] ** 2)


def _clipped(x, y, params, clip: float, scale=1.0) -> dict[str, np.ndarray]:
    """The clipped sum sum_b min(1, clip / ||g_b||) g_b of ``_per_example``."""
    g = _per_example(x, y, params, scale)
    s = np.minimum(1.0, clip / _norms(g))
    return {"w": (s[:, None] * g["w"]).sum(0), "b": np.array((s * g["b"]).sum())}


def _f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_per_example_y_gives_the_per_example_loop():
    x, y, params = _data()
    want = _per_example(x, y, params)
    got = jax.jit(per_example_grads(loss))(_f32(params), _f32(x), _f32(y))
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-5)
    got = per_example_grads(loss, microbatch_size=3)(_f32(params), _f32(x), _f32(y))
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [0.5, 1e3])  # most examples clipped / none clipped
def test_clipped_grad_with_per_example_y_equals_the_clipped_loop(clip):
    x, y, params = _data(1)
    want = _clipped(x, y, params, clip)
    got = jax.jit(clipped_grad(loss, clip))(_f32(params), _f32(x), _f32(y))
    assert got.batch_size == B and int(got.nonfinite) == 0
    # Over-clipping (norm bounds slightly above the true norm) is at most ~1e-4 relative here.
    for k in want:
        np.testing.assert_allclose(np.asarray(got.grads[k]), want[k], rtol=1e-3, atol=1e-5)
    norms = np.asarray(clipping_norms(loss, clip)(_f32(params), _f32(x), _f32(y)))
    exact = _norms(_per_example(x, y, params))
    assert np.all(norms >= exact * (1 - 1e-6)) and np.all(norms <= exact * 1.01)


def test_shared_arguments_are_passed_whole_to_every_example():
    x, y, params = _data(2)
    scale = np.array(0.25)  # shared: the loss of example b is scale * r_b^2
    want = _clipped(x, y, params, 0.7, scale=0.25)
    got = clipped_grad(loss, 0.7)(_f32(params), _f32(x), _f32(y), shared=(_f32(scale),))
    for k in want:
        np.testing.assert_allclose(np.asarray(got.grads[k]), want[k], rtol=1e-3, atol=1e-5)
    want_pe = _per_example(x, y, params, scale=0.25)
    got_pe = jax.jit(per_example_grads(loss))(_f32(params), _f32(x), _f32(y), shared=[_f32(scale)])
    np.testing.assert_allclose(np.asarray(got_pe["w"]), want_pe["w"], rtol=2e-5, atol=1e-5)


def test_a_shared_array_of_batch_length_is_shared_only_when_said():
    # A (B,) array that every example should see whole: as a positional argument it would be
    # per-example; through shared= each loss gets all of it.
    x, y, params = _data(3)
    weights = np.linspace(0.5, 1.5, B)

    def weighted(params, x, y, weights):
        return jnp.mean(weights) * (x @ params["w"] + params["b"] - y) ** 2

    got = per_example_grads(weighted)(_f32(params), _f32(x), _f32(y), shared=(_f32(weights),))
    want = _per_example(x, y, params, scale=float(np.mean(weights)))
    np.testing.assert_allclose(np.asarray(got["w"]), want["w"], rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: clipped_grad(loss, 1.0),
    lambda: clipping_norms(loss, 1.0),
    lambda: per_example_grads(loss),
])
def test_the_ambiguous_call_is_refused_naming_the_argument_and_its_shape(make):
    x, y, params = _data()
    f = make()
    # y of another length than the batch: it was silently shared by every example before.
    with pytest.raises(ValueError, match=r"per-example argument 2 \(after params\) has shape \(3,\).*"
                                         r"argument 1 \(after params\) has shape \(8, 5\).*shared="):
        f(_f32(params), _f32(x), _f32(y[:3]))
    # A scalar has no batch axis: refused, not broadcast.
    with pytest.raises(ValueError, match=r"per-example argument 2 \(after params\) is a scalar.*shared="):
        f(_f32(params), _f32(x), 0.5)
    # Inside a pytree argument the path is named.
    with pytest.raises(ValueError, match=r"argument 1 \(after params\)\['y'\] has shape \(3,\)"):
        f(_f32(params), {"x": _f32(x), "y": _f32(y[:3])})
    with pytest.raises(ValueError, match="no per-example argument"):
        f(_f32(params))


def test_shared_must_be_a_tuple():
    x, y, params = _data()
    with pytest.raises(TypeError, match=r"shared must be a tuple.*shared=\(value,\)"):
        clipped_grad(loss, 1.0)(_f32(params), _f32(x), _f32(y), shared=_f32(np.array(0.5)))


def test_ghost_leaves_takes_one_examples_arguments():
    # One example's arguments, as separate positional arguments or as one tuple: the same answer.
    p = {"W": jnp.zeros((16, 16), jnp.float32)}
    x, t = jnp.ones((2, 16), jnp.float32), jnp.zeros((2, 16), jnp.float32)

    def two(p, x, t):
        return jnp.sum((x @ p["W"] - t) ** 2)

    assert ghost_leaves(two, p, x, t) == ghost_leaves(lambda p, ex: two(p, *ex), p, (x, t)) == ["['W']"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(0, 3))
def test_batch_size_is_the_common_leading_axis_or_refused(sizes, extra_dims):
    examples = [np.zeros((s,) + (2,) * extra_dims) for s in sizes]
    if len(set(sizes)) == 1:
        assert batch_size(examples, "t") == sizes[0]
    else:
        bad = next(i for i, s in enumerate(sizes) if s != sizes[0])
        with pytest.raises(ValueError, match=rf"argument {bad + 1} \(after params\) has shape"):
            batch_size(examples, "t")
