"""Is the BLT optimizer's optimum global? A multi-start search on the same loss.

The target: a 5-buffer BLT (prefix sum, single participation, max error) within 0.3% of
sqrt-Toeplitz at n = 10^6. mfnoise's staged optimizer (and jax-privacy 2.0.0) reach +0.413%. This
script runs L-BFGS-B on the same loss (mfnoise.optim.blt, the interlaced parametrisation: omega > 0,
the family jax-privacy also optimizes over) from many random initial decays, log-uniform, jittered
log-spaced and log-log-uniform in 1 - theta, and reports the distinct optima found, next to the
staged optimizer's result and sqrt-Toeplitz (the Toeplitz optimum's baseline) in the same run.

    .venv/bin/python benchmarks/blt_multistart.py            # n = 10^6, 5 buffers, 150 starts (~2 min)
    .venv/bin/python benchmarks/blt_multistart.py --quick    # n = 10^4, 20 starts
    .venv/bin/python benchmarks/blt_multistart.py --n 1000000 --buffers 6 --starts 50

Writes benchmarks/results/blt_multistart.json. No extra packages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import mfnoise
from mfnoise import Participation
from mfnoise.core import workloads
from mfnoise.optim import blt as blt_loss
from mfnoise.optim.problem import FAST_COMPILE
from mfnoise.optim.solver import optimize


def random_start(rng: np.random.Generator, kind: int, d: int, n: int) -> np.ndarray:
    """Initial log(1 - decay) of the 2d interlaced decays (decreasing), in the saturation's range."""
    if kind == 0:  # log-uniform 1 - decay in [0.1 / n, 0.9]
        ld = rng.uniform(math.log(0.1 / n), math.log(0.9), 2 * d)
    elif kind == 1:  # log-spaced with jitter and a random span
        lo, hi = math.log(rng.uniform(0.01, 10) / n), math.log(rng.uniform(0.05, 0.95))
        ld = np.minimum(np.linspace(hi, lo, 2 * d) + rng.normal(0, 0.3, 2 * d), -1e-3)
    else:  # log-log-uniform: more weight next to 1
        ld = -np.exp(rng.uniform(math.log(0.05), math.log(math.log(10 * n)), 2 * d))
    ld = np.clip(ld, blt_loss.LOG_DELTA_MIN + 1.0, -1e-3)
    return blt_loss.params_from_log_deltas(np.sort(ld)[::-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--buffers", type=int, default=5)
    ap.add_argument("--starts", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="n = 10^4, 20 starts")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "blt_multistart.json"))
    args = ap.parse_args()
    n, d, starts = (10_000, args.buffers, 20) if args.quick else (int(args.n), args.buffers, args.starts)
    p, w = Participation.single(n), workloads.prefix_sum(n)

    t0 = time.perf_counter()
    staged, result = optimize(w, p, "blt", buffers=d, objective="max", progress=False)
    staged_seconds = time.perf_counter() - t0
    sqrt_max = mfnoise.max_error(mfnoise.sqrt_toeplitz(n), w, p)

    with jax.enable_x64(True):
        prob = blt_loss.problem(w, p, objective="max", buffers=d)
        vg = jax.jit(prob.value_and_grad, compiler_options=FAST_COMPILE)

        def f(x):
            v, g = vg(jnp.asarray(x))
            v, g = float(v), np.asarray(g)
            if not math.isfinite(v) or not np.all(np.isfinite(g)):
                return 1e300, np.zeros_like(x)
            return v, g

        rng = np.random.default_rng(args.seed)
        found, best_x = [], None
        t0 = time.perf_counter()
        for s in range(starts):
            x0 = random_start(rng, s % 3, d, n)
            res = scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B",
                                          options={"maxiter": 20000, "ftol": 1e-13, "gtol": 1e-10, "maxcor": 30})
            found.append(math.exp(min(res.fun, 700.0)))
            if best_x is None or found[-1] <= min(found[:-1], default=math.inf):
                best_x = res.x
        search_seconds = time.perf_counter() - t0
    best = prob.to_strategy(best_x)
    best_exact = mfnoise.max_error(best, w, p)
    optima = sorted({round(v, 7) for v in found})
    counts = {v: sum(1 for x in found if round(x, 7) == v) for v in optima}

    print(f"BLT, prefix sum, single participation, max error, n = {n}, {d} buffers; "
          f"{platform.machine()} CPU, {os.cpu_count()} cores")
    print(f"{'':<36}{'max_error':>14}{'vs sqrt-Toeplitz':>18}{'seconds':>10}")
    print(f"{'sqrt-Toeplitz (baseline)':<36}{sqrt_max:>14.10f}{1.0:>18.6f}{'':>10}")
    print(f"{'staged optimizer (mfnoise.optimize)':<36}{result.max_error:>14.10f}"
          f"{result.max_error / sqrt_max:>18.6f}{staged_seconds:>10.1f}")
    print(f"{f'best of {starts} random starts':<36}{best_exact:>14.10f}{best_exact / sqrt_max:>18.6f}"
          f"{search_seconds:>10.1f}")
    print("distinct optima (rounded to 1e-7) and how many starts reached each:")
    for v in optima[:10]:
        print(f"  {v:.7f}  x{counts[v]}")

    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "n": n, "buffers": d, "starts": starts, "seed": args.seed,
        "sqrt_toeplitz_max_error": sqrt_max,
        "staged_max_error": result.max_error, "staged_ratio": result.max_error / sqrt_max,
        "staged_seconds": staged_seconds,
        "multistart_best_max_error": best_exact, "multistart_ratio": best_exact / sqrt_max,
        "multistart_seconds": search_seconds,
        "optima": [{"max_error": v, "starts": counts[v]} for v in optima],
        "best_theta": best.theta.tolist(), "best_omega": best.omega.tolist(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
