"""Data parallelism on 8 host CPU devices in one process, against the one-device run.

Usage: dp_sharded_worker.py REF.npz  (writes dp_multihost_worker.train's one-process result there)
Run by tests/training/test_data_parallel.py in a fresh process (the test process has one device).
Prints "ALL OK" when every check passes.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from dp_multihost_worker import BATCH, CLIP, STEPS, data, loss, train, transform  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from scipy import stats  # noqa: E402

import mfnoise  # noqa: E402
from mfnoise.training import noise  # noqa: E402
from mfnoise.training.accumulation import accumulate  # noqa: E402
from mfnoise.training.clipping import clipped_grad  # noqa: E402
from mfnoise.training.data_parallel import data_parallel  # noqa: E402
from mfnoise.training.per_example import per_example_grads  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
ONE = jax.devices()[0]
AUTO = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
AUTO2D = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
EXPLICIT = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
MODEL_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def gamma(n: int) -> float:
    e = float(np.finfo(np.float32).eps)
    return n * e / (1 - n * e)


def run(grads, put_params, put_batch, mesh=None) -> tuple[list, Any, Any]:
    """STEPS steps of grads -> mf_sgd; the params after each step and the first step's ClippedSum."""
    init, xs, ys = data()
    params = {k: put_params(k, jnp.asarray(v)) for k, v in init.items()}
    tx = transform(mesh)
    state: Any = tx.init(params)

    @jax.jit
    def step(p, st, x, y):
        s = grads(p, x, y)
        u, st = tx.update(s, st, p)
        return optax.apply_updates(p, u), st, s

    out: list = []
    first: Any = None
    for t in range(STEPS):
        params, state, s = step(params, state, put_batch(jnp.asarray(xs[t])), put_batch(jnp.asarray(ys[t])))
        first = host(s) if first is None else first
        out.append(host(params))
    noise.check(state)
    assert int(state[0].noise.step) == STEPS  # one noise step per (global) batch
    return out, first, state


def close(got, ref, what, rtol=1e-5, atol=1e-6):
    for a, b in zip(got, ref):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what} {k}")


def check_sum_bound(s: Any, ref: Any, what: str) -> None:
    """Both are sums of the same B products s_b g_b in two orders: per entry within
    2 gamma_{B+1} sum_b s_b |g_b,i| (+ a few eps for the weights computed in another program)."""
    init, xs, ys = data()
    g = per_example_grads(loss)({k: jnp.asarray(v) for k, v in init.items()}, jnp.asarray(xs[0]), jnp.asarray(ys[0]))
    keys = sorted(g)
    flat = np.concatenate([np.asarray(g[k], np.float64).reshape(BATCH, -1) for k in keys], axis=1)
    w = np.minimum(1.0, CLIP / np.linalg.norm(flat, axis=1))
    mag = np.abs(flat * w[:, None]).sum(0)
    bound = (2 * gamma(BATCH + 1) + 8 * float(np.finfo(np.float32).eps)) * mag
    a = np.concatenate([np.asarray(s.grads[k], np.float64).ravel() for k in keys])
    b = np.concatenate([np.asarray(ref.grads[k], np.float64).ravel() for k in keys])
    assert np.all(np.abs(a - b) <= bound + 1e-30), (what, float(np.max(np.abs(a - b) - bound)))
    assert s.batch_size == ref.batch_size == BATCH and int(s.nonfinite) == int(ref.nonfinite) == 0


