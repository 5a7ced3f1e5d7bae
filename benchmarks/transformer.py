"""A private training step against a non-private one for decoder-only transformers (issue 14).

For each model size (about 5M and 30M parameters; ``--quick``: about 1M), with the same random token
batch (B windows of T + 1 tokens) and the same optimizer (SGD with momentum 0.9):

* **non-private**: ``jax.grad`` of the mean next-token cross-entropy, then the optimizer;
* **mfnoise**: ``mfnoise.clipped_grad`` of the one-example loss (ghost norms where the loss allows,
  materialised per-example gradients elsewhere), then ``optax.chain(mfnoise.dp_aggregate(BLT-4),
  optimizer)`` (correlated noise from a 4-buffer BLT, divided by B);
* **mfnoise, microbatched**: the same with ``mfnoise.training.accumulation.accumulate(clipped_grad,
  k)`` (a ``lax.scan`` over B / k microbatches of k examples, their clipped sums added, the noise
  once) for each k of the same grid as jax-privacy's; the best k by CPU time is the row;
* **jax-privacy 2.0.0** (in its own venv, a subprocess running this file): ``jax_privacy.clipping.
  clipped_grad`` (vmap over examples, per-example gradients materialised) for each microbatch size
  of a small grid, then its ``matrix_factorization_privatizer`` with a 4-buffer BLT (the same
  theta, omega as ours), divided by B, then the same optimizer; the best microbatch size by CPU
  time is the row, the others are listed.

Every step is one jitted function (params and optimizer state donated). Time: the median of
``--reps`` runs after a compile-and-warm-up run, as wall time and as the process's CPU time (all
threads; on a shared machine the wall time is mostly the wait for a core, the CPU time the work).
Memory: XLA's compiled ``memory_analysis()`` of the step, temp + arguments (arguments include the
optimizer state, hence BLT-4's 4 parameter-sized buffers), and
``jax.devices()[0].memory_stats()['peak_bytes_in_use']`` where the backend reports it (GPU). Ratios
are against the non-private step of the same process (goal: private <= 1.3x time, <= 1.5x memory).

The model (plain JAX, a pytree of arrays, so both libraries see the same pure function):
token embedding E (V, D) tied with the output head (logits = h E^T), learned positions (T, D),
L pre-norm blocks (RMSNorm scale; fused QKV (D, 3D); causal softmax attention over H heads; output
projection (D, D); RMSNorm scale; MLP (D, 4D) + bias, GELU, (4D, D) + bias), final RMSNorm.

Run:  .venv/bin/python benchmarks/transformer.py [--quick] [--sizes 5M,30M] [--reps 3]
          [--jax-privacy-python /work/bench-venv/bin/python] [--device cpu|gpu] [--out PATH]
jax-privacy venv:  python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install jax-privacy==2.0.0 flax
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
N_STEPS = 1000  # the BLT's length; the benchmark runs a handful of steps
MOMENTUM = 0.9
LEARNING_RATE = 0.1
CLIP = 1.0

# name -> (vocab, width, layers, heads, seq_len, batch)
MODELS = {
    "1M": (1024, 128, 4, 4, 64, 8),
    "5M": (4096, 256, 5, 4, 128, 16),
    "30M": (8192, 512, 8, 8, 128, 16),
}


def blt_params(d: int) -> tuple[np.ndarray, np.ndarray]:
    """A valid d-buffer BLT (decays spread in (0, 1), small positive scales): as benchmarks/noise.py.
    The step's cost does not depend on the values, only on the number of buffers."""
    theta = 1.0 - np.logspace(-3, -0.3, d)
    omega = np.full(d, 0.5 / d) * (1 - theta) ** 0.5
    return theta, omega


# -- the model -------------------------------------------------------------------------------------
def init_params(key: jax.Array, vocab: int, width: int, layers: int, seq_len: int) -> dict:
    ks = iter(jax.random.split(key, 4 + 6 * layers))

    def normal(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        return jax.random.normal(next(ks), shape, jnp.float32) / math.sqrt(fan_in)

    blocks = []
    for _ in range(layers):
        blocks.append({
            "norm1": jnp.ones((width,), jnp.float32),
            "qkv": normal((width, 3 * width), width),
            "proj": normal((width, width), width),
            "norm2": jnp.ones((width,), jnp.float32),
            "up": normal((width, 4 * width), width),
            "up_bias": jnp.zeros((4 * width,), jnp.float32),
            "down": normal((4 * width, width), 4 * width),
            "down_bias": jnp.zeros((width,), jnp.float32),
        })
    return {"embed": normal((vocab, width), width), "pos": 0.02 * normal((seq_len, width), 1),
            "blocks": blocks, "norm": jnp.ones((width,), jnp.float32)}


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6) * scale


