"""Streaming noise (mfnoise.noise) against dense linear algebra, sample covariance and restarts."""

from __future__ import annotations

import os
import subprocess
import sys

import hypothesis.strategies as hst
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings

import mfnoise
from mfnoise.training import noise

SHAPES = {"w": (3, 5), "b": (7,), "s": ()}


def params(dtype=jnp.float32):
    return {k: jnp.zeros(v, dtype) for k, v in SHAPES.items()}


def flat(tree) -> np.ndarray:
    """Leaves in tree_flatten order, raveled and concatenated along the last axis."""
    leaves = jax.tree.leaves(tree)
    lead = leaves[0].shape[: leaves[0].ndim - len(SHAPES[sorted(SHAPES)[0]])]
    return np.concatenate([np.asarray(x, np.float64).reshape(*lead, -1) for x in leaves], axis=-1)


def stream(gen, p, steps, state=None):
    """All noise rows for steps state.step.. state.step + steps - 1 in one scan: (rows, state)."""
    state = gen.init(p) if state is None else state

    def body(st, _):
        z, st = gen.next(st, p)
        return st, z

    state, zs = jax.jit(lambda st: jax.lax.scan(body, st, None, length=steps))(state)
    return zs, state


def reference_w(key, p, n) -> np.ndarray:
    """W (n × params) from the documented derivation: normal(fold_in(fold_in(key, leaf), t))."""
    cols = []
    for i, x in enumerate(jax.tree.leaves(p)):
        one = lambda t, i=i, x=x: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), t), x.shape, x.dtype)  # noqa: E731
        cols.append(np.asarray(jax.jit(jax.vmap(one))(jnp.arange(n)), np.float64).reshape(n, -1))
    return np.concatenate(cols, axis=1)


def families(n: int) -> dict[str, mfnoise.Strategy]:
    """One or more members of every streamable family, size n (built lazily: some need n >= 4)."""
    rng = np.random.default_rng(n)
    dense = np.tril(rng.uniform(-0.3, 0.3, size=(n, n)), -1) + np.diag(rng.uniform(0.5, 2.0, n))
    raw = rng.uniform(0.1, 1.0, size=(n, min(5, n)))
    raw[np.add.outer(np.arange(n), np.arange(min(5, n))) >= n] = 0
    return {
        "identity": lambda: mfnoise.Identity(n),
        "banded-bsr8": lambda: mfnoise.bsr(n, min(8, n)),
        "banded-random5": lambda: mfnoise.Banded(raw),
        "banded-toeplitz4": lambda: mfnoise.Toeplitz(np.array([1.0, 0.6, -0.2, 0.1]), n),
        "toeplitz-full-sqrt": lambda: mfnoise.sqrt_toeplitz(n),
        "bisr7": lambda: mfnoise.bisr(n, min(7, n)),
        "blt2": lambda: mfnoise.BLT(np.array([0.95, 0.6]), np.array([0.4, 0.2]), n),
        "blt4-near-one": lambda: mfnoise.BLT(np.array([0.999, 0.9, 0.5, 0.1]), np.array([0.02, 0.3, 0.2, 0.1]), n),
        "blt5-clustered": lambda: mfnoise.BLT(np.array([0.9999, 0.999, 0.99, 0.9, 0.5]),
                                              np.array([0.01, 0.02, 0.05, 0.1, 0.2]), n),
        # omega of mixed signs, C^{-1}'s decays complex (0.5 +- 0.2i): C's own buffers, fed the outputs
        "blt2-mixed": lambda: mfnoise.BLT(np.array([0.9, 0.5]), np.array([0.5, -0.1]), n),
        "dense": lambda: mfnoise.Dense(dense),
    }


def family(n: int, name: str) -> mfnoise.Strategy:
    return families(n)[name]()


CASES = [(256, name) for name in families(256) if name != "dense"] + [(64, "dense")]
# float32 on one member per family (the float64 test covers the variants)
CASES32 = [c for c in CASES if c[1] not in ("banded-random5", "blt2", "blt5-clustered")]


ONE = {"w": (4, 5)}  # one leaf keeps the many compilations below cheap; multi-leaf trees are tested apart


def one_leaf(dtype):
    return {k: jnp.zeros(v, dtype) for k, v in ONE.items()}


_W: dict = {}


