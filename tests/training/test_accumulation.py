"""Gradient accumulation (mfnoise.training.accumulation) against one-batch runs and closed forms.

The independent references: a model whose examples have gradients on disjoint coordinates (so the
clipped sum holds each example's weighted gradient exactly, the weights can be read off, and every
summation order gives the same bits), float64 numpy clipping, the closed-form noise variance of
C = I (sigma^2 c^2 k / B^2, sens(I, epochs(n, k)) = sqrt(k)) with a chi-square interval, and the
step counts a one-batch run makes.
"""

from __future__ import annotations

import math
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import mfnoise
from mfnoise.training import noise
from mfnoise.training.accumulation import (
    MultiStepsState,
    accumulate,
    clipped_per_example,
    multi_steps,
)
from mfnoise.training.clipping import TOLERANCE, ClippedSum, clipped_grad
from mfnoise.training.per_example import per_example_grads


def disjoint_loss(p, x, onehot):
    """Example b's gradient is x_b (d,) placed in row b of w (B, d): onehot_b x_b^T, exactly."""
    return jnp.sum(p["w"] * (onehot[:, None] * x[None, :]))


def disjoint_data(rng, batch, d, scale):
    # small integers times a power of two: every product and partial sum is exact in float32
    x = rng.integers(-8, 9, size=(batch, d)).astype(np.float32) * np.float32(scale)
    return jnp.asarray(x), jnp.eye(batch, dtype=jnp.float32)


def mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["w"] + p["b"])
    return jnp.sum((h @ p["v"] - y) ** 2)


def mlp(rng, batch):
    p = {"w": rng.normal(size=(5, 6)) / 2, "b": rng.normal(size=(6,)) / 4, "v": rng.normal(size=(6, 2)) / 2}
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    x = jnp.asarray(rng.normal(size=(batch, 3, 5)) * rng.uniform(0.1, 3, size=(batch, 1, 1)), jnp.float32)
    return p, x, jnp.asarray(rng.normal(size=(batch, 3, 2)), jnp.float32)


