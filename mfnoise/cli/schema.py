"""Command-line arguments shared by several commands: the participation schema and the workload."""

from __future__ import annotations

import argparse
import sys
import warnings

from mfnoise.core.participation import EpochsWarning, Participation


def add_participation(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--n", type=int, required=required, help="number of training steps")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--epochs", type=int, help="K epochs of fixed cyclic batches (min_sep = n // K)")
    group.add_argument("--min-sep", type=int, help="min-sep participation: least distance b between participations")
    parser.add_argument("--max-participations", type=int,
                        help="with --min-sep: most participations K of one example")


def add_workload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="prefix",
                        help="prefix | momentum:BETA[:lr=ETA][:wd=LAMBDA][:cooldown:FRACTION | :warmup-cosine:STEPS] "
                             "(default prefix; e.g. momentum:0.9:wd=1e-4, momentum:0.9:lr=0.1:warmup-cosine:100)")


def participation(args: argparse.Namespace) -> Participation:
    """The schema named by --epochs K, or --min-sep B --max-participations K (default: one epoch)."""
    if args.min_sep is not None:
        if args.max_participations is None:
            raise ValueError("--min-sep needs --max-participations")
        return Participation(args.n, args.max_participations, args.min_sep)
    if args.max_participations is not None:
        raise ValueError("--max-participations needs --min-sep (or use --epochs)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EpochsWarning)
        p = Participation.epochs(args.n, 1 if args.epochs is None else args.epochs)
    for w in caught:  # --epochs K not dividing --n gives more than K participations: say so
        print(f"mfnoise: warning: {w.message}; on the command line: --min-sep {p.min_sep} "
              f"--max-participations {args.epochs}", file=sys.stderr)
    return p
