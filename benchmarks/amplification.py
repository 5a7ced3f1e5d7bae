"""Amplification across strategies: noise multiplier and trajectory rmse of DP-SGD (Poisson),
amplified BandMF (best bands, cyclic Poisson), BLT and BISR without amplification (one Gaussian
mechanism) and BISR / BLT amplified by MMCC (Poisson sampling), with the seconds each accounting
(calibration) took.

    .venv/bin/python benchmarks/amplification.py            # 60000 examples, batch 512, 10 and 50 epochs
    .venv/bin/python benchmarks/amplification.py --quick    # a few minutes

rmse = z * sens(C, p) * ||A C^{-1}||_F / sqrt(n) for the prefix-sum workload, with p the schema the
noise is scaled for (Participation(n, n, 1) under Poisson sampling, the cyclic epochs schema otherwise).
MMCC is run where n <= --mmcc-max-n (its cost: see mfnoise/training/mmcc.py); beyond, the row says so.
Writes benchmarks/results/amplification.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import prefix_sum
from mfnoise.strategies import closed_forms
from mfnoise.strategies.error import rmse
from mfnoise.strategies.identity import Identity
from mfnoise.training import accounting


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def rows_for(dataset: int, batch: int, epochs: int, eps: float, delta: float, mmcc_max_n: int, bands_grid, bisr_bands):
    steps_per_epoch = dataset // batch
    n = steps_per_epoch * epochs
    w = prefix_sum(n)
    out = []
    pois = Participation(n, n, 1)
    cyc = Participation.epochs(n, epochs)

    def add(name, sampling, strategy, p, calib_kwargs):
        try:
            z, sec = _timed(lambda: accounting.calibrate(eps, delta, p, **calib_kwargs))
            err = z * rmse(strategy, w, p)
            out.append({"mechanism": name, "sampling": sampling, "epsilon": eps, "epochs": epochs, "n": n,
                        "noise_multiplier": z, "rmse": err, "seconds": sec})
        except ValueError as e:
            out.append({"mechanism": name, "sampling": sampling, "epsilon": eps, "epochs": epochs, "n": n,
                        "noise_multiplier": None, "rmse": None, "seconds": None, "refused": str(e)[:200]})

    add("dp-sgd", "poisson", Identity(n), pois,
        {"sampling": "poisson", "dataset_size": dataset, "batch_size": batch, "strategy": Identity(n)})
    best = None
    for b in bands_grid:
        if b > steps_per_epoch or b > n:
            continue
        s = closed_forms.bsr(n, b)
        p = Participation(n, -(-n // b), b, cyclic=True)
        try:
            z, sec = _timed(lambda p=p, s=s: accounting.calibrate(
                eps, delta, p, sampling="cyclic-poisson", dataset_size=dataset, batch_size=batch, strategy=s))
        except ValueError:
            continue
        r = z * rmse(s, w, p)
        if best is None or r < best["rmse"]:
            best = {"mechanism": f"bandmf(bsr, bands={b})", "sampling": "cyclic-poisson", "epsilon": eps,
                    "epochs": epochs, "n": n, "noise_multiplier": z, "rmse": r, "seconds": sec}
    if best is not None:
        out.append(best)
    bisr = closed_forms.bisr(n, min(bisr_bands, n))
    sq = closed_forms.sqrt_toeplitz(n)
    for name, s in (("bisr", bisr), ("sqrt-toeplitz", sq)):
        add(name, "none", s, cyc, {"strategy": s})
        if n <= mmcc_max_n:
            add(name + " (mmcc)", "poisson", s, pois,
                {"sampling": "poisson", "dataset_size": dataset, "batch_size": batch, "strategy": s})
        else:
            out.append({"mechanism": name + " (mmcc)", "sampling": "poisson", "epsilon": eps, "epochs": epochs,
                        "n": n, "noise_multiplier": None, "rmse": None, "seconds": None,
                        "refused": f"n={n} > --mmcc-max-n={mmcc_max_n} (not run)"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mmcc-max-n", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "amplification.json"))
    a = ap.parse_args()
    if a.quick:
        dataset, batch, epochs_list, eps_list, bands_grid = 5120, 512, [2], [2.0, 8.0], [1, 2, 5]
    else:
        dataset, batch, epochs_list = 60000, 512, [10, 50]
        eps_list, bands_grid = [1.0, 2.0, 4.0, 8.0], [1, 2, 4, 8, 16, 32, 64]
    delta = 1e-5
    rows = []
    for epochs in epochs_list:
        for eps in eps_list:
            for r in rows_for(dataset, batch, epochs, eps, delta, a.mmcc_max_n, bands_grid, 8):
                rows.append(r)
                z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4f}"
                e = "-" if r["rmse"] is None else f"{r['rmse']:.3f}"
                s = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
                print(f"eps={eps:<4g} epochs={epochs:<3d} n={r['n']:<6d} {r['mechanism']:<26s} {r['sampling']:<15s} "
                      f"z={z:<9s} rmse={e:<9s} s={s:<7s} {r.get('refused', '')}", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"quick": a.quick, "dataset_size": dataset, "batch_size": batch, "delta": delta, "rows": rows}, f,
                  indent=1)
    print("wrote", a.out)



if __name__ == "__main__":
    main()
