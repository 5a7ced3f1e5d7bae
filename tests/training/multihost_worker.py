"""20 steps of dp_aggregate + SGD on a model sharded over 8 CPU devices; writes the final params.

Usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
  NUM_PROCESSES=1: one process with 8 CPU devices (the reference).
  NUM_PROCESSES=2: jax.distributed on 127.0.0.1:PORT, 4 CPU devices per process, gloo collectives.
Run by tests/test_multihost.py.
"""

from __future__ import annotations

import sys

import jax

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_num_cpu_devices", 8 // nproc)
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout=120)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mfnoise  # noqa: E402
from mfnoise.training import noise  # noqa: E402
from mfnoise.training.per_example import per_example_grads  # noqa: E402

STEPS = 20
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
specs = {"w1": P("data", "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
rng = np.random.default_rng(0)
init = {
    "w1": rng.normal(size=(16, 32)) / 4,
    "b1": np.zeros(32),
    "w2": rng.normal(size=(32, 8)) / 6,
    "b2": np.zeros(8),
}
xs = rng.normal(size=(STEPS, 12, 16))
ys = rng.normal(size=(STEPS, 12, 8))


def global_array(x: np.ndarray, spec: P) -> jax.Array:
    x = np.asarray(x, np.float32)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


params = {k: global_array(v, specs[k]) for k, v in init.items()}


def loss(p, ex):
    h = jnp.tanh(ex[0] @ p["w1"] + p["b1"])
    return jnp.sum((h @ p["w2"] + p["b2"] - ex[1]) ** 2)


grads = per_example_grads(loss, microbatch_size=4)
strategy = mfnoise.bsr(STEPS, 4)
tx = optax.chain(
    mfnoise.dp_aggregate(strategy, 1.0, 0.8, jax.random.key(123), participation=mfnoise.Participation.epochs(STEPS, 4),
                         expected_batch_size=12),
    optax.sgd(0.05, momentum=0.9),
)
state = tx.init(params)


@jax.jit
def step(p, st, x, y):
    u, st = tx.update(grads(p, (x, y)), st, p)
    return optax.apply_updates(p, u), st


for t in range(STEPS):
    x = global_array(xs[t], P())
    y = global_array(ys[t], P())
    params, state = step(params, state, x, y)

noise.check(state)
# each process holds only its shards: gather to every host before writing
full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in params.items()}
state_shards = sum(s.data.nbytes for leaf in jax.tree.leaves(state[0].noise.buffers) for s in leaf.addressable_shards)
if pid == 0:
    np.savez(out, **full, local_state_bytes=np.array(state_shards))
print("done", pid, flush=True)
if nproc > 1:
    jax.distributed.shutdown()
