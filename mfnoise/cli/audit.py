"""``mfnoise audit``: the empirical privacy audit of a mechanism (white-box) or of the demo's training
(black-box), with the epsilon lower bound next to the claimed epsilon.

The demo's black-box train function lives here (``demo_blackbox``), not in ``mfnoise.auditing``:
auditing (layer 5) may not import ``mfnoise.demo`` (layer 5); the command line (layer 6) may.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from mfnoise.cli import schema

HELP = "audit privacy empirically: canaries and an attack give an epsilon lower bound, next to the claimed epsilon"
DESCRIPTION = """Empirical privacy auditing: does the mechanism, as it runs, keep the epsilon it claims?

  mfnoise audit --family bsr --bands 4 --n 16 --epochs 4 --epsilon 4 --delta 1e-5 --trials 100000
  mfnoise audit --plan plan.json --trials 200000 --plot roc.png --out audit.json
  mfnoise audit --family identity --n 16 --epochs 4 --epsilon 4 --delta 1e-5 --trials 100000 \\
      --mechanism sensitivity-k1
  mfnoise audit --demo --epsilon 8 --canaries 500 --plot roc.png

White-box audit (--strategy FILE, --family NAME or --plan FILE): each trial is a canary example whose
gradient is a Dirac vector of norm = clip norm on its own coordinate, present (in) or absent (out)
with probability 1/2, taking part at the steps its participation schema gives it, every other
gradient zero; the adversary sees every noisy release of mfnoise's real noise generator and knows
the strategy C, so it whitens the releases with C (it sees C x + sigma Z) and scores each canary with
the likelihood-ratio test. Noise is independent across coordinates: one run of n steps over T
coordinates gives T trials. The estimator turns the in and out scores into an epsilon lower bound
that holds with the stated confidence: gdp (the Gaussian-DP estimate, "Tight Auditing of
Differentially Private Machine Learning", Nasr et al. 2023) or clopper-pearson (TPR / FPR bounds).
The claim is mfnoise's accounting of (noise multiplier, delta, schema): one Gaussian mechanism with
noise multiplier z (a plan's amplified claim is not audited white-box: it is refused).
--mechanism runs a deliberately broken mechanism instead (sensitivity-k1: noise scaled for one
participation; wrong-strategy: noise correlated with another C; reused-last-row: the last noise row
reused past n; no-clipping: the canary's gradient not clipped, with --canary-norm above the clip),
which the audit must catch.

Black-box audit (--demo): the demo's digits training (DP-SGD with fixed cyclic batches at --epsilon)
with --canaries mislabelled examples, each inserted with probability 1/2, one training run, canaries
scored by minus their loss; the one-run bound ("Privacy Auditing with One (1) Training Run", Steinke,
Nasr, Jagielski 2023) turns the scores into a lower bound. A black-box lower bound is usually far
below the claim (the attack sees only the final model).

What the numbers mean: "epsilon lower bound" is proven at the confidence (95% by default): the
mechanism cannot be epsilon-DP for any smaller epsilon at this delta, unless that 5% happened.
"tightness" = lower bound / claimed: near 1 says the claim is tight (the white-box audit of the honest
mechanism reaches about 0.7-0.95 with 10^5 trials); a lower bound above the claim is FLAGGED: the
mechanism leaks more than it claims (exit status 1). A small lower bound is no proof of privacy.
--plot writes the attack's ROC with the claimed trade-off curves (needs matplotlib, the demo extra);
--out writes the result as JSON."""

# The fixtures of mfnoise.auditing.mechanisms, named here without importing it (a command's --help
# loads nothing heavy).
MECHANISM_NAMES = ("honest", "sensitivity-k1", "wrong-strategy", "reused-last-row", "no-clipping")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--strategy", metavar="FILE", help="a strategy file (.npz) to audit white-box")
    what.add_argument("--family", help="a closed-form strategy (identity, sqrt-toeplitz, bsr, bisr, ...) to audit")
    what.add_argument("--plan", metavar="FILE", help="a plan file (mfnoise plan --out) to audit white-box; "
                      "its schema, noise multiplier, delta and clip norm are used")
    what.add_argument("--demo", action="store_true", help="black-box audit of the demo's digits training")
    parser.add_argument("--bands", type=int, help="bands for --family bsr / bisr")
    schema.add_participation(parser, required=False)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, help="the noise multiplier z to audit")
    noise.add_argument("--epsilon", type=float,
                       help="calibrate z to this epsilon (mfnoise.calibrate) and audit it (with --demo: the demo's "
                            "target epsilon, default 8)")
    parser.add_argument("--delta", type=float, help="delta of the claim and of the bound (default 1e-5; a plan's own)")
    parser.add_argument("--trials", type=int, default=100_000,
                        help="white-box: canary coordinates, one trial each (default 100000)")
    parser.add_argument("--mechanism", choices=MECHANISM_NAMES, default="honest",
                        help="the mechanism run: honest (mfnoise's) or a broken fixture (default honest)")
    parser.add_argument("--estimator", choices=("gdp", "clopper-pearson", "one-run", "one-run-fdp"), default=None,
                        help="white-box: gdp (default) or clopper-pearson; --demo: one-run (default) or one-run-fdp")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    parser.add_argument("--clip", type=float, default=None, help="per-example L2 clip norm (default 1; a plan's own)")
    parser.add_argument("--canary-norm", type=float, default=None,
                        help="white-box: the canary gradient's norm (default: the clip norm; larger tests clipping)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the canaries' coins and of the noise (default 0)")
    parser.add_argument("--canaries", type=int, default=500, help="--demo: number of canaries (default 500)")
    parser.add_argument("--demo-epochs", type=int, default=None,
                        help="--demo: training epochs (default: --epochs, else 8)")
    parser.add_argument("--learning-rate", type=float, default=0.2, help="--demo: SGD learning rate (default 0.2)")
    parser.add_argument("--non-private", action="store_true",
                        help="--demo: train without noise (not private: shows the attack's power)")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="write the ROC against the claimed trade-off curves (png, pdf, svg by extension)")
    parser.add_argument("--out", metavar="FILE", default=None, help="write the result as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _log(args: argparse.Namespace):
    if args.quiet:
        return lambda s: None
    return lambda s: print(f"mfnoise audit: {s}", file=sys.stderr, flush=True)


def _strategy(args: argparse.Namespace) -> Any:
    from mfnoise.strategies import io
    from mfnoise.strategies.closed_forms import CLOSED_FORMS, closed_form

    if args.strategy is not None:
        strategy = io.load(args.strategy)
        if args.n is None:
            args.n = strategy.n
        elif args.n != strategy.n:
            raise ValueError(f"--n {args.n} differs from the strategy file's n = {strategy.n}")
        return strategy
    if args.family not in CLOSED_FORMS:
        raise ValueError(f"--family {args.family!r} is not a closed form; expected one of {', '.join(CLOSED_FORMS)}")
    if args.n is None:
        raise ValueError("--family needs --n")
    if CLOSED_FORMS[args.family].needs_bands and args.bands is None:
        raise ValueError(f"--family {args.family} needs --bands")
    return closed_form(args.family, args.n, args.bands)


def run(args: argparse.Namespace) -> dict:
    from mfnoise.auditing import api

    log = _log(args)
    from mfnoise.strategies.files import figure_format, output_folder

    if args.out is not None:  # before the work: a mistyped folder fails at once
        output_folder(args.out, "--out")
    if args.plot is not None:
        figure_format(args.plot, "--plot")
    if not (0 < args.confidence < 1):
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence!r}")
    start = time.perf_counter()
    if args.demo:
        result = _run_demo(args, log)
    else:
        result = _run_whitebox(args, log)
    out = result.to_dict()
    out.setdefault("audit", "white-box")
    out["report"] = api.report(result)
    out["command_seconds"] = time.perf_counter() - start
    if args.plot is not None:
        from mfnoise.auditing.plot import roc_plot

        out["plot"] = os.path.abspath(roc_plot(result, args.plot))
        log(f"ROC written to {out['plot']}")
    from mfnoise.auditing.estimators import jsonable

    out = jsonable(out)
    out["ok"] = not bool(out.get("flagged", False))
    if args.out is not None:
        from mfnoise.strategies.files import atomic_write

        with atomic_write(args.out, "w", "--out") as f:
            f.write(json.dumps(out, indent=1, sort_keys=True))
        out["out"] = os.path.abspath(args.out)
    return out


def _run_whitebox(args: argparse.Namespace, log) -> Any:
    from mfnoise.auditing import api

    if args.estimator in ("one-run", "one-run-fdp"):
        raise ValueError(f"--estimator {args.estimator} is the black-box audit's (--demo); white-box takes gdp or "
                         "clopper-pearson")
    common = dict(trials=args.trials, estimator=args.estimator, confidence=args.confidence, seed=args.seed,
                  mechanism=None if args.mechanism == "honest" else args.mechanism, canary_norm=args.canary_norm)
    if args.plan is not None:
        from mfnoise.planning.plans import load

        given = [f for f, v in (("--n", args.n), ("--epochs", args.epochs), ("--min-sep", args.min_sep),
                                ("--noise-multiplier", args.noise_multiplier), ("--epsilon", args.epsilon),
                                ("--bands", args.bands)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} come from the plan file; drop them with --plan")
        plan = load(args.plan)
        log(f"plan {args.plan}: {plan.mechanism} ({plan.strategy.family}), {plan.sampling} sampling, n={plan.steps}, "
            f"z={plan.noise_multiplier:.5g}, epsilon={plan.epsilon:.4g} at delta={plan.delta:g}")
        log(f"white-box audit: {args.trials} canary coordinates x {plan.steps} steps ...")
        return api.audit(plan, delta=args.delta, l2_clip_norm=args.clip, **common)
    if args.strategy is None and args.family is None:
        raise ValueError("say what to audit: --strategy FILE, --family NAME, --plan FILE or --demo")
    strategy = _strategy(args)
    p = schema.participation(args)
    delta = 1e-5 if args.delta is None else args.delta
    if args.noise_multiplier is not None:
        z = args.noise_multiplier
    elif args.epsilon is not None:
        from mfnoise.training.accounting import calibrate

        z = calibrate(args.epsilon, delta, p)
        log(f"calibrated: z={z:.6g} gives epsilon<={args.epsilon:g} at delta={delta:g}")
    else:
        raise ValueError("give --noise-multiplier Z or --epsilon E (calibrated)")
    log(f"white-box audit of {strategy.family} (n={p.n}, k={p.max_participations}, b={p.min_sep}), z={z:.5g}, "
        f"mechanism {args.mechanism}: {args.trials} canary coordinates ...")
    t0 = time.perf_counter()
    result = api.audit(strategy, p, z, delta=delta, l2_clip_norm=args.clip, **common)
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return result


# -- the demo's black-box audit ---------------------------------------------------------------------
def demo_blackbox(*, epsilon: float = 8.0, delta: float = 1e-5, epochs: int = 8, batch_size: int = 64,
                  canaries: int = 500, learning_rate: float = 0.2, method: str = "dp-sgd", private: bool = True,
                  estimator: str = "one-run", confidence: float = 0.95, seed: int = 0, max_train: int | None = None,
                  log=None) -> Any:
    """Black-box audit of ``mfnoise demo``'s private training (``mfnoise.auditing.blackbox``).

    The digits training split (``demo.load_digits``) gets ``canaries`` mislabelled canaries
    (``make_canaries``, seeded); the schema, batches and noise multiplier are the demo's:
    ``mfnoise.plan(epsilon, delta, mechanism="dp-sgd", sampling="cyclic", ...)`` for the dataset's
    size (every slot, canary or not: the size and the batches do not depend on the coins), and
    ``demo.make_trainer`` trains with ``dp_aggregate`` (``method``: "dp-sgd", "bandmf" or "blt";
    their strategies share the plan's z). An out canary's slot has mask 0, so its clipped
    contribution is exactly 0: the release is the one without it (add/remove adjacency). Each canary
    is scored by minus its loss under the final model; the one-run bound is compared with the plan's
    epsilon. ``private=False`` trains without noise (not private: the attack's power; no claim).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mfnoise import demo
    from mfnoise.auditing.blackbox import audit_blackbox
    from mfnoise.core import workloads
    from mfnoise.planning.choose import plan as make_plan
    from mfnoise.strategies.identity import Identity
    from mfnoise.training import batching

    log = log or (lambda s: None)
    cfg = demo.Config(epsilon=epsilon, delta=delta, epochs=epochs, batch_size=batch_size, seeds=1,
                      learning_rates=(learning_rate,), non_private=not private, max_train=max_train)
    data = demo.load_digits(cfg.test_fraction, cfg.validation_fraction, max_train=max_train)
    n_slots = int(data.x_train.shape[0])
    made = make_plan(epsilon, delta, mechanism="dp-sgd", sampling="cyclic", dataset_size=n_slots,
                     batch_size=batch_size, epochs=epochs,
                     optimizer=("momentum", cfg.momentum) if cfg.momentum > 0 else "sgd",
                     accountant=cfg.accountant, pld_discretization=cfg.pld_discretization, l2_clip_norm=cfg.clip)
    schema_, z = made.participation, made.noise_multiplier
    log(f"demo training: {n_slots} slots ({canaries} canaries), batch {batch_size}, {epochs} epochs = {schema_.n} "
        f"steps; {method} at epsilon={made.epsilon:.4g} (z={z:.4f})" + ("" if private else ", NOT private (no noise)"))
    if private:
        workload = workloads.parse(cfg.workload_spec, schema_.n)
        strategy, _ = demo.make_strategy(method, schema_, workload, cfg)
    else:
        strategy = Identity(schema_.n)
    trainer = demo.make_trainer(strategy, schema_, z if private else 0.0, cfg, input_dim=data.x_train.shape[1],
                                non_private=not private)
    batches = made.batches(seed).batch_plan
    batching.check(batches, schema_)
    loss = jax.jit(jax.vmap(demo.example_loss, in_axes=(None, 0, 0)))

    def train_digits(ds: Any) -> dict:
        jdata = demo.Data(*(jnp.asarray(a) for a in (ds.x_all, ds.y_all, data.x_val, data.y_val, data.x_test,
                                                      data.y_test)))
        # an out canary's slot is masked: its loss times 0, its clipped gradient exactly 0
        mask = np.asarray(batches.mask) * ds.present[np.asarray(batches.indices)]
        k_init, k_noise = jax.random.split(jax.random.key(seed), 2)
        t0 = time.perf_counter()
        _, test, params = trainer(jdata, jnp.float32(learning_rate), k_init, k_noise, jnp.asarray(batches.indices),
                                  jnp.asarray(mask))
        losses = np.asarray(loss(params, jnp.asarray(ds.canary_x), jnp.asarray(ds.canary_y)), dtype=np.float64)
        log(f"trained in {time.perf_counter() - t0:.1f} s: test accuracy {float(test[-1]):.3f}")
        return {"scores": -losses, "test_accuracy": float(test[-1]), "noise_multiplier": z if private else 0.0,
                "steps": schema_.n, "method": method, "learning_rate": learning_rate,
                "plan_epsilon": made.epsilon}

    return audit_blackbox(train_digits, data.x_train, data.y_train, canaries=canaries, delta=delta,
                          claimed_epsilon=made.epsilon if private else None, kind="mislabelled", num_classes=10,
                          estimator=estimator, confidence=confidence, seed=seed,
                          mechanism=f"demo {method}" + ("" if private else " (non-private)"))


def _run_demo(args: argparse.Namespace, log) -> Any:
    if args.estimator in ("gdp", "clopper-pearson"):
        raise ValueError(f"--estimator {args.estimator} needs many training runs; the black-box demo audit is one run: "
                         "use one-run or one-run-fdp")
    if args.noise_multiplier is not None:
        raise ValueError("--demo calibrates its own noise multiplier: give --epsilon")
    ignored = [f for f, v in (("--n", args.n), ("--min-sep", args.min_sep), ("--bands", args.bands),
                              ("--canary-norm", args.canary_norm), ("--clip", args.clip)) if v is not None]
    if args.mechanism != "honest":
        ignored.append("--mechanism")
    if ignored:
        raise ValueError(f"{', '.join(ignored)} do not apply to --demo")
    epochs = args.demo_epochs or args.epochs or 8
    return demo_blackbox(epsilon=8.0 if args.epsilon is None else args.epsilon,
                         delta=1e-5 if args.delta is None else args.delta, epochs=epochs, canaries=args.canaries,
                         learning_rate=args.learning_rate, private=not args.non_private,
                         estimator=args.estimator or "one-run", confidence=args.confidence, seed=args.seed, log=log)


def format_text(result: dict) -> str:
    lines = [result["report"]]
    if result.get("plot"):
        lines.append(f"ROC plot: {result['plot']}")
    if result.get("out"):
        lines.append(f"result written to {result['out']}")
    return "\n".join(lines)