def forward(params: dict, tokens: jax.Array, heads: int) -> jax.Array:
    """tokens (T,) int -> logits (T, V): one example, no batch axis."""
    t = tokens.shape[0]
    x = jnp.take(params["embed"], tokens, axis=0) + params["pos"][:t]
    d = x.shape[-1]
    dh = d // heads
    causal = jnp.tril(jnp.ones((t, t), bool))
    for blk in params["blocks"]:
        q, k, v = jnp.split((_rms_norm(x, blk["norm1"]) @ blk["qkv"]).reshape(t, 3, heads, dh), 3, axis=1)
        scores = jnp.einsum("thd,shd->hts", q[:, 0], k[:, 0]) / math.sqrt(dh)
        w = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        x = x + jnp.einsum("hts,shd->thd", w, v[:, 0]).reshape(t, d) @ blk["proj"]
        h = jax.nn.gelu(_rms_norm(x, blk["norm2"]) @ blk["up"] + blk["up_bias"])
        x = x + h @ blk["down"] + blk["down_bias"]
    return _rms_norm(x, params["norm"]) @ params["embed"].T


def example_loss(params: dict, window: jax.Array, heads: int) -> jax.Array:
    """Mean next-token cross-entropy of ONE window (T + 1,)."""
    logits = forward(params, window[:-1], heads)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, window[1:, None], axis=-1))


def setup(name: str, seed: int = 0) -> tuple[dict, jax.Array, int, dict]:
    vocab, width, layers, heads, seq_len, batch = MODELS[name]
    params = init_params(jax.random.key(seed), vocab, width, layers, seq_len)
    data = jax.random.randint(jax.random.key(seed + 1), (batch, seq_len + 1), 0, vocab, jnp.int32)
    info = {"vocab": vocab, "width": width, "layers": layers, "heads": heads, "seq_len": seq_len, "batch": batch,
            "params": int(sum(x.size for x in jax.tree.leaves(params)))}
    return params, data, heads, info


# -- measuring ---------------------------------------------------------------------------------------
def measure(step: Any, params: Any, state: Any, data: jax.Array, reps: int) -> dict:
    """Compile (memory analysis), one warm-up run, then ``reps`` timed runs (median)."""
    jitted = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jitted.lower(params, state, data).compile()
    compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    memory = None
    if mem is not None:
        memory = {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
                  "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes)}
        memory["peak_bytes"] = memory["temp_bytes"] + memory["argument_bytes"]
    params, state = compiled(params, state, data)
    jax.block_until_ready((params, state))
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        params, state = compiled(params, state, data)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # CPU seconds (all threads of the process) measure the work; on a shared machine the wall time
    # mostly measures the wait for a core
    out = {"seconds": statistics.median(times), "times": times, "cpu_seconds": statistics.median(cpu),
           "cpu_times": cpu, "compile_seconds": compile_seconds, "memory": memory}
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def _sgd() -> Any:
    import optax

    return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


def non_private_step(heads: int) -> tuple[Any, Any]:
    import optax

    opt = _sgd()

    def mean_loss(p: Any, x: jax.Array) -> jax.Array:
        return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0, None))(p, x, heads))

    def step(p: Any, s: Any, x: jax.Array) -> tuple[Any, Any]:
        u, s = opt.update(jax.grad(mean_loss)(p, x), s, p)
        return optax.apply_updates(p, u), s

    return step, opt