def identity_w(key_seed: int, n: int, dtype) -> np.ndarray:
    """W (n × 20) streamed by the identity strategy (C = I, so its noise is W itself); cached."""
    k = (key_seed, n, jnp.dtype(dtype).name)
    if k not in _W:
        zs, _ = stream(noise.generator(mfnoise.Identity(n), jax.random.key(key_seed)), one_leaf(dtype), n)
        _W[k] = np.asarray(zs["w"], np.float64).reshape(n, -1)
    return _W[k]


def test_identity_stream_is_the_documented_w():
    """w_t for leaf i is normal(fold_in(fold_in(key, i), t), shape, dtype), for every leaf."""
    key = jax.random.key(42)
    p = params(jnp.float32)
    zs, _ = stream(noise.generator(mfnoise.Identity(9), key), p, 9)
    np.testing.assert_array_equal(flat(zs), reference_w(key, p, 9))
    np.testing.assert_array_equal(identity_w(42, 9, jnp.float32), reference_w(key, one_leaf(jnp.float32), 9))


@pytest.mark.parametrize("n,name", CASES + [(1, "banded-bsr8"), (1, "blt2")])
def test_streamed_equals_dense_inverse_float64(n, name):
    s = family(n, name)
    with jax.enable_x64(True):
        w = identity_w(42, n, jnp.float64)
        zs, state = stream(noise.generator(s, jax.random.key(42)), one_leaf(jnp.float64), n)
        assert zs["w"].dtype == jnp.float64
    got = np.asarray(zs["w"]).reshape(n, -1)
    want = scipy.linalg.solve_triangular(s.dense(), w, lower=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * max(1.0, np.abs(want).max()))
    assert int(state.step) == n and not bool(state.exhausted)


@pytest.mark.parametrize("n,name", CASES32)
def test_streamed_equals_dense_inverse_float32(n, name):
    s = family(n, name)
    w = identity_w(7, n, jnp.float32)  # the float32 samples, widened
    zs, state = stream(noise.generator(s, jax.random.key(7)), one_leaf(jnp.float32), n)
    assert zs["w"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.buffers))
    want = scipy.linalg.solve_triangular(s.dense(), w, lower=True)
    np.testing.assert_allclose(np.asarray(zs["w"], np.float64).reshape(n, -1), want, rtol=0,
                               atol=1e-5 * max(1.0, np.abs(want).max()))


