"""``mfnoise demo``: private training on scikit-learn's digits, DP-SGD vs correlated noise."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "train a small network privately on sklearn digits: DP-SGD vs BandMF vs BLT at the same (epsilon, delta)"
DESCRIPTION = """Train a small MLP on scikit-learn's digits (shipped with scikit-learn, no download) with
DP-SGD (independent noise), BandMF and BLT (correlated noise) at the same (epsilon, delta), on the
same fixed cyclic batches; and, for reference, DP-SGD with Poisson sampling and its amplified
accounting. Each method's learning rate is picked from a small grid by validation accuracy; the
table reports test accuracy (mean ± std over seeds) and writes a PNG of test accuracy per epoch.

  mfnoise demo                             (about a minute on 2 CPU cores)
  mfnoise demo --epsilon 4 --epochs 16 --seeds 5 --plot out.png
  mfnoise demo --methods dp-sgd,bandmf --json

Needs the demo extra: pip install 'mfnoise[demo]' (scikit-learn, matplotlib)."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mfnoise.demo import LABELS, METHODS, Config
    from mfnoise.training.accounting import ACCOUNTANTS

    d = Config()
    parser.add_argument("--epsilon", type=float, default=d.epsilon,
                        help=f"target epsilon, the same for every method (default {d.epsilon:g})")
    parser.add_argument("--delta", type=float, default=d.delta,
                        help=f"target delta, the same for every method (default {d.delta:g})")
    parser.add_argument("--epochs", type=int, default=d.epochs,
                        help=f"passes over the training data; each example takes part this many times "
                             f"(default {d.epochs})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="examples per step (cyclic batches: train size // BATCH_SIZE steps per epoch, "
                             "each batch at least this big; Poisson: this many expected); every update is "
                             f"the noisy clipped sum divided by this public constant (default {d.batch_size})")
    parser.add_argument("--seeds", type=int, default=d.seeds,
                        help="training runs per method and learning rate (initialisation, batches and noise "
                             f"differ); the table shows mean ± std (default {d.seeds})")
    parser.add_argument("--methods", default=",".join(d.methods),
                        help="comma-separated, from " + ", ".join(f"{m} ({LABELS[m]})" for m in METHODS)
                        + " (default all)")
    parser.add_argument("--learning-rates", type=_floats, default=d.learning_rates,
                        help="comma-separated grid; each method takes its best by validation accuracy "
                             f"(default {','.join(f'{x:g}' for x in d.learning_rates)})")
    parser.add_argument("--momentum", type=float, default=d.momentum,
                        help="SGD momentum in [0, 1); BandMF and BLT are optimized for this workload "
                             f"(0: prefix sums) (default {d.momentum:g})")
    parser.add_argument("--clip", type=float, default=d.clip, help=f"per-example L2 clip norm (default {d.clip:g})")
    parser.add_argument("--bands", type=int, default=None,
                        help="BandMF bands (default: the steps per epoch)")
    parser.add_argument("--buffers", type=int, default=d.buffers,
                        help=f"BLT buffers (parameter-sized noise state arrays) (default {d.buffers})")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default=d.accountant,
                        help="dp-accounting accountant for the noise multipliers: pld (tight) or rdp (looser) "
                             "(default pld)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the non-private reference run (clipped, no noise)")
    parser.add_argument("--plot", default="mfnoise-demo.png", metavar="PATH",
                        help="image of test accuracy per epoch; the format follows the extension (png, pdf, "
                             "svg, ...), the folder must exist (default ./mfnoise-demo.png; 'none' to skip)")


def run(args: argparse.Namespace) -> dict:
    from mfnoise import demo

    cfg = demo.Config(
        epsilon=args.epsilon, delta=args.delta, epochs=args.epochs, batch_size=args.batch_size,
        seeds=args.seeds, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        learning_rates=args.learning_rates, momentum=args.momentum, clip=args.clip, bands=args.bands,
        buffers=args.buffers, accountant=args.accountant, non_private=not args.no_reference,
    )
    plot = args.plot if args.plot and args.plot.lower() != "none" else None
    if plot is not None:
        demo.plot_format(plot, "--plot")  # a mistyped folder or format fails now, not after training
    result = demo.run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    if plot is not None:
        result["plot"] = os.path.abspath(demo.plot(result, plot))
    return result


def format_text(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"sklearn digits: {result['train_size']} train / {result['validation_size']} validation / "
        f"{result['test_size']} test; batch {cfg['batch_size']}, {cfg['epochs']} epochs = {result['n']} steps "
        f"({result['min_sep']} per epoch); momentum {cfg['momentum']:g}; clip {cfg['clip']:g}; "
        f"{cfg['seeds']} seeds",
        f"privacy: (epsilon={cfg['epsilon']:g}, delta={cfg['delta']:g}), {cfg['accountant']} accountant",
        "",
    ]
    header = ("method", "batches", "z", "z*sens", "noise rmse", "lr", "test accuracy", "min..max", "seconds")
    rows = []
    for r in result["results"]:
        rows.append((
            r["label"],
            "Poisson" if r["sampling"] == "poisson" else "cyclic",
            f"{r['noise_multiplier']:.4f}",
            f"{r['noise_std']:.3f}",
            f"{r['noise_rmse']:.1f}",
            f"{r['learning_rate']:g}",
            f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}",
            f"{r['accuracy_min']:.3f}..{r['accuracy_max']:.3f}",
            f"{r['strategy_seconds'] + r['train_seconds']:.1f}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*header))
    lines.append(fmt.format(*("-" * w for w in widths)))
    lines.extend(fmt.format(*row) for row in rows)
    ref = result.get("non_private")
    if ref:
        lines.append(f"non-private reference (clipped, no noise; not private): {ref['accuracy']:.4f} ± "
                     f"{ref['accuracy_std']:.4f} at lr {ref['learning_rate']:g}")
    lines.append("")
    lines.append("z: noise multiplier of the sensitivity-normalised mechanism (mfnoise.calibrate); z*sens: std of the")
    lines.append("noise Z in C G + Z per clip norm; noise rmse: rmse of the noise in the trajectory A G (clip units).")
    plan = result.get("plan")
    if plan:
        lines.append("")
        lines.append(f"mfnoise.plan's choice at these settings: {plan['mechanism']} with {plan['sampling']} sampling, "
                     f"noise multiplier {plan['noise_multiplier']:.5f}, epsilon {plan['epsilon']:.6g}; candidates "
                     "(traj. rmse: noise in the trajectory, clip units):")
        lines.append(plan["candidates_table"])
    lines.append(f"total {result['seconds']:.1f} s" + (f"; plot: {result['plot']}" if result.get("plot") else ""))
    return "\n".join(lines)
