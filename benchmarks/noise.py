"""Benchmark: streaming correlated noise and the dp_aggregate step, against DP-SGD and jax-privacy.

Measures, for float32 parameter vectors of 1M / 10M / 100M entries (one leaf):
  * a plain memory copy of the same bytes (``x + 1``: read P, write P): the bandwidth reference;
  * the noise step alone (``mfnoise.training.noise`` generator, jitted with the state donated) for
    identity (DP-SGD's independent Gaussian noise), banded 4/16/64 bands (BSR) and BLT 2/4/8
    buffers: minimum step time over the repetitions (least disturbed by other load), ratio to the
    identity step, exact state bytes, and the compiled peak memory (arguments + outputs +
    temporaries - aliased, from XLA's memory analysis) in parameter-sized arrays;
  * jax-privacy 2.0.0's ``matrix_factorization_privatizer`` on the same strategies (Gaussian, BLT-4,
    banded 4/16, banded Toeplitz 16), run in the same benchmark run from a separate venv;
  * a full ``dp_aggregate`` step (per-example clipping, noise) for a 1M-parameter MLP at batch 32
    (and, with the identity strategy, a 1M-parameter sequence model of 64 tokens per example, where
    ghost clipping uses the Gram form), against plain vmap(grad) + sum + the same noise: clipping by
    ``mfnoise.training.clipping.clipped_grad`` (ghost norms, the recommended path) and by materialised
    per-example gradients (``mfnoise.training.per_example.per_example_grads``, vmap(grad)) then clipping.

jax-privacy lives in its own venv so that it cannot change this project's jax/numpy:

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install jax-privacy==2.0.0
    /work/bench-venv/bin/pip install -e /work/main

Run:  .venv/bin/python benchmarks/noise.py [--quick] [--sizes 1e6,1e7] [--jax-privacy-python PY]
      [--dp-step-only] [--baseline-clipping OLD_CLIPPING_PY]
Writes benchmarks/results/noise.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import cast

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
N_STEPS = 1000  # strategy length; the benchmark runs far fewer steps


def blt_params(d: int) -> tuple[np.ndarray, np.ndarray]:
    """A valid d-buffer BLT (decays spread in (0, 1), small positive scales)."""
    theta = 1.0 - np.logspace(-3, -0.3, d)
    omega = np.full(d, 0.5 / d) * (1 - theta) ** 0.5
    return theta, omega


def timeit(fn, reps: int) -> float:
    """Minimum over ``reps`` runs: on a shared machine the minimum is the least disturbed."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_arrays(compiled, param_bytes: int) -> float:
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return peak / param_bytes


# -- mfnoise ---------------------------------------------------------------------------------------


def mfnoise_strategies(quick: bool, size: int) -> dict:
    import mfnoise

    out: dict[str, mfnoise.Strategy] = {"identity": mfnoise.Identity(N_STEPS)}
    bands = [4, 16] if quick else [4, 16, 64]
    buffers = [4] if quick else [2, 4, 8]
    for b in bands:
        if size * (b - 1) * 4 <= 8e9:  # state that fits this machine next to everything else
            out[f"banded-{b}"] = mfnoise.bsr(N_STEPS, b)
    for d in buffers:
        out[f"blt-{d}"] = mfnoise.BLT(*blt_params(d), N_STEPS)
    return out