def mfnoise_step(heads: int, batch: int, buffers: int = 4, microbatch: int | None = None) -> tuple[Any, Any, dict]:
    import optax

    import mfnoise
    from mfnoise.training.accumulation import accumulate

    theta, omega = blt_params(buffers)
    strategy = mfnoise.BLT(theta, omega, N_STEPS)
    p = mfnoise.Participation(N_STEPS, 1, 1)
    opt = optax.chain(mfnoise.dp_aggregate(strategy, CLIP, 1.0, jax.random.key(0), participation=p,
                                           expected_batch_size=float(batch)), _sgd())
    clipped = mfnoise.clipped_grad(lambda prm, w: example_loss(prm, w, heads), CLIP)
    if microbatch is not None:
        clipped = accumulate(clipped, microbatch)

    def step(prm: Any, s: Any, x: jax.Array) -> tuple[Any, Any]:
        u, s = opt.update(clipped(prm, x), s, prm)
        return optax.apply_updates(prm, u), s

    return step, opt, {}


def ghost_report(params: Any, data: jax.Array, heads: int) -> dict:
    """Which leaves mfnoise's clipped_grad sends the ghost way for this model (paths)."""
    from mfnoise.training.clipping import ghost_leaves

    ghost = ghost_leaves(lambda prm, w: example_loss(prm, w, heads), params, data[0])
    every = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {"ghost": ghost, "materialised": sorted(set(every) - set(ghost))}


def _grid_sizes(grid: list[int | None], batch: int) -> list[int | None]:
    """The microbatch sizes of ``grid`` that split ``batch`` evenly (None: the whole batch)."""
    return [m for m in grid if m is None or (m < batch and batch % m == 0)]


def _best(row: dict) -> None:
    """row["best"] / row["best_microbatch"]: the grid entry with the least CPU time."""
    ok = {k: v for k, v in row["grid"].items() if "seconds" in v}
    if ok:  # by CPU time: on a shared machine the wall time is mostly the wait for a core
        best = min(ok, key=lambda k: ok[k]["cpu_seconds"])
        row["best_microbatch"] = int(best)
        row["best"] = ok[best]


def mfnoise_main(names: list[str], reps: int, save: Any = None, grid: list[int | None] | None = None) -> dict:
    """Our rows for each model (``grid``: microbatch sizes for the accumulated rows); ``save(partial)``
    after each measurement (a killed run keeps what it measured)."""
    out: dict = {}
    for name in names:
        params, data, heads, info = setup(name)
        row: dict = {"model": info}
        try:
            row["leaves"] = ghost_report(params, data, heads)
        except Exception as e:  # record, do not hide
            row["leaves"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        makers = {"non-private": lambda heads=heads: non_private_step(heads),
                  "mfnoise": lambda heads=heads, batch=info["batch"]: mfnoise_step(heads, batch)[:2]}
        micro = {"grid": {}}
        for m in _grid_sizes(grid or [], info["batch"]):
            if m is not None:
                makers[f"micro {m}"] = lambda heads=heads, batch=info["batch"], m=m: mfnoise_step(heads, batch,
                                                                                                  microbatch=m)[:2]
        out[name] = row
        for label, make in makers.items():
            print(f"  {name} mfnoise {label} ...", file=sys.stderr, flush=True)
            try:
                step, opt = make()
                p = jax.tree.map(jnp.copy, params)
                measured = measure(step, p, opt.init(p), data, reps)
            except Exception as e:
                measured = {"error": f"{type(e).__name__}: {e}"[:500]}
            if label.startswith("micro "):
                micro["grid"][label.split()[1]] = measured
                _best(micro)
                row["mfnoise_microbatched"] = micro
            else:
                row[label] = measured
            if save is not None:
                save(out)
    return out


def jax_privacy_main(names: list[str], reps: int, grid: list[int | None]) -> dict:
    """Runs inside the jax-privacy venv (no mfnoise there); prints one JSON object."""
    # jax-privacy is installed only in the benchmark's own venv (module docstring).
    import jax_privacy  # pyright: ignore[reportMissingImports]
    import optax
    from jax_privacy import noise_addition  # pyright: ignore[reportMissingImports]
    from jax_privacy.clipping import clipped_grad  # pyright: ignore[reportMissingImports]
    from jax_privacy.matrix_factorization import buffered_toeplitz  # pyright: ignore[reportMissingImports]

    with jax.enable_x64(True):
        theta, omega = blt_params(4)
        blt_inv = buffered_toeplitz.BufferedToeplitz.build(theta, omega, dtype=jnp.float64) \
            .inverse_as_streaming_matrix()
    out: dict = {"version": jax_privacy.__version__, "jax": jax.__version__}
    for name in names:
        params, data, heads, info = setup(name)
        batch = info["batch"]
        row: dict = {"model": info, "grid": {}}
        for micro in _grid_sizes(grid, batch):
            print(f"  {name} jax-privacy microbatch {micro} ...", file=sys.stderr, flush=True)
            try:
                clipped = clipped_grad(lambda prm, w, heads=heads: example_loss(prm, w, heads), l2_clip_norm=CLIP,
                                       batch_argnums=1, keep_batch_dim=False, microbatch_size=micro)
                privatizer = noise_addition.matrix_factorization_privatizer(blt_inv, stddev=CLIP, prng_key=0)
                opt = optax.chain(privatizer, optax.scale(1.0 / batch), _sgd())

                def step(prm: Any, s: Any, x: jax.Array, clipped: Any = clipped, opt: Any = opt) -> tuple[Any, Any]:
                    u, s = opt.update(clipped(prm, x), s, prm)
                    return optax.apply_updates(prm, u), s

                p = jax.tree.map(jnp.copy, params)
                row["grid"][str(micro or batch)] = measure(step, p, opt.init(p), data, reps)
            except Exception as e:  # record, do not hide
                row["grid"][str(micro or batch)] = {"error": f"{type(e).__name__}: {e}"[:500]}
        _best(row)
        out[name] = row
    return out


def run_jax_privacy(python: str, names: list[str], reps: int, grid: str, device: str) -> dict:
    if not os.path.exists(python):
        return {"error": f"no jax-privacy python at {python} (see the module docstring for the venv)"}
    cmd = [python, __file__, "--_jax-privacy-worker", "--sizes", ",".join(names), "--reps", str(reps),
           "--microbatches", grid, "--device", device]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=6000)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the table -------------------------------------------------------------------------------------
