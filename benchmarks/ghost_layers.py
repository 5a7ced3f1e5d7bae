"""Benchmark: ghost norms of embedding lookups (and tied embeddings) against materialised per-example
gradients, side by side in one run.

Model: an embedding table E (V x M) looked up at T token ids per example, l = sum(tanh(E[ids]) * y)
("lookup"), and the same with a tied output head, l += logsumexp-free sum(sin(h E^T)) ("tied"). For
each: the clipped sum by ``mfnoise.training.clipping.clipped_grad`` (book-keeping lookup path) and
by ``per_example_grads`` (vmap(grad): B copies of the V x M table) + ``clipped_sum``, and a
non-private ``grad`` of the batch loss: minimum step time over the repetitions and XLA's compiled
temporary memory (``memory_analysis().temp_size_in_bytes``), with ratios against the materialised path.

Run:  .venv/bin/python benchmarks/ghost_layers.py [--quick] [--vocab 8192 --width 256 --tokens 128 --batch 16]
Writes benchmarks/results/ghost_layers.json and prints a table (machine and load average included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.training.clipping import clipped_grad, clipped_sum, ghost_leaves
from mfnoise.training.per_example import per_example_grads


def lookup_loss(p, ids, y):
    return jnp.sum(jnp.tanh(p["E"][ids]) * y)


def tied_loss(p, ids, y):
    h = jnp.tanh(p["E"][ids]) * y
    return jnp.sum(h) + jnp.sum(jnp.sin(jnp.einsum("tm,vm->tv", h, p["E"])))


def measure(fn, args, reps):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else -1
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return min(times), temp


def main() -> None:
    ap = argparse.ArgumentParser(description="ghost norms of embedding lookups vs materialised per-example gradients")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="V=1024, M=64, 3 repetitions")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ghost_layers.json"))
    a = ap.parse_args()
    if a.quick:
        a.vocab, a.width, a.reps = 1024, 64, 3
    v, m, t, b = a.vocab, a.width, a.tokens, a.batch
    rng = np.random.default_rng(0)
    params = {"E": jnp.asarray(rng.normal(size=(v, m)) / np.sqrt(m), jnp.float32)}
    ids = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    y = jnp.asarray(rng.normal(size=(b, t, m)), jnp.float32)
    rows = []
    for name, loss in (("lookup", lookup_loss), ("tied", tied_loss)):
        assert ghost_leaves(loss, params, ids[0], y[0]) == ["['E']"]
        paths = {
            "materialised": lambda p, i, z, loss=loss: clipped_sum(per_example_grads(loss)(p, i, z), 1.0)[0],
            "ghost": lambda p, i, z, loss=loss: clipped_grad(loss, 1.0)(p, i, z).grads,
            "non-private": lambda p, i, z, loss=loss: jax.grad(
                lambda q: jnp.sum(jax.vmap(loss, in_axes=(None, 0, 0))(q, i, z)))(p),
        }
        got = {k: measure(f, (params, ids, y), a.reps) for k, f in paths.items()}
        base_t, base_m = got["materialised"]
        for k, (sec, temp) in got.items():
            rows.append({"model": name, "path": k, "seconds": sec, "temp_bytes": temp,
                         "time_vs_materialised": sec / base_t, "temp_vs_materialised": temp / base_m})
    load = os.getloadavg()
    machine = f"{platform.machine()} {os.cpu_count()}-core {jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    print(f"V={v} M={m} T={t} B={b}; {machine}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'model':8} {'path':13} {'time (s)':>10} {'temp (MiB)':>11} {'time/mat':>9} {'temp/mat':>9}")
    for r in rows:
        print(f"{r['model']:8} {r['path']:13} {r['seconds']:10.4f} {r['temp_bytes'] / 2**20:11.1f} "
              f"{r['time_vs_materialised']:9.3f} {r['temp_vs_materialised']:9.3f}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"vocab": v, "width": m, "tokens": t, "batch": b, "reps": a.reps, "machine": machine,
                   "loadavg": load, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
