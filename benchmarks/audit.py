"""The audit's tightness table: white-box audits of honest DP-SGD, BSR and BLT at epsilon 2, 4, 8,
of each broken fixture, and the black-box audit of ``mfnoise demo``'s training.

    nice -n 5 .venv/bin/python benchmarks/audit.py            # 2^17 trials per white-box row
    nice -n 5 .venv/bin/python benchmarks/audit.py --quick    # 2^15 trials, no demo rows

White-box rows (``mfnoise.audit(strategy, participation, z, ...)``): n = 32 steps, 4 epochs of fixed
cyclic batches (b = 8), z = ``mfnoise.calibrate(epsilon, delta, p)``, claimed epsilon =
``mfnoise.epsilon(z, delta, p)`` (one Gaussian mechanism), the lower bound at 95% confidence by the
GDP estimate and by Clopper-Pearson (each a separate run of the mechanism with its own seed).
BLT is ``mfnoise.optimize``'s BLT (2 buffers) for the prefix workload at this schema; BSR is
``mfnoise.bsr(32, 8)``; DP-SGD is ``Identity(32)``. Broken fixtures (``mfnoise.auditing.mechanisms``)
run against BSR at epsilon 4 (no-clipping with canary norm 4 x clip): every one must be flagged.
Black-box rows (``mfnoise.cli.audit.demo_blackbox``): the demo's digits training with 500
mislabelled canaries (one run, one-run estimator), DP-SGD and BandMF at epsilon 8 (the demo's 8
epochs, learning rate 0.2), DP-SGD at epsilon 8 with 30 epochs at learning rate 0.5, and the same
30-epoch training without noise (not private) as the attack's power check.

Prints the table (ratio = lower bound / claimed; and each row's seconds against the first row's,
the baseline, after one untimed warm-up audit per strategy compiles it), the machine and its load
average; writes benchmarks/results/audit.json (audit-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import mfnoise
from mfnoise.core import workloads

N, EPOCHS, DELTA = 32, 4, 1e-5
EPSILONS = (2.0, 4.0, 8.0)
FIXTURES = ("sensitivity_k1", "wrong_strategy", "reused_last_row", "no_clipping")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _row(kind: str, mechanism: str, strategy: str, result, load0: float) -> dict:
    lb = result.lower_bound
    return {
        "audit": kind, "mechanism": mechanism, "strategy": strategy,
        "claimed_epsilon": result.claimed_epsilon, "epsilon_lower_bound": float(lb.epsilon),
        "tightness": result.tightness, "flagged": bool(result.flagged), "estimator": lb.method,
        "confidence": float(lb.confidence),
        # the canaries run (a white-box bound may be certified on part of them: the empirical attack's half)
        "trials": int(getattr(result, "trials", None) or result.canaries), "certified_on": int(lb.trials),
        "seconds": float(result.seconds),
        "load_before": load0, "load_after": _load(),
    }


def whitebox_rows(trials: int, log) -> list[dict]:
    p = mfnoise.Participation.epochs(N, EPOCHS)
    t0 = time.perf_counter()
    blt, _ = mfnoise.optimize(workloads.parse("prefix", N), p, family="blt", buffers=2, progress=False)
    log(f"BLT optimized in {time.perf_counter() - t0:.1f} s: {blt!r}")
    strategies = {"dp-sgd": mfnoise.Identity(N), "bsr": mfnoise.bsr(N, N // EPOCHS), "blt": blt}
    for strategy in strategies.values():  # compile each mechanism once, so no row's seconds include it
        mfnoise.audit(strategy, p, 1.0, delta=DELTA, trials=trials, seed=99)  # the same shapes as the rows
    rows = []
    zs = {}
    for eps in EPSILONS:
        zs[eps] = mfnoise.calibrate(eps, DELTA, p)
        log(f"epsilon {eps:g}: z = {zs[eps]:.6f}")
        for name, strategy in strategies.items():
            for estimator, seed in (("gdp", 1), ("clopper-pearson", 2)):
                load0 = _load()
                r = mfnoise.audit(strategy, p, zs[eps], delta=DELTA, trials=trials, estimator=estimator, seed=seed)
                rows.append(_row("white-box", f"honest {name}", strategy.family, r, load0))
                log(_line(rows[-1]))
    for fixture in FIXTURES:
        load0 = _load()
        r = mfnoise.audit(strategies["bsr"], p, zs[4.0], delta=DELTA, trials=trials, mechanism=fixture, seed=3,
                          canary_norm=4.0 if fixture == "no_clipping" else None)
        rows.append(_row("white-box", fixture.replace("_", "-"), "banded", r, load0))
        log(_line(rows[-1]))
    return rows


def blackbox_rows(log) -> list[dict]:
    from mfnoise.cli.audit import demo_blackbox

    rows = []
    for label, kwargs in (("demo dp-sgd", {"method": "dp-sgd"}), ("demo bandmf", {"method": "bandmf"}),
                          ("demo dp-sgd (30 epochs)", {"method": "dp-sgd", "epochs": 30, "learning_rate": 0.5}),
                          ("demo non-private (30 epochs)", {"private": False, "epochs": 30, "learning_rate": 0.5})):
        load0 = _load()
        r = demo_blackbox(**{"epsilon": 8.0, "delta": DELTA, "canaries": 500, **kwargs}, seed=0)
        row = _row("black-box", label, "identity" if kwargs.get("method", "dp-sgd") == "dp-sgd" else "banded", r,
                   load0)
        row.update(test_accuracy=r.extra.get("test_accuracy"), steps=r.extra.get("steps"),
                   correct=r.lower_bound.details.get("correct"), guesses=r.lower_bound.details.get("guesses"))
        rows.append(row)
        log(_line(row))
    return rows


def _line(r: dict) -> str:
    claimed = "-" if r["claimed_epsilon"] is None else f"{r['claimed_epsilon']:.3f}"
    tight = "-" if r["tightness"] is None else f"{r['tightness']:.3f}"
    return (f"{r['audit']:<9}  {r['mechanism']:<28}  {claimed:>7}  {r['epsilon_lower_bound']:>7.3f}  {tight:>6}  "
            f"{'FLAGGED' if r['flagged'] else '':<7}  {r['estimator']:<15}  {r['trials']:>7}  {r['seconds']:>7.1f}")


HEADER = (f"{'audit':<9}  {'mechanism':<28}  {'claimed':>7}  {'lower':>7}  {'ratio':>6}  {'':<7}  "
          f"{'estimator':<15}  {'trials':>7}  {'seconds':>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2^15 trials, no black-box rows")
    ap.add_argument("--trials", type=int, default=None, help="white-box trials per row (default 2^17; --quick 2^15)")
    ap.add_argument("--no-demo", action="store_true", help="skip the black-box demo rows")
    args = ap.parse_args()
    trials = args.trials or (1 << 15 if args.quick else 1 << 17)

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    load_start = os.getloadavg()
    start = time.perf_counter()
    log(HEADER)
    rows = whitebox_rows(trials, log)
    if not (args.quick or args.no_demo):
        rows += blackbox_rows(log)
    base = rows[0]["seconds"]
    for r in rows:
        r["seconds_vs_first_row"] = r["seconds"] / base
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs (shared 2-core container), "
          f"load average at start {tuple(round(x, 2) for x in load_start)}, at end "
          f"{tuple(round(x, 2) for x in os.getloadavg())}")
    print(f"white-box: n = {N}, {EPOCHS} epochs of fixed cyclic batches, delta = {DELTA:g}, 95% confidence; "
          "ratio = lower bound / claimed")
    print(HEADER + "  vs row 1")
    for r in rows:
        print(_line(r) + f"  {r['seconds_vs_first_row']:>8.2f}x")
    honest = [r for r in rows if r["mechanism"].startswith("honest")]
    broken = [r for r in rows if r["audit"] == "white-box" and not r["mechanism"].startswith("honest")]
    print(f"honest: {sum(not r['flagged'] for r in honest)}/{len(honest)} not accused, tightness "
          f"{min(r['tightness'] for r in honest):.3f}..{max(r['tightness'] for r in honest):.3f}; broken fixtures "
          f"flagged: {sum(r['flagged'] for r in broken)}/{len(broken)}; total {time.perf_counter() - start:.0f} s")
    out = Path(__file__).parent / "results" / ("audit-quick.json" if args.quick else "audit.json")
    out.write_text(json.dumps({
        "command": " ".join(["benchmarks/audit.py", *sys.argv[1:]]),
        "machine": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                    "note": "shared 2-core x86_64 CPU container", "load_start": load_start,
                    "load_end": os.getloadavg(), "python": platform.python_version()},
        "n": N, "epochs": EPOCHS, "delta": DELTA, "trials": trials, "rows": rows,
        "seconds": time.perf_counter() - start,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
