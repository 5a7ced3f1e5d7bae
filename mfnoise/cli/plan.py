"""``mfnoise plan``: from a privacy budget to a checked training plan (``mfnoise.plan``)."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "choose the mechanism, sampling and noise for a privacy budget; print the plan and its candidates"
DESCRIPTION = """Choose the mechanism with the least noise in the training trajectory at (epsilon, delta).

  mfnoise plan --epsilon 2 --delta 1e-6 --dataset-size 60000 --batch-size 512 --epochs 20
  mfnoise plan ... --params 1e8 --memory-budget 4e9 --momentum 0.9 --out plan.json

Compares DP-SGD and BandMF with cyclic Poisson sampling (amplified) and DP-SGD, BandMF, BLT, banded
Toeplitz and BISR with fixed cyclic batches, and BLT, banded Toeplitz and BISR with Poisson sampling
priced by MMCC when its cost (about 350 s per candidate at n = 2340 on a 2-core machine) fits
--amplification-seconds (default 10: listed as not evaluated, with the budget that includes them);
prints the chosen plan (achieved epsilon, noise multiplier, assumptions, the paper behind each
accounting step) and the table of candidates;
it takes seconds, and says on stderr what it is doing once it has lasted 2 s (--quiet: not).
--out writes the plan (strategy included); load it with mfnoise.planning.load(path)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epsilon", type=float, required=True, help="privacy budget epsilon")
    parser.add_argument("--delta", type=float, required=True, help="privacy budget delta")
    parser.add_argument("--dataset-size", type=int, required=True, help="number of training examples (public)")
    parser.add_argument("--batch-size", type=int, required=True, help="examples per step")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=int, help="passes over the data")
    length.add_argument("--steps", type=int, help="number of training steps")
    parser.add_argument("--momentum", type=float, default=None, help="SGD momentum beta (default: plain SGD)")
    parser.add_argument("--params", type=float, default=None, help="model parameters (for the state memory)")
    parser.add_argument("--memory-budget", type=float, default=None, help="bytes of noise state allowed")
    parser.add_argument("--mechanism", default="auto", help="auto | dp-sgd | bandmf | blt | toeplitz | bisr")
    parser.add_argument("--sampling", default="auto", help="auto | cyclic | cyclic-poisson | poisson")
    parser.add_argument("--amplification-seconds", type=float, default=None,
                        help="MMCC accounting time allowed per Poisson candidate (estimated; default: "
                             "mfnoise.planning.choose.AMPLIFICATION_SECONDS, 10 s)")
    parser.add_argument("--accountant", default="pld", choices=["pld", "rdp"], help="dp-accounting accountant")
    parser.add_argument("--clip", type=float, default=1.0, help="per-example L2 clip norm (default 1)")
    parser.add_argument("--optimize-seconds", type=float, default=20.0,
                        help="time budget of the strategy optimizer over all candidates that need it")
    parser.add_argument("--out", default=None, help="write the plan as JSON to this file")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (by default it says what it is doing once it has lasted 2 s)")


def _count(name: str, value: float | None) -> int | None:
    if value is None:
        return None
    if not (value >= 1 and float(value).is_integer()):
        raise ValueError(f"--{name} must be a positive whole number, got {value!r}")
    return int(value)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mfnoise.planning import plan
    from mfnoise.planning.report import summary
    from mfnoise.strategies.files import output_folder

    if args.out is not None:
        output_folder(args.out, "--out")  # before the work: a typo fails at once
    made = plan(args.epsilon, args.delta, dataset_size=args.dataset_size, batch_size=args.batch_size,
                epochs=args.epochs, steps=args.steps,
                optimizer="sgd" if args.momentum is None else ("momentum", args.momentum),
                params=_count("params", args.params), memory_budget=args.memory_budget, mechanism=args.mechanism,
                sampling=args.sampling, accountant=args.accountant, l2_clip_norm=args.clip,
                optimize_seconds=args.optimize_seconds, progress=False if args.quiet else None,
                **({} if args.amplification_seconds is None else {"amplification_seconds": args.amplification_seconds}))
    out = {"fingerprint": made.fingerprint, **summary(made),
           "candidates": [c.to_dict() for c in made.candidates], "report": made.report()}
    if args.out is not None:
        out["out"] = made.save(args.out)
    return out


def format_text(result: dict[str, Any]) -> str:
    text = result["report"]
    return text + (f"\nplan written to {result['out']}" if result.get("out") else "")
