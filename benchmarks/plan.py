"""``mfnoise.plan`` wall and CPU time, this checkout against a baseline revision in the same run.

    .venv/bin/python benchmarks/plan.py --baseline 4d16643 --repeats 3   # README example + epsilon 1, 4, 16
    .venv/bin/python benchmarks/plan.py --baseline 4d16643 --quick       # the README example only, once

Settings: the README's plan (epsilon 8, delta 1e-5, 1000 examples, batch 100, 4 epochs, momentum
0.9) and `mfnoise plan --epsilon E --delta 1e-6 --dataset-size 60000 --batch-size 512 --epochs 20`
for E in 1, 4, 16. Each (revision, setting) runs in a fresh subprocess (imports included in
"process s"; "plan s" is the ``mfnoise.plan`` call alone), the baseline from ``git archive`` of its
``mfnoise/`` into a temporary folder put first on PYTHONPATH. The chosen mechanism, its sampling,
bands/buffers and noise multiplier, and the runner-up (the next lowest priced trajectory rmse) are
compared between the two. Each pair runs ``--repeats`` times, alternating, and the table gives the
minimum (the least disturbed run). Writes benchmarks/results/plan.json. Timings on a shared
machine: the load average is recorded; compare the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {
    "readme": "mfnoise.plan(8.0, 1e-5, dataset_size=1000, batch_size=100, epochs=4, optimizer=('momentum', 0.9))",
    **{f"epsilon-{e}": f"mfnoise.plan({e}.0, 1e-6, dataset_size=60000, batch_size=512, epochs=20)" for e in (1, 4, 16)},
}
CHILD = """
import json, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
import mfnoise
t1 = time.perf_counter(); c1 = time.process_time()
plan = {call}
t2 = time.perf_counter(); c2 = time.process_time()
priced = sorted((c for c in plan.candidates if c.dropped is None and c.accountant == plan.accountant),
                key=lambda c: c.trajectory_rmse)
row = lambda c: {{"mechanism": c.mechanism, "sampling": c.sampling, "bands": c.bands, "buffers": c.buffers,
                 "noise_multiplier": c.noise_multiplier, "trajectory_rmse": c.trajectory_rmse}}
print(json.dumps({{"file": mfnoise.__file__, "import_s": t1 - t0, "plan_s": t2 - t1, "plan_cpu_s": c2 - c1,
                  "process_cpu_s": time.process_time() - c0, "epsilon": plan.epsilon,
                  "chosen": row(priced[0]), "runner_up": row(priced[1])}}))
"""


def run_one(call: str, path: str | None) -> dict:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(call=call)], env=env, capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    return result


def _least(runs: list[dict]) -> dict:
    """The run of least plan time, with the minimum of each time over the runs (the least disturbed)."""
    best = dict(min(runs, key=lambda r: r["plan_s"]))
    for key in ("import_s", "plan_s", "plan_cpu_s", "process_s", "process_cpu_s"):
        best[key] = min(r[key] for r in runs)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="git revision to compare against")
    ap.add_argument("--quick", action="store_true", help="the README example only, once")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each (revision, setting), alternating")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan.json"))
    args = ap.parse_args()
    names = ["readme"] if args.quick else list(SETTINGS)
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as base:
        archive = subprocess.run(["git", "archive", rev, "mfnoise"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        for name in names:
            load = os.getloadavg()[0]
            runs: dict[str, list[dict]] = {"baseline": [], "this": []}
            for _ in range(1 if args.quick else args.repeats):
                runs["baseline"].append(run_one(SETTINGS[name], base))
                runs["this"].append(run_one(SETTINGS[name], None))
            old, new = (_least(runs[k]) for k in ("baseline", "this"))
            assert old["file"].startswith(base) and not new["file"].startswith(base), (old["file"], new["file"])
            rows.append({"setting": name, "call": SETTINGS[name], "load_average": load, "baseline": old, "this": new,
                         "runs": runs, "plan_ratio": new["plan_s"] / old["plan_s"],
                         "plan_cpu_ratio": new["plan_cpu_s"] / old["plan_cpu_s"],
                         "same_choice": {k: old["chosen"][k] == new["chosen"][k]
                                         for k in ("mechanism", "sampling", "bands", "buffers")}})
    print(f"baseline {rev} vs this checkout (HEAD {head} + working tree)")
    print(f"{'setting':11} {'load':>5} {'plan s (base)':>14} {'plan s (this)':>14} {'ratio':>6} {'cpu ratio':>9} "
          f"{'process s':>16}  chosen (this) / runner-up (this); same as baseline?")
    for r in rows:
        b, t = r["baseline"], r["this"]

        def describe(c: dict) -> str:
            size = f"{c['bands']} bands" if c["bands"] is not None else f"{c['buffers']} buffers"
            return f"{c['mechanism']} {c['sampling']} {size} z={c['noise_multiplier']:.5g} " \
                   f"rmse={c['trajectory_rmse']:.4g}"

        same = "same" if all(r["same_choice"].values()) and b["runner_up"]["mechanism"] == t["runner_up"]["mechanism"] \
            else f"DIFFERENT (baseline: {describe(b['chosen'])} / {describe(b['runner_up'])})"
        print(f"{r['setting']:11} {r['load_average']:5.2f} {b['plan_s']:14.2f} {t['plan_s']:14.2f} "
              f"{r['plan_ratio']:6.2f} {r['plan_cpu_ratio']:9.2f} {b['process_s']:7.1f} ->{t['process_s']:6.1f}  "
              f"{describe(t['chosen'])} / {describe(t['runner_up'])}; {same}")
    pathlib.Path(args.out).write_text(json.dumps({"baseline": rev, "head": head, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