def main() -> None:
    one = lambda k, v: jax.device_put(v, ONE)
    ref, ref_sum, _ = run(jax.jit(clipped_grad(loss, CLIP)), one, lambda x: jax.device_put(x, ONE))

    # Auto (8,) data axis: replicated params, noise state split over all 8 devices (ZeRO); this run is
    # also the one-process reference of the two-process test
    rep = lambda k, v: jax.device_put(v, NamedSharding(AUTO, P()))
    shard = lambda x: jax.device_put(x, NamedSharding(AUTO, P("data")))
    ref_mp, local, state = train(AUTO)
    np.savez(sys.argv[1], **ref_mp, local_state_bytes=np.array(local))
    close([ref_mp], [ref[-1]], "auto (8,) + accumulate")
    w1 = state[0].noise.buffers["w1"]  # (m, 8, 12): its first dimension divisible by 8 is split 8 ways
    assert {sh.data.nbytes for sh in w1.addressable_shards} == {w1.nbytes // 8}, w1.sharding
    assert len({sh.device for sh in w1.addressable_shards}) == 8
    print("ok auto (8,): all_devices noise state, w1's split 8 ways", flush=True)

    # Auto (4, 2): params sharded over "model", batch over "data", 2 microbatches per device
    msh = lambda k, v: jax.device_put(v, NamedSharding(AUTO2D, MODEL_SPECS[k]))
    shard2 = lambda x: jax.device_put(x, NamedSharding(AUTO2D, P("data")))
    got, s, state = run(data_parallel(accumulate(clipped_grad(loss, CLIP), 2), AUTO2D), msh, shard2)
    close(got, ref, "auto (4, 2) + accumulate")
    check_sum_bound(s, ref_sum, "auto (4, 2) + accumulate")
    want = NamedSharding(AUTO2D, P(None, None, "model"))
    assert state[0].noise.buffers["w1"].sharding.is_equivalent_to(want, 3), state[0].noise.buffers["w1"].sharding
    print("ok auto (4, 2) model-sharded params, state sharded like them", flush=True)

    # Explicit (8,)
    with jax.set_mesh(EXPLICIT):
        xrep = lambda k, v: jax.device_put(v, NamedSharding(EXPLICIT, P()))
        xshard = lambda x: jax.device_put(x, NamedSharding(EXPLICIT, P("data")))
        got, s, _ = run(data_parallel(clipped_grad(loss, CLIP), EXPLICIT), xrep, xshard, EXPLICIT)
    close(got, ref, "explicit (8,)")
    check_sum_bound(s, ref_sum, "explicit (8,)")
    print("ok explicit (8,)", flush=True)

    # No shard_map: clipped_grad under jit with the batch sharded (XLA partitions the batch sums)
    got, s, _ = run(clipped_grad(loss, CLIP), rep, shard, AUTO)
    close(got, ref, "jit, sharded batch")
    check_sum_bound(s, ref_sum, "jit, sharded batch")
    print("ok jit with a sharded batch", flush=True)

    # The trap data_parallel avoids: per-example gradients inside shard_map (check_vma=True) with
    # invariant params are summed over the devices (row b = the 8 devices' b-th examples), then clipped
    # together. clipped_grad and per_example_grads refuse it, naming the axis and the fix.
    def naive(p, x, y, fn):
        def local(p, x, y):
            c = fn(p, x, y)
            leaves = c.grads if hasattr(c, "grads") else c
            return jax.tree.map(lambda g: jax.lax.psum(jnp.sum(g), "data"), leaves)

        return jax.shard_map(local, mesh=AUTO, in_specs=(P(), P("data"), P("data")), out_specs=P())(p, x, y)

    init, xs, ys = data()
    for name, fn in [("clipped_grad", clipped_grad(loss, CLIP)), ("per_example_grads", per_example_grads(loss))]:
        try:
            jax.jit(lambda p, x, y, fn=fn: naive(p, x, y, fn))(
                {k: rep(k, jnp.asarray(v)) for k, v in init.items()}, shard(jnp.asarray(xs[0])),
                shard(jnp.asarray(ys[0])))
        except ValueError as e:
            assert "check_vma=True" in str(e) and "'data'" in str(e) and "data_parallel" in str(e), str(e)
        else:
            raise AssertionError(f"{name} inside shard_map with check_vma=True was not refused")
    print("ok the naive shard_map is refused (implicit psum of per-example gradients)", flush=True)

    check_exact()
    check_noise_once()
    print("ALL OK", flush=True)


def disjoint_loss(p, x, onehot):
    return jnp.sum(p["w"] * (onehot[:, None] * x[None, :]))


def check_exact() -> None:
    """Disjoint small-integer gradients: every partial sum is exact, so the data-parallel update equals
    the one-device update bit for bit (the noise is the same draw: same key, same step)."""
    rng = np.random.default_rng(1)
    b, d = 16, 5
    x = jnp.asarray(rng.integers(-8, 9, size=(b, d)).astype(np.float32) / 4)
    onehot = jnp.eye(b, dtype=jnp.float32)
    tx = mfnoise.dp_aggregate(mfnoise.bsr(4, 2), 1.0, 0.7, jax.random.key(9),
                              participation=mfnoise.Participation.epochs(4, 2), expected_batch_size=b)

    def updates(grads, p, x, o):
        st, out = tx.init(p), []
        step = jax.jit(lambda p, st, x, o: tx.update(grads(p, x, o), st, p))
        for _ in range(2):
            u, st = step(p, st, x, o)
            out.append(host(u)["w"])
        return out

    p1 = {"w": jax.device_put(jnp.zeros((b, d)), ONE)}
    ref = updates(clipped_grad(disjoint_loss, 1.0), p1, x, onehot)
    for mesh in (AUTO, EXPLICIT):
        with jax.set_mesh(mesh):
            p = {"w": jax.device_put(jnp.zeros((b, d)), NamedSharding(mesh, P()))}
            xs, os_ = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, onehot))
            got = updates(data_parallel(clipped_grad(disjoint_loss, 1.0), mesh), p, xs, os_)
        for a, r in zip(got, ref):
            np.testing.assert_array_equal(a, r, err_msg=str(mesh.axis_types))
    print("ok bit for bit on exact gradients (Auto and Explicit)", flush=True)


