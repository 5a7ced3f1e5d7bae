"""MMCC's cost at a given n: one epsilon evaluation and one calibration, for a Toeplitz C (BISR,
the Toeplitz fast path) and a banded C (BSR, the general path), under Poisson sampling with
q = batch / dataset, through mfnoise's routing (accounting.explain / calibrate, theorem "mmcc").

    nice -n 5 .venv/bin/python benchmarks/mmcc_cost.py                 # n = 2000, epsilon 2
    nice -n 5 .venv/bin/python benchmarks/mmcc_cost.py --no-calibrate  # evaluations only

Wall and CPU seconds are printed with the 1-minute load average before and after each
measurement (the machine is shared). Writes benchmarks/results/mmcc_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from mfnoise.core.participation import Participation
from mfnoise.strategies import closed_forms
from mfnoise.training import accounting


def _measure(fn):
    load0 = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "load_before": load0,
                 "load_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--dataset-size", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--z", type=float, default=0.3, help="noise multiplier of the epsilon evaluation")
    ap.add_argument("--epsilon", type=float, default=2.0, help="target of the calibration")
    ap.add_argument("--bisr-bands", type=int, default=8)
    ap.add_argument("--bsr-bands", type=int, default=16)
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mmcc_cost.json"))
    a = ap.parse_args()
    n = a.n
    p = Participation(n, n, 1)
    kw = {"sampling": "poisson", "dataset_size": a.dataset_size, "batch_size": a.batch_size}
    rows = []
    for name, s in ((f"bisr(bands={a.bisr_bands})", closed_forms.bisr(n, a.bisr_bands)),
                    (f"bsr(bands={a.bsr_bands})", closed_forms.bsr(n, a.bsr_bands))):
        acc, m = _measure(lambda s=s: accounting.explain(a.z, a.delta, p, strategy=s, **kw))
        row = {"strategy": name, "n": n, "q": a.batch_size / a.dataset_size, "delta": a.delta, "theorem": acc.theorem,
               "toeplitz_path": acc.detail["toeplitz"], "rows_priced": acc.detail["rows_priced"],
               "z": a.z, "epsilon": acc.epsilon, "epsilon_eval": m}
        print(f"{name:<16s} n={n} path={'toeplitz' if row['toeplitz_path'] else 'general':<8s} "
              f"rows_priced={row['rows_priced']:<4d} eps(z={a.z:g})={acc.epsilon:.4f}  {m['wall_s']:.1f} s wall "
              f"{m['cpu_s']:.1f} s cpu  load {m['load_before']:.2f}->{m['load_after']:.2f}", flush=True)
        if not a.no_calibrate:
            z, m = _measure(lambda s=s: accounting.calibrate(a.epsilon, a.delta, p, strategy=s, **kw))
            row.update({"target_epsilon": a.epsilon, "calibrated_z": z, "calibration": m})
            print(f"{'':<16s} calibrate(epsilon={a.epsilon:g}) -> z={z:.5f}  {m['wall_s']:.1f} s wall "
                  f"{m['cpu_s']:.1f} s cpu  load {m['load_before']:.2f}->{m['load_after']:.2f}", flush=True)
        rows.append(row)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"rows": rows, "command": "benchmarks/mmcc_cost.py", "args": vars(a)}, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
