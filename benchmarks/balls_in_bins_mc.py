"""Benchmark: the balls-in-bins Monte Carlo accountant (``mfnoise.training.balls_in_bins``) at the issue's
scale: 60000 examples, batch 512 (b = 117 bins), 10 and 50 epochs (n = 1170, 5850 steps).

For identity (DP-SGD), a banded Toeplitz C and a BLT C it measures the seconds to form the b×b mode Gram
(one pass over C), the seconds to draw the privacy-loss samples and search epsilon, and reports the
estimate (value, [lower, upper] at 95 %) of epsilon at delta, next to the provable unamplified epsilon of
the same noise multiplier (the Gaussian mechanism, ``accounting.epsilon``).

Run:  .venv/bin/python benchmarks/balls_in_bins_mc.py [--samples 200000] [--epochs 10,50] [--delta 1e-5]
Writes benchmarks/results/balls_in_bins_mc.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import mfnoise
from mfnoise.strategies import BLT, Toeplitz
from mfnoise.training import accounting, balls_in_bins

HERE = os.path.dirname(os.path.abspath(__file__))


def strategies(n: int) -> dict[str, mfnoise.Strategy]:
    return {
        "identity": mfnoise.Identity(n),
        "toeplitz-8": Toeplitz(0.5 ** np.arange(8), n),
        "blt-2": BLT(np.array([0.9, 0.5]), np.array([0.05, 0.1]), n),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--epochs", default="10,50")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--noise-multiplier", type=float, default=0.8)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "balls_in_bins_mc.json"))
    args = ap.parse_args()
    dataset, batch = 60_000, 512
    rows = []
    for k in (int(e) for e in args.epochs.split(",")):
        p = mfnoise.batching.schedule(dataset, batch, k)
        for name, s in strategies(p.n).items():
            t0 = time.perf_counter()
            balls_in_bins.mode_gram(s, p)
            t_gram = time.perf_counter() - t0
            t0 = time.perf_counter()
            est = balls_in_bins.epsilon_estimate(s, p, args.noise_multiplier, args.delta, samples=args.samples,
                                                 seed=0)
            t_est = time.perf_counter() - t0
            unamplified = accounting.epsilon(args.noise_multiplier, args.delta)
            rows.append({"epochs": k, "n": p.n, "bins": p.min_sep, "strategy": name, "samples": args.samples,
                         "gram_s": t_gram, "estimate_s": t_est, "epsilon": est.value, "lower": est.lower,
                         "upper": est.upper, "unamplified_epsilon": unamplified})
            r = rows[-1]
            print(f"{k:>3} ep n={p.n:<5} {name:<11} gram {t_gram:7.2f}s  estimate {t_est:7.2f}s  "
                  f"eps {r['epsilon']:.3f} [{r['lower']:.3f}, {r['upper']:.3f}]  unamplified {unamplified:.3f}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg(),
                   "noise_multiplier": args.noise_multiplier, "delta": args.delta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