@settings(max_examples=5, deadline=None)
@given(n=hst.integers(1, 24), bands=hst.integers(1, 24), seed=hst.integers(0, 2**31 - 1))
def test_random_banded_matches_dense(n, bands, seed):
    bands = min(bands, n)
    rng = np.random.default_rng(seed)
    cols = rng.uniform(-1, 1, size=(n, bands))
    cols[:, 0] = rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n)
    cols[np.add.outer(np.arange(n), np.arange(bands)) >= n] = 0
    s = mfnoise.Banded(cols)
    key = jax.random.key(seed)
    with jax.enable_x64(True):
        zs, _ = stream(noise.generator(s, key), one_leaf(jnp.float64), n)
        w = identity_w(seed, n, jnp.float64)
    want = scipy.linalg.solve_triangular(s.dense(), w, lower=True)
    np.testing.assert_allclose(np.asarray(zs["w"]).reshape(n, -1), want, rtol=0,
                               atol=1e-11 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", ["banded-bsr8", "blt4-near-one", "bisr7", "toeplitz-full-sqrt"])
def test_sample_covariance(name):
    """Over 40000 coordinates, Cov(z) = stddev^2 C^{-1} C^{-T} within 6 standard errors."""
    n, stddev = 12, 1.7
    s = family(n, name)
    p = {"x": jnp.zeros((40000,), jnp.float32)}
    tx = mfnoise.correlated_noise(s, stddev, jax.random.key(3))
    state = tx.init(p)

    def body(st, _):
        u, st = tx.update(p, st)
        return st, u["x"]

    _, zs = jax.jit(lambda st: jax.lax.scan(body, st, None, length=n))(state)
    z = np.asarray(zs, np.float64)
    emp = z @ z.T / z.shape[1]
    cinv = np.linalg.inv(s.dense())
    true = stddev**2 * cinv @ cinv.T
    se = np.sqrt((np.outer(np.diag(true), np.diag(true)) + true**2) / z.shape[1])
    assert np.all(np.abs(emp - true) <= 6 * se + 1e-6), np.max(np.abs(emp - true) / se)
    # and the empirical means are ~0
    assert np.all(np.abs(z.mean(axis=1)) <= 6 * np.sqrt(np.diag(true) / z.shape[1]))


@pytest.mark.parametrize("name", ["banded-bsr8", "blt2", "bisr7"])
def test_resume_is_bit_identical(name):
    n = 40
    s = family(n, name)
    p = one_leaf(jnp.float32)
    key = jax.random.key(5)
    full, _ = stream(noise.generator(s, key), p, n)
    first, state = stream(noise.generator(s, key), p, 17)
    # checkpoint: to host numpy and back, as a restarted process would do
    saved = jax.tree.map(np.asarray, jax.device_get(state))
    restored = jax.tree.map(jnp.asarray, saved)
    assert isinstance(restored, noise.NoiseState)
    second, _ = stream(noise.generator(s, key), p, n - 17, restored)
    for a, b, c in zip(jax.tree.leaves(full), jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.concatenate([np.asarray(b), np.asarray(c)]))


def test_step_by_step_equals_scan_and_past_end_is_an_error():
    n = 6
    s = mfnoise.bsr(n, 3)
    p = one_leaf(jnp.float32)
    gen = noise.generator(s, jax.random.key(1))
    zs, _ = stream(gen, p, n)
    state = gen.init(p)
    step = jax.jit(gen.next)
    for t in range(n):
        z, state = step(state, p)
        for a, b in zip(jax.tree.leaves(z), jax.tree.leaves(zs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b[t]))
    noise.check(state)  # exactly n steps: fine
    # Eagerly, step n raises at once.
    with pytest.raises(noise.ExhaustedError, match="n=6"):
        gen.next(state, p)
    # Under jit it cannot raise: the noise is NaN, the flag is set, and check() raises on the host.
    z, bad = step(state, p)
    assert all(np.all(np.isnan(np.asarray(x))) for x in jax.tree.leaves(z))
    assert bool(bad.exhausted)
    with pytest.raises(noise.ExhaustedError):
        noise.check({"opt": (bad,)})
    # ... and it stays set (no silent recovery), while the last row is never reused.
    _, worse = step(bad, p)
    assert bool(worse.exhausted)


STATE_CASES = [
    (mfnoise.Identity(50), 0),
    (mfnoise.bsr(50, 4), 3),
    (mfnoise.bsr(50, 16), 15),
    (mfnoise.Toeplitz(np.ones(5), 50), 4),
    (mfnoise.bisr(50, 9), 8),
    (mfnoise.BLT(np.array([0.9, 0.5, 0.2]), np.array([0.3, 0.2, 0.1]), 50), 3),
    (mfnoise.Dense(np.eye(10)), 9),
]


@pytest.mark.parametrize("strategy,m", STATE_CASES)
@pytest.mark.parametrize("param_dtype,noise_dtype", [(jnp.float32, None), (jnp.bfloat16, jnp.float32)])
def test_state_bytes_exact(strategy, m, param_dtype, noise_dtype):
    """State bytes = m x params x itemsize of the noise dtype (float32 state for bfloat16 params)."""
    p = params(param_dtype)
    gen = noise.generator(strategy, 0, dtype=noise_dtype)
    state = gen.init(p)
    nparams = sum(int(np.prod(v)) for v in SHAPES.values())
    want_dtype = jnp.float32
    got = sum(x.nbytes for x in jax.tree.leaves(state.buffers))
    assert gen.state_arrays == m
    assert got == gen.state_bytes(p) == m * nparams * jnp.dtype(want_dtype).itemsize
    assert all(x.dtype == want_dtype for x in jax.tree.leaves(state.buffers))


@pytest.mark.parametrize("strategy,m", STATE_CASES[1:])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_coarse_noise_dtype_is_refused_with_the_fix(strategy, m, dtype):
    """A recurrence in bfloat16 / float16 (8 / 11 bit coefficients and state) is refused, naming noise_dtype."""
    with pytest.raises(TypeError, match=r"noise_dtype=jnp.float32"):
        noise.generator(strategy, 0).init(params(dtype))
    with pytest.raises(TypeError, match=jnp.dtype(dtype).name):
        noise.generator(strategy, 0, dtype=dtype)


def test_bfloat16_params_with_float32_noise_equal_the_float32_stream():
    """dtype=float32 with bfloat16 params: bit-identical float32 noise to float32 params (shapes only matter)."""
    n = 12
    for s in (mfnoise.bsr(n, 4), mfnoise.BLT(np.array([0.9, 0.3]), np.array([0.2, 0.1]), n), mfnoise.bisr(n, 5)):
        key = jax.random.key(8)
        want, _ = stream(noise.generator(s, key), params(jnp.float32), n)
        got, state = stream(noise.generator(s, key, dtype=jnp.float32), params(jnp.bfloat16), n)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            assert b.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_identity_noise_runs_in_bfloat16():
    """C = I has no recurrence: bfloat16 noise is the bfloat16 sample itself (the documented w)."""
    key = jax.random.key(42)
    p = params(jnp.bfloat16)
    zs, _ = stream(noise.generator(mfnoise.Identity(5), key), p, 5)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(zs))
    np.testing.assert_array_equal(flat(zs), reference_w(key, p, 5))


