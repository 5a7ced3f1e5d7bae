"""``mfnoise demo``: private training on scikit-learn's digits (DP-SGD vs correlated noise), or
(``--task lm``) private fine-tuning of a small transformer language model on Python's own docs."""

from __future__ import annotations

import argparse
import os
import sys

HELP = ("train privately: DP-SGD vs BandMF vs BLT at the same (epsilon, delta), on sklearn digits or "
        "(--task lm) a small transformer LM")
DESCRIPTION = """--task digits (the default): train a small MLP on scikit-learn's digits (shipped with
scikit-learn, no download) with DP-SGD (independent noise), BandMF and BLT (correlated noise) at the
same (epsilon, delta), on the same fixed cyclic batches; and, for reference, DP-SGD with Poisson
sampling and its amplified accounting. Each method's learning rate is picked from a small grid by
validation accuracy; the table reports test accuracy (mean ± std over seeds) and writes a PNG of
test accuracy per epoch.

--task lm: pretrain a small decoder-only transformer (Flax NNX, byte tokens, tied embedding)
without privacy on the public topics of Python's own documentation text (pydoc_data.topics, part of
the standard library: no download), then fine-tune it on the private topics with DP-SGD, BandMF
and BLT at the same (epsilon, delta) (mfnoise.plan with fixed cyclic batches; one window of text is
one example); the table reports validation perplexity on held-out text of the private topics, the
epsilon reached and the wall time, against the pretrained model and non-private fine-tuning.

  mfnoise demo                             (about a minute on 2 CPU cores)
  mfnoise demo --epsilon 4 --epochs 16 --seeds 5 --plot out.png
  mfnoise demo --methods dp-sgd,bandmf --json
  mfnoise demo --task lm --quick           (about a minute; without --quick a few minutes)
  mfnoise demo --task lm --epsilon 4 --json

Needs the demo extra: pip install 'mfnoise[demo]' (scikit-learn, matplotlib); --task lm needs the
flax extra: pip install 'mfnoise[flax]' (and matplotlib for --plot)."""

TASKS = ("digits", "lm")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mfnoise.demo import LABELS, METHODS, Config
    from mfnoise.lm_demo import LABELS as LM_LABELS
    from mfnoise.lm_demo import METHODS as LM_METHODS
    from mfnoise.lm_demo import Config as LMConfig
    from mfnoise.training.accounting import ACCOUNTANTS

    d, lm = Config(), LMConfig()
    parser.add_argument("--task", choices=TASKS, default="digits",
                        help="digits: an MLP on sklearn digits; lm: fine-tune a small transformer language model "
                             "on Python's documentation text (default digits)")
    parser.add_argument("--quick", action="store_true",
                        help="--task lm only: a smaller model, fewer steps (about a minute on 2 cores)")
    parser.add_argument("--epsilon", type=float, default=d.epsilon,
                        help=f"target epsilon, the same for every method (default {d.epsilon:g})")
    parser.add_argument("--delta", type=float, default=d.delta,
                        help=f"target delta, the same for every method (default {d.delta:g})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"passes over the (private) training data; each example takes part this many times "
                             f"(default {d.epochs}; lm {lm.epochs})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="examples per step (cyclic batches: train size // BATCH_SIZE steps per epoch, "
                             "each batch at least this big; Poisson: this many expected); every update is "
                             f"the noisy clipped sum divided by this public constant (default {d.batch_size}; "
                             f"lm {lm.batch_size})")
    parser.add_argument("--seeds", type=int, default=None,
                        help="digits: training runs per method and learning rate (initialisation, batches and "
                             f"noise differ); the table shows mean ± std (default {d.seeds}). lm: one seed only")
    parser.add_argument("--methods", default=None,
                        help="comma-separated, from " + ", ".join(f"{m} ({LABELS[m]})" for m in METHODS)
                        + " (default all); lm: from " + ", ".join(f"{m} ({LM_LABELS[m]})" for m in LM_METHODS))
    parser.add_argument("--learning-rates", type=_floats, default=None,
                        help="comma-separated grid; each method takes its best by validation accuracy "
                             f"(default {','.join(f'{x:g}' for x in d.learning_rates)}); lm: ONE learning rate "
                             f"of SGD with momentum, the same for every method (default {lm.learning_rate:g})")
    parser.add_argument("--momentum", type=float, default=d.momentum,
                        help="SGD momentum in [0, 1); BandMF and BLT are optimized for this workload "
                             f"(0: prefix sums) (default {d.momentum:g})")
    parser.add_argument("--clip", type=float, default=d.clip, help=f"per-example L2 clip norm (default {d.clip:g})")
    parser.add_argument("--bands", type=int, default=None,
                        help="digits: BandMF bands (default: the steps per epoch); lm: mfnoise.plan picks them")
    parser.add_argument("--buffers", type=int, default=None,
                        help=f"BLT buffers (parameter-sized noise state arrays) (default {d.buffers}); lm: "
                             "mfnoise.plan picks them")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default=d.accountant,
                        help="dp-accounting accountant for the noise multipliers: pld (tight) or rdp (looser) "
                             "(default pld)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the non-private reference run (digits: clipped, no noise; lm: no clipping, "
                             "no noise)")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="image of test accuracy (lm: validation perplexity) per epoch; the format follows "
                             "the extension (png, pdf, svg, ...), the folder must exist (digits default "
                             "./mfnoise-demo.png, lm default none; 'none' to skip)")


