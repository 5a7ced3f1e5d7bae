"""Start-up cost of mfnoise: `import mfnoise` and CLI commands against `import jax` (issue 16, "lean start").

Each row is a fresh interpreter run as a subprocess (wall time, from spawn to exit): `python -c pass`
(the interpreter alone), `python -c "import jax"` (the baseline: mfnoise cannot start faster than
the JAX it is built on), `python -c "import mfnoise"`, `mfnoise --help` and `mfnoise evaluate
--family sqrt-toeplitz --n 1000` (the CLI entry point `mfnoise.cli.main`, as the console script runs
it). Repetitions are interleaved (one of each row per round, in a rotated order), so load from other
processes on a shared machine falls on every row alike; the table shows the median and the minimum
over rounds and the overhead of each row's median over the median of `import jax` in the same run.
A second table is Python's own `-X importtime` of `import mfnoise` (cumulative microseconds of the
jax and mfnoise modules, one run), and the heavy dependencies the import loaded.

    .venv/bin/python benchmarks/startup.py                 # 15 rounds
    .venv/bin/python benchmarks/startup.py --reps 30
    .venv/bin/python benchmarks/startup.py --tree before=/tmp/old-checkout --tree after=.

--tree LABEL=DIR (repeatable) runs the mfnoise rows with PYTHONPATH=DIR, so that two checkouts
(e.g. before and after a change, from `git archive REV | tar -x -C DIR`) are compared in the same
run; without it the installed mfnoise is measured. Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("scipy", "dp_accounting", "optax", "tqdm", "matplotlib", "orbax", "flax", "keras", "sklearn")
CLI = "import sys; from mfnoise.cli import main; sys.exit(main(sys.argv[1:]))"


def rows(trees: dict[str, str | None]) -> list[tuple[str, list[str], str | None]]:
    """(label, argv, PYTHONPATH) for every measured command."""
    py = sys.executable
    out: list[tuple[str, list[str], str | None]] = [
        ("python -c pass", [py, "-c", "pass"], None),
        ("import jax", [py, "-c", "import jax"], None),
    ]
    for tree, path in trees.items():
        suffix = f" [{tree}]" if tree else ""
        out += [
            (f"import mfnoise{suffix}", [py, "-c", "import mfnoise"], path),
            (f"mfnoise --help{suffix}", [py, "-c", CLI, "--help"], path),
            (f"mfnoise evaluate --family sqrt-toeplitz --n 1000{suffix}",
             [py, "-c", CLI, "evaluate", "--family", "sqrt-toeplitz", "--n", "1000"], path),
        ]
    return out


def _env(path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if path is not None:
        env["PYTHONPATH"] = os.path.abspath(path)
    env.setdefault("JAX_PLATFORMS", "cpu")  # the same backend initialisation for every row
    return env


# `python -c` puts the working folder first on sys.path: run from a neutral one, so that a checkout
# in the caller's folder cannot shadow the tree under test.
_CWD = tempfile.gettempdir()


def wall(argv: list[str], path: str | None) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=_env(path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=_CWD)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def importtime(path: str | None) -> dict:
    """Cumulative -X importtime microseconds of `jax` and `mfnoise`, and the heavy packages loaded."""
    probe = ("import mfnoise, sys, json; "
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], env=_env(path),
                          capture_output=True, text=True, check=True, cwd=_CWD)
    cumulative: dict[str, int] = {}
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].startswith("import time:") and parts[1].strip().isdigit():
            name = parts[2].strip()
            if name in ("jax", "mfnoise"):
                cumulative[name] = int(parts[1])
    return {"jax_us": cumulative.get("jax"), "mfnoise_us": cumulative.get("mfnoise"),
            "heavy_loaded": json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                    help="measure the mfnoise rows with PYTHONPATH=DIR (repeatable)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "startup.json"))
    args = ap.parse_args()
    if args.reps < 1:
        raise SystemExit(f"--reps must be positive, got {args.reps}")
    trees: dict[str, str | None] = {}
    for item in args.tree:
        label, sep, path = item.partition("=")
        if not sep or not label or not os.path.isdir(path):
            raise SystemExit(f"--tree must be LABEL=DIR with an existing DIR, got {item!r}")
        trees[label] = path
    if not trees:
        trees[""] = None
    commands = rows(trees)
    for _, argv, path in commands:  # warm the file cache and fail early, not after many rounds
        wall(argv, path)
    times: dict[str, list[float]] = {label: [] for label, _, _ in commands}
    for r in range(args.reps):
        shift = r % len(commands)
        for label, argv, path in commands[shift:] + commands[:shift]:
            times[label].append(wall(argv, path))
    jax_median = statistics.median(times["import jax"])
    results = []
    for label, _, _ in commands:
        med = statistics.median(times[label])
        results.append({"command": label, "median_s": med, "min_s": min(times[label]),
                        "overhead_over_jax_s": med - jax_median, "ratio_to_jax": med / jax_median,
                        "times_s": times[label]})
    width = max(len(r["command"]) for r in results)
    print(f"{'command':<{width}}  {'median s':>8}  {'min s':>6}  {'- jax s':>7}  {'x jax':>5}")
    for r in results:
        print(f"{r['command']:<{width}}  {r['median_s']:8.3f}  {r['min_s']:6.3f}  "
              f"{r['overhead_over_jax_s']:7.3f}  {r['ratio_to_jax']:5.2f}")
    imports = {label or "installed": importtime(path) for label, path in trees.items()}
    print("\n-X importtime of `import mfnoise` (cumulative, one run):")
    for label, t in imports.items():
        jax_us, mf_us = t["jax_us"], t["mfnoise_us"]
        cost = "" if jax_us is None or mf_us is None else \
            f"jax {jax_us / 1e6:.3f} s, mfnoise {mf_us / 1e6:.3f} s (+{(mf_us - jax_us) / 1e6:.3f} s over jax); "
        print(f"  {label}: {cost}heavy modules loaded: {', '.join(t['heavy_loaded']) or 'none'}")
    report = {
        "benchmark": "startup",
        "reps": args.reps,
        "trees": {k or "installed": v for k, v in trees.items()},
        "results": results,
        "importtime": imports,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
