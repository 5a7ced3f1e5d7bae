"""Amplification across strategies: noise multiplier and trajectory rmse of DP-SGD (Poisson),
amplified BandMF (best bands, cyclic Poisson), BLT and BISR without amplification (one Gaussian
mechanism, fixed cyclic batches) and BLT / BISR amplified by MMCC (Poisson sampling), with the
seconds each accounting (calibration) took and, for MMCC, the number of epsilon evaluations.

    .venv/bin/python benchmarks/amplification.py            # 60000 examples, batch 512, 10 and 50 epochs
    .venv/bin/python benchmarks/amplification.py --quick    # a few minutes
    nohup nice .venv/bin/python benchmarks/amplification.py --epochs 10 > /tmp/amp10.log &

rmse = z * sens(C, p) * ||A C^{-1}||_F / sqrt(n) for the prefix-sum workload, with p the schema the
noise is scaled for (Participation(n, n, 1) under Poisson sampling, where sens = ||C 1|| for C >= 0:
``mmcc.all_steps_sensitivity``, the scale the MMCC route uses; the cyclic epochs schema otherwise).
The BLT is ``mfnoise.optimize(prefix_sum(n), Participation.epochs(n, epochs), "blt", buffers=4)``
(its Toeplitz coefficients checked >= 0: MMCC refuses a negative entry); BISR has 8 bands.
MMCC is run where n <= --mmcc-max-n (its cost: mfnoise/training/mmcc.py); beyond, the row says so.

Rows are merged into the JSON (default benchmarks/results/amplification.json) as each one is
computed, keyed by (mechanism, sampling, epsilon, epochs, dataset, batch): a crash loses nothing,
and ``--epochs 10`` then ``--epochs 50`` build one table. ``--table`` prints the markdown table of
the JSON and exits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import prefix_sum
from mfnoise.strategies import closed_forms
from mfnoise.strategies.error import decoder_norms, rmse
from mfnoise.strategies.identity import Identity
from mfnoise.training import accounting, mmcc

BISR_BANDS = 8
BLT_BUFFERS = 4


class _CountingMMCC:
    """Counts mmcc.epsilon calls (the routing calls it through the module attribute)."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._orig = mmcc.epsilon

    def __enter__(self):
        def wrapped(*args, **kwargs):
            t = time.perf_counter()
            try:
                return self._orig(*args, **kwargs)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - t

        mmcc.epsilon = wrapped  # type: ignore[assignment]
        return self

    def __exit__(self, *exc) -> None:
        mmcc.epsilon = self._orig  # type: ignore[assignment]


def _machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU container (shared), {platform.python_version()}"


def _key(r: dict) -> tuple:
    return (r["mechanism"], r["sampling"], r["epsilon"], r["epochs"], r["dataset_size"], r["batch_size"])