def _methods(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(m.strip() for m in text.split(",") if m.strip())


def run(args: argparse.Namespace) -> dict:
    if getattr(args, "task", "digits") == "lm":
        return _run_lm(args)
    if getattr(args, "quick", False):
        raise ValueError("--quick is for --task lm (the digits demo is already about a minute)")
    from mfnoise import demo

    d = demo.Config()
    cfg = demo.Config(
        epsilon=args.epsilon, delta=args.delta,
        epochs=d.epochs if args.epochs is None else args.epochs,
        batch_size=d.batch_size if args.batch_size is None else args.batch_size,
        seeds=d.seeds if args.seeds is None else args.seeds, methods=_methods(args.methods) or d.methods,
        learning_rates=d.learning_rates if args.learning_rates is None else args.learning_rates,
        momentum=args.momentum, clip=args.clip, bands=args.bands,
        buffers=d.buffers if args.buffers is None else args.buffers, accountant=args.accountant,
        non_private=not args.no_reference,
    )
    plot = "mfnoise-demo.png" if args.plot is None else args.plot
    plot = plot if plot and plot.lower() != "none" else None
    if plot is not None:
        demo.plot_format(plot, "--plot")  # a mistyped folder or format fails now, not after training
    result = demo.run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    if plot is not None:
        result["plot"] = os.path.abspath(demo.plot(result, plot))
    return result


def _run_lm(args: argparse.Namespace) -> dict:
    from mfnoise import lm_demo

    kwargs: dict = dict(lm_demo.QUICK) if args.quick else {}
    if args.learning_rates is not None:
        if len(args.learning_rates) != 1:
            raise ValueError(f"--task lm takes one learning rate, got {args.learning_rates}")
        kwargs["learning_rate"] = args.learning_rates[0]
    if args.bands is not None or args.buffers is not None:
        raise ValueError("--bands and --buffers are for --task digits; with --task lm mfnoise.plan picks BandMF's "
                         "bands and BLT's buffers")
    if args.seeds not in (None, 1):
        raise ValueError(f"--task lm runs one seed, got --seeds {args.seeds}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    cfg = lm_demo.Config(epsilon=args.epsilon, delta=args.delta, momentum=args.momentum, clip=args.clip,
                         accountant=args.accountant, non_private=not args.no_reference,
                         methods=_methods(args.methods) or lm_demo.METHODS, **kwargs)
    plot = args.plot if args.plot and args.plot.lower() != "none" else None
    if plot is not None:
        lm_demo.plot_format(plot, "--plot")
    result = lm_demo.run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    result["quick"] = bool(args.quick)
    if plot is not None:
        result["plot"] = os.path.abspath(lm_demo.plot(result, plot))
    return result


def format_text(result: dict) -> str:
    if result.get("task") == "lm":
        return format_lm(result)
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


def format_lm(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"pydoc_data.topics (Python's documentation text, bytes): {result['public_windows']} public windows "
        f"({len(result['public_topics'])} topics) for pretraining; {result['train_size']} private training / "
        f"{result['validation_size']} validation windows ({len(result['private_topics'])} topics) of "
        f"{cfg['seq_len']} + 1 bytes",
        f"model: decoder-only transformer, {cfg['layers']} layers, width {cfg['width']}, {cfg['heads']} heads, "
        f"{result['params']} parameters; fine-tuning: batch {cfg['batch_size']}, {cfg['epochs']} epochs = "
        f"{result['n']} steps ({result['min_sep']} per epoch), SGD lr {cfg['learning_rate']:g} momentum "
        f"{cfg['momentum']:g}, clip {cfg['clip']:g}",
        f"privacy: (epsilon={cfg['epsilon']:g}, delta={cfg['delta']:g}), {cfg['accountant']} accountant, "
        "one window = one example",
        "",
    ]
    header = ("method", "strategy", "epsilon", "z", "noise rmse", "val. perplexity", "seconds")
    rows = []
    for r in result["results"]:
        rows.append((r["label"], r["family"], f"{r['epsilon']:.4f}", f"{r['noise_multiplier']:.4f}",
                     f"{r['noise_rmse']:.2f}", f"{r['perplexity']:.3f}",
                     f"{r['plan_seconds'] + r['train_seconds']:.1f}"))
    pre = result["pretrained"]
    rows.append(("pretrained only", "-", "-", "-", "-", f"{pre['perplexity']:.3f}", f"{pre['seconds']:.1f}"))
    ref = result.get("non_private")
    if ref:
        rows.append(("non-private fine-tuning", "-", "inf", "0", "0", f"{ref['perplexity']:.3f}",
                     f"{ref['train_seconds']:.1f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*header))
    lines.append(fmt.format(*("-" * w for w in widths)))
    lines.extend(fmt.format(*row) for row in rows)
    lines.append("")
    lines.append("val. perplexity: exp(mean cross-entropy per byte) on held-out text of the private topics "
                 f"(initial model: {pre['initial_perplexity']:.1f});")
    lines.append("z: the shared noise multiplier; noise rmse: of the noise in the trajectory of SGD with momentum "
                 "(clip units);")
    lines.append("non-private fine-tuning: no clipping, no noise (not private); seconds: plan + training "
                 "(pretraining for the pretrained row).")
    cpu = f" ({result['cpu_seconds']:.0f} s of CPU)" if "cpu_seconds" in result else ""
    lines.append(f"total {result['seconds']:.1f} s{cpu}" + (f"; plot: {result['plot']}" if result.get("plot") else ""))
    return "\n".join(lines)
