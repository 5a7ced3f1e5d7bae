"""MMCC's cost at a given n: one epsilon evaluation (optionally split into its stages) and one
calibration, for Toeplitz C (BISR, BLT: the Toeplitz fast path) and a banded C (BSR, the general
path), under Poisson sampling with q = batch / dataset, through mfnoise's routing
(accounting.explain / calibrate, theorem "mmcc").

    nice -n 5 .venv/bin/python benchmarks/mmcc_cost.py                       # n = 2000, epsilon 2
    nice -n 5 .venv/bin/python benchmarks/mmcc_cost.py --n 1170 --strategies bisr blt --profile
    nice -n 5 .venv/bin/python benchmarks/mmcc_cost.py --no-calibrate        # evaluations only

``--profile`` times the stages of one evaluation (mmcc.epsilon's own steps, run one by one: the
lag Gram and Chernoff tail bounds, the row laws, the row mixture PLDs, their self-compositions and
compositions, the final epsilon); the evaluation itself is timed separately through the routing.
A calibration reports its number of MMCC evaluations (counted at mmcc.epsilon) and, for
comparison, the number the former search would have made (bracket by halving from z_none, then
bisection in log z to 0.1%: 1 + halvings + 10 for a monotone epsilon, computed from z_none and
the calibrated z, not run).

Wall and CPU seconds are printed with the 1-minute load average before and after each
measurement (the machine is shared). Rows are merged into --out (default
benchmarks/results/mmcc_cost.json) keyed by (strategy, n, what), so runs add up.
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
from mfnoise.training import accounting, mmcc


def _measure(fn):
    load0 = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "load_before": load0,
                 "load_after": os.getloadavg()[0]}


def merge(path: str, header: dict, row: dict) -> None:
    import fcntl
    import tempfile

    key = ("strategy", "n", "what")
    with open(os.path.join(tempfile.gettempdir(), os.path.basename(path) + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict = {"rows": []}
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        rows = [r for r in data.get("rows", []) if tuple(r.get(k) for k in key) != tuple(row.get(k) for k in key)]
        data.update(header)
        data["rows"] = rows + [row]
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)


def profile(priced, sigma: float, delta: float, q: float) -> dict:
    """mmcc.epsilon's steps one by one, each timed (wall seconds)."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    tc = priced.toeplitz_coeffs() if hasattr(priced, "toeplitz_coeffs") else None
    if tc is not None:
        c = mmcc._toeplitz_coeffs(tc, priced.n)
        a = time.perf_counter()
        mmcc.lag_probabilities(c, q, sigma**2, 0.5 * delta)
        t["lag_gram_and_chernoff_s"] = time.perf_counter() - a
    a = time.perf_counter()
    bounds = mmcc.row_bounds(priced, sigma, delta, q)  # includes the tail bounds again
    t["row_bounds_s"] = time.perf_counter() - a
    if "lag_gram_and_chernoff_s" in t:
        t["row_laws_s"] = t["row_bounds_s"] - t["lag_gram_and_chernoff_s"]
    d = min(1e-3, mmcc.PLD_BIAS / bounds.n)
    t["mixture_pld_s"] = t["self_compose_s"] = t["compose_s"] = 0.0
    pld = None
    for b in bounds.rows:
        a = time.perf_counter()
        one = mmcc.mixture_pld(sigma, b.sensitivities, b.probabilities, d)
        t["mixture_pld_s"] += time.perf_counter() - a
        a = time.perf_counter()
        one = one.self_compose(b.count) if b.count > 1 else one
        t["self_compose_s"] += time.perf_counter() - a
        a = time.perf_counter()
        pld = one if pld is None else pld.compose(one)
        t["compose_s"] += time.perf_counter() - a
    assert pld is not None
    a = time.perf_counter()
    t["epsilon"] = float(pld.get_epsilon_for_delta(delta - bounds.tail_delta))
    t["get_epsilon_s"] = time.perf_counter() - a
    t["total_s"] = time.perf_counter() - t0
    t["rows_priced"] = len(bounds.rows)
    return t


