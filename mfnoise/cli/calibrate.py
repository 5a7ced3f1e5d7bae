"""``mfnoise calibrate``: the noise multiplier that gives (epsilon, delta), by dp-accounting."""

from __future__ import annotations

import argparse
import time

from mfnoise.cli import schema
from mfnoise.core.participation import Participation
from mfnoise.strategies import io

HELP = "noise multiplier for a target (epsilon, delta), via dp-accounting (PLD or RDP)"
DESCRIPTION = """Find the noise multiplier z that makes a sensitivity-normalised MF mechanism (epsilon, delta)-DP.

  mfnoise calibrate --epsilon 8 --delta 1e-5                        (one Gaussian mechanism, any k)
  mfnoise calibrate --epsilon 8 --delta 1e-5 --n 1000 --epochs 10
  mfnoise calibrate --epsilon 8 --delta 1e-5 --strategy bandmf.npz --min-sep 4 --max-participations 250 \\
      --sampling cyclic-poisson --dataset-size 60000 --batch-size 1000

Noise convention: the noise added to C G has standard deviation z * clip * sens(C, p).
--sampling none (default): any batches that honour the schema; the mechanism is one Gaussian
mechanism with noise multiplier z, whatever k is.
--sampling cyclic-poisson: amplified BandMF (Choquette-Choo et al. 2023, arXiv:2306.08153):
ceil(n / b) rounds of a Poisson-subsampled Gaussian with q = batch / (dataset / b) and noise
multiplier z * sens(C, p) / (max column norm of C). It needs the strategy itself (--strategy FILE,
e.g. from `mfnoise optimize` or `mfnoise library`), which is checked: C must be banded with
bands <= min_sep b (identity, i.e. DP-SGD, is bands = 1), and the schema must allow ceil(n / b)
participations. Anything else is refused, with the reason.
--sampling poisson: every step samples each example with q = batch / dataset (schema: every step,
Participation(n, n, 1), the default with this sampling). A diagonal C (identity: DP-SGD) is n
Poisson-subsampled Gaussians (dp-accounting); any other C with non-negative entries (BLT, BISR,
banded Toeplitz, BandMF) is priced by MMCC ("Privacy Amplification for Matrix Mechanisms",
Choquette-Choo, Ganesh, Steinke, Thakurta, ICLR 2024), minutes at n ~ 2000; a negative entry is
refused. --mmcc-discretization / --mmcc-components trade tightness for time (still upper bounds).
--sampling balls-in-bins is refused here (its accountant is a Monte Carlo estimate, not a bound),
and so is b-min-sep (no theorem implemented). The output names the theorem and paper used.
The PLD accountant coarsens its grid at large epsilon (bounded memory; still an upper bound) and
is refused beyond a grid of 256 (epsilon ~ 1e7): use --accountant rdp there."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mfnoise.training import accounting  # dp-accounting: loaded by this command only, not by `mfnoise --help`

    parser.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    parser.add_argument("--delta", type=float, required=True, help="target delta")
    schema.add_participation(parser, required=False)
    parser.add_argument("--sampling", choices=accounting.ROUTED_SAMPLINGS, default="none",
                        help="none (default), cyclic-poisson (amplified BandMF) or poisson (Poisson DP-SGD / MMCC); "
                             "the amplified ones need --strategy, --dataset-size and --batch-size")
    parser.add_argument("--strategy", metavar="FILE",
                        help="a strategy file; with cyclic-poisson its bands and column norms are checked and used "
                             "(--n defaults to its n)")
    # Refused with a message: a number of bands does not determine the amplified accounting.
    parser.add_argument("--bands", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dataset-size", type=int, help="number of training examples (with cyclic-poisson)")
    parser.add_argument("--batch-size", type=int, help="expected batch size (with cyclic-poisson)")
    parser.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default="pld",
                        help="dp-accounting accountant: pld (default, tight) or rdp (fast, looser)")
    parser.add_argument("--mmcc-discretization", type=float, default=None,
                        help="with --sampling poisson and a non-diagonal C: MMCC's privacy-loss grid (default 1e-3; "
                             "coarser is faster and looser, always an upper bound)")
    parser.add_argument("--mmcc-components", type=int, default=None,
                        help="with --sampling poisson and a non-diagonal C: MMCC's mixture components per row "
                             "(default 64; fewer is faster and looser)")


def run(args: argparse.Namespace) -> dict:
    from mfnoise.training import accounting

    start = time.perf_counter()
    if args.bands is not None:
        raise ValueError(
            f"--bands {args.bands} is not accepted: amplified accounting needs the strategy itself, whose column "
            f"norms (not only its bands) set the per-round noise; pass --strategy FILE"
        )
    strategy = io.load(args.strategy) if args.strategy else None
    if args.n is None and strategy is not None:
        args.n = strategy.n
    mmcc_options = {k: v for k, v in (("pld_discretization", args.mmcc_discretization),
                                      ("max_components", args.mmcc_components)) if v is not None}
    if mmcc_options and args.sampling != "poisson":
        raise ValueError(f"--mmcc-discretization / --mmcc-components only apply to --sampling poisson, not "
                         f"{args.sampling}")
    if args.sampling == "poisson" and args.n is not None and args.epochs is None and args.min_sep is None:
        # Poisson sampling lets an example take part in every step: the schema its theorems assume
        p = Participation(args.n, args.n, 1)
    elif args.n is None:
        if args.epochs is not None or args.min_sep is not None or args.max_participations is not None:
            raise ValueError("--epochs / --min-sep / --max-participations need --n")
        p = None
    else:
        p = schema.participation(args)
    kwargs: dict = {}
    amp = None
    if args.sampling in ("balls-in-bins", "b-min-sep"):
        # accounting refuses them (with the reason): calibrate returns provable noise multipliers only
        kwargs = {"sampling": args.sampling, "strategy": strategy}
    elif args.sampling == "poisson":
        if strategy is None:
            raise ValueError("--sampling poisson needs --strategy FILE: the theorem (Poisson DP-SGD for a diagonal C, "
                             "MMCC for C >= 0) is chosen from the strategy itself")
        if p is None:
            raise ValueError("--sampling poisson needs --n (or a strategy file, whose n is used)")
        kwargs = {"sampling": "poisson", "dataset_size": args.dataset_size, "batch_size": args.batch_size,
                  "strategy": strategy}
        missing = [f"--{k.replace('_', '-')}" for k in ("dataset_size", "batch_size") if kwargs[k] is None]
        if missing:
            raise ValueError(f"--sampling poisson needs {' and '.join(missing)}")
        if mmcc_options:
            kwargs["mmcc_options"] = mmcc_options
    elif args.sampling == "cyclic-poisson":
        if strategy is None:
            raise ValueError("--sampling cyclic-poisson needs --strategy FILE: the theorem's hypotheses (banded, "
                             "bands <= min_sep) and the per-round noise are read off the strategy itself")
        if p is None:
            raise ValueError("--sampling cyclic-poisson needs the schema (--epochs or --min-sep)")
        kwargs = {"sampling": "cyclic-poisson", "dataset_size": args.dataset_size, "batch_size": args.batch_size,
                  "strategy": strategy}
        missing = [f"--{k.replace('_', '-')}" for k in ("dataset_size", "batch_size") if kwargs[k] is None]
        if missing:
            raise ValueError(f"--sampling cyclic-poisson needs {' and '.join(missing)}")
        amp = accounting.amplification(p, dataset_size=args.dataset_size, batch_size=args.batch_size,
                                       strategy=strategy)
    else:
        given = [f for f, v in (("--dataset-size", args.dataset_size), ("--batch-size", args.batch_size))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only matter with --sampling cyclic-poisson or poisson")
        if strategy is not None:
            kwargs = {"strategy": strategy}
    z = accounting.calibrate(args.epsilon, args.delta, p, accountant=args.accountant, **dict(kwargs))
    # explain prices z as epsilon does and names the theorem that gave it
    how = accounting.explain(z, args.delta, p, accountant=args.accountant, **kwargs)
    out: dict = {
        "noise_multiplier": z,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "achieved_epsilon": how.epsilon,
        "accountant": "mmcc" if how.theorem == "mmcc" else args.accountant,
        "sampling": args.sampling,
        "theorem": how.theorem,
        "paper": how.paper,
    }
    if mmcc_options:
        out["mmcc_options"] = mmcc_options
    if p is not None:
        out.update(n=p.n, max_participations=p.max_participations, min_sep=p.min_sep, participation=p.kind)
    if amp is not None:
        out.update(bands=amp.bands, rounds=amp.rounds, sampling_probability=amp.q,
                   round_noise_multiplier=z * amp.scale, max_column_norm=amp.max_column_norm,
                   column_spread=amp.column_spread)
    if args.accountant == "pld" and how.theorem != "mmcc":
        out["pld_discretization"] = accounting.pld_grid(accounting.dp_event(
            z, p, **{k: v for k, v in kwargs.items() if k != "mmcc_options"}))
    if strategy is not None:
        out["family"] = strategy.family
    out["seconds"] = time.perf_counter() - start
    return out
