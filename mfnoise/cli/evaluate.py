"""``mfnoise evaluate``: sensitivity, rmse and max_error of a strategy file or a closed form."""

from __future__ import annotations

import argparse
import time

from mfnoise.cli import schema
from mfnoise.core import workloads
from mfnoise.core.participation import Participation
from mfnoise.strategies import error, io
from mfnoise.strategies.base import Strategy
from mfnoise.strategies.closed_forms import CLOSED_FORMS, closed_form

HELP = "report sensitivity, rmse and max_error of a strategy (file or closed form)"
DESCRIPTION = """Report sensitivity, rmse and max_error of a strategy for a workload and participation schema.

  mfnoise evaluate --family sqrt-toeplitz --n 4096 --epochs 1
  mfnoise evaluate --family bsr --bands 64 --n 4096 --epochs 4 --json
  mfnoise evaluate strategy.npz            (schema and workload from the file unless given)

rmse = sens * ||A C^-1||_F / sqrt(n); max_error = sens * max_i ||(A C^-1)[i, :]||, noise multiplier 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="a strategy file (.npz)")
    parser.add_argument("--family", choices=list(CLOSED_FORMS), help="a closed-form strategy instead of a file")
    needs = " / ".join(name for name, form in CLOSED_FORMS.items() if form.needs_bands)
    parser.add_argument("--bands", type=int, help=f"bands for {needs}")
    schema.add_participation(parser, required=False)
    parser.add_argument("--workload", default=None,
                        help="prefix | momentum:BETA | momentum:BETA:cooldown:F (default: the file's, or prefix)")


def _closed_form(name: str, n: int, bands: int | None, workload: workloads.Workload) -> Strategy:
    if CLOSED_FORMS[name].needs_bands and bands is None:
        raise ValueError(f"--family {name} needs --bands")
    return closed_form(name, n, bands, workload)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    meta: dict = {}
    if (args.file is None) == (args.family is None):
        raise ValueError("give either a strategy FILE or --family")
    if args.file is not None:
        arrays, meta = io.read(args.file)
        strategy = io.load(args.file)
        if args.n is None:
            args.n = strategy.n
        elif args.n != strategy.n:
            raise ValueError(f"--n {args.n} does not match the strategy file's n={strategy.n}")
        schema_given = not (args.epochs is None and args.min_sep is None and args.max_participations is None)
        if not schema_given and "participation" in meta:
            p = Participation.from_dict(meta["participation"])
        else:
            p = schema.participation(args)
        spec = args.workload or meta.get("workload", {}).get("name", "prefix")
        w = workloads.parse(spec, strategy.n)
    else:
        if args.n is None:
            raise ValueError("--family needs --n")
        p = schema.participation(args)
        w = workloads.parse(args.workload or "prefix", args.n)
        strategy = _closed_form(args.family, args.n, args.bands, w)
    result = error.evaluate(strategy, w, p)
    out = {
        "family": strategy.family if args.file else args.family,
        **strategy.params(),
        "workload": w.name,
        "max_participations": p.max_participations,
        "min_sep": p.min_sep,
        "participation": p.kind,
        **result,
        "seconds": time.perf_counter() - start,
    }
    if args.file:
        out["path"] = args.file
    return out
