"""``mfnoise recommend``: the shipped strategy with the lowest error that fits a memory budget."""

from __future__ import annotations

import argparse

from mfnoise.library import recommend

HELP = "pick the lowest-error library strategy whose noise state fits a memory budget"
DESCRIPTION = """Pick the library strategy with the lowest expected error whose noise state fits a budget.

  mfnoise recommend --n 10000 --epochs 4 --params 10000000 --memory-budget 200000000

State bytes = state arrays (BLT: buffers; banded: bands - 1; DP-SGD: 0) x params x 4 (float32).
The error (rmse, or max_error with --objective max) is reported relative to DP-SGD and to the best
library strategy without the budget."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, required=True, help="number of training steps")
    parser.add_argument("--epochs", type=int, required=True,
                        help="epochs of fixed cyclic batches (not in the library's 1, 2, 4, ..., 64: the entries "
                             "for the next library epochs, their errors recomputed for these)")
    parser.add_argument("--params", type=int, required=True, help="number of model parameters")
    parser.add_argument("--memory-budget", type=int, help="bytes available for noise state (default: no limit)")
    parser.add_argument("--workload", default="prefix", help="prefix | momentum:0.9 (default prefix)")
    parser.add_argument("--objective", choices=["rmse", "max"], default="rmse", help="error to minimise")
    parser.add_argument("--itemsize", type=int, default=4, help="bytes per parameter value (default 4, float32)")


def run(args: argparse.Namespace) -> dict:
    return recommend.recommend(args.n, args.epochs, args.params, args.memory_budget, workload=args.workload,
                               objective=args.objective, itemsize=args.itemsize)


def format_text(r: dict) -> str:
    size = "".join(f", {k} {r[k]}" for k in ("buffers", "bands") if k in r)
    lines = [
        f"recommended: {r['name']} ({r['family']}{size})",
        f"  {_key(r)} {r['error']:.6g}; noise state {r['state_bytes']:,} bytes"
        + (f" of a {r['memory_budget']:,}-byte budget" if r["memory_budget"] is not None else ""),
        f"  {r['relative_to_dp_sgd']:.3f} x DP-SGD's ({r['dp_sgd'][_key(r)]:.6g})",
        f"  {r['relative_to_best']:.3f} x the best without a budget ({r['best_unconstrained']['name']}, "
        f"{r['best_unconstrained']['state_bytes']:,} bytes)",
    ]
    if "built_for" in r:  # the library holds no entry for these epochs: one built for more, recomputed
        lines.append(f"  built for {r['built_for']['epochs']} epochs; its sensitivity and errors recomputed for "
                     f"{r['epochs']} epochs (a strategy for more participations stays valid for fewer)")
    if r.get("path"):
        lines.append(f"  file: {r['path']}")
    return "\n".join(lines)


def _key(r: dict) -> str:
    return "rmse" if r["objective"] == "rmse" else "max_error"