def old_module(rev: str):
    """mfnoise/training/mmcc.py as of git revision ``rev``, imported as a separate module."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:mfnoise/training/mmcc.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"mmcc_{rev}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"mmcc_{rev}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def former_search_evaluations(z_none: float, z: float, rel: float = 1e-3) -> int:
    """The former MMCC calibration's evaluations for a monotone epsilon with root z: eps(z_none),
    halvings until eps(lo) > target, then bisection in log z from ratio 2 to 1 + rel."""
    halvings = max(1, math.ceil(math.log2(z_none / z))) if z < z_none else 1
    return 1 + halvings + math.ceil(math.log2(math.log(2.0) / -math.log1p(-rel)))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--dataset-size", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--z", type=float, default=0.05, help="noise multiplier of the epsilon evaluation")
    ap.add_argument("--epsilon", type=float, default=2.0, help="target of the calibration")
    ap.add_argument("--strategies", nargs="*", default=["bisr", "bsr"], help="bisr blt bsr")
    ap.add_argument("--bisr-bands", type=int, default=8)
    ap.add_argument("--bsr-bands", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=None, help="the BLT's schema: Participation.epochs(n, epochs) "
                    "(default n // (dataset // batch))")
    ap.add_argument("--profile", action="store_true", help="also time the stages of one evaluation")
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--old-rev", default=None, help="also evaluate with mmcc.py of this git revision (same C, "
                    "sigma, q) and compare epsilon and CPU seconds side by side")
    ap.add_argument("--no-eval", action="store_true", help="skip the routed evaluation (e.g. with --profile, "
                    "whose total is an evaluation's time)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "mmcc_cost.json"))
    a = ap.parse_args()
    n = a.n
    p = Participation(n, n, 1)
    q = a.batch_size / a.dataset_size
    kw = {"sampling": "poisson", "dataset_size": a.dataset_size, "batch_size": a.batch_size}
    header = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU container (shared)",
              "command": "benchmarks/mmcc_cost.py (rows merged from several runs; see each row's args)"}
    for name in a.strategies:
        if name == "bisr":
            label, s = f"bisr(bands={a.bisr_bands})", closed_forms.bisr(n, a.bisr_bands)
        elif name == "bsr":
            label, s = f"bsr(bands={a.bsr_bands})", closed_forms.bsr(n, a.bsr_bands)
        elif name == "blt":
            import mfnoise

            epochs = a.epochs or max(1, n // (a.dataset_size // a.batch_size))
            s, _ = mfnoise.optimize(prefix_sum(n), Participation.epochs(n, epochs), "blt", buffers=4)
            if np.any(np.asarray(s.toeplitz_coeffs()) < 0):
                raise SystemExit("the BLT has a negative coefficient: MMCC refuses it")
            label = f"blt(buffers=4, epochs={epochs})"
        else:
            raise SystemExit(f"unknown strategy {name!r}")
        base = {"strategy": label, "n": n, "q": q, "delta": a.delta, "args": vars(a)}
        if not a.no_eval:
            acc, m = _measure(lambda s=s: accounting.explain(a.z, a.delta, p, strategy=s, **kw))
            row = {**base, "what": "evaluation", "theorem": acc.theorem, "toeplitz_path": acc.detail["toeplitz"],
                   "rows_priced": acc.detail["rows_priced"], "z": a.z, "epsilon": acc.epsilon, **m}
            print(f"{label:<24s} n={n} path={'toeplitz' if row['toeplitz_path'] else 'general':<8s} "
                  f"rows_priced={row['rows_priced']:<4d} eps(z={a.z:g})={acc.epsilon:.6f}  {m['wall_s']:.1f} s "
                  f"wall {m['cpu_s']:.1f} s cpu  load {m['load_before']:.2f}->{m['load_after']:.2f}", flush=True)
            merge(a.out, header, row)
        if a.old_rev:
            old = old_module(a.old_rev)
            sigma = a.z * mmcc.all_steps_sensitivity(s)
            priced = mmcc.priced_strategy(s)
            r_new, m_new = _measure(lambda priced=priced, sigma=sigma: mmcc.epsilon(priced, sigma, a.delta, q))
            r_old, m_old = _measure(lambda priced=priced, sigma=sigma, old=old: old.epsilon(priced, sigma, a.delta, q))
            row = {**base, "what": f"vs {a.old_rev}", "z": a.z, "epsilon": r_new.epsilon,
                   "epsilon_old": r_old.epsilon, "cpu_s": m_new["cpu_s"], "cpu_s_old": m_old["cpu_s"],
                   "wall_s": m_new["wall_s"], "wall_s_old": m_old["wall_s"], "load_before": m_new["load_before"],
                   "load_after": m_old["load_after"]}
            print(f"{label:<24s} n={n} eps(z={a.z:g}) {r_old.epsilon:.9f} ({a.old_rev}) -> {r_new.epsilon:.9f}  cpu "
                  f"{m_old['cpu_s']:.1f} -> {m_new['cpu_s']:.1f} s ({m_old['cpu_s'] / m_new['cpu_s']:.2f}x)",
                  flush=True)
            merge(a.out, header, row)
        if a.profile:
            route_sens = mmcc.all_steps_sensitivity(s)
            prof, m = _measure(lambda s=s, route_sens=route_sens: profile(mmcc.priced_strategy(s), a.z * route_sens,
                                                                         a.delta, q))
            row = {**base, "what": "profile", "z": a.z, **prof, **{k: v for k, v in m.items() if k != "wall_s"}}
            stages = ", ".join(f"{k} {v:.1f}" for k, v in prof.items() if k.endswith("_s"))
            print(f"{label:<24s} n={n} eps(z={a.z:g})={prof['epsilon']:.6f} stages: {stages}", flush=True)
            merge(a.out, header, row)
        if not a.no_calibrate:
            counter = {"calls": 0}
            orig = mmcc.epsilon

            def counted(*args, counter=counter, orig=orig, **kwargs):
                counter["calls"] += 1
                return orig(*args, **kwargs)

            mmcc.epsilon = counted  # type: ignore[assignment]
            try:
                z, m = _measure(lambda s=s: accounting.calibrate(a.epsilon, a.delta, p, strategy=s, **kw))
            finally:
                mmcc.epsilon = orig  # type: ignore[assignment]
            z_none = accounting.calibrate(a.epsilon, a.delta)
            row = {**base, "what": "calibration", "target_epsilon": a.epsilon, "calibrated_z": z,
                   "evaluations": counter["calls"], "z_none": z_none,
                   "former_search_evaluations": former_search_evaluations(z_none, z), **m}
            print(f"{'':<24s} calibrate(epsilon={a.epsilon:g}) -> z={z:.5f}  {counter['calls']} evaluations "
                  f"(former search: {row['former_search_evaluations']})  {m['wall_s']:.1f} s wall "
                  f"{m['cpu_s']:.1f} s cpu  load {m['load_before']:.2f}->{m['load_after']:.2f}", flush=True)
            merge(a.out, header, row)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