def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def format_table(result: dict) -> str:
    lines = [f"machine: {result['machine']}; load average {result['load_average_at_start']} at start, "
             f"{result['load_average_at_end']} at end; mfnoise {result['revision']}", ""]
    header = ("model", "params", "step", "ms", "x time", "CPU ms", "x CPU", "peak MB", "x memory", "compile s")
    rows = []
    for name, row in result["mfnoise"].items() if isinstance(result["mfnoise"], dict) else []:
        base = row.get("non-private", {})
        jp = result["jax_privacy"].get(name, {}) if isinstance(result["jax_privacy"], dict) else {}
        cases = [("non-private (grad + sgd)", base), ("mfnoise clipped_grad + BLT-4", row.get("mfnoise", {}))]
        micro = row.get("mfnoise_microbatched", {})
        if "best" in micro:
            cases.append((f"mfnoise accumulate(clipped_grad, {micro['best_microbatch']}) + BLT-4", micro["best"]))
        if "best" in jp:
            cases.append((f"jax-privacy clipped_grad (micro {jp['best_microbatch']}) + BLT-4", jp["best"]))
        elif jp:
            cases.append(("jax-privacy", {"error": jp.get("error", "no result")}))
        for label, r in cases:
            if "seconds" not in r:
                rows.append((name, str(row["model"]["params"]), label, "error: " + str(r.get("error", ""))[:60],
                             "", "", "", "", "", ""))
                continue
            peak = (r.get("memory") or {}).get("peak_bytes")
            bpeak = (base.get("memory") or {}).get("peak_bytes")
            rows.append((name, f"{row['model']['params'] / 1e6:.2f}M", label, f"{1e3 * r['seconds']:.0f}",
                         f"{r['seconds'] / base['seconds']:.2f}" if "seconds" in base else "-",
                         f"{1e3 * r['cpu_seconds']:.0f}" if "cpu_seconds" in r else "-",
                         f"{r['cpu_seconds'] / base['cpu_seconds']:.2f}" if "cpu_seconds" in r and "cpu_seconds" in base
                         else "-", _mb(peak),
                         f"{peak / bpeak:.2f}" if peak and bpeak else "-", f"{r['compile_seconds']:.1f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    mine = result["mfnoise"] if isinstance(result["mfnoise"], dict) else {}
    grids = [(f"mfnoise {name}", row.get("mfnoise_microbatched", {})) for name, row in mine.items()]
    if isinstance(result["jax_privacy"], dict):
        grids += [(f"jax-privacy {name}", jp) for name, jp in result["jax_privacy"].items()]
    for label, g in grids:
        if isinstance(g, dict) and g.get("grid"):
            lines.append(f"{label} microbatch grid (CPU ms / peak MB): " + ", ".join(
                f"{k}: {1e3 * v['cpu_seconds']:.0f} / {_mb((v.get('memory') or {}).get('peak_bytes'))}"
                if "seconds" in v else f"{k}: error" for k, v in g["grid"].items()))
    for name, row in result["mfnoise"].items():
        leaves = row.get("leaves", {})
        if "ghost" in leaves:
            lines.append(f"mfnoise {name}: {len(leaves['ghost'])} leaves by ghost norms, "
                         f"{len(leaves['materialised'])} materialised ({', '.join(leaves['materialised'][:6])}"
                         f"{', ...' if len(leaves['materialised']) > 6 else ''})")
    if isinstance(result["jax_privacy"], dict) and "error" in result["jax_privacy"]:
        lines.append("jax-privacy: " + str(result["jax_privacy"]["error"])[-300:])
    lines.append("ms: median wall time of a step after compile; CPU ms: median CPU time of the process (all threads)")
    lines.append("over the step; peak MB: XLA memory_analysis temp + arguments; x: / the non-private step")
    return "\n".join(lines)


def _git_head() -> str:
    try:
        import mfnoise

        root = os.path.dirname(os.path.dirname(os.path.abspath(mfnoise.__file__)))
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return f"{rev.stdout.strip() or 'unknown'} ({root})"
    except Exception as e:  # pragma: no cover - informational only
        return f"unknown ({e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 1M model only, 2 reps (about a minute)")
    ap.add_argument("--sizes", default=None, help=f"comma-separated, from {', '.join(MODELS)} (default 5M,30M)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per step (median; default 3, quick 2)")
    ap.add_argument("--microbatches", default="none,8,4",
                    help="microbatch sizes to try, for jax-privacy's clipped_grad and mfnoise's accumulate "
                         "('none': the whole batch in one call; mfnoise's whole-batch row is always run)")
    ap.add_argument("--jax-privacy-python", default="/work/bench-venv/bin/python",
                    help="python of the venv with jax-privacy 2.0.0 ('none' to skip)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="run on this device (gpu: fails unless JAX sees a GPU)")
    ap.add_argument("--label", default="", help="suffix of the JSON file name (e.g. the revision)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/transformer[-LABEL].json)")
    ap.add_argument("--_jax-privacy-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names: list[str] = str(args.sizes or ("1M" if args.quick else "5M,30M")).split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; expected some of {list(MODELS)}")
    reps = args.reps or (2 if args.quick else 3)
    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else "cpu")
    try:
        devices = jax.devices()
    except (RuntimeError, AssertionError) as e:  # jax 0.10 asserts when no platform of the list initialises
        sys.exit(f"--device {args.device}: JAX finds no {args.device.upper()} here ({type(e).__name__}: {e}); "
                 f"a GPU run needs a machine with one and jax[cuda]")
    grid = [None if m.strip().lower() == "none" else int(m) for m in args.microbatches.split(",")]
    if args._jax_privacy_worker:
        print(json.dumps(jax_privacy_main(names, reps, grid)))
        return
    load_start = os.getloadavg()
    out = args.out or os.path.join(HERE, "results", f"transformer{'-quick' if args.quick else ''}"
                                   f"{'-' + args.label if args.label else ''}.json")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()}-core {args.device.upper()} "
                   f"({devices[0].device_kind}) container, shared; jax {jax.__version__}",
        "load_average_at_start": [round(x, 2) for x in load_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "revision": _git_head(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "reps": reps,
        "quick": args.quick,
        "models": {n: dict(zip(("vocab", "width", "layers", "heads", "seq_len", "batch"), MODELS[n])) for n in names},
        "command": " ".join(sys.argv),
        "jax_privacy": {"pending": True},
    }

    def save(mine: dict) -> None:
        result["mfnoise"] = mine
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    mine = mfnoise_main(names, reps, save, grid)
    if args.jax_privacy_python.lower() == "none":
        result["jax_privacy"] = {"skipped": True}
    else:
        print("  jax-privacy (subprocess) ...", file=sys.stderr, flush=True)
        result["jax_privacy"] = run_jax_privacy(args.jax_privacy_python, names, reps, args.microbatches, args.device)
    save(mine)
    print(format_table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
