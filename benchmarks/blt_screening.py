"""BLT staged starts: the optimum and the iterations of this tree against another revision's, side by side.

mfnoise.optimize(family="blt") runs d rounds of starts (mfnoise/optim/blt.py) that the solver screens
at a loose tolerance before polishing the best (mfnoise/optim/solver.py). A cheaper screen must not
cost the optimum: for each problem below this prints the objective of this tree and of ``--rev``
(``git archive`` of that revision, run by the same interpreter in its own subprocess), their
relative difference (negative: this tree is better), and both iteration counts and wall times.
Writes benchmarks/results/blt_screening.json.

    .venv/bin/python benchmarks/blt_screening.py                 # against 9863479 (before the screen)
    .venv/bin/python benchmarks/blt_screening.py --rev 77cb97d   # against the O(n) BLT losses
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "blt_screening.json")
# (workload, n, participations k (min_sep n // k), buffers, objective)
CASES = [
    ("prefix", 10**7, 1, 8, "max"),
    ("prefix", 10**7, 1, 8, "rmse"),
    ("prefix", 10**5, 1, 4, "rmse"),
    ("prefix", 10**4, 4, 6, "max"),
    ("prefix", 4096, 8, 5, "rmse"),
    ("momentum:0.9", 10**4, 8, 5, "max"),
    ("prefix", 2048, 16, 8, "max"),
    ("momentum:0.9", 10**6, 1, 6, "rmse"),
    ("prefix", 10**9, 1, 8, "max"),
]


def _worker(case: int) -> None:
    import mfnoise
    from mfnoise import Participation

    w, n, k, d, obj = CASES[case]
    start = time.perf_counter()
    _, r = mfnoise.optimize(w, Participation(n, k, n // k), "blt", buffers=d, objective=obj, progress=False)
    seconds = time.perf_counter() - start
    value = r["rmse"] if obj == "rmse" else r["max_error"]  # r[key]: an OptimizeResult or an older dict report
    print("RESULT " + json.dumps({"objective_value": value, "iterations": r["iterations"], "seconds": seconds,
                                  "mfnoise_path": os.path.dirname(mfnoise.__file__)}))


def _run(case: int, pythonpath: str | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(case)], capture_output=True,
                          text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="9863479", help="revision to compare with (default %(default)s)")
    parser.add_argument("--cases", nargs="+", type=int, help=f"case indices (0..{len(CASES) - 1})")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker)
        return 0
    sys.path.insert(0, HERE)
    from optimize import _old_tree  # the git archive helper of the optimize benchmark

    old = _old_tree(args.rev)
    rows = []
    print(f"| workload | n | k | buffers | objective | this tree | {args.rev} | relative | iterations | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases or range(len(CASES)):
        w, n, k, d, obj = CASES[case]
        new, base = _run(case, None), _run(case, old)
        row = {"case": case, "workload": w, "n": n, "participations": k, "buffers": d, "objective": obj,
               "this_tree": new, "rev": base, "load_average": os.getloadavg()}
        if "objective_value" in new and "objective_value" in base:
            row["relative"] = new["objective_value"] / base["objective_value"] - 1
            print(f"| {w} | {n} | {k} | {d} | {obj} | {new['objective_value']:.10f} | {base['objective_value']:.10f} "
                  f"| {row['relative']:+.1e} | {new['iterations']} / {base['iterations']} "
                  f"| {new['seconds']:.2f} / {base['seconds']:.2f} |", flush=True)
        rows.append(row)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rev": args.rev, "machine": f"{os.cpu_count()}-core CPU",
                   "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
