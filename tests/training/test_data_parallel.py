"""Data parallelism (mfnoise.training.data_parallel): 8 devices and 2 processes against one device.

In process (one device): data_parallel on a one-device mesh is the plain clipped sum; the refusals.
In fresh processes (the test process has one device): dp_sharded_worker.py runs 8 host CPU devices,
Auto and Explicit axes, (8,) and (4, 2) meshes, against the one-device run (the sum within its
summation-order bound, bit for bit on exact gradients, the noise variance and draw of one device,
the naive shard_map shown wrong); dp_multihost_worker.py runs 2 jax.distributed processes x 4
devices, compared with that one-process run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfnoise.training.accumulation import accumulate
from mfnoise.training.clipping import ClippedSum, clipped_grad
from mfnoise.training.data_parallel import data_parallel

HERE = os.path.dirname(__file__)


def loss(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"]) ** 2)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_one_device_mesh_is_the_plain_clipped_sum(axis_type):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(axis_type,))
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(5, 3)) * 3, jnp.float32)
    want = jax.jit(clipped_grad(loss, 0.5))(p, x)
    with jax.set_mesh(mesh):
        got = jax.jit(data_parallel(accumulate(clipped_grad(loss, 0.5), 2), mesh))(p, x)
    assert isinstance(got, ClippedSum) and got.batch_size == 5 and got.l2_clip_norm == 0.5
    np.testing.assert_allclose(np.asarray(got.grads["w"]), np.asarray(want.grads["w"]), rtol=1e-6, atol=1e-7)


def test_refusals():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    fn = clipped_grad(loss, 1.0)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        data_parallel(fn, mesh, axis="batch")
    with pytest.raises(TypeError, match="Mesh"):
        data_parallel(fn, "data")  # type: ignore[arg-type]
    p = {"w": jnp.zeros((3, 2))}
    with pytest.raises(TypeError, match="ClippedSum"):
        data_parallel(lambda p, x, shared=(): {"w": jnp.zeros((x.shape[0], 3, 2))}, mesh)(p, jnp.zeros((4, 3)))


def run(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, os.path.join(HERE, script), *map(str, args)], env=env, cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """dp_sharded_worker.py's output and the one-process reference it writes."""
    ref = tmp_path_factory.mktemp("dp") / "ref.npz"
    proc = run("dp_sharded_worker.py", ref)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out, ref


def test_eight_devices_equal_one_device(one_process):
    code, out, _ = one_process
    assert code == 0 and "ALL OK" in out, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(one_process, tmp_path):
    code, out, ref = one_process
    assert code == 0, out
    port = free_port()
    procs = [run("dp_multihost_worker.py", i, 2, port, tmp_path / "multi.npz") for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    a, b = np.load(ref), np.load(tmp_path / "multi.npz")
    for k in ("w1", "b1", "w2", "b2"):
        assert np.all(np.isfinite(a[k]))
        # the same sums over the same shards; only the reduction order of the gloo psum may differ
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # each process holds its 4 devices' part of the noise state: w1's split, the others replicated
    assert 0 < int(b["local_state_bytes"]) < int(a["local_state_bytes"])
