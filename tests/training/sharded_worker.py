"""Sharded-noise checks, run by tests/test_noise.py in a fresh process with 8 host CPU devices.

(The test process has already initialised JAX with one device, so this runs as a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8.) Prints "ALL OK" when every check passes.
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mfnoise  # noqa: E402
from mfnoise.training import noise  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
N = 8
STRATEGIES = {
    "banded4": mfnoise.bsr(N, 4),
    "blt3": mfnoise.BLT(np.array([0.95, 0.7, 0.2]), np.array([0.3, 0.2, 0.1]), N),
    "bisr5": mfnoise.bisr(N, 5),
}
SHAPES = {"w": (64, 40), "b": (40,)}


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run_noise(gen, p, steps=N):
    state = gen.init(p)
    step = jax.jit(gen.next, donate_argnums=0)
    out = []
    for _ in range(steps):
        z, state = step(state, p)
        out.append(host(z))
    return out, state


def assert_same(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=what)


def per_device_bytes(tree) -> dict:
    out: dict = {}
    for x in jax.tree.leaves(tree):
        for sh in x.addressable_shards:
            out[sh.device] = out.get(sh.device, 0) + sh.data.nbytes
    return out


def main() -> None:
    key = jax.random.key(11)
    one = jax.devices()[0]
    plain = {k: jax.device_put(jnp.zeros(v, jnp.float32), one) for k, v in SHAPES.items()}

    mesh1d = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    mesh2d = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    meshx = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    layouts = {
        "1d-sharded": (mesh1d, {"w": P("d", None), "b": P("d")}),
        "2d-sharded": (mesh2d, {"w": P("data", "model"), "b": P("model")}),
    }
    for name, s in STRATEGIES.items():
        ref, _ = run_noise(noise.generator(s, key), plain)
        for lname, (mesh, specs) in list(layouts.items())[1:]:
            p = {k: jax.device_put(plain[k], NamedSharding(mesh, specs[k])) for k in SHAPES}
            gen = noise.generator(s, key)
            got, state = run_noise(gen, p)
            assert_same(ref, got, f"{name} {lname}")
            if gen.state_arrays:
                for k in SHAPES:
                    want = NamedSharding(mesh, P(None, *specs[k]))
                    assert state.buffers[k].sharding.is_equivalent_to(want, 1 + len(SHAPES[k])), (name, lname, k)
        # 1d fully sharded: per-device state bytes = total / 8 exactly.
        mesh, specs = layouts["1d-sharded"]
        p = {k: jax.device_put(plain[k], NamedSharding(mesh, specs[k])) for k in SHAPES}
        gen = noise.generator(s, key)
        state = gen.init(p)
        total = gen.state_bytes(p)
        assert set(per_device_bytes(state.buffers).values()) <= {total // 8}, (name, per_device_bytes(state.buffers))
        # ZeRO: replicated params, state split across all 8 devices.
        p = {k: jax.device_put(plain[k], NamedSharding(mesh1d, P())) for k in SHAPES}
        gen = noise.generator(s, key, state_sharding="all_devices")
        got, state = run_noise(gen, p)
        assert_same(ref, got, f"{name} all_devices")
        if gen.state_arrays:
            assert set(per_device_bytes(state.buffers).values()) == {total // 8}, (name, "zero")
        # Explicit mesh axes (sharding in types).
        p = {k: jax.device_put(plain[k], NamedSharding(meshx, layouts["2d-sharded"][1][k])) for k in SHAPES}
        with jax.set_mesh(meshx):
            got, state = run_noise(noise.generator(s, key), p)
        assert_same(ref, got, f"{name} explicit")
        print("ok", name, flush=True)

    # Compiled memory of one step at 8M float32 params sharded 8 ways: no full-size replicated
    # temporaries (temp bytes per device well below the 32 MB of one parameter-sized array).
    big = {"w": jax.ShapeDtypeStruct((2048, 4096), jnp.float32, sharding=NamedSharding(mesh1d, P("d", None)))}
    for name in ("banded4", "blt3"):
        gen = noise.generator(STRATEGIES[name], key)
        st = jax.eval_shape(gen.init, big)
        spec = NamedSharding(mesh1d, P(None, "d", None))
        st = st._replace(buffers={"w": jax.ShapeDtypeStruct(st.buffers["w"].shape, jnp.float32, sharding=spec)})
        compiled = jax.jit(gen.next, donate_argnums=0).lower(st, big).compile()
        mem = compiled.memory_analysis()
        param_bytes = 2048 * 4096 * 4
        print("memory", name, "temp", mem.temp_size_in_bytes, "args", mem.argument_size_in_bytes,
              "out", mem.output_size_in_bytes, flush=True)
        # JAX's threefry sampler alone needs 3 shard-sized temporaries on CPU (identity has them
        # too); the recurrence may add at most 2 more (no copy of the state, nothing replicated).
        assert mem.temp_size_in_bytes <= 5 * param_bytes // 8 + (1 << 16), (name, mem.temp_size_in_bytes)

    # dp_aggregate + SGD on a sharded model equals the unsharded run.
    def loss(params, ex):
        h = jnp.tanh(ex["x"] @ params["w"] + params["b"])
        return jnp.sum((h - ex["y"]) ** 2)

    from mfnoise.training.per_example import per_example_grads

    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(N, 16, 64)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(N, 16, 40)), jnp.float32)}
    init = {"w": jnp.asarray(rng.normal(size=(64, 40)) * 0.1, jnp.float32), "b": jnp.zeros((40,), jnp.float32)}
    tx = mfnoise.mf_sgd(mfnoise.bsr(N, 4), 0.05, 1.0, 0.7, key, participation=mfnoise.Participation.epochs(N, 2),
                        expected_batch_size=16)
    grads = per_example_grads(loss, microbatch_size=4)

    def train(params, grads=grads):
        state = tx.init(params)

        @jax.jit
        def step(params, state, batch):
            g = grads(params, batch)
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

        for t in range(N):
            params, state = step(params, state, jax.tree.map(lambda a, t=t: a[t], data))
        noise.check(state)
        return host(params)

    ref = train(jax.device_put(init, one))
    p = {k: jax.device_put(init[k], NamedSharding(mesh2d, layouts["2d-sharded"][1][k])) for k in SHAPES}
    got = train(p)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    print("ok dp_aggregate sharded", flush=True)

    # Ghost clipping on the sharded model: the same training run.
    from mfnoise.training.clipping import clipped_grad

    got = train(p, clipped_grad(loss, 1.0))
    for k in SHAPES:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with jax.set_mesh(meshx):
        px = {k: jax.device_put(init[k], NamedSharding(meshx, layouts["2d-sharded"][1][k])) for k in SHAPES}
        got = train(px, clipped_grad(loss, 1.0))
    for k in SHAPES:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    print("ok clipped_grad sharded (Auto and Explicit axes)", flush=True)

    # dp_aggregate alone on per-example gradients with Explicit mesh axes (jax.make_mesh's default).
    g = {k: jnp.asarray(rng.normal(size=(6, *v)), jnp.float32) for k, v in SHAPES.items()}
    g["w"] = g["w"].at[3, 0, 0].set(jnp.nan)
    agg = mfnoise.dp_aggregate(mfnoise.bsr(N, 4), 1.0, 0.7, key, participation=mfnoise.Participation.epochs(N, 2),
                               expected_batch_size=6)

    def three_steps(p, g):
        st = agg.init(p)
        upd = jax.jit(agg.update)
        outs = []
        for _ in range(3):
            u, st = upd(g, st)
            outs.append(host(u))
        return outs, int(st.nonfinite)

    ref, dropped = three_steps(plain, g)
    assert dropped == 3
    specs = layouts["2d-sharded"][1]
    with jax.set_mesh(meshx):
        p = {k: jax.device_put(plain[k], NamedSharding(meshx, specs[k])) for k in SHAPES}
        gx = {k: jax.device_put(g[k], NamedSharding(meshx, P(None, *specs[k]))) for k in SHAPES}
        got, dropped = three_steps(p, gx)
    assert dropped == 3
    for a, b in zip(ref, got):
        for k in SHAPES:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    print("ok dp_aggregate explicit", flush=True)
    print("ALL OK")


if __name__ == "__main__":
    main()