def merge_row(path: str, header: dict, row: dict) -> None:
    """Adds (or replaces, same key) one row in the JSON at path, written atomically, under a lock
    (several runs, e.g. --epochs 10 and --epochs 50, may merge into one file at the same time)."""
    import fcntl
    import tempfile

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(os.path.join(tempfile.gettempdir(), os.path.basename(path) + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = {"rows": []}
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        rows = [r for r in data.get("rows", []) if "dataset_size" not in r or _key(r) != _key(row)]
        rows.append(row)
        data.update(header)
        data["rows"] = rows
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)


def blt_strategy(n: int, epochs: int):
    import mfnoise

    s, res = mfnoise.optimize(prefix_sum(n), Participation.epochs(n, epochs), "blt", buffers=BLT_BUFFERS)
    c = np.asarray(s.toeplitz_coeffs(), np.float64)
    if np.any(c < 0):
        k = int(np.argmax(c < 0))
        raise ValueError(f"the BLT has a negative Toeplitz coefficient c_{k} = {c[k]:.3g}: MMCC refuses it")
    return s, f"blt(buffers={BLT_BUFFERS}) {'converged' if res.converged else res.stopped}, min c_k = {c.min():.3g}"


def rows_for(dataset: int, batch: int, epochs: int, eps: float, delta: float, mmcc_max_n: int, bands_grid,
             mechanisms, emit, mmcc_cost_note: str = ""):
    steps_per_epoch = dataset // batch
    n = steps_per_epoch * epochs
    w = prefix_sum(n)
    pois = Participation(n, n, 1)
    cyc = Participation.epochs(n, epochs)
    base = {"epsilon": eps, "epochs": epochs, "n": n, "dataset_size": dataset, "batch_size": batch}

    def poisson_rmse(strategy):
        return mmcc.all_steps_sensitivity(strategy) * math.sqrt(decoder_norms(strategy, w).frobenius_sq / n)

    def add(name, sampling, strategy, p, calib_kwargs, err_of, note=None):
        load0 = os.getloadavg()[0]
        try:
            with _CountingMMCC() as cnt:
                t = time.perf_counter()
                z = accounting.calibrate(eps, delta, p, **calib_kwargs)
                sec = time.perf_counter() - t
            row = {"mechanism": name, "sampling": sampling, **base, "noise_multiplier": z,
                   "rmse": z * err_of(strategy), "seconds": sec}
            if cnt.calls:
                row.update({"mmcc_evaluations": cnt.calls, "mmcc_seconds": cnt.seconds})
        except ValueError as e:
            row = {"mechanism": name, "sampling": sampling, **base, "noise_multiplier": None, "rmse": None,
                   "seconds": None, "refused": str(e)[:300]}
        row.update({"load_before": load0, "load_after": os.getloadavg()[0]})
        if note:
            row["strategy"] = note
        emit(row)

    if "dp-sgd" in mechanisms:
        add("dp-sgd", "poisson", Identity(n), pois,
            {"sampling": "poisson", "dataset_size": dataset, "batch_size": batch, "strategy": Identity(n)},
            lambda s: rmse(s, w, pois))
    if "bandmf" in mechanisms:
        best = None
        load0 = os.getloadavg()[0]
        total = 0.0
        for b in bands_grid:
            if b > steps_per_epoch or b > n:
                continue
            s = closed_forms.bsr(n, b)
            p = Participation(n, -(-n // b), b, cyclic=True)
            t = time.perf_counter()
            try:
                z = accounting.calibrate(eps, delta, p, sampling="cyclic-poisson", dataset_size=dataset,
                                         batch_size=batch, strategy=s)
            except ValueError:
                continue
            sec = time.perf_counter() - t
            total += sec
            r = z * rmse(s, w, p)
            if best is None or r < best["rmse"]:
                best = {"mechanism": "bandmf", "bands": b, "sampling": "cyclic-poisson", **base,
                        "noise_multiplier": z, "rmse": r, "seconds": sec}
        if best is not None:
            best.update({"seconds_all_bands": total, "bands_grid": list(bands_grid), "load_before": load0,
                         "load_after": os.getloadavg()[0]})
            emit(best)
    strategies = []
    if "blt" in mechanisms:
        s, note = blt_strategy(n, epochs)
        strategies.append(("blt", s, note))
    if "bisr" in mechanisms:
        strategies.append(("bisr", closed_forms.bisr(n, min(BISR_BANDS, n)), f"bisr(bands={BISR_BANDS})"))
    for name, s, note in strategies:
        if "none" in mechanisms or "unamplified" in mechanisms:
            add(name, "none", s, cyc, {"strategy": s}, lambda s: rmse(s, w, cyc), note)
        if "mmcc" in mechanisms:
            if n <= mmcc_max_n:
                add(name + " (mmcc)", "poisson", s, pois,
                    {"sampling": "poisson", "dataset_size": dataset, "batch_size": batch, "strategy": s}, poisson_rmse,
                    note)
            else:
                emit({"mechanism": name + " (mmcc)", "sampling": "poisson", **base, "noise_multiplier": None,
                      "rmse": None, "seconds": None, "load_before": os.getloadavg()[0],
                      "refused": f"not run: n={n} > --mmcc-max-n={mmcc_max_n}{mmcc_cost_note}"})


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    rows = sorted(data["rows"], key=lambda r: (r["epochs"], r["epsilon"]))
    out = ["| epochs (n) | epsilon | mechanism | sampling | z | rmse | accounting s | MMCC evals |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mech = r["mechanism"] + (f" (bands={r['bands']})" if "bands" in r else "")
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4g}"
        e = "-" if r["rmse"] is None else f"{r['rmse']:.2f}"
        s = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        ev = str(r.get("mmcc_evaluations", "")) or ("" if "refused" not in r else r["refused"][:60])
        out.append(f"| {r['epochs']} ({r['n']}) | {r['epsilon']:g} | {mech} | {r['sampling']} | {z} | {e} | {s} "
                   f"| {ev} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, nargs="*", help="default 10 50 (quick: 2)")
    ap.add_argument("--epsilons", type=float, nargs="*", help="default 1 2 4 8 (quick: 2 8)")
    ap.add_argument("--mechanisms", nargs="*", default=["dp-sgd", "bandmf", "blt", "bisr", "none", "mmcc"],
                    help="which rows: dp-sgd bandmf blt bisr none mmcc (blt/bisr choose strategies, none/mmcc "
                         "their rows)")
    ap.add_argument("--mmcc-max-n", type=int, default=6000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    a = ap.parse_args()
    if a.quick:
        dataset, batch, epochs_list, eps_list, bands_grid = 5120, 512, [2], [2.0, 8.0], [1, 2, 5]
        default_out = "amplification_quick.json"
    else:
        dataset, batch, epochs_list = 60000, 512, [10, 50]
        eps_list, bands_grid = [1.0, 2.0, 4.0, 8.0], [1, 2, 4, 8, 16, 32, 64]
        default_out = "amplification.json"
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", default_out)
    if a.table:
        print(table(out))
        return
    epochs_list = a.epochs or epochs_list
    eps_list = a.epsilons or eps_list
    delta = 1e-5
    header = {"quick": a.quick, "delta": delta, "machine": _machine(),
              "command": "benchmarks/amplification.py (rows merged from one or more runs; see each row's load)"}

    def emit(r: dict) -> None:
        r["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        merge_row(out, header, r)
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4f}"
        e = "-" if r["rmse"] is None else f"{r['rmse']:.3f}"
        s = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        ev = f"evals={r['mmcc_evaluations']}" if "mmcc_evaluations" in r else ""
        mech = r["mechanism"] + (f"(b={r['bands']})" if "bands" in r else "")
        print(f"eps={r['epsilon']:<4g} epochs={r['epochs']:<3d} n={r['n']:<6d} {mech:<18s} {r['sampling']:<15s} "
              f"z={z:<9s} rmse={e:<9s} s={s:<7s} {ev} load={r['load_before']:.1f}->{r.get('load_after', 0):.1f} "
              f"{r.get('refused', '')}", flush=True)

    print(f"machine: {_machine()}, load {os.getloadavg()}", flush=True)
    for epochs in epochs_list:
        for eps in eps_list:
            rows_for(dataset, batch, epochs, eps, delta, a.mmcc_max_n, bands_grid, set(a.mechanisms), emit)
    print("wrote", out)


if __name__ == "__main__":
    main()