def bench_copy(size: int, reps: int) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((size,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = f(x)
    x.block_until_ready()

    def run():
        nonlocal x
        x = f(x)
        x.block_until_ready()

    return timeit(run, reps)


def bench_mfnoise_noise(strategy, size: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from mfnoise.training import noise

    p = {"w": jax.ShapeDtypeStruct((size,), jnp.float32)}
    gen = noise.generator(strategy, jax.random.key(0))
    state = gen.init(p)
    step = jax.jit(gen.next, donate_argnums=0)
    compiled = step.lower(state, p).compile()
    peak = peak_arrays(compiled, size * 4)
    z, state = step(state, p)
    jax.block_until_ready((z, state))

    def run():
        nonlocal state
        z, state = step(state, p)
        jax.block_until_ready((z, state))

    t = timeit(run, reps)
    return {"seconds": t, "state_bytes": gen.state_bytes(p), "peak_param_arrays": peak}


def dp_step_model(model: str, batch: int):
    """(loss, params, batch data) of the dp-step benchmark's 1M-parameter models, float32.

    "mlp": 784-1024-256-10 on one row per example (every ghost product has T = 1).
    "sequence": two 512x1024 / 1024x512 layers applied to each of T = 64 tokens per example, the
    Gram form of ghost clipping (T (K + M) < K M) with T > 32 (the chunked, compensated product).
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    if model == "mlp":
        sizes = [784, 1024, 256, 10]
        params = {f"w{i}": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
                  for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}
        params.update({f"b{i}": jnp.zeros((b,), jnp.float32) for i, b in enumerate(sizes[1:])})
        data = (jnp.asarray(rng.normal(size=(batch, 784)), jnp.float32), jnp.asarray(rng.integers(0, 10, size=batch)))

        def loss(p, ex):
            h = ex[0]
            for i in range(len(sizes) - 1):
                h = h @ p[f"w{i}"] + p[f"b{i}"]
                if i < len(sizes) - 2:
                    h = jax.nn.relu(h)
            return -jax.nn.log_softmax(h)[ex[1]]

        return loss, params, data
    if model == "sequence":
        d, hidden, tokens = 512, 1024, 64
        params = {"w_in": jnp.asarray(rng.normal(size=(d, hidden)) / np.sqrt(d), jnp.float32),
                  "b_in": jnp.zeros((hidden,), jnp.float32),
                  "w_out": jnp.asarray(rng.normal(size=(hidden, d)) / np.sqrt(hidden), jnp.float32)}
        data = (jnp.asarray(rng.normal(size=(batch, tokens, d)), jnp.float32),
                jnp.asarray(rng.normal(size=(batch, tokens, d)), jnp.float32))

        def loss(p, ex):
            h = jax.nn.gelu(ex[0] @ p["w_in"] + p["b_in"])
            return 0.5 * jnp.mean(jnp.sum((h @ p["w_out"] - ex[1]) ** 2, axis=-1))

        return loss, params, data
    raise ValueError(f"unknown dp-step model {model!r}")


def load_clipping(path: str):
    """A clipping module from a file (e.g. ``git show REV:mfnoise/training/clipping.py``), to time against this one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_clipping", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--baseline-clipping {path!r} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bench_dp_step(strategy, reps: int, batch: int = 32, model: str = "mlp", baseline_clipping=None) -> dict:
    """Full dp_aggregate step vs vmap(grad) + sum + the same noise, for a 1M-parameter model.

    The variants run interleaved (one step of each in turn, ``reps`` times; the minimum is reported),
    so that other load on the machine affects them alike. With ``baseline_clipping`` (a module, see
    ``load_clipping``) its ghost step is timed too, as "dp_aggregate_baseline_clipping".
    """
    import jax
    import jax.numpy as jnp
    import optax

    import mfnoise
    from mfnoise.training.clipping import clipped_grad
    from mfnoise.training.per_example import per_example_grads

    loss, params, data = dp_step_model(model, batch)
    nparams = sum(int(np.prod(v.shape)) for v in params.values())
    grads = per_example_grads(loss)
    ghost = clipped_grad(loss, 1.0)
    part = mfnoise.Participation.epochs(strategy.n, 1)
    dp = mfnoise.dp_aggregate(strategy, 1.0, 1.0, jax.random.key(1), participation=part, expected_batch_size=batch)
    plain = mfnoise.correlated_noise(strategy, 1.0, jax.random.key(1))

    # the batch is an argument of the step, not a constant XLA could fold work into
    def dp_step(p, st, batch):  # ghost clipping: no per-example gradients materialised for the weights
        u, st = dp.update(ghost(p, batch), st, p)
        return u, st

    def dp_materialised_step(p, st, batch):  # per-example gradients (B x params) then clip
        u, st = dp.update(grads(p, batch), st, p)
        return u, st

    def plain_step(p, st, batch):
        g = jax.tree.map(lambda a: jnp.sum(a, axis=0), grads(p, batch))
        u, st = plain.update(g, st, p)
        return u, st

    runs = {"dp_aggregate": (dp, dp_step), "dp_aggregate_materialised": (dp, dp_materialised_step),
            "vmap_grad_sum_noise": (plain, plain_step)}
    if baseline_clipping is not None:
        from mfnoise.training.clipping import ClippedSum

        other = baseline_clipping.clipped_grad(loss, 1.0)

        def baseline_step(p, st, batch):
            r = other(p, batch)
            # dp_aggregate takes a ClippedSum, which optax's Updates type does not name
            clipped = cast(optax.Updates, ClippedSum(r.grads, r.nonfinite, r.batch_size, r.l2_clip_norm))
            return dp.update(clipped, st, p)

        runs["dp_aggregate_baseline_clipping"] = (dp, baseline_step)
    steps, states, times = {}, {}, {}
    for name, (tx, fn) in runs.items():
        steps[name] = jax.jit(fn, donate_argnums=1)
        u, states[name] = steps[name](params, tx.init(params), data)
        jax.block_until_ready((u, states[name]))
        times[name] = []
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            u, states[name] = step(params, states[name], data)
            jax.block_until_ready((u, states[name]))
            times[name].append(time.perf_counter() - t0)
    out = {"model": model, "params": nparams, "batch": batch, **{name: min(t) for name, t in times.items()}}
    out["ratio"] = out["dp_aggregate"] / out["vmap_grad_sum_noise"]
    out["ratio_materialised"] = out["dp_aggregate_materialised"] / out["vmap_grad_sum_noise"]
    if baseline_clipping is not None:
        out["ratio_baseline_clipping"] = out["dp_aggregate_baseline_clipping"] / out["vmap_grad_sum_noise"]
    return out


# -- jax-privacy (run in its own venv) -------------------------------------------------------------


def jax_privacy_main(sizes: list[int], reps: int, quick: bool) -> dict:
    """Runs inside the jax-privacy venv; prints one JSON object."""
    import jax
    import jax.numpy as jnp

    # jax-privacy is installed only in the benchmark's own venv (module docstring).
    import jax_privacy  # pyright: ignore[reportMissingImports]
    from jax_privacy import noise_addition  # pyright: ignore[reportMissingImports]
    from jax_privacy.matrix_factorization import (  # pyright: ignore[reportMissingImports]
        banded,
        buffered_toeplitz,
        toeplitz,
    )

    import mfnoise

    results: dict = {"version": jax_privacy.__version__, "sizes": {}}
    for size in sizes:
        p = {"w": jnp.zeros((size,), jnp.float32)}
        cases = {"gaussian": lambda: noise_addition.gaussian_privatizer(stddev=1.0, prng_key=0)}
        with jax.enable_x64(True):
            theta, omega = blt_params(4)
            blt = buffered_toeplitz.BufferedToeplitz.build(theta, omega, dtype=jnp.float64)
            blt_inv = blt.inverse_as_streaming_matrix()
        cases["blt-4"] = lambda m=blt_inv: noise_addition.matrix_factorization_privatizer(m, stddev=1.0, prng_key=0)
        for b in ([4, 16] if not quick else [4]):
            if size * b * 4 * 3 > 8e9:
                continue
            cols = jnp.asarray(mfnoise.bsr(N_STEPS, b).columns, jnp.float32)
            cases[f"banded-{b}"] = (lambda c=cols: noise_addition.matrix_factorization_privatizer(
                banded.ColumnNormalizedBanded(params=c).inverse_as_streaming_matrix(), stddev=1.0, prng_key=0))
        if not quick and size * 16 * 4 * 3 <= 8e9:
            coef = jnp.asarray(mfnoise.bsr(N_STEPS, 16).columns[0] / mfnoise.bsr(N_STEPS, 16).columns[0, 0])
            cases["banded-toeplitz-16"] = lambda c=coef: noise_addition.matrix_factorization_privatizer(
                toeplitz.inverse_as_streaming_matrix(c, column_normalize_for_n=N_STEPS), stddev=1.0, prng_key=0)
        row = {}
        for name, make in cases.items():
            try:
                tx = make()
                state = tx.init(p)
                step = jax.jit(tx.update, donate_argnums=1)
                compiled = step.lower(p, state).compile()
                peak = peak_arrays(compiled, size * 4)
                state_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if x.size >= size)
                u, state = step(p, state)
                jax.block_until_ready((u, state))

                def run(step=step, p=p):
                    nonlocal state
                    u, state = step(p, state)
                    jax.block_until_ready((u, state))

                row[name] = {"seconds": timeit(run, reps), "state_bytes": state_bytes, "peak_param_arrays": peak}
                del state, u
            except Exception as e:  # record, do not hide
                row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        results["sizes"][str(size)] = row
    return results


def run_jax_privacy(python: str, sizes: list[int], reps: int, quick: bool) -> dict:
    cmd = [python, __file__, "--_jax-privacy-worker", "--sizes", ",".join(map(str, sizes)), "--reps", str(reps)]
    if quick:
        cmd.append("--quick")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M params only, fewer strategies and repetitions")
    ap.add_argument("--sizes", default=None, help="comma-separated parameter counts (default 1e6,1e7,1e8)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (minimum reported)")
    ap.add_argument("--jax-privacy-python", default="/work/bench-venv/bin/python",
                    help="python of a venv with jax-privacy==2.0.0 (skipped if missing)")
    ap.add_argument("--dp-step-only", action="store_true",
                    help="only the full dp_aggregate step (no noise-alone sizes, no jax-privacy)")
    ap.add_argument("--baseline-clipping", default=None, metavar="PY",
                    help="also time the ghost step with this clipping module (a file, e.g. from "
                         "git show REV:mfnoise/training/clipping.py), interleaved with the current one")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "noise.json"))
    ap.add_argument("--_jax-privacy-worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(float(s)) for s in (args.sizes or ("1e6" if args.quick else "1e6,1e7,1e8")).split(",")]
    reps = args.reps or (3 if args.quick else 7)
    if args.worker:
        print(json.dumps(jax_privacy_main(sizes, reps, args.quick)))
        return

    import jax

    result: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU container, jax {jax.__version__}",
        "load_average_at_start": os.getloadavg(),
        "devices": str(jax.devices()),
        "n_steps": N_STEPS,
        "reps": reps,
        "sizes": {},
    }
    for size in [] if args.dp_step_only else sizes:
        row: dict = {"copy_seconds": bench_copy(size, reps)}
        for name, s in mfnoise_strategies(args.quick, size).items():
            row[name] = bench_mfnoise_noise(s, size, reps)
        base = row["identity"]["seconds"]
        for v in row.values():
            if isinstance(v, dict):
                v["ratio_vs_dpsgd"] = v["seconds"] / base
                v["ratio_vs_copy"] = v["seconds"] / row["copy_seconds"]
        result["sizes"][str(size)] = row
        print(f"done {size}", file=sys.stderr, flush=True)

    import mfnoise

    baseline = load_clipping(args.baseline_clipping) if args.baseline_clipping else None
    if baseline is not None:
        result["baseline_clipping"] = args.baseline_clipping
    result["dp_step"] = {
        name: bench_dp_step(s, reps, baseline_clipping=baseline)
        for name, s in {"identity": mfnoise.Identity(N_STEPS), "banded-4": mfnoise.bsr(N_STEPS, 4),
                        "blt-4": mfnoise.BLT(*blt_params(4), N_STEPS)}.items()
    }
    result["dp_step_sequence"] = {
        "identity": bench_dp_step(mfnoise.Identity(N_STEPS), reps, model="sequence", baseline_clipping=baseline)
    }

    if args.dp_step_only:
        result["jax_privacy"] = {"skipped": "--dp-step-only"}
    elif os.path.exists(args.jax_privacy_python):
        jp = run_jax_privacy(args.jax_privacy_python, sizes, reps, args.quick)
        result["jax_privacy"] = jp
        for size, row in jp.get("sizes", {}).items():
            ours = result["sizes"].get(size, {})
            for name, v in row.items():
                if "seconds" in v:
                    v["ratio_vs_our_dpsgd"] = v["seconds"] / ours["identity"]["seconds"]
                    mine = ours.get("identity" if name == "gaussian" else name.replace("banded-toeplitz", "banded"))
                    if isinstance(mine, dict):
                        v["mfnoise_speedup"] = v["seconds"] / mine["seconds"]
    else:
        result["jax_privacy"] = {"skipped": f"{args.jax_privacy_python} not found"}

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))


