"""Data-parallel private training on a (8,) "data" mesh, one process or two; writes the final params.

Usage: dp_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
  NUM_PROCESSES=2: jax.distributed on 127.0.0.1:PORT, 4 CPU devices per process, gloo collectives.
(The one-process reference is ``train`` run by dp_sharded_worker.py, which has 8 devices.)
Run by tests/training/test_data_parallel.py.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

STEPS, BATCH, CLIP = 3, 16, 0.5


def data() -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    init = {"w1": rng.normal(size=(8, 12)) / 3, "b1": np.zeros(12), "w2": rng.normal(size=(12, 4)) / 4,
            "b2": np.zeros(4)}
    xs = rng.normal(size=(STEPS, BATCH, 3, 8)) * rng.uniform(0.2, 3, size=(STEPS, BATCH, 1, 1))
    ys = rng.normal(size=(STEPS, BATCH, 3, 4))
    return {k: np.asarray(v, np.float32) for k, v in init.items()}, xs.astype(np.float32), ys.astype(np.float32)


def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.sum((h @ p["w2"] + p["b2"] - y) ** 2)


def transform(mesh=None):
    import mfnoise

    strategy = mfnoise.BLT(np.array([0.9, 0.4]), np.array([0.3, 0.1]), STEPS)
    kw = {} if mesh is None else {"state_sharding": "all_devices", "mesh": mesh}
    return mfnoise.mf_sgd(strategy, 0.05, CLIP, 0.8, jax.random.key(123),
                          participation=mfnoise.Participation.epochs(STEPS, STEPS), expected_batch_size=BATCH,
                          momentum=0.9, **kw)


def train(mesh, microbatch: int | None = 1) -> tuple[dict, int, Any]:
    """STEPS steps of data_parallel(accumulate(clipped_grad)) + mf_sgd; (final params on every host,
    bytes of noise state this process holds, the final state)."""
    from jax.experimental import multihost_utils

    from mfnoise.training import noise
    from mfnoise.training.accumulation import accumulate
    from mfnoise.training.clipping import clipped_grad
    from mfnoise.training.data_parallel import data_parallel

    init, xs, ys = data()

    def global_array(x, spec):
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])

    params = {k: global_array(v, P()) for k, v in init.items()}
    clip_fn = clipped_grad(loss, CLIP)
    grads = data_parallel(clip_fn if microbatch is None else accumulate(clip_fn, microbatch), mesh)
    tx = transform(mesh)
    state: Any = tx.init(params)

    @jax.jit
    def step(p, st, x, y):
        u, st = tx.update(grads(p, x, y), st, p)
        return optax.apply_updates(p, u), st

    for t in range(STEPS):
        params, state = step(params, state, global_array(xs[t], P("data")), global_array(ys[t], P("data")))
    noise.check(state)
    local = sum(s.data.nbytes for leaf in jax.tree.leaves(state[0].noise.buffers) for s in leaf.addressable_shards)
    full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in params.items()}
    return full, local, state


def main() -> None:
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_num_cpu_devices", 8 // nproc)
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                                   initialization_timeout=120)
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    full, local, _ = train(mesh)
    if pid == 0:
        np.savez(out, **full, local_state_bytes=np.array(local))
    print("done", pid, flush=True)
    if nproc > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