def check_noise_once() -> None:
    """Zero gradients on 8 devices, C = I, epochs(n, k): the update's coordinates have variance
    sigma^2 c^2 k / B^2 (S = sqrt(k)); the sample variance of 40000 coordinates is in the chi-square
    interval (level 1e-6); noise per device (8 draws, or 8 x the same one) would be 8x or 64x."""
    n, k, b, d, sigma, clip = 4, 2, 16, 40000, 0.9, 0.7
    zero_loss = lambda p, x: jnp.sum(p["w"] * 0.0 * x)
    tx = mfnoise.dp_aggregate(mfnoise.Identity(n), clip, sigma, jax.random.key(7),
                              participation=mfnoise.Participation.epochs(n, k), expected_batch_size=b,
                              state_sharding="all_devices", mesh=AUTO)
    p = {"w": jax.device_put(jnp.zeros((d,)), NamedSharding(AUTO, P()))}
    x = jax.device_put(jnp.ones((b, d)), NamedSharding(AUTO, P("data")))
    grads = data_parallel(clipped_grad(zero_loss, clip), AUTO)
    u, _ = jax.jit(lambda p, x: tx.update(grads(p, x), tx.init(p), p))(p, x)
    z = np.asarray(jax.device_get(u["w"]), np.float64)
    var = (sigma * clip * math.sqrt(k) / b) ** 2
    lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], d) / d
    v = float(np.mean(z**2))
    assert var * lo <= v <= var * hi, (v, var)
    for wrong in (8 * var, 64 * var, var / 8):
        assert not (wrong * lo <= v <= wrong * hi)
    p1 = {"w": jax.device_put(jnp.zeros((d,)), ONE)}
    tx1 = mfnoise.dp_aggregate(mfnoise.Identity(n), clip, sigma, jax.random.key(7),
                               participation=mfnoise.Participation.epochs(n, k), expected_batch_size=b)
    u1, _ = jax.jit(lambda p, x: tx1.update(clipped_grad(zero_loss, clip)(p, x), tx1.init(p), p))(
        p1, jax.device_put(jnp.ones((b, d)), ONE))
    np.testing.assert_array_equal(z, np.asarray(u1["w"], np.float64))
    print("ok noise added once: variance", v, "expected", var, "and the one-device draw bit for bit", flush=True)


if __name__ == "__main__":
    main()