def format_table(result: dict) -> str:
    lines = [f"machine: {result['machine']}"]
    for size, row in result["sizes"].items():
        lines.append(f"\n{int(size):,} float32 params; memory copy {row['copy_seconds'] * 1e3:.1f} ms")
        lines.append(f"  {'mfnoise noise step':22s} {'ms':>8s} {'x DP-SGD':>9s} {'x copy':>7s} {'state MB':>9s} "
                     f"{'peak arrays':>12s}")
        for name, v in row.items():
            if isinstance(v, dict):
                lines.append(f"  {name:22s} {v['seconds'] * 1e3:8.1f} {v['ratio_vs_dpsgd']:9.2f} "
                             f"{v['ratio_vs_copy']:7.2f} {v['state_bytes'] / 1e6:9.1f} {v['peak_param_arrays']:12.1f}")
        jp = result.get("jax_privacy", {}).get("sizes", {}).get(size)
        if jp:
            lines.append(f"  {'jax-privacy 2.0.0':22s} {'ms':>8s} {'x ourDPSGD':>10s} {'ours faster':>11s} "
                         f"{'state MB':>9s} {'peak arrays':>12s}")
            for name, v in jp.items():
                if "seconds" in v:
                    lines.append(f"  {name:22s} {v['seconds'] * 1e3:8.1f} {v['ratio_vs_our_dpsgd']:10.2f} "
                                 f"{v.get('mfnoise_speedup', float('nan')):11.2f} {v['state_bytes'] / 1e6:9.1f} "
                                 f"{v['peak_param_arrays']:12.1f}")
                else:
                    lines.append(f"  {name:22s} {v.get('error', '')[:100]}")
    for key, title in (("dp_step", "1M-param MLP"), ("dp_step_sequence", "1M-param sequence model, T = 64")):
        lines.append(f"\nfull step, {title}, batch 32 (ms): dp_aggregate (ghost clipping | materialised"
                     " per-example grads) vs vmap(grad)+sum+same noise")
        lines.append(f"  {'strategy':12s} {'ghost':>8s} {'material':>8s} {'baseline':>8s} {'ratio':>6s} "
                     f"{'ratio mat':>9s}"
                     + (f" {'ghost, baseline clipping':>25s}" if "baseline_clipping" in result else ""))
        for name, v in result.get(key, {}).items():
            extra = ""
            if "ratio_baseline_clipping" in v:
                extra = (f" {v['dp_aggregate_baseline_clipping'] * 1e3:8.1f} ms, "
                         f"ratio {v['ratio_baseline_clipping']:5.2f}")
            lines.append(f"  {name:12s} {v['dp_aggregate'] * 1e3:8.1f} {v['dp_aggregate_materialised'] * 1e3:8.1f} "
                         f"{v['vmap_grad_sum_noise'] * 1e3:8.1f} {v['ratio']:6.2f} "
                         f"{v['ratio_materialised']:9.2f}{extra}")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
