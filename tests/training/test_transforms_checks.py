"""dp_aggregate / mf_sgd / correlated_noise refuse what would train silently wrong or non-privately.

Issue 10: bad clip norms and noise multipliers (item 5), gradients without a per-example axis
(item 4), the expected batch size (item 3), and bfloat16 parameters (item 10).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfnoise
from mfnoise.training.clipping import ClippedSum
from mfnoise.training.transforms import NonPrivateWarning

N = 8
PART = mfnoise.Participation.epochs(N, 2)
SHAPES = {"w": (3, 4), "b": (4,)}
EXPECTS = r"expects per-example gradients \(B, \*param.shape\) or a ClippedSum"


def params(dtype=jnp.float32, shapes=SHAPES):
    return {k: jnp.zeros(v, dtype) for k, v in shapes.items()}


def per_example(batch=5, dtype=jnp.float32, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=(batch, *v)), dtype) for k, v in shapes.items()}


def agg(clip=1.0, sigma=1.0, strategy=None, **kw):
    kw.setdefault("participation", PART)
    kw.setdefault("expected_batch_size", 5)
    return mfnoise.dp_aggregate(strategy or mfnoise.bsr(N, 2), clip, sigma, 0, **kw)


def sgd(clip=1.0, sigma=1.0, **kw):
    kw.setdefault("participation", PART)
    kw.setdefault("expected_batch_size", 5)
    return mfnoise.mf_sgd(mfnoise.bsr(N, 2), 0.1, clip, sigma, 0, **kw)


# -- item 5: clip norm, noise multiplier, stddev ------------------------------------------------------

BAD_CLIPS = [0.0, -0.0, -1.0, -1e-30, math.nan, math.inf, -math.inf]
BAD_NOISE = [-1.0, -1e-30, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("clip", BAD_CLIPS)
@pytest.mark.parametrize("make", [agg, sgd])
def test_bad_clip_norm_is_refused_by_name(make, clip):
    with pytest.raises(ValueError, match=r"l2_clip_norm must be a positive finite number, got"):
        make(clip=clip)


@pytest.mark.parametrize("sigma", BAD_NOISE)
@pytest.mark.parametrize("make", [agg, sgd])
def test_bad_noise_multiplier_is_refused_by_name(make, sigma):
    with pytest.raises(ValueError, match=r"noise_multiplier must be a non-negative finite number, got"):
        make(sigma=sigma)
    with pytest.raises(ValueError, match=r"noise_multiplier must be a non-negative finite number"):
        make(sigma=sigma, allow_non_private=True)  # the opt-in is for zero only


def test_clip_and_noise_minus_one_no_longer_flip_the_gradient():
    """Old: clip -1 with z -1 was accepted and the update pointed against the gradient."""
    with pytest.raises(ValueError, match="l2_clip_norm"):
        agg(clip=-1.0, sigma=-1.0)


@pytest.mark.parametrize("make", [agg, sgd])
def test_zero_noise_needs_the_opt_in_and_marks_the_run(make):
    with pytest.raises(ValueError, match=r"noise_multiplier=0.0 adds no noise.*allow_non_private=True"):
        make(sigma=0.0)
    with pytest.warns(NonPrivateWarning, match="NOT differentially private"):
        tx = make(sigma=0.0, allow_non_private=True)
    assert tx.info.private is False and tx.info.noise_multiplier == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make(sigma=0.5, allow_non_private=True).info.private is True  # opt-in without zero: no warning


@pytest.mark.parametrize("stddev", BAD_NOISE)
def test_correlated_noise_stddev_is_checked(stddev):
    with pytest.raises(ValueError, match=r"stddev must be a non-negative finite number, got"):
        mfnoise.correlated_noise(mfnoise.bsr(N, 2), stddev, 0)


def test_correlated_noise_zero_stddev_needs_the_opt_in():
    with pytest.raises(ValueError, match=r"stddev=0 adds no noise.*allow_non_private=True"):
        mfnoise.correlated_noise(mfnoise.bsr(N, 2), 0, 0)
    with pytest.warns(NonPrivateWarning):
        tx = mfnoise.correlated_noise(mfnoise.bsr(N, 2), 0.0, 0, allow_non_private=True)
    g = params()
    g = {k: v + 1.0 for k, v in g.items()}
    u, _ = tx.update(g, tx.init(params()))
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(g[k]))


@pytest.mark.parametrize("name,kwargs", [
    ("l2_clip_norm", dict(clip="1.0")),
    ("l2_clip_norm", dict(clip=True)),
    ("noise_multiplier", dict(sigma=None)),
    ("noise_multiplier", dict(sigma=np.bool_(True))),
    ("allow_non_private", dict(allow_non_private="yes")),
])
def test_non_numbers_are_refused_by_name(name, kwargs):
    with pytest.raises(TypeError, match=name):
        agg(**kwargs)


def test_traced_values_are_refused():
    """A traced clip norm, noise multiplier or batch size is not a public constant."""
    for kw in (dict(clip=jnp.float32(1.0)), dict(sigma=jnp.float32(1.0)), dict(expected_batch_size=jnp.float32(4))):
        name = {"clip": "l2_clip_norm", "sigma": "noise_multiplier"}.get(next(iter(kw)), next(iter(kw)))

        def build(x, kw=kw):
            agg(**{k: x for k in kw})
            return x

        with pytest.raises(TypeError, match=f"{name} must be a concrete public constant"):
            jax.jit(build)(next(iter(kw.values())))


# -- item 3: expected_batch_size -----------------------------------------------------------------------


def test_expected_batch_size_is_required():
    with pytest.raises(TypeError, match="expected_batch_size"):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 2), 1.0, 1.0, 0, participation=PART)
    with pytest.raises(TypeError, match="expected_batch_size"):
        mfnoise.mf_sgd(mfnoise.bsr(N, 2), 0.1, 1.0, 1.0, 0, participation=PART)
    with pytest.raises(TypeError):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 2), 1.0, 1.0, 0, PART, 4)  # keyword-only


@pytest.mark.parametrize("bad", [0, 0.0, -4, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("make", [agg, sgd])
def test_bad_expected_batch_size_is_refused_by_name(make, bad):
    with pytest.raises(ValueError, match=r"expected_batch_size must be a positive finite public constant.*got"):
        make(expected_batch_size=bad)


@pytest.mark.parametrize("bad", [True, "16", [16]])
def test_expected_batch_size_must_be_a_number(bad):
    with pytest.raises(TypeError, match="expected_batch_size must be a number"):
        agg(expected_batch_size=bad)


# -- item 4: per-example gradients are checked against the params ---------------------------------------


def test_plain_jax_grad_output_is_refused():
    p = {k: jnp.ones(v) for k, v in SHAPES.items()}
    ex = (jnp.ones(3), jnp.ones(4))
    g = jax.grad(lambda p, ex: jnp.sum((ex[0] @ p["w"] + p["b"] - ex[1]) ** 2))(p, ex)
    tx = agg()
    state = tx.init(p)
    with pytest.raises(ValueError,
                       match=EXPECTS + r".*has shape \(4,\) for a parameter of shape \(4,\).*per_example_grads"):
        tx.update(g, state, p)
    with pytest.raises(ValueError, match=EXPECTS):
        jax.jit(tx.update)(g, state, p)  # at trace time under jit too
    chain = optax.chain(tx, optax.sgd(0.1))
    with pytest.raises(ValueError, match=EXPECTS):
        chain.update(g, chain.init(p), p)


def test_plain_grad_whose_leading_dims_fit_is_refused():
    """Old: w (4, 4) and b (4,) from jax.grad looked like 4 examples (rows of w, entries of b) and were
    'clipped' row by row, with one noise draw broadcast. Every leaf is now compared with its parameter."""
    shapes = {"w": (4, 4), "b": (4,)}
    p = params(shapes=shapes)
    g = {k: jnp.ones(v) for k, v in shapes.items()}
    tx = agg()
    with pytest.raises(ValueError, match=EXPECTS):
        tx.update(g, tx.init(p), p)


def test_one_batch_size_across_leaves_and_one_tree():
    tx = agg()
    p = params()
    state = tx.init(p)
    g = per_example(5)
    g["b"] = g["b"][:4]
    with pytest.raises(ValueError, match=EXPECTS + r" with one batch size B across leaves; leaf \['w'\] has 5 examples"
                       r"|" + EXPECTS + r" with one batch size B across leaves; leaf \['b'\] has 4 examples"):
        tx.update(g, state, p)
    with pytest.raises(ValueError, match=EXPECTS + ": the gradients have tree structure"):
        tx.update({"w": per_example(5)["w"]}, state, p)
    g = per_example(5)
    g["w"] = g["w"][:, :, :3]
    with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(5, 3, 3\) for a parameter of shape \(3, 4\)"):
        tx.update(g, state, p)


def test_without_params_the_shapes_seen_at_init_are_used():
    tx = agg()
    state = tx.init(params())
    tx.update(per_example(5), state)  # fine
    with pytest.raises(ValueError, match=EXPECTS):
        tx.update(params(), state)  # no per-example axis, and no params passed
    fresh = agg()
    with pytest.raises(ValueError, match="pass params to update"):
        fresh.update(per_example(5), state)


def test_clipped_sum_shapes_are_checked():
    tx = agg()
    p = params()
    bad = ClippedSum({"w": jnp.zeros((5, 3, 4)), "b": jnp.zeros((5, 4))}, jnp.zeros((), jnp.int32), 5, 1.0)
    with pytest.raises(ValueError, match=EXPECTS + r"; the ClippedSum's leaf \['b'\] has shape \(5, 4\)"):
        tx.update(bad, tx.init(p), p)
    good = ClippedSum(params(), jnp.zeros((), jnp.int32), 5, 1.0)
    tx.update(good, tx.init(p), p)
    with pytest.raises(ValueError, match="clipped to 2.0"):
        tx.update(ClippedSum(params(), jnp.zeros((), jnp.int32), 5, 2.0), tx.init(p), p)


# -- item 10: bfloat16 parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [mfnoise.bsr(N, 2), mfnoise.BLT(np.array([0.9, 0.4]), np.array([0.3, 0.1]), N),
                                      mfnoise.bisr(N, 3)])
def test_bfloat16_params_with_float32_noise_state(strategy):
    """noise_dtype=float32: float32 state; the update is the float32 update of the same noise, cast to bfloat16."""
    key = jax.random.key(4)
    tx = mfnoise.dp_aggregate(strategy, 1.0, 1.2, key, participation=PART, expected_batch_size=5,
                              noise_dtype=jnp.float32)
    ref = mfnoise.dp_aggregate(strategy, 1.0, 1.2, key, participation=PART, expected_batch_size=5)
    p16, p32 = params(jnp.bfloat16), params(jnp.float32)
    st16, st32 = tx.init(p16), ref.init(p32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st16.noise.buffers))
    step16, step32 = jax.jit(tx.update), jax.jit(ref.update)
    for _ in range(3):
        # zero gradients: the update is noise / B, computed in float32 in both, then cast
        u16, st16 = step16(jax.tree.map(jnp.zeros_like, per_example(5, jnp.bfloat16)), st16, p16)
        u32, st32 = step32(jax.tree.map(jnp.zeros_like, per_example(5, jnp.float32)), st32, p32)
        for k in SHAPES:
            assert u16[k].dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(u16[k]), np.asarray(u32[k].astype(jnp.bfloat16)))
    # With gradients: within bfloat16 rounding of the float32 result.
    g = per_example(5, jnp.bfloat16, seed=3)
    u16, _ = step16(g, st16, p16)
    u32, _ = step32(jax.tree.map(lambda x: x.astype(jnp.float32), g), st32, p32)
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(u16[k], np.float32), np.asarray(u32[k]), rtol=2e-2, atol=2e-2)


def test_mf_sgd_trains_bfloat16_params_with_float32_noise():
    tx = mfnoise.mf_sgd(mfnoise.bsr(N, 2), 0.05, 1.0, 0.8, 0, participation=PART, expected_batch_size=5,
                        momentum=0.9, noise_dtype=jnp.float32)
    p = {k: v + 0.5 for k, v in params(jnp.bfloat16).items()}
    st = tx.init(p)

    @jax.jit
    def step(p, st, g):
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st

    for t in range(N):
        p, st = step(p, st, per_example(5, jnp.bfloat16, seed=t))
    mfnoise.noise.check(st)
    assert all(x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


def test_bfloat16_default_noise_is_refused_clearly_except_for_the_identity():
    """noise_dtype=None with bfloat16 params: a recurrence in bfloat16 is refused, naming the fix;
    C = I (DP-SGD) has none and runs in bfloat16."""
    tx = agg()
    with pytest.raises(TypeError, match=r"noise dtype bfloat16 is too coarse for the banded recurrence.*"
                                        r"noise_dtype=jnp.float32"):
        tx.init(params(jnp.bfloat16))
    with pytest.raises(TypeError, match="too coarse"):
        agg(noise_dtype=jnp.bfloat16)
    key = jax.random.key(2)
    ident = mfnoise.dp_aggregate(mfnoise.Identity(N), 1.0, 1.5, key, participation=PART, expected_batch_size=4)
    p = params(jnp.bfloat16)
    u, _ = ident.update(jax.tree.map(jnp.zeros_like, per_example(5, jnp.bfloat16)), ident.init(p), p)
    gen = mfnoise.noise.generator(mfnoise.Identity(N), key)
    z, _ = gen.next(gen.init(p), p)
    for k in SHAPES:
        assert u[k].dtype == jnp.bfloat16
        want = (jnp.asarray(1.5 * math.sqrt(2) * (1 + math.sqrt(2) * 2**-52), jnp.bfloat16) * z[k]) / 4
        np.testing.assert_array_equal(np.asarray(u[k], np.float32), np.asarray(want, np.float32))


def test_mixed_param_dtypes_need_one_noise_dtype():
    p = {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros((4,), jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"the params have dtypes \['bfloat16', 'float32'\]; pass noise_dtype="):
        agg().init(p)
    tx = agg(noise_dtype=jnp.float32)
    g = {"w": jnp.ones((5, 3, 4), jnp.float32), "b": jnp.ones((5, 4), jnp.bfloat16)}
    u, _ = tx.update(g, tx.init(p), p)
    assert u["w"].dtype == jnp.float32 and u["b"].dtype == jnp.bfloat16
