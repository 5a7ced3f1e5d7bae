"""End-to-end demo: private training of a small network on scikit-learn's digits, comparing
DP-SGD (independent noise, ``mfnoise.Identity``) with correlated noise (BandMF, BLT) at the same
(epsilon, delta).

Everything private goes through mfnoise:

* batches: ``mfnoise.batching.cyclic_batches`` (k epochs of fixed cyclic batches, b = steps per
  epoch), checked against the schema with ``mfnoise.batching.check`` before training;
* strategies: ``mfnoise.optimize(workload, p, family="banded", bands=b)`` (BandMF) and
  ``family="blt"`` (BLT), for the workload the optimizer implies (SGD with momentum beta:
  ``workloads.momentum``); DP-SGD is ``Identity(n)``;
* schema, batches and noise multiplier: ``mfnoise.plan(epsilon, delta, ..., mechanism="dp-sgd",
  sampling="cyclic")`` (its ``batches(seed)`` and calibrated z; ``sampling="cyclic-poisson"`` for the
  Poisson reference), and ``mfnoise.plan``'s own choice with its candidates table is printed first;
  every strategy is normalised to
  sensitivity 1 by ``dp_aggregate``, so all methods share one noise multiplier (one Gaussian
  mechanism, "Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning",
  Choquette-Choo et al. 2023, arXiv:2211.06530);
* clipping and summing: ``mfnoise.training.clipping.clipped_grad`` (ghost clipping; padded slots are
  masked out exactly); noise: ``mfnoise.dp_aggregate`` inside ``optax.chain``, which divides the
  noisy sum by the stated batch size (``expected_batch_size``, a public constant: never the
  number of examples a step holds).

For reference it also trains DP-SGD with Poisson sampling (``cyclic_poisson_batches`` with one
group, ``pack``-ed to the largest sampled batch) under its amplified accounting
(``calibrate(..., sampling="cyclic-poisson")``), and the same clipped training without noise.

Where correlated noise helps: several epochs with large batches (each example takes part k times,
so DP-SGD's per-step noise is sqrt(k) times the single-epoch noise, while anti-correlated noise
cancels over the trajectory; large batches also leave little for sampling to amplify).

The data (1797 8x8 images, 10 classes) ships with scikit-learn: nothing is downloaded. Each run is
one jitted ``lax.scan`` over the steps, compiled once per method (learning rate, keys and batches
are arguments). Each method's learning rate is picked from a grid by validation accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mfnoise.core import workloads
from mfnoise.core.participation import Participation
from mfnoise.strategies.banded import Banded
from mfnoise.strategies.base import Strategy
from mfnoise.strategies.blt import BLT
from mfnoise.strategies.files import figure_format, save_figure
from mfnoise.strategies.identity import Identity
from mfnoise.training import batching

METHODS = ("dp-sgd", "bandmf", "blt", "dp-sgd-poisson")
LABELS = {
    "dp-sgd": "DP-SGD",
    "bandmf": "BandMF",
    "blt": "BLT",
    "dp-sgd-poisson": "DP-SGD + Poisson (amplified)",
}
# How each method samples its batches: fixed cyclic batches (no amplification), or Poisson
# sampling from the whole dataset (one group, b = 1: DP-SGD's usual amplified accounting).
_SAMPLING = {"dp-sgd": "cyclic", "bandmf": "cyclic", "blt": "cyclic", "dp-sgd-poisson": "poisson"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Demo settings (the defaults are the README's table)."""

    epsilon: float = 8.0
    delta: float = 1e-5
    epochs: int = 8
    batch_size: int = 64
    seeds: int = 5
    methods: tuple[str, ...] = METHODS
    learning_rates: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5)
    momentum: float = 0.9
    clip: float = 1.0
    hidden: int = 32
    bands: int | None = None  # BandMF bands (default: b, the steps per epoch)
    buffers: int = 4  # BLT buffers
    accountant: Literal["pld", "rdp"] = "pld"
    pld_discretization: float = 1e-3  # coarser than dp-accounting's 1e-4: faster, still an upper bound
    test_fraction: float = 0.2
    validation_fraction: float = 0.15  # of the rest: picks each method's learning rate
    max_train: int | None = None  # use at most this many training examples (smoke tests)
    non_private: bool = True  # also train without noise, as the ceiling (not private)
    plan_optimize_seconds: float = 5.0  # mfnoise.plan's optimizer budget for the candidates table

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "learning_rates", tuple(float(x) for x in self.learning_rates))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown or self.methods}; expected some of {METHODS}")
        for name in ("epochs", "batch_size", "seeds", "hidden", "buffers"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.learning_rates or not all(lr > 0 for lr in self.learning_rates):
            raise ValueError(f"learning_rates must be positive, got {self.learning_rates}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if not (0 < self.test_fraction < 1 and 0 < self.validation_fraction < 1):
            raise ValueError("test_fraction and validation_fraction must be in (0, 1)")

    @property
    def workload_spec(self) -> str:
        return f"momentum:{self.momentum:g}" if self.momentum > 0 else "prefix"


# -- data and model -------------------------------------------------------------------------------
class Data(NamedTuple):
    """The three splits, as numpy arrays on the host or as JAX arrays (the jitted trainer's argument)."""

    x_train: np.ndarray | jax.Array
    y_train: np.ndarray | jax.Array
    x_val: np.ndarray | jax.Array
    y_val: np.ndarray | jax.Array
    x_test: np.ndarray | jax.Array
    y_test: np.ndarray | jax.Array


def load_digits(test_fraction: float = 0.2, validation_fraction: float = 0.15, seed: int = 0,
                max_train: int | None = None) -> Data:
    """8x8 digits scaled to [0, 1] (float32), split once, stratified, into train / validation /
    test. Needs scikit-learn (the ``demo`` extra); nothing is downloaded."""
    try:
        from sklearn.datasets import load_digits as sk_load
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo needs scikit-learn: pip install 'mfnoise[demo]'") from None
    x, y = sk_load(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    x_rest, x_te, y_rest, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    x_tr, x_va, y_tr, y_va = train_test_split(x_rest, y_rest, test_size=validation_fraction,
                                              random_state=seed, stratify=y_rest)
    if max_train is not None:
        x_tr, y_tr = x_tr[:max_train], y_tr[:max_train]
    return Data(*(np.asarray(a) for a in (x_tr, y_tr, x_va, y_va, x_te, y_te)))


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    """A tanh MLP, weights N(0, 1 / fan_in), float32."""
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        params.append({"w": jax.random.normal(k, (a, b), jnp.float32) / math.sqrt(a),
                       "b": jnp.zeros((b,), jnp.float32)})
    return params


def _mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def example_loss(params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Cross-entropy of ONE example (no batch axis)."""
    return optax.softmax_cross_entropy_with_integer_labels(_mlp(params, x[None]), y[None])[0]


def _accuracy(params, x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> jax.Array:
    return jnp.mean(jnp.argmax(_mlp(params, jnp.asarray(x)), axis=-1) == y)


# -- strategies ----------------------------------------------------------------------------------
def make_strategy(method: str, p: Participation, workload: workloads.Workload, cfg: Config) -> tuple[Strategy, dict]:
    """(strategy, info) for a method; info has the optimizer's report fields worth printing."""
    if method in ("dp-sgd", "dp-sgd-poisson"):
        return Identity(p.n), {"family": Identity.family}
    from mfnoise.optim.solver import optimize  # loaded only when a method needs it

    if method == "bandmf":
        bands = p.min_sep if cfg.bands is None else min(cfg.bands, p.n)
        strategy, report = optimize(workload, p, family=Banded.family, bands=bands, progress=False)
    elif method == "blt":
        strategy, report = optimize(workload, p, family=BLT.family, buffers=cfg.buffers, progress=False)
    else:
        raise ValueError(f"unknown method {method!r}")
    return strategy, {"family": strategy.family, **strategy.params(), "optimize_seconds": report.seconds}


# -- training ------------------------------------------------------------------------------------
def batch_gradient(cfg: Config) -> Callable:
    """f(params, x (B, d), y (B,), mask (B,)) -> ClippedSum of one padded batch:

        sum_b mask_b * clip(grad l(params; x_b, y_b), cfg.clip),

    by ghost clipping (``mfnoise.clipped_grad``), without per-example gradients. A padded slot
    (mask 0) holds some real example's index (``cyclic_batches`` pads with example 0); its loss is
    multiplied by 0, so its gradient, hence its clipped contribution, is exactly 0 whatever example
    it points at (for any example with a finite gradient).
    """
    from mfnoise.training.clipping import clipped_grad

    clipped = clipped_grad(lambda params, ex: ex[2] * example_loss(params, ex[0], ex[1]), cfg.clip)

    def grad(params, x: jax.Array, y: jax.Array, mask: jax.Array):
        return clipped(params, (x, y, mask.astype(x.dtype)))

    return grad


def make_trainer(strategy: Strategy, p: Participation, noise_multiplier: float, cfg: Config,
                 input_dim: int, classes: int = 10, *, non_private: bool = False) -> Callable:
    """A jitted f(data, learning_rate, init_key, noise_key, indices (n, cap), mask (n, cap)) ->
    (validation accuracy, test accuracy) after every step, each of shape (n,), and the final params.

    Each step's update is ``(sum_b mask_b clip(g_b) + noise) / cfg.batch_size`` (``dp_aggregate``
    with ``expected_batch_size=cfg.batch_size``): the normaliser is the batch size the user states, a
    public constant, never the number of examples a step happens to hold nor the padded capacity
    (either would tell neighbouring datasets apart; docs/design.md, "Threat model"). For the fixed cyclic
    batches it is within a factor 1 + 1/b of their real size dataset_size / b; for Poisson sampling
    it is exactly the expected batch size q * dataset_size / b, since q is defined from it
    (``batching.sampling_probability``). ``non_private=True`` (noise multiplier 0) is the clipped
    reference without noise, not private.

    One compilation serves every learning rate and seed of a strategy (they are arguments; the
    data too: as constants they slow XLA's compilation down).
    """
    sizes = (input_dim, cfg.hidden, classes)
    from mfnoise.training.transforms import NonPrivateWarning, dp_aggregate

    grad = batch_gradient(cfg)

    def train(data: Data, learning_rate, init_key, noise_key, indices, mask):
        params = init_mlp(init_key, sizes)
        with warnings.catch_warnings():
            if non_private:  # asked for, and labelled "not private" wherever its results are shown
                warnings.simplefilter("ignore", NonPrivateWarning)
            aggregate = dp_aggregate(strategy, cfg.clip, noise_multiplier, noise_key, participation=p,
                                     expected_batch_size=float(cfg.batch_size), allow_non_private=non_private)
        # (clipped sum + noise_multiplier * clip * sens(C, p) * (C^{-1} W)_t) / batch_size, then SGD
        opt = optax.chain(aggregate, optax.sgd(learning_rate, momentum=cfg.momentum or None))
        state = opt.init(params)

        def step(carry, batch):
            params, state = carry
            idx, m = batch
            g = grad(params, data.x_train[idx], data.y_train[idx], m)
            updates, state = opt.update(g, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), (_accuracy(params, data.x_val, data.y_val),
                                     _accuracy(params, data.x_test, data.y_test))

        (params, _), (val, test) = jax.lax.scan(step, (params, state), (indices, mask))
        return val, test, params

    return jax.jit(train)


def run(cfg: Config, log: Callable[[str], None] | None = None) -> dict:
    """Trains every method of ``cfg`` at every learning rate for ``cfg.seeds`` seeds; each
    method's learning rate is picked by mean validation accuracy; returns the results dict."""
    from mfnoise.planning.choose import plan as make_plan
    from mfnoise.planning.report import candidates_table, summary
    from mfnoise.strategies.error import rmse

    log = log or (lambda s: None)
    start = time.perf_counter()
    data = load_digits(cfg.test_fraction, cfg.validation_fraction, max_train=cfg.max_train)
    jdata = Data(*(jnp.asarray(a) for a in data))
    dataset_size = data.x_train.shape[0]
    p = batching.schedule(dataset_size, cfg.batch_size, cfg.epochs)
    workload = workloads.parse(cfg.workload_spec, p.n)
    log(f"{dataset_size} training examples, batch {cfg.batch_size}, {cfg.epochs} epochs: n={p.n} steps, "
        f"b={p.min_sep} steps per epoch; (epsilon={cfg.epsilon:g}, delta={cfg.delta:g}), {cfg.accountant}")
    setups: dict[str, tuple] = {}
    plan_args = {"dataset_size": dataset_size, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                 "optimizer": ("momentum", cfg.momentum) if cfg.momentum > 0 else "sgd",
                 "accountant": cfg.accountant, "pld_discretization": cfg.pld_discretization, "l2_clip_norm": cfg.clip}

    def setup(sampling: str) -> tuple:
        """(schema, noise multiplier, plans) of a sampling scheme, computed once: ``mfnoise.plan``'s
        DP-SGD plan for that sampling gives the schema, the calibrated z and the batches of each seed
        (fixed cyclic batches, or Poisson sampling from one group), which the other strategies share."""
        if sampling not in setups:
            t0 = time.perf_counter()
            made = make_plan(cfg.epsilon, cfg.delta, mechanism="dp-sgd",
                             sampling="cyclic" if sampling == "cyclic" else "cyclic-poisson", **plan_args)
            schema, z = made.participation, made.noise_multiplier
            plans = [made.batches(seed).batch_plan for seed in range(cfg.seeds)]  # checked against the schema
            if sampling == "poisson":
                # one shape over all seeds (one compilation): the largest packed batch
                capacity = max(plan.capacity for plan in plans)
                plans = [batching.pack(plan, capacity) for plan in plans]
            for plan in plans:  # never train on batches that break the schema the sensitivity assumed
                batching.check(plan, schema)
            setups[sampling] = (schema, z, plans, time.perf_counter() - t0)
            log(f"  {sampling} batches: noise multiplier {z:.5f} ({time.perf_counter() - t0:.1f} s)")
        return setups[sampling]

    # what mfnoise.plan would choose for this model, and everything it compared
    t0 = time.perf_counter()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        init_mlp(jax.random.key(0), (data.x_train.shape[1], cfg.hidden, 10))))
    chosen = make_plan(cfg.epsilon, cfg.delta, params=n_params, optimize_seconds=cfg.plan_optimize_seconds,
                       **plan_args)
    log(f"mfnoise.plan ({time.perf_counter() - t0:.1f} s): {chosen.mechanism} with {chosen.sampling} sampling, "
        f"noise multiplier {chosen.noise_multiplier:.5f}\n" + candidates_table(chosen.candidates))

    # the same initialisations for every method, and the same batches for every cyclic method
    seed_keys = [jax.random.split(jax.random.key(seed), 2) for seed in range(cfg.seeds)]
    epoch_end = np.arange(1, cfg.epochs + 1) * p.min_sep - 1
    results = []
    for method in cfg.methods:
        schema, z, plans, _ = setup(_SAMPLING[method])
        t0 = time.perf_counter()
        strategy, info = make_strategy(method, schema, workload, cfg)
        strategy_seconds = time.perf_counter() - t0
        sens = strategy.sensitivity(schema)
        t0 = time.perf_counter()
        trainer = make_trainer(strategy, schema, z, cfg, input_dim=data.x_train.shape[1])
        sweep = _sweep(trainer, jdata, cfg.learning_rates, seed_keys, plans)
        train_seconds = time.perf_counter() - t0
        lr, val, test = max(sweep, key=lambda s: s[1][:, -1].mean())
        final = test[:, -1]
        curve = test[:, epoch_end]
        results.append({
            "method": method,
            "label": LABELS[method],
            **info,
            "sampling": _SAMPLING[method],
            "epsilon": cfg.epsilon,
            "delta": cfg.delta,
            "noise_multiplier": z,
            "accountant": cfg.accountant,
            "sensitivity": float(sens.value),
            # std of Z in C G + Z, in units of the clip norm (C as the strategy holds it)
            "noise_std": z * float(sens.value),
            # rmse of the noise in the trajectory A G at this noise multiplier (units of the clip
            # norm): sens * ||A C^-1||_F / sqrt(n) * z, comparable across methods and samplings
            "noise_rmse": float(rmse(strategy, workload, schema)) * z,
            "learning_rate": lr,
            "accuracy": float(final.mean()),
            "accuracy_std": float(final.std(ddof=1)) if cfg.seeds > 1 else 0.0,
            "accuracy_min": float(final.min()),
            "accuracy_max": float(final.max()),
            "accuracies": [float(a) for a in final],
            "validation_accuracy": float(val[:, -1].mean()),
            "sweep": [{"learning_rate": s[0], "validation_accuracy": float(s[1][:, -1].mean()),
                       "accuracy": float(s[2][:, -1].mean())} for s in sweep],
            "curve": [float(a) for a in curve.mean(axis=0)],
            "curve_std": [float(a) for a in (curve.std(axis=0, ddof=1) if cfg.seeds > 1 else 0 * curve[0])],
            "strategy_seconds": strategy_seconds,
            "train_seconds": train_seconds,
        })
        log(f"{method:>14}: test accuracy {final.mean():.4f} ± {results[-1]['accuracy_std']:.4f} at "
            f"learning rate {lr:g} (strategy {strategy_seconds:.1f} s, training {train_seconds:.1f} s)")
    reference = None
    if cfg.non_private:
        # the ceiling: the same clipped training without noise (not private; for comparison only)
        t0 = time.perf_counter()
        schema, _, plans, _ = setup("cyclic")
        trainer = make_trainer(Identity(p.n), schema, 0.0, cfg, input_dim=data.x_train.shape[1], non_private=True)
        lr, val, test = max(_sweep(trainer, jdata, cfg.learning_rates, seed_keys, plans),
                            key=lambda s: s[1][:, -1].mean())
        reference = {
            "learning_rate": lr,
            "accuracy": float(test[:, -1].mean()),
            "accuracy_std": float(test[:, -1].std(ddof=1)) if cfg.seeds > 1 else 0.0,
            "curve": [float(a) for a in test[:, epoch_end].mean(axis=0)],
            "train_seconds": time.perf_counter() - t0,
        }
        log(f"{'non-private':>14}: test accuracy {reference['accuracy']:.4f} (clipped, no noise)")
    return {
        "results": results,
        "non_private": reference,
        "plan": {"fingerprint": chosen.fingerprint, **summary(chosen),
                 "candidates": [c.to_dict() for c in chosen.candidates],
                 "candidates_table": candidates_table(chosen.candidates)},
        "config": {**dataclasses.asdict(cfg), "methods": list(cfg.methods),
                   "learning_rates": list(cfg.learning_rates)},
        "dataset": "sklearn digits",
        "train_size": dataset_size,
        "validation_size": int(data.x_val.shape[0]),
        "test_size": int(data.x_test.shape[0]),
        "n": p.n,
        "max_participations": p.max_participations,
        "min_sep": p.min_sep,
        "participation": p.kind,
        "workload": workload.name,
        "seconds": time.perf_counter() - start,
    }


def _sweep(trainer: Callable, jdata: Data, learning_rates: Sequence[float], seed_keys: list,
           plans: list[batching.BatchPlan]) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """[(learning rate, validation accuracies (seeds, n), test accuracies (seeds, n))]."""
    sweep = []
    for lr in learning_rates:
        val, test = [], []
        for (k_init, k_noise), plan in zip(seed_keys, plans):
            v, t, _ = trainer(jdata, jnp.float32(lr), k_init, k_noise, plan.indices, plan.mask)
            val.append(np.asarray(v))
            test.append(np.asarray(t))
        sweep.append((lr, np.stack(val), np.stack(test)))
    return sweep


def plot(result: dict, path: str) -> str:
    """Test accuracy after each epoch per method (the mean over seeds, and a shaded band of ± one
    standard deviation over seeds), as an image (PNG, or the format of ``path``'s extension), written
    atomically with the usual file mode."""
    fmt = plot_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, r in enumerate(result["results"]):
        mean, std = np.array(r["curve"]), np.array(r["curve_std"])
        epochs = np.arange(1, mean.size + 1)
        ax.plot(epochs, mean, marker="o", ms=3, label=f"{r['label']}: {r['accuracy']:.3f}")
        # the band is mean ± one standard deviation over the seeds (ddof 1), not min..max
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=ax.lines[-1].get_color(),
                        label=f"shaded: mean ± 1 std over {result['config']['seeds']} seeds" if i == 0 else None)
    ref = result.get("non_private")
    if ref:
        ax.plot(np.arange(1, len(ref["curve"]) + 1), ref["curve"], ls="--", color="gray",
                label=f"non-private (clipped): {ref['accuracy']:.3f}")
    cfg = result["config"]
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, (ε={cfg['epsilon']:g}, δ={cfg['delta']:g}), batch {cfg['batch_size']}, "
                 f"{cfg['seeds']} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, fmt)


def plot_format(path: str, argument: str = "plot") -> str:
    """The image format ``plot`` writes to ``path`` (``files.figure_format``): the CLI calls it
    before training, so a typo fails at once."""
    return figure_format(path, argument)