def leaves(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def gamma(n: int) -> float:
    e = float(np.finfo(np.float32).eps)
    return n * e / (1 - n * e)


@settings(max_examples=3, deadline=None)
@given(batch=st.sampled_from([1, 7, 10]), micro=st.sampled_from([1, 3, 4, 12]), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([2.0**-6, 2.0**-3, 1.0]))
def test_accumulated_equals_one_batch_bit_for_bit_with_the_same_weights(batch, micro, seed, scale):
    """Disjoint gradients: row b of the clipped sum is s_b x_b exactly, in any summation order, so the
    accumulated sum must equal the one-batch sum bit for bit (weights included), and the weights must
    be those float64 clipping gives, within clipping's stated tolerance (never above: N_b >= ||g_b||)."""
    rng = np.random.default_rng(seed)
    d, clip = 4, 1.0
    x, onehot = disjoint_data(rng, batch, d, scale)
    p = {"w": jnp.zeros((batch, d), jnp.float32)}
    for fn in (clipped_grad(disjoint_loss, clip), clipped_per_example(disjoint_loss, clip)):
        one = jax.jit(fn)(p, x, onehot)
        acc = jax.jit(accumulate(fn, micro))(p, x, onehot)
        assert isinstance(acc, ClippedSum) and acc.batch_size == batch and acc.l2_clip_norm == clip
        np.testing.assert_array_equal(leaves(acc.grads)[0], leaves(one.grads)[0])
        assert int(acc.nonfinite) == int(one.nonfinite) == 0
        xs = np.asarray(x, np.float64)
        norms = np.linalg.norm(xs, axis=1)
        s_ref = np.where(norms > 0, np.minimum(1.0, clip / np.maximum(norms, 1e-300)), 1.0)
        got = np.asarray(acc.grads["w"], np.float64)
        nz = np.abs(xs) > 0
        s_got = np.where(nz, got / np.where(nz, xs, 1.0), np.nan)
        for b in range(batch):
            if nz[b].any():
                w = s_got[b][nz[b]]
                assert np.all(w <= s_ref[b] * (1 + 1e-6)), (b, w, s_ref[b])
                assert np.all(w >= s_ref[b] / (1 + TOLERANCE)), (b, w, s_ref[b])


@settings(max_examples=3, deadline=None)
@given(batch=st.sampled_from([2, 9]), micro=st.sampled_from([1, 4, 9]), seed=st.integers(0, 2**31 - 1),
       clip=st.sampled_from([0.05, 0.5, 5.0]))
def test_accumulated_sum_within_the_summation_order_bound(batch, micro, seed, clip):
    """A model whose examples share coordinates: both sums are of the same B products s_b g_b in
    another order, so |acc_i - one_i| <= 2 gamma_{B+1} sum_b s_b |g_b,i|; the weights s_b and
    gradients g_b of one example come from the same code on the same inputs (up to a few units of
    roundoff: 8 eps sum_b s_b |g_b,i| more). The reference sum is float64 numpy clipping of the
    per-example gradients."""
    rng = np.random.default_rng(seed)
    p, x, y = mlp(rng, batch)
    fn = clipped_grad(mlp_loss, clip)
    one = jax.jit(fn)(p, x, y)
    acc = jax.jit(accumulate(fn, micro))(p, x, y)
    g = per_example_grads(mlp_loss)(p, x, y)
    flat = np.concatenate([np.asarray(v, np.float64).reshape(batch, -1) for v in jax.tree.leaves(g)], axis=1)
    s = np.minimum(1.0, clip / np.linalg.norm(flat, axis=1))
    magnitude = np.abs(flat * s[:, None]).sum(axis=0)
    bound = (2 * gamma(batch + 1) + 8 * float(np.finfo(np.float32).eps)) * magnitude
    a = np.concatenate([v.ravel() for v in leaves(acc.grads)]).astype(np.float64)
    o = np.concatenate([v.ravel() for v in leaves(one.grads)]).astype(np.float64)
    assert np.all(np.abs(a - o) <= bound + 1e-30), np.max(np.abs(a - o) - bound)
    ref = (flat * s[:, None]).sum(axis=0)  # float64 clipping: the accumulated sum is a clipped sum
    assert np.all(np.abs(a - ref) <= 2 * TOLERANCE * magnitude + 1e-12)


def test_dp_aggregate_update_is_the_same_from_the_accumulated_sum():
    """Same key, same step: the update from the accumulated sum equals the one from the whole batch's
    per-example gradients and from its ClippedSum, bit for bit (disjoint, exact gradients), for 3 steps."""
    rng = np.random.default_rng(1)
    batch, d = 10, 6
    x, onehot = disjoint_data(rng, batch, d, 0.25)
    p = {"w": jnp.zeros((batch, d), jnp.float32)}
    strategy = mfnoise.BLT(np.array([0.9, 0.5]), np.array([0.3, 0.1]), 6)
    tx = mfnoise.dp_aggregate(strategy, 1.0, 0.7, jax.random.key(5), participation=mfnoise.Participation.epochs(6, 2),
                              expected_batch_size=batch)
    pairs = {
        "clipped_grad": (jax.jit(clipped_grad(disjoint_loss, 1.0))(p, x, onehot),
                         jax.jit(accumulate(clipped_grad(disjoint_loss, 1.0), 3))(p, x, onehot)),
        # dp_aggregate clips per-example gradients itself, with the weights clipped_per_example computes
        "per-example": (per_example_grads(disjoint_loss)(p, x, onehot),
                        jax.jit(accumulate(clipped_per_example(disjoint_loss, 1.0), 4))(p, x, onehot)),
    }
    step = jax.jit(tx.update)
    for name, (whole, accumulated) in pairs.items():
        outs = []
        for g in (whole, accumulated):
            state, out = tx.init(p), []
            for _ in range(3):
                u, state = step(g, state, p)
                out.append(leaves(u)[0])
            outs.append(out)
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_multi_steps_equals_accumulate_and_steps_once_per_logical_batch():
    rng = np.random.default_rng(2)
    batch, k = 12, 3
    p, x, y = mlp(rng, batch)
    fn = clipped_grad(mlp_loss, 0.5)
    n = 3
    tx = mfnoise.mf_sgd(mfnoise.bsr(n, 2), 0.1, 0.5, 0.8, jax.random.key(3),
                        participation=mfnoise.Participation.epochs(n, n), expected_batch_size=batch, momentum=0.9)
    wrapped = multi_steps(tx, k)
    assert wrapped.info is tx.info and wrapped.microbatches == k
    upd = jax.jit(wrapped.update)
    ref_upd = jax.jit(tx.update)
    acc_fn = jax.jit(accumulate(fn, batch // k))
    mb = batch // k
    ws: Any = wrapped.init(p)
    rs: Any = tx.init(p)
    wp, rp = p, p
    for _ in range(n):
        for j in range(k):
            s = jax.jit(fn)(wp, x[j * mb:(j + 1) * mb], y[j * mb:(j + 1) * mb])
            u, ws = upd(s, ws, wp)
            if j < k - 1:  # no update, no noise step, no optimizer step between microbatches
                assert all(np.all(v == 0) for v in leaves(u))
                assert int(ws.inner[0].noise.step) == int(rs[0].noise.step)
            wp = optax.apply_updates(wp, u)
        u, rs = ref_upd(acc_fn(rp, x, y), rs, rp)
        rp = optax.apply_updates(rp, u)
        for a, b in zip(leaves(wp), leaves(rp)):
            np.testing.assert_array_equal(a, b)
    assert isinstance(ws, MultiStepsState) and int(ws.microbatch) == 0
    assert int(ws.inner[0].noise.step) == int(rs[0].noise.step) == n


def test_accounting_counts_logical_steps():
    """n logical batches of k microbatches: the generator is at step n and not exhausted (the schema's n
    steps), exactly as the one-batch run; adding the noise per microbatch would exhaust the strategy
    after n / k logical batches (shown, so the check can fail)."""
    n, k, mb = 4, 2, 3
    p = {"w": jnp.zeros((mb * k, 2), jnp.float32)}
    x, onehot = disjoint_data(np.random.default_rng(3), mb * k, 2, 0.5)
    fn = clipped_grad(disjoint_loss, 1.0)
    part = mfnoise.Participation.epochs(n, 2)
    tx = mfnoise.dp_aggregate(mfnoise.bsr(n, 2), 1.0, 1.0, 0, participation=part, expected_batch_size=mb * k)
    wrapped, plain = multi_steps(tx, k), tx
    ws: Any = wrapped.init(p)
    ps: Any = plain.init(p)
    wupd, pupd = jax.jit(wrapped.update), jax.jit(plain.update)
    clip_fn, acc_fn = jax.jit(fn), jax.jit(accumulate(fn, mb))
    micro = [clip_fn(p, x[j * mb:(j + 1) * mb], onehot[j * mb:(j + 1) * mb]) for j in range(k)]
    for _ in range(n):
        for j in range(k):
            _, ws = wupd(micro[j], ws, p)
        _, ps = pupd(acc_fn(p, x, onehot), ps, p)
    noise.check(ws)
    noise.check(ps)
    assert int(ws.inner.noise.step) == int(ps.noise.step) == n
    assert wrapped.info.participation is part and wrapped.info.strategy.n == n
    # the misuse: one noise step per microbatch
    bad: Any = plain.init(p)
    for _ in range(n):
        for j in range(k):
            _, bad = pupd(micro[j], bad, p)
    assert int(bad.noise.step) == n * k
    with pytest.raises(noise.ExhaustedError):
        noise.check(bad)


def chi2_interval(var: float, dof: int, alpha: float = 1e-6) -> tuple[float, float]:
    lo, hi = stats.chi2.ppf([alpha / 2, 1 - alpha / 2], dof)
    return var * lo / dof, var * hi / dof


@pytest.mark.parametrize("route", ["accumulate", "multi_steps"])
def test_noise_added_exactly_once_variance(route):
    """Zero gradients, C = I, epochs(n, kk): the update is sigma c S w / B with S = sqrt(kk), so its
    coordinates have variance sigma^2 c^2 kk / B^2; the sample variance over 40000 coordinates lies in
    the chi-square interval (level 1e-6, about +-3.5%). Noise per microbatch (k = 4 draws) would give 4x,
    dividing by the microbatch size 16x: both far outside."""
    n, kk, k, mb, d = 4, 2, 4, 3, 40000
    batch = k * mb
    sigma, clip = 0.9, 0.7
    p = {"w": jnp.zeros((d,), jnp.float32)}
    x = jnp.ones((batch, d), jnp.float32)
    zero_loss = lambda p, x: jnp.sum(p["w"] * 0.0 * x)
    fn = clipped_grad(zero_loss, clip)
    tx = mfnoise.dp_aggregate(mfnoise.Identity(n), clip, sigma, jax.random.key(7),
                              participation=mfnoise.Participation.epochs(n, kk), expected_batch_size=batch)
    var = (sigma * clip * math.sqrt(kk) / batch) ** 2
    u: Any = None
    if route == "accumulate":
        u, _ = jax.jit(tx.update)(jax.jit(accumulate(fn, mb))(p, x), tx.init(p), p)
    else:
        wrapped = multi_steps(tx, k)
        state = wrapped.init(p)
        for j in range(k):
            u, state = jax.jit(wrapped.update)(fn(p, x[j * mb:(j + 1) * mb]), state, p)
    z = np.asarray(u["w"], np.float64)
    v = float(np.mean(z**2))  # mean known (0): d degrees of freedom
    lo, hi = chi2_interval(var, d)
    assert lo <= v <= hi, (v, var, lo, hi)
    for wrong in (k * var, var / k, k * k * var):
        wlo, whi = chi2_interval(wrong, d)
        assert not (wlo <= v <= whi)


def test_has_aux_and_ragged_tail():
    rng = np.random.default_rng(4)
    p, x, y = mlp(rng, 7)
    loss_aux: Any = lambda p, x, y: (mlp_loss(p, x, y), jnp.sum(x))
    one, aux1 = jax.jit(clipped_grad(loss_aux, 1.0, has_aux=True))(p, x, y)
    acc, aux2 = jax.jit(accumulate(clipped_grad(loss_aux, 1.0, has_aux=True), 3, has_aux=True))(p, x, y)
    assert acc.batch_size == 7
    np.testing.assert_array_equal(np.asarray(aux2), np.asarray(aux1))
    for a, b in zip(leaves(acc.grads), leaves(one.grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_counts_add_up():
    rng = np.random.default_rng(5)
    p, x, y = mlp(rng, 8)
    x = x.at[1, 0, 0].set(jnp.nan).at[6, 2, 1].set(jnp.inf)
    acc = jax.jit(accumulate(clipped_grad(mlp_loss, 1.0), 3))(p, x, y)
    assert int(acc.nonfinite) == 2
    assert all(np.all(np.isfinite(v)) for v in leaves(acc.grads))


def test_bfloat16_microbatch_sums_stay_float32():
    """bf16 params: each microbatch's ClippedSum is float32 (the clipping function keeps its
    accumulation dtype until the noise is added); accumulate adds those k partial sums in float32."""
    rng = np.random.default_rng(6)
    batch, d, mb = 9, 64, 2
    x = jnp.asarray(rng.normal(size=(batch, d)), jnp.float32)
    p = {"w": jnp.zeros((d,), jnp.bfloat16)}
    loss = lambda p, x: jnp.sum(p["w"].astype(jnp.float32) * x)
    fn = jax.jit(clipped_per_example(loss, 100.0))  # no clipping: the sum is sum_b x_b
    acc = jax.jit(accumulate(fn, mb))(p, x)
    assert acc.grads["w"].dtype == jnp.float32
    parts = [np.asarray(fn(p, x[i:i + mb]).grads["w"], np.float64) for i in range(0, batch, mb)]
    total = np.sum(parts, axis=0)  # the partial sums' exact total (float32 adds 5 terms: within gamma_5)
    got = np.asarray(acc.grads["w"], np.float64)
    assert np.all(np.abs(got) <= np.abs(total) * (1 + gamma(5)))
    assert np.all(np.abs(got - total) <= np.abs(total) * 2.0**-7 + gamma(5) * np.abs(parts).sum(0))
    exact = np.asarray(x, np.float64).sum(axis=0)  # one bf16 rounding per partial sum and one at the end
    assert np.all(np.abs(got - exact) <= 2.0**-7 * (np.abs(parts).sum(0) + np.abs(total)) + 1e-6)


def fake_sum(p, rows, clip=1.0):
    """A ClippedSum of ``rows`` examples (contents irrelevant to what is refused)."""
    return ClippedSum(jax.tree.map(jnp.zeros_like, p), jnp.zeros((), jnp.int32), rows, clip)


def test_refusals():
    p = {"w": jnp.zeros((3, 2), jnp.float32)}
    x = jnp.zeros((6, 3), jnp.float32)
    fn = lambda p, x, shared=(): fake_sum(p, x.shape[0])
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises((TypeError, ValueError), match="microbatch_size"):
            accumulate(fn, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ClippedSum"):
        accumulate(lambda p, x, shared=(): {"w": jnp.zeros((x.shape[0], 3, 2))}, 2)(p, x)
    with pytest.raises(ValueError, match="batch_size 6 for a microbatch of 2"):
        accumulate(lambda p, x, shared=(): fake_sum(p, 6), 2)(p, x)
    tx = mfnoise.dp_aggregate(mfnoise.Identity(4), 1.0, 1.0, 0, participation=mfnoise.Participation.epochs(4, 2),
                              expected_batch_size=6)
    with pytest.raises(TypeError, match="DP transform"):
        multi_steps(optax.sgd(0.1), 2)
    with pytest.raises(TypeError, match="DP transform"):
        multi_steps(optax.MultiSteps(tx, 2), 2)
    # optax.MultiSteps around dp_aggregate is loud on its own (its params-shaped accumulator): were it
    # to accept a ClippedSum, it would average clipped sums and step the noise once per k anyway
    optax_ms = optax.MultiSteps(tx, 2)
    with pytest.raises(ValueError, match="pytree structure"):
        optax_ms.update(cast(Any, fake_sum(p, 3)), optax_ms.init(p), p)
    for bad in (0, 1.5, False):
        with pytest.raises((TypeError, ValueError), match="microbatches"):
            multi_steps(tx, bad)  # type: ignore[arg-type]
    wrapped = multi_steps(tx, 2)
    state = wrapped.init(p)
    with pytest.raises(TypeError, match="ClippedSum"):
        wrapped.update({"w": jnp.zeros((6, 3, 2))}, state, p)
    with pytest.raises(ValueError, match="clipped to 2.0"):
        wrapped.update(cast(Any, fake_sum(p, 3, 2.0)), state, p)
    _, state = wrapped.update(cast(Any, fake_sum(p, 3)), state, p)
    with pytest.raises(ValueError, match="microbatch of 2 examples after microbatches of 3"):
        wrapped.update(cast(Any, fake_sum(p, 2)), state, p)


def test_refuses_to_noise_inside_shard_map():
    """Inside shard_map a device's partial ClippedSum (varying across the data axis) or even a reduced
    one (where, with the default check_vma, replicated params' per-example gradients were summed over
    the devices before clipping) must not be noised there: multi_steps refuses both, naming the axes."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(8)
    p = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    y = jnp.zeros((4,), jnp.float32)
    tx = mfnoise.dp_aggregate(mfnoise.Identity(4), 1.0, 1.0, 0, participation=mfnoise.Participation.epochs(4, 2),
                              expected_batch_size=4)
    wrapped = multi_steps(tx, 1)
    fn = clipped_per_example(lambda p, x, y: jnp.sum(p["w"] * x) - y, 1.0)
    P = jax.sharding.PartitionSpec

    def local(reduce, p, state, x, y):
        # params cast to device-varying, so that the per-example gradients are each device's own
        s = fn(jax.tree.map(lambda a: jax.lax.pcast(a, ("data",), to="varying"), p), x, y)
        if reduce:
            s = ClippedSum(jax.lax.psum(s.grads, "data"), jax.lax.psum(s.nonfinite, "data"), s.batch_size,
                           s.l2_clip_norm)
        return wrapped.update(cast(Any, s), state, p)[0]

    state = wrapped.init(p)
    specs = (P(), P(), P("data"), P("data"))
    with pytest.raises(ValueError, match=r"inside shard_map \(manual mesh axes \['data'\]\).*still varies across"):
        jax.shard_map(lambda *a: local(False, *a), mesh=mesh, in_specs=specs, out_specs=P())(p, state, x, y)
    with pytest.raises(ValueError, match=r"inside shard_map \(manual mesh axes \['data'\]\)"):
        jax.shard_map(lambda *a: local(True, *a), mesh=mesh, in_specs=specs, out_specs=P())(p, state, x, y)
    out = wrapped.update(cast(Any, jax.jit(fn)(p, x, y)), state, p)[0]  # outside: accepted
    assert all(np.all(np.isfinite(v)) for v in leaves(out))