def test_state_of_another_dtype_is_refused():
    """A float32 state stepped by a float64 generator: a clear error naming the state dtype."""
    gen32 = noise.generator(mfnoise.bsr(6, 3), 0, dtype=jnp.float32)
    state = gen32.init(one_leaf(jnp.float32))
    with jax.enable_x64(True):
        gen64 = noise.generator(mfnoise.bsr(6, 3), 0)
        with pytest.raises(TypeError, match="noise state has dtype float32"):
            gen64.next(state, one_leaf(jnp.float64))


def test_leaves_and_keys_give_independent_noise():
    p = {"a": jnp.zeros((1000,)), "b": jnp.zeros((1000,))}
    gen = noise.generator(mfnoise.Identity(3), jax.random.key(0))
    z, _ = gen.next(gen.init(p), p)
    assert abs(np.corrcoef(np.asarray(z["a"]), np.asarray(z["b"]))[0, 1]) < 0.15
    z2, _ = noise.generator(mfnoise.Identity(3), jax.random.key(1)).next(gen.init(p), p)
    assert not np.allclose(np.asarray(z["a"]), np.asarray(z2["a"]))
    # int seeds and raw uint32 keys work too
    noise.generator(mfnoise.Identity(3), jax.random.PRNGKey(0)).next(gen.init(p), p)


def test_bad_input():
    with pytest.raises(TypeError):
        noise.generator(np.eye(3), 0)
    with pytest.raises(ValueError, match="state_sharding"):
        noise.generator(mfnoise.Identity(3), 0, state_sharding="zero")
    with pytest.raises(TypeError, match="floating"):
        noise.generator(mfnoise.bsr(4, 2), 0).init({"i": jnp.zeros(3, jnp.int32)})
    with pytest.raises(ValueError, match="all_devices"):
        noise.generator(mfnoise.bsr(4, 2), 0, state_sharding="all_devices").init(params())


WORKER = os.path.join(os.path.dirname(__file__), "sharded_worker.py")


@pytest.mark.slow
def test_eight_device_sharding_matches_unsharded():
    """Runs tests/sharded_worker.py with 8 host CPU devices (the main process already chose 1).

    Bit-identical noise for 1-device, (8,)- and (2, 4)-sharded, ZeRO-sharded and Explicit-axes
    layouts; per-device state bytes = total / 8; compiled temporaries of one step; mf_sgd on a
    sharded model equal to the unsharded run; dp_aggregate with Explicit axes.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ALL OK" in r.stdout, r.stdout + r.stderr


def test_ring_contraction_runs_at_full_precision():
    """The ring recurrences' dot is HIGHEST precision: on GPU / TPU a default float32 dot may use TF32 or
    bfloat16 passes, i.e. coefficients and state rounded to 10 / 8 bits, not the realised strategy."""
    for s in (mfnoise.bsr(8, 4), mfnoise.bisr(8, 3), mfnoise.Toeplitz(np.array([1.0, 0.5, 0.2]), 8)):
        gen = noise.generator(s, 0)
        p = one_leaf(jnp.float32)
        jaxpr = jax.make_jaxpr(gen.next)(gen.init(p), p)
        dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
        assert dots, s
        for e in dots:
            assert e.params["precision"] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST), e.params
