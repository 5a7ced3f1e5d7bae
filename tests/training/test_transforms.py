"""Optax transforms (mfnoise.training.transforms) against independent numpy computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfnoise
from mfnoise.training import noise
from mfnoise.training.per_example import per_example_grads
from mfnoise.training.transforms import DPAggregateState

N = 10
P_SHAPES = {"w": (3, 4), "b": (4,)}


def per_example(rng, batch=6, scale=1.0):
    return {k: jnp.asarray(rng.normal(size=(batch, *v)) * scale, jnp.float32) for k, v in P_SHAPES.items()}


def numpy_clipped_mean(g: dict, clip: float, divisor: float | None = None) -> dict:
    """Independent reference: per-example global norms, clip, drop non-finite, sum, divided by
    ``divisor`` (default: the number of rows)."""
    keys = sorted(g)
    batch = g[keys[0]].shape[0]
    flat = np.concatenate([np.asarray(g[k], np.float64).reshape(batch, -1) for k in keys], axis=1)
    out = np.zeros(flat.shape[1])
    for row in flat:
        if not np.all(np.isfinite(row)):
            continue
        norm = np.linalg.norm(row)
        out += row * min(1.0, clip / norm) if norm > 0 else row
    out /= batch if divisor is None else divisor
    res, i = {}, 0
    for k in keys:
        size = int(np.prod(P_SHAPES[k]))
        res[k] = out[i : i + size].reshape(P_SHAPES[k])
        i += size
    return res


def params():
    return {k: jnp.zeros(v, jnp.float32) for k, v in P_SHAPES.items()}


@pytest.mark.parametrize("clip", [0.3, 1.0, 100.0])
def test_noise_free_dp_aggregate_is_the_clipped_mean(clip):
    rng = np.random.default_rng(0)
    g = per_example(rng, scale=1.0)
    g["w"] = g["w"].at[2].set(0.0)  # a zero gradient: must not divide by zero
    g["b"] = g["b"].at[2].set(0.0)
    with pytest.warns(mfnoise.training.transforms.NonPrivateWarning):
        tx = mfnoise.dp_aggregate(mfnoise.bsr(N, 3), clip, 0.0, 0, participation=mfnoise.Participation.epochs(N, 2),
                                  expected_batch_size=6, allow_non_private=True)
    assert not tx.info.private
    u, state = jax.jit(tx.update)(g, tx.init(params()))
    want = numpy_clipped_mean(jax.device_get(g), clip)
    for k in P_SHAPES:
        np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=1e-5, atol=1e-6)
    assert int(state.nonfinite) == 0


def test_non_finite_examples_are_dropped_and_counted():
    rng = np.random.default_rng(1)
    g = per_example(rng)
    g["w"] = g["w"].at[1, 0, 0].set(jnp.nan)
    g["b"] = g["b"].at[4, 2].set(jnp.inf)
    with pytest.warns(mfnoise.training.transforms.NonPrivateWarning):
        tx = mfnoise.dp_aggregate(mfnoise.Identity(N), 1.0, 0.0, 0, participation=mfnoise.Participation.single(N),
                                  expected_batch_size=6, allow_non_private=True)
    step = jax.jit(tx.update)
    u, state = step(g, tx.init(params()))
    want = numpy_clipped_mean(jax.device_get(g), 1.0)
    for k in P_SHAPES:
        assert np.all(np.isfinite(np.asarray(u[k])))
        np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=1e-5, atol=1e-6)
    assert int(state.nonfinite) == 2
    _, state = step(g, state)
    assert int(state.nonfinite) == 4  # cumulative


@pytest.mark.parametrize(
    "strategy,part",
    [
        (mfnoise.bsr(N, 3), mfnoise.Participation.epochs(N, 2)),
        (mfnoise.BLT(np.array([0.9, 0.4]), np.array([0.3, 0.1]), N), mfnoise.Participation(N, 3, 3)),
        (mfnoise.Identity(N), mfnoise.Participation.epochs(N, 5)),
    ],
)
def test_dp_aggregate_noise_is_sensitivity_scaled_generator_noise(strategy, part):
    """With zero gradients, B * update = sigma * clip * S * (C'^{-1} W)_t for every t, B the expected
    batch size (not the 5 rows), S >= sens(C, p) the bound for the float32-realised strategy."""
    sigma, clip, batch, divisor = 1.3, 0.7, 5, 3.5
    key = jax.random.key(9)
    tx = mfnoise.dp_aggregate(strategy, clip, sigma, key, participation=part, expected_batch_size=divisor)
    sens = tx.info.sensitivity(np.float32).value
    assert strategy.sensitivity(part).value <= sens <= strategy.sensitivity(part).value * (1 + 1e-6)
    assert tx.info.private and tx.info.noise_stddev(np.float32) == pytest.approx(sigma * clip * sens, rel=1e-15)
    gen = noise.generator(strategy, key)
    zeros = {k: jnp.zeros((batch, *v)) for k, v in P_SHAPES.items()}
    state, gstate = tx.init(params()), gen.init(params())
    step, gnext = jax.jit(tx.update), jax.jit(gen.next)
    for _ in range(N):
        u, state = step(zeros, state)
        z, gstate = gnext(gstate, params())
        for k in P_SHAPES:
            np.testing.assert_allclose(np.asarray(u[k]) * divisor, sigma * clip * sens * np.asarray(z[k]), rtol=2e-6,
                                       atol=1e-6)


def test_correlated_noise_adds_stddev_times_generator_noise():
    s = mfnoise.bisr(N, 4)
    key = jax.random.key(3)
    tx = mfnoise.correlated_noise(s, 2.5, key)
    gen = noise.generator(s, key)
    g = per_example(np.random.default_rng(2), batch=1)
    g = {k: v[0] for k, v in g.items()}
    state, gs = tx.init(params()), gen.init(params())
    for _ in range(3):
        u, state = tx.update(g, state)
        z, gs = gen.next(gs, params())
        for k in P_SHAPES:
            np.testing.assert_allclose(np.asarray(u[k]), np.asarray(g[k]) + 2.5 * np.asarray(z[k]), rtol=1e-6,
                                       atol=1e-6)


def test_participation_is_required_and_checked():
    with pytest.raises(TypeError, match="participation"):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, 1.0, 0, expected_batch_size=4)
    with pytest.raises(TypeError, match="participation"):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, 1.0, 0, participation=None, expected_batch_size=4)
    with pytest.raises(ValueError, match="n="):
        mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, 1.0, 0, participation=mfnoise.Participation.single(N + 1),
                             expected_batch_size=4)


def test_in_optax_chain_under_jit_and_exhaustion():
    """mf_sgd (chain of dp_aggregate and momentum SGD) trains N steps; step N+1 is flagged."""
    rng = np.random.default_rng(4)
    data = {"x": jnp.asarray(rng.normal(size=(N, 8, 3)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(N, 8, 4)), jnp.float32)}

    def loss(p, ex):
        return jnp.sum((ex["x"] @ p["w"] + p["b"] - ex["y"]) ** 2)

    grads = per_example_grads(loss, microbatch_size=3)
    tx = mfnoise.mf_sgd(mfnoise.bsr(N, 2), 0.01, 1.0, 0.5, 0, participation=mfnoise.Participation.epochs(N, 2),
                        expected_batch_size=8, momentum=0.9)
    assert tx.info.expected_batch_size == 8 and tx.info.private

    @jax.jit
    def step(p, st, batch):
        u, st = tx.update(grads(p, batch), st, p)
        return optax.apply_updates(p, u), st

    p = params()
    st = tx.init(p)
    assert isinstance(st[0], DPAggregateState)
    for t in range(N):
        p, st = step(p, st, jax.tree.map(lambda a, t=t: a[t], data))
    noise.check(st)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(p))
    p2, st2 = step(p, st, jax.tree.map(lambda a: a[0], data))
    with pytest.raises(noise.ExhaustedError):
        noise.check(st2)
    assert all(np.all(np.isnan(np.asarray(v))) for v in jax.tree.leaves(p2))


def test_per_example_grads_microbatched_equals_loop():
    rng = np.random.default_rng(5)
    batch = {"x": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)}
    p = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.ones((4,), jnp.float32)}

    def loss(p, ex):
        return jnp.sum(jnp.tanh(ex["x"] @ p["w"] + p["b"]) * ex["y"])

    want = [jax.grad(loss)(p, jax.tree.map(lambda a, i=i: a[i], batch)) for i in range(7)]
    for mb in (None, 1, 3, 7):
        got = jax.jit(per_example_grads(loss, mb))(p, batch)
        for i in range(7):
            for k in p:
                np.testing.assert_allclose(np.asarray(got[k][i]), np.asarray(want[i][k]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        per_example_grads(loss, 0)(p, batch)


def test_update_divides_by_the_expected_batch_size_not_by_the_rows():
    """(clipped sum + noise) / expected_batch_size, or the noisy sum for None; the number of rows and
    ClippedSum.batch_size play no part."""
    from mfnoise.training.clipping import ClippedSum, clipped_sum

    rng = np.random.default_rng(6)
    g = per_example(rng, batch=7, scale=2.0)
    part = mfnoise.Participation.epochs(N, 2)
    with pytest.warns(mfnoise.training.transforms.NonPrivateWarning):
        quiet = {d: mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, 0.0, 0, participation=part, expected_batch_size=d,
                                         allow_non_private=True) for d in (2.5, None)}
    for divisor, tx in quiet.items():
        u, _ = tx.update(g, tx.init(params()), params())
        want = numpy_clipped_mean(jax.device_get(g), 1.0, divisor=1.0 if divisor is None else divisor)
        for k in P_SHAPES:
            np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=1e-5, atol=1e-6)
    # A ClippedSum claiming another batch size is divided by the same public constant.
    summed, dropped = clipped_sum(g, 1.0)
    tx = quiet[2.5]
    u, _ = tx.update(ClippedSum(summed, dropped, 1000, 1.0), tx.init(params()), params())
    want = numpy_clipped_mean(jax.device_get(g), 1.0, divisor=2.5)
    for k in P_SHAPES:
        np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=1e-5, atol=1e-6)
    # With noise: None returns exactly expected_batch_size times the normalised update.
    noisy = {d: mfnoise.dp_aggregate(mfnoise.bsr(N, 3), 1.0, 1.0, 5, participation=part, expected_batch_size=d)
             for d in (4.0, None)}
    u4, _ = noisy[4.0].update(g, noisy[4.0].init(params()), params())
    u_sum, _ = noisy[None].update(g, noisy[None].init(params()), params())
    for k in P_SHAPES:
        np.testing.assert_allclose(np.asarray(u_sum[k]) / 4.0, np.asarray(u4[k]), rtol=1e-6, atol=1e-7)


def test_update_distribution_is_the_same_for_neighbouring_dataset_sizes():
    """Issue 10 item 3: zero gradients, b = 4 batches of a 64- or a 65-example dataset: the padded batch
    has ceil(N / 4) = 16 or 17 rows. The old normaliser (the rows) gave update std 0.0883 vs 0.0832, so
    one step told the two datasets apart; with a public expected_batch_size the distributions agree.

    200000 coordinates per dataset size, independent keys: a two-sample KS test and the ratio of the
    standard deviations (standard error 1 / sqrt(200000) = 0.0022). The same two tests reject the
    old normalisation applied to the same draws (std ratio 17 / 16: 28 standard errors)."""
    import scipy.stats

    b, size = 4, 200_000
    strategy, part = mfnoise.bsr(8, 2), mfnoise.Participation.epochs(8, 2)
    samples = {}
    for n_data, seed in ((64, 1), (65, 2)):
        rows = -(-n_data // b)
        tx = mfnoise.dp_aggregate(strategy, 1.0, 1.1, seed, participation=part, expected_batch_size=16.0)
        p = {"x": jnp.zeros((size,), jnp.float32)}
        u, _ = jax.jit(tx.update)({"x": jnp.zeros((rows, size), jnp.float32)}, tx.init(p), p)
        samples[n_data] = np.asarray(u["x"], np.float64)
    a, c = samples[64], samples[65]
    se = 1 / np.sqrt(size)
    assert scipy.stats.ks_2samp(a, c).pvalue > 1e-3
    assert abs(a.std() / c.std() - 1) < 4 * se
    old_c = c * 16 / 17  # what dividing by the 17 rows instead of 16 would have given
    assert scipy.stats.ks_2samp(a, old_c).pvalue < 1e-8
    assert abs(a.std() / old_c.std() - 1) > 20 * se
    # With one key, the two dataset sizes give bit-identical updates.
    tx = mfnoise.dp_aggregate(strategy, 1.0, 1.1, 1, participation=part, expected_batch_size=16.0)
    p = {"x": jnp.zeros((1000,), jnp.float32)}
    u16, _ = tx.update({"x": jnp.zeros((16, 1000))}, tx.init(p), p)
    u17, _ = tx.update({"x": jnp.zeros((17, 1000))}, tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(u16["x"]), np.asarray(u17["x"]))
