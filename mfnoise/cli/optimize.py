"""``mfnoise optimize``: find a strategy for a workload and participation schema, write its file."""

from __future__ import annotations

import argparse
import math
import shlex
import sys

from mfnoise.cli import format_table, schema
from mfnoise.core import workloads
from mfnoise.optim import objectives, problem, solver
from mfnoise.strategies import io

_FAMILIES = problem.families()
_ALIASES = problem.deprecated_aliases()

HELP = f"optimize a strategy ({', '.join(_FAMILIES)}) and write its strategy file"
DESCRIPTION = """Optimize a correlated-noise strategy and write it as a strategy file (.npz).

  mfnoise optimize --family blt --buffers 5 --n 1000000 --objective max --out blt.npz
  mfnoise optimize --family toeplitz --bands 64 --n 4096 --epochs 4 --out bt.npz --json
  mfnoise optimize --family banded --bands 32 --n 1024 --min-sep 64 --max-participations 8 --out b.npz
  mfnoise optimize --family banded --n 2048 --workload momentum:0.9:wd=1e-4 --objective last-iterate --out w.npz

Objectives (--objective): rmse, the error averaged over every step's model; max, the worst step's;
last-iterate, the final model's only (sens * ||(A C^-1)[n-1, :]||). For a Toeplitz strategy on a
Toeplitz workload (toeplitz, blt) max and last-iterate are the same objective.

Workloads (--workload): prefix (SGD); momentum:BETA[:lr=ETA][:wd=LAMBDA] (heavy-ball momentum BETA,
learning rate ETA, weight decay LAMBDA: theta <- (1 - ETA LAMBDA) theta - ETA m); with a schedule,
momentum:BETA[:lr=ETA][:wd=LAMBDA]:cooldown:F (the last fraction F of the steps decays linearly to 0)
or :warmup-cosine:W (ETA reached linearly over W steps, then cosine decay to 0). Constant learning
rates give Toeplitz workloads (every family); schedules need banded or dense.

The reported sensitivity, rmse and max_error are recomputed exactly from the optimized strategy
(as `mfnoise evaluate FILE` does), never taken from the optimizer. A progress bar (stderr) shows
for runs over ~2 s; Ctrl-C stops early and still writes the best strategy found so far."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    aliases = "".join(f"; {old} is a deprecated alias of {new}" for old, new in _ALIASES.items())
    parser.add_argument("--family", required=True, choices=[*_FAMILIES, *_ALIASES],
                        metavar="{" + ",".join(_FAMILIES) + "}",
                        help=f"strategy family (banded Toeplitz: toeplitz with --bands{aliases})")
    schema.add_participation(parser, required=True)
    parser.add_argument("--bands", type=int, help="bands (banded, toeplitz)")
    parser.add_argument("--buffers", type=int, help="buffers (blt)")
    schema.add_workload(parser)
    parser.add_argument("--objective", choices=list(objectives.OBJECTIVES), default="rmse",
                        help="minimise rmse (default), max_error or the last iterate's error (see above)")
    parser.add_argument("--out", required=True,
                        help="strategy file to write (.npz appended if missing); its folder must exist")
    parser.add_argument("--method", choices=list(solver.METHODS), default="auto",
                        help="quasi-Newton method: auto (default: the family's, lbfgs for blt, else scipy), "
                             "scipy L-BFGS-B, lbfgs (numpy L-BFGS, no bounds) or optax.lbfgs")
    parser.add_argument("--tol", type=float, default=solver.DEFAULT_TOL,
                        help="stop a start once the objective fell by at most this, relative, over the last "
                             f"{solver.TOL_WINDOW} iterations (default %(default)g: below the 6 digits reported)")
    parser.add_argument("--max-iterations", type=int, default=20_000, help="safety limit on iterations")
    parser.add_argument("--max-seconds", type=float, help="stop after this many seconds (keeps the best so far)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _family(args: argparse.Namespace) -> str:
    """The family's registered name; a deprecated alias is said on stderr."""
    if args.family in _ALIASES:
        name = _ALIASES[args.family]
        print(f"mfnoise: warning: --family {args.family} is deprecated; use --family {name} (the same problem)",
              file=sys.stderr)
        return name
    return args.family


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this run (recorded in the strategy file)."""
    parts = ["mfnoise", "optimize", "--family", args.family, "--n", str(args.n)]
    if args.min_sep is not None:
        parts += ["--min-sep", str(args.min_sep), "--max-participations", str(args.max_participations)]
    else:
        parts += ["--epochs", str(1 if args.epochs is None else args.epochs)]
    for flag, value in (("--bands", args.bands), ("--buffers", args.buffers)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--workload", args.workload, "--objective", args.objective, "--method", args.method]
    if args.tol != solver.DEFAULT_TOL:
        parts += ["--tol", repr(args.tol)]
    parts += ["--out", args.out]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> dict:
    from mfnoise.optim.solver import optimize

    args = argparse.Namespace(**{**vars(args), "family": _family(args)})
    if args.n is None or args.n < 1:
        raise ValueError(f"--n must be a positive integer, got {args.n}")
    for flag, value in (("--bands", args.bands), ("--buffers", args.buffers)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    if not (math.isfinite(args.tol) and args.tol >= 0):
        raise ValueError(f"--tol must be a non-negative number, got {args.tol}")
    io.output_folder(args.out, "--out")  # a mistyped folder fails now, not after the optimization
    p = schema.participation(args)
    w = workloads.parse(args.workload, args.n)
    # The family's builder refuses a size it does not take (--bands for blt, --buffers for the others).
    strategy, result = optimize(
        w, p, args.family, bands=args.bands, buffers=args.buffers, objective=args.objective,
        method=args.method, tol=args.tol, max_iterations=args.max_iterations, max_seconds=args.max_seconds,
        progress=False if args.no_progress else None,
    )
    path = strategy.save(
        args.out, participation=p, workload=w, rmse=result.rmse, max_error=result.max_error,
        sensitivity=result.sensitivity, objective=args.objective, command=command_line(args),
        optimizer={"method": result.method, "iterations": result.iterations, "evaluations": result.evaluations,
                   "converged": result.converged, "stopped": result.stopped, "seconds": result.seconds},
    )
    out = {
        "family": result.family,
        "n": p.n,
        "max_participations": p.max_participations,
        "min_sep": p.min_sep,
        "participation": p.kind,
        "workload": w.name,
        "objective": args.objective,
        **{k: v for k, v in result.params.items() if k in ("bands", "buffers")},
        "rmse": result.rmse,
        "max_error": result.max_error,
        "last_iterate_error": result.last_iterate_error,
        "sensitivity": result.sensitivity,
        "sensitivity_exact": result.sensitivity_exact,
        "iterations": result.iterations,
        "converged": result.converged,
        "stopped": result.stopped,
        "tol": result.tol,
        "tol_window": result.tol_window,
        "stops": dict(result.stops),
        "seconds": result.seconds,
        "path": path,
    }
    if result.buffers_requested is not None:
        out.update(buffers_requested=result.buffers_requested, buffers_kept=result.buffers_kept,
                   buffers_message=result.buffers_message)
    out["summary"] = result.summary()
    # the dense dual certifies its result: rmse >= dual_bound for every strategy of the family
    out.update({k: v for k, v in result.details.items() if k in ("formulation", "dual_bound", "duality_gap")})
    return out


def format_text(result: dict) -> str:
    """The run's summary (``OptimizeResult.summary``: the strategy, its exact errors, how the run
    stopped and on which tolerance, and the buffers note when fewer were kept), then the table of
    the remaining entries."""
    rest = {k: v for k, v in result.items() if k not in ("summary", "buffers_message")}
    return f"{result['summary']}\n\n{format_table(rest)}"
