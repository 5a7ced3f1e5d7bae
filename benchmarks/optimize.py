"""Strategy optimization: mfnoise.optimize against jax-privacy 2.0.0, side by side in one run.

Each problem (a row of ROWS) is solved by mfnoise and by jax-privacy's matrix_factorization module,
each in a fresh subprocess (so compile time and peak memory are counted the same way for both). Every
strategy, including jax-privacy's, is scored by mfnoise.strategies.error.evaluate (exact sensitivity), so the
losses are comparable. Printed as a markdown table and written to benchmarks/results/optimize.json.

jax-privacy is not an mfnoise dependency; the benchmark runs it from its own virtual environment:

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install jax-privacy==2.0.0
    /work/bench-venv/bin/pip install -e /work/main     # mfnoise, to score its strategies

2.0.0 is the newest jax-privacy on the package index; it has no optimize_banded_inverse_toeplitz, so
the inverse-toeplitz (BISR) rows compose its 2.0.0 functions as that later function does.

Usage:

    .venv/bin/python benchmarks/optimize.py              # every row (jax-privacy takes many minutes)
    .venv/bin/python benchmarks/optimize.py --quick      # small versions of the rows, a few minutes
    .venv/bin/python benchmarks/optimize.py --only bt-4096 blt-max-1e6-b5
    .venv/bin/python benchmarks/optimize.py --device gpu # the same table on a GPU (JAX_PLATFORMS=cuda)

The blt-lbfgs-* rows run this tree's default BLT solver (method "auto": mfnoise.optim.lbfgs) against
``method="scipy"`` (L-BFGS-B, the default before), ``--repeat`` fresh processes of each taken in turns;
the baseline columns hold L-BFGS-B's run of median wall time, the JSON every run's wall and CPU seconds
(``before_speedup``: the ratio of the median wall times, ``before_cpu_speedup``: of their CPU times).

The blt-closed-* rows (BLT, max error, 8 buffers, n = 10^7 and 10^9; closed-form losses) run instead
against the previous tree's O(n) BLT path: ``git archive OLD_REV`` (``--old-rev``, default 77cb97d,
the tree before the closed forms) unpacked into a temporary folder and put first on PYTHONPATH for
its worker, the same benchmark worker, same interpreter, same run (its loss and seconds sit in the
baseline columns, and ``old_loss_ratio`` / ``old_speedup`` in the JSON). At 10^9 the old path is
not run: it materialises arrays of length n (8 GB each).

Columns: loss (rmse or max_error of the objective), seconds (wall time of the optimize call:
tracing, compiling, iterating and, for mfnoise, the final exact evaluation), peak RSS of the
process (MB), and mfnoise / jax-privacy ratios of loss and time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "optimize.json")
DEFAULT_BASELINE_PYTHON = "/work/bench-venv/bin/python"

# name: (family, n, schema, size, objective, target text, jax-privacy runs?, quick n)
# schema: ("epochs", k), ("min-sep", k) (min_sep n // k) or ("single",) ; size: bands or buffers.
ROWS = {
    "bt-4096": dict(family="toeplitz", n=4096, schema=("epochs", 4), bands=64, objective="rmse",
                    target="rmse <= jax-privacy's 13.5179, time <= 1/10 of jax-privacy's", quick_n=1024),
    "bt-4096-optax": dict(family="toeplitz", n=4096, schema=("epochs", 4), bands=64, objective="rmse",
                          method="optax", baseline=False, target="method comparison (optax.lbfgs)", quick_n=1024),
    "blt-max-1e4-b5": dict(family="blt", n=10**4, schema=("single",), buffers=5, objective="max",
                           target="max_error within 0.3% of sqrt-Toeplitz 3.99801, < 10 s"),
    "blt-max-1e6-b4": dict(family="blt", n=10**6, schema=("single",), buffers=4, objective="max",
                           target="(jax-privacy: 1.5% off with 4 buffers)", quick_n=10**5),
    "blt-max-1e6-b5": dict(family="blt", n=10**6, schema=("single",), buffers=5, objective="max",
                           target="max_error within 0.3% of sqrt-Toeplitz 5.46389, < 10 s", quick_n=10**5),
    "blt-max-1e6-b5-optax": dict(family="blt", n=10**6, schema=("single",), buffers=5, objective="max",
                                 method="optax", baseline=False, target="method comparison (optax.lbfgs)",
                                 quick_n=10**5),
    **{f"blt-max-1e7-b{d}": dict(family="blt", n=10**7, schema=("single",), buffers=d, objective="max",
                                 target="ratio to sqrt-Toeplitz 6.19683 reported; <= 0.5% by 8; non-increasing; < 10 s",
                                 quick_n=10**6, baseline_quick=False)
       for d in range(4, 9)},
    "blt-rmse-2000-e20-b3": dict(family="blt", n=2000, schema=("epochs", 20), buffers=3, objective="rmse",
                                 target="rmse <= jax-privacy's 21.374, < 5 s"),
    "blt-rmse-2000-e20-b4": dict(family="blt", n=2000, schema=("epochs", 20), buffers=4, objective="rmse",
                                 target="rmse <= jax-privacy's 21.374, < 5 s, never worse than 3 buffers"),
    "banded-1024": dict(family="banded", n=1024, schema=("epochs", 4), bands=64, objective="rmse",
                        target="converged rmse < 7.9954 (jax-privacy, 100 steps, 147 s) in < 30 s",
                        quick_n=256, baseline_steps=100),
    "banded-4096": dict(family="banded", n=4096, schema=("single",), bands=64, objective="rmse",
                        target="converged in < 10 min, peak < 2 GB (jax-privacy: 398 s, 9 GB for 10 steps)",
                        quick_n=512, baseline_steps=10, baseline_full_only=True),
    "banded-8192": dict(family="banded", n=8192, schema=("single",), bands=64, objective="rmse",
                        target="works", quick_n=1024, baseline=False),
    "bisr-1024-e4-b16": dict(family="inverse-toeplitz", n=1024, schema=("epochs", 4), bands=16, objective="rmse",
                             target="rmse <= jax-privacy's (optimized BISR), both scored exactly", quick_n=512,
                             baseline_steps=100),
    "bisr-1024-ms4-b16": dict(family="inverse-toeplitz", n=1024, schema=("min-sep", 4), bands=16, objective="rmse",
                              target="rmse <= jax-privacy's under min-sep (its formula is the same for both schemas)",
                              quick_n=512, baseline_steps=100),
    "bisr-2048-e16-b32": dict(family="inverse-toeplitz", n=2048, schema=("epochs", 16), bands=32, objective="rmse",
                              target="rmse <= jax-privacy's; its own loss (closed-form sensitivity) vs the truth",
                              quick_n=512, baseline_steps=100),
    "dense-256": dict(family="dense", n=256, schema=("single",), objective="rmse",
                      target="rmse <= 2.52499 in < 10 s (jax-privacy: 70 s)", quick_n=64),
    "dense-1024-e4": dict(family="dense", n=1024, schema=("epochs", 4), objective="rmse",
                          target="converged in < 5 min, rmse < 6.05005 (best before the dual)", quick_n=128,
                          baseline_full_only=True),
    "dense-1024-e4-optax": dict(family="dense", n=1024, schema=("epochs", 4), objective="rmse", method="optax",
                                baseline=False, target="method comparison (optax.lbfgs)", quick_n=128),
}
ROWS.update({
    "blt-closed-1e7-b8": dict(family="blt", n=10**7, schema=("single",), buffers=8, objective="max", baseline=False,
                              old=True, quick_n=10**6,
                              target="< 1 s inside optimize (issue 16); max_error within 1e-6 of the O(n) path's"),
    "blt-closed-1e9-b8": dict(family="blt", n=10**9, schema=("single",), buffers=8, objective="max", baseline=False,
                              quick_n=10**8, target="works (the O(n) path would need 8 GB arrays: not run)"),
    # The default solver of the BLT family (method "auto" -> "lbfgs", numpy, no scipy import) against
    # scipy's L-BFGS-B (the default before), the same problem in the same run: the "before" columns.
    "blt-lbfgs-1e7-b8": dict(family="blt", n=10**7, schema=("single",), buffers=8, objective="max", baseline=False,
                             before_method="scipy", quick_n=10**6,
                             target="< 1 s inside optimize (issue 16), max_error within 1e-7 of L-BFGS-B's"),
    "blt-lbfgs-1e9-b8": dict(family="blt", n=10**9, schema=("single",), buffers=8, objective="max", baseline=False,
                             before_method="scipy", quick_n=10**8,
                             target="the same at n = 10^9 (closed forms: the cost does not grow with n)"),
})
DEFAULT_OLD_REV = "77cb97d"
REFERENCE = {  # closed-form sqrt-Toeplitz max_error (single participation, prefix sum)
    10**4: 3.99801, 10**6: 5.46389, 10**7: 6.19683,
}


# -- workers (run in subprocesses) -------------------------------------------------------------------
def _participation(row, n):
    from mfnoise import Participation

    if row["schema"][0] == "min-sep":  # k participations at least n // k apart (not only the cyclic patterns)
        return Participation(n, row["schema"][1], n // row["schema"][1])
    return Participation.single(n) if row["schema"][0] == "single" else Participation.epochs(n, row["schema"][1])


def _score(strategy, row, n) -> dict:
    import mfnoise

    p = _participation(row, n)
    ev = mfnoise.evaluate(strategy, mfnoise.workloads.prefix_sum(n), p)
    return {"rmse": ev["rmse"], "max_error": ev["max_error"], "sensitivity": ev["sensitivity"],
            "sensitivity_exact": ev["sensitivity_exact"],
            "loss": ev["rmse"] if row["objective"] == "rmse" else ev["max_error"]}


def worker_mfnoise(row, n, method=None) -> dict:
    import mfnoise

    p = _participation(row, n)
    # "auto" only where this tree's optimize knows it (the --old-rev worker runs older trees)
    method = method or row.get("method") or ("auto" if "auto" in _methods() else "scipy")
    start = time.perf_counter()
    cpu_start = time.process_time()
    strategy, result = mfnoise.optimize(
        mfnoise.workloads.prefix_sum(n), p, row["family"], bands=row.get("bands"), buffers=row.get("buffers"),
        objective=row["objective"], method=method, progress=False)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    # result[key] reads an OptimizeResult and the dict report of older trees (the --old-rev worker) alike
    out = {"seconds": seconds, "cpu_seconds": cpu_seconds, "method": result.get("method", method),
           "iterations": result["iterations"], "converged": result["converged"],
           "stopped": result["stopped"], "mfnoise_path": os.path.dirname(mfnoise.__file__), **strategy.params()}
    # the dense dual's certificate: its lower bound on the optimal rmse and the relative gap to it
    out.update({key: result[key] for key in ("formulation", "dual_bound", "duality_gap",
                                             "final_relative_change") if key in result})
    out.update(compile_seconds=result.get("compile_seconds"), evaluations=result["evaluations"])
    out.update(_score(strategy, row, n))
    assert abs(out["loss"] / (result["rmse"] if row["objective"] == "rmse" else result["max_error"]) - 1) < 1e-12
    return out


def _methods() -> tuple[str, ...]:
    try:
        from mfnoise.optim import solver
    except ImportError:
        return ("scipy",)
    return tuple(getattr(solver, "METHODS", ("scipy",)))


def worker_jax_privacy(row, n, full: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_privacy.matrix_factorization import banded, buffered_toeplitz, dense, toeplitz

    import mfnoise

    fam = row["family"]
    k = 1 if row["schema"][0] == "single" else row["schema"][1]
    start = time.perf_counter()
    with jax.enable_x64(True):
        if fam == "toeplitz":
            coef = toeplitz.optimize_banded_toeplitz(n=n, bands=row["bands"])
            strategy = mfnoise.Toeplitz(np.asarray(coef, np.float64), n)
        elif fam == "blt":
            d = row["buffers"]
            blt = buffered_toeplitz.optimize(
                n=n, min_sep=n // k if k > 1 else 1, max_participations=k,
                error="max" if row["objective"] == "max" else "mean", min_buffers=d, max_buffers=d)
            strategy = mfnoise.BLT(np.asarray(blt.buf_decay, np.float64), np.asarray(blt.output_scale, np.float64), n)
        elif fam == "banded":
            c = banded.optimize(n, bands=row["bands"], max_optimizer_steps=row.get("baseline_steps", 100))
            cols = np.array(c.params, np.float64)
            t, j = np.meshgrid(np.arange(n), np.arange(cols.shape[1]), indexing="ij")
            cols[t + j >= n] = 0.0
            strategy = mfnoise.Banded.normalized_columns(cols)
        elif fam == "inverse-toeplitz":
            # jax-privacy 2.0.0 (the newest release on the package index) has no
            # optimize_banded_inverse_toeplitz; its later source composes these 2.0.0 functions the
            # same way: L-BFGS (optimization.optimize) on r, loss = mean per-query error times the
            # closed-form min-sep sensitivity of C = 1 / r (applied whether or not c is monotone).
            from jax_privacy.matrix_factorization import optimization

            min_sep = n // k if k > 1 else n

            def loss_fn(r):
                c = toeplitz.inverse_coef(r, n)
                err = jnp.mean(toeplitz.per_query_error(noising_coef=r, n=n, workload_coef=jnp.ones(n),
                                                        skip_checks=True))
                return err * toeplitz.minsep_sensitivity_squared(c, min_sep=min_sep, n=n, skip_checks=True)

            r0 = jnp.asarray(mfnoise.bisr(n, row["bands"]).inverse_coeffs)  # the closed form (not in 2.0.0)
            r = optimization.optimize(loss_fn, r0, max_optimizer_steps=row.get("baseline_steps", 10))
            claimed = float(jnp.sqrt(loss_fn(r)))
            strategy = mfnoise.InverseToeplitz(np.asarray(r / r[0], np.float64), n)
        elif fam == "dense":
            c = dense.optimize(n, epochs=k)
            strategy = mfnoise.Dense(np.asarray(c, np.float64))
        else:
            raise ValueError(fam)
        jax.block_until_ready(jnp.zeros(()))
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, **strategy.params()}
    out.update(_score(strategy, row, n))
    if fam == "inverse-toeplitz":
        out["claimed_loss"] = claimed  # jax-privacy's own rmse (its sensitivity formula), vs the exact "loss"
    return out


def _worker_main(argv) -> None:
    row_name, impl, n, full = argv[0], argv[1], int(argv[2]), argv[3] == "full"
    row = ROWS[row_name]
    if impl.startswith("mfnoise"):  # "mfnoise" or "mfnoise:METHOD" (the before_method rows)
        out = worker_mfnoise(row, n, impl.partition(":")[2] or None)
    else:
        out = worker_jax_privacy(row, n, full)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_mb"] = usage.ru_maxrss / 1024
    # CPU time of the whole worker (import, compile, run, score; all threads): less sensitive than
    # wall time to other jobs running on the machine.
    out["process_cpu_seconds"] = usage.ru_utime + usage.ru_stime
    print("RESULT " + json.dumps(out))


# -- driver ---------------------------------------------------------------------------------------
def run_worker(python, row_name, impl, n, full, device, timeout, pythonpath=None) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cuda" if device == "gpu" else "cpu"
    if pythonpath:  # another tree's mfnoise first on the path (the --old-rev rows)
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [python, os.path.abspath(__file__), "--worker", row_name, impl, str(n), "full" if full else "quick"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["process_seconds"] = time.perf_counter() - start
            return out
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller n for every row (a few minutes)")
    parser.add_argument("--only", nargs="+", metavar="ROW", help=f"rows to run, of: {', '.join(ROWS)}")
    parser.add_argument("--no-baseline", action="store_true", help="mfnoise only (no jax-privacy)")
    parser.add_argument("--all-baselines", action="store_true",
                        help="also run jax-privacy where it needs many minutes (banded-4096: ~9 GB; dense-1024-e4)")
    parser.add_argument("--baseline-python", default=DEFAULT_BASELINE_PYTHON,
                        help="python of the venv with jax-privacy 2.0.0 (default %(default)s)")
    parser.add_argument("--old-rev", default=DEFAULT_OLD_REV,
                        help="git revision whose mfnoise the blt-closed-* rows run against (default %(default)s)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeat", type=int, default=3,
                        help="fresh processes of each side for the rows with a before_method (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return 0
    names = args.only or list(ROWS)
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    baseline = not args.no_baseline and os.path.exists(args.baseline_python)
    full = not args.quick
    results = []
    machine = {"machine": "", "load_average_at_end": os.getloadavg()}
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = {r["row"]: r for r in json.load(f).get("rows", [])}
    for name in names:
        row = ROWS[name]
        try:
            from mfnoise.optim import problem  # only to check the family exists in this version

            problem.builder(row["family"])
        except (ImportError, ValueError) as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        n = row["n"] if full else row.get("quick_n", row["n"])
        entry = {"row": name, "family": row["family"], "n": n, "schema": list(row["schema"]),
                 "bands": row.get("bands"), "buffers": row.get("buffers"), "objective": row["objective"],
                 "method": row.get("method", "scipy"), "target": row["target"], "quick": not full}
        print(f"[{time.strftime('%H:%M:%S')}] {name} n={n}: mfnoise ...", file=sys.stderr, flush=True)
        before = row.get("before_method")
        if before:
            # this tree's default against method=before_method, in fresh processes taken in turns
            # (after, before, after, ...) so that the machine's load falls on both alike; the
            # columns hold the run of median wall time, the ratios are of the medians.
            runs: dict[str, list] = {"mfnoise": [], "before": []}
            for _ in range(args.repeat):
                for key, impl in (("mfnoise", "mfnoise"), ("before", f"mfnoise:{before}")):
                    runs[key].append(run_worker(sys.executable, name, impl, n, full, args.device, args.timeout))
                    runs[key][-1]["load_average"] = os.getloadavg()
            for key, got in runs.items():
                ok = sorted((r for r in got if "seconds" in r), key=lambda r: r["seconds"])
                entry[key] = ok[len(ok) // 2] if ok else got[-1]
                entry[f"{key}_runs"] = [{k: r.get(k) for k in ("seconds", "cpu_seconds", "process_seconds",
                                                               "process_cpu_seconds", "loss", "iterations",
                                                               "load_average", "error")} for r in got]
            entry["before_method"] = before
            m, b = entry["mfnoise"], entry["before"]
            if "loss" in m and "loss" in b:
                entry["before_loss_ratio"] = m["loss"] / b["loss"]
                entry["before_speedup"] = b["seconds"] / m["seconds"]
                entry["before_cpu_speedup"] = b["cpu_seconds"] / m["cpu_seconds"]
        else:
            entry["mfnoise"] = run_worker(sys.executable, name, "mfnoise", n, full, args.device, args.timeout)
        run_base = baseline and row.get("baseline", True) and (full or row.get("baseline_quick", True)) \
            and (args.all_baselines or not row.get("baseline_full_only", False))
        if run_base:
            print(f"[{time.strftime('%H:%M:%S')}] {name} n={n}: jax-privacy ...", file=sys.stderr, flush=True)
            entry["jax_privacy"] = run_worker(args.baseline_python, name, "jax-privacy", n, full, args.device,
                                              args.timeout)
        if row.get("old") and not args.no_baseline:
            print(f"[{time.strftime('%H:%M:%S')}] {name} n={n}: mfnoise {args.old_rev} ...", file=sys.stderr,
                  flush=True)
            entry["old_rev"] = args.old_rev
            entry["old"] = run_worker(sys.executable, name, "mfnoise", n, full, args.device, args.timeout,
                                      pythonpath=_old_tree(args.old_rev))
            o, m = entry["old"], entry["mfnoise"]
            if "loss" in o and "loss" in m:
                entry["old_loss_ratio"] = m["loss"] / o["loss"]
                entry["old_speedup"] = o["seconds"] / m["seconds"]
        m, j = entry["mfnoise"], entry.get("jax_privacy")
        if j and "loss" in j and "loss" in m:
            entry["loss_ratio"] = m["loss"] / j["loss"]
            entry["time_ratio"] = m["seconds"] / j["seconds"]
            entry["speedup"] = j["seconds"] / m["seconds"]
        if row["family"] == "blt" and row["objective"] == "max" and n in REFERENCE and "loss" in m:
            entry["vs_sqrt_toeplitz"] = m["loss"] / REFERENCE[n] - 1
            if j and "loss" in j:
                entry["jax_privacy_vs_sqrt_toeplitz"] = j["loss"] / REFERENCE[n] - 1
        entry["load_average"] = os.getloadavg()
        results.append(entry)
        print(_table([entry], header=False), file=sys.stderr, flush=True)
        machine = _write(args, previous, results)  # after every row, so a long run keeps what it has
    print(_table(results))
    print(f"\n{machine['machine']}, load average at end {machine['load_average_at_end']}; wrote {args.out}")
    return 0


_OLD_TREES: dict = {}


def _old_tree(rev: str) -> str:
    """A folder holding ``git archive rev`` of this checkout (made once per run)."""
    if rev not in _OLD_TREES:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix=f"mfnoise-{rev}-")
        atexit.register(shutil.rmtree, folder, True)
        root = os.path.dirname(HERE)  # git archive run in benchmarks/ would archive that folder only
        archive = subprocess.run(["git", "-C", root, "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        _OLD_TREES[rev] = folder
    return _OLD_TREES[rev]


def _write(args, previous, results) -> dict:
    merged = {**previous, **{r["row"]: r for r in results}}
    machine = {"machine": f"{os.cpu_count()}-core CPU" if args.device == "cpu" else "GPU",
               "platform": platform.platform(), "python": platform.python_version(),
               "load_average_at_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "rows": [merged[k] for k in ROWS if k in merged]}, f, indent=1)
    return machine


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _table(entries, header=True) -> str:
    lines = []
    if header:
        lines.append("| row | n | size | objective | mfnoise loss | s | peak MB | jax-privacy loss | s | peak MB "
                     "| loss ratio | speedup | vs sqrt-Toeplitz | target |")
        lines.append("|" + "---|" * 14)
    for e in entries:
        # the blt-closed-* rows: the previous tree (--old-rev) in the baseline columns
        m, j = e["mfnoise"], e.get("jax_privacy") or e.get("old") or e.get("before") or {}
        size = f"bands={e['bands']}" if e.get("bands") else (f"buffers={e['buffers']}" if e.get("buffers") else "")
        if m.get("buffers") is not None and m.get("buffers") != e.get("buffers"):
            size += f" (uses {m['buffers']})"
        vs = e.get("vs_sqrt_toeplitz")
        lines.append(
            f"| {e['row']} | {e['n']} | {size} | {e['objective']} | {_fmt(m.get('loss'), '.6f') or m.get('error')} "
            f"| {_fmt(m.get('seconds'), '.2f')} | {_fmt(m.get('peak_mb'), '.0f')} "
            f"| {_fmt(j.get('loss'), '.6f') or j.get('error', '')} | {_fmt(j.get('seconds'), '.2f')} "
            f"| {_fmt(j.get('peak_mb'), '.0f')} "
            f"| {_fmt(e.get('loss_ratio', e.get('old_loss_ratio', e.get('before_loss_ratio'))), '.9f')} "
            f"| {_fmt(e.get('speedup', e.get('old_speedup', e.get('before_speedup'))), '.2f')} "
            f"| {'' if vs is None else f'{100 * vs:+.3f}%'} | {e['target']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
