"""Private language-model fine-tuning demo: a small decoder-only transformer (Flax NNX), pretrained
without privacy on a public corpus, then fine-tuned on a private corpus with DP-SGD, BandMF and BLT
at the same (epsilon, delta); validation perplexity per method against the pretrained-only model and
a non-private fine-tuning reference. ``mfnoise demo --task lm`` runs it.

Corpus (nothing is downloaded): the English documentation text that ships with Python itself,
``pydoc_data.topics.topics`` (the help text of ``help('topic')``, 79 topics, ~0.46 MB in Python
3.11). Tokens are UTF-8 bytes (vocabulary 256). The split is by topic key and deterministic:
a topic is *public* when the first byte of sha256(key) is below ``256 * public_fraction`` (it
pretrains), else *private*; each private topic's text is cut at ``1 - validation_fraction`` of its
bytes: the head is private training data, the tail held-out validation data of the private
distribution (the same topics, text the model never trained on). Each part is cut into windows of
``seq_len + 1`` bytes (non-overlapping inputs, targets shifted by one); **one window is one
example**, the unit of privacy (add/remove one window).

Model (``Transformer``): token embedding (tied with the output head: logits = h E^T), learned
positions, ``layers`` pre-norm blocks (RMSNorm, causal multi-head self-attention with a fused QKV
projection, RMSNorm, GELU MLP), final RMSNorm. For one example the loss is the mean next-byte
cross-entropy over its ``seq_len`` positions,

    l(theta; x) = -(1/T) sum_{t<T} log softmax(f_theta(x_{<=t}))[x_{t+1}],

a pure function of the parameters (``nnx.split`` / ``nnx.merge``), so ``mfnoise.clipped_grad``
clips it per example: ghost norms for every weight used once in a plain matrix product (QKV, output
projection, MLP), materialised per-example gradients for the rest (embedding used twice when tied,
positions, norm scales). Perplexity is exp of the mean cross-entropy per byte over the validation
windows.

Private fine-tuning, everything from mfnoise:

* ``mfnoise.plan(epsilon, delta, mechanism=m, sampling="cyclic", optimizer=("momentum", beta))``
  for m in dp-sgd (``Identity``), bandmf (BSR, bands <= steps per epoch) and blt: one Gaussian
  mechanism with the same calibrated noise multiplier z for all three (C normalised to sensitivity
  1: "Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning", Choquette-Choo et
  al. 2023, arXiv:2211.06530; BLT: "Efficient and Near-Optimal Noise Generation for Streaming
  Differential Privacy", Dvijotham et al. 2024, arXiv:2404.16706), its fixed cyclic batches
  (``plan.batches(seed)``, re-checked with ``batching.check`` against the plan's schema);
* ``plan.clipped_grad(example_loss)``: sum_b mask_b clip_c(grad l(theta; x_b)) (ghost clipping,
  "Large Language Models Can Be Strong Differentially Private Learners", Li et al. 2022,
  arXiv:2110.05679);
* ``plan.transform(optax.sgd(lr, momentum=beta), key=...)``: ``dp_aggregate`` then SGD with
  momentum, update_t = (sum_b clip_c(g_b) + z c S (C'^{-1} W)_t) / B, B the stated batch size.

The non-private reference fine-tunes on the same batches with the same optimizer on the plain
mean gradient (no clipping, no noise: not private). Pretraining uses Adam on random batches of the
public part (public data: no privacy cost).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core import workloads
from mfnoise.training import batching

METHODS = ("dp-sgd", "bandmf", "blt")
LABELS = {"dp-sgd": "DP-SGD", "bandmf": "BandMF", "blt": "BLT"}
VOCAB = 256  # byte tokens


@dataclasses.dataclass(frozen=True)
class Config:
    """LM demo settings (the defaults are the README's table; ``QUICK`` is ``--quick``)."""

    epsilon: float = 8.0
    delta: float = 1e-5
    # private fine-tuning
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 0.02
    momentum: float = 0.9
    clip: float = 1.0
    methods: tuple[str, ...] = METHODS
    non_private: bool = True
    seed: int = 0
    accountant: str = "pld"
    # BLT's optimizer budget inside mfnoise.plan: a cap that should not bind (at n ~ 100 the optimizer
    # stops at its tolerance within seconds); a binding cap would make the strategy depend on the load
    plan_optimize_seconds: float = 600.0
    # model
    seq_len: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    tied: bool = True
    # pretraining (public part, non-private)
    pretrain_steps: int = 500
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    # corpus split
    validation_fraction: float = 0.1
    max_private: int | None = None  # use at most this many private training windows (smoke tests)
    max_validation: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown or self.methods}; expected some of {METHODS}")
        for name in ("epochs", "batch_size", "seq_len", "width", "layers", "heads", "mlp_ratio",
                     "pretrain_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.pretrain_steps, bool) or int(self.pretrain_steps) != self.pretrain_steps \
                or self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be a non-negative integer, got {self.pretrain_steps!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("learning_rate", "pretrain_lr", "clip", "epsilon"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive and finite, got {v!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")

    @property
    def optimizer(self) -> Any:
        """What ``mfnoise.plan`` scores the strategies on (the workload of SGD with this momentum)."""
        return ("momentum", self.momentum) if self.momentum > 0 else "sgd"


# --quick: about a minute on 2 cores (a smaller model, fewer pretraining steps, 2 epochs)
QUICK = dict(epochs=2, batch_size=64, width=48, layers=2, heads=4, seq_len=48, pretrain_steps=200,
             max_private=1536, max_validation=256)


# -- corpus --------------------------------------------------------------------------------------
class Corpus(NamedTuple):
    """Windows of seq_len + 1 byte tokens, int32: public (pretraining), private (fine-tuning),
    validation (held-out text of the private topics); and the topic keys of each part."""

    public: np.ndarray
    private: np.ndarray
    validation: np.ndarray
    public_topics: tuple[str, ...]
    private_topics: tuple[str, ...]


def _windows(texts: list[bytes], length: int) -> np.ndarray:
    """(N, length) int32: each text cut into consecutive non-overlapping windows (a tail shorter than
    a window is dropped), texts concatenated in order."""
    rows = []
    for t in texts:
        a = np.frombuffer(t, np.uint8)
        m = a.size // length
        if m:
            rows.append(a[: m * length].reshape(m, length))
    if not rows:
        return np.zeros((0, length), np.int32)
    return np.concatenate(rows).astype(np.int32)


# The private domain: the reference of the built-in types and of the data model (special method
# names and attributes, string methods, format strings). The rest (syntax, statements, the
# execution model, the debugger, ...) is public.
PRIVATE_PREFIXES = ("types", "bltin-")
PRIVATE_TOPICS = ("specialnames", "specialattrs", "string-methods", "formatstrings")
_SHINGLE, _STRIDE, _SHARED = 120, 60, 0.3


def is_private(key: str) -> bool:
    """The deterministic public/private rule on topic keys (``PRIVATE_PREFIXES``, ``PRIVATE_TOPICS``)."""
    return key.startswith(PRIVATE_PREFIXES) or key in PRIVATE_TOPICS


def distinct_topics(topics: dict[str, str]) -> list[str]:
    """The topics kept after removing repeated text: many topics are copied inside others (``for``
    inside ``compound``, ``customization`` inside ``specialnames``). Longest first (ties by key), a
    topic is kept unless at least 30% of its 120-character pieces (every 60 characters) occur in the
    text already kept; so no kept text is (mostly) a copy of another, and a public topic cannot leak
    a private topic's validation text into pretraining (nor a private topic's head its own tail)."""
    kept: list[str] = []
    seen = ""
    for key in sorted(topics, key=lambda k: (-len(topics[k]), k)):
        text = topics[key]
        pieces = [text[i: i + _SHINGLE] for i in range(0, max(1, len(text) - _SHINGLE + 1), _STRIDE)]
        if sum(piece in seen for piece in pieces) < _SHARED * len(pieces):
            kept.append(key)
            seen += "\0" + text
    return sorted(kept)


def load_corpus(seq_len: int = 64, validation_fraction: float = 0.1,
                topics: dict[str, str] | None = None) -> Corpus:
    """The split of the module docstring, from ``pydoc_data.topics`` (or ``topics``, for tests)."""
    if topics is None:
        from pydoc_data.topics import topics as shipped

        topics = dict(shipped)
    keys = distinct_topics(topics)
    public = [k for k in keys if not is_private(k)]
    private = [k for k in keys if is_private(k)]
    if not public or not private:
        raise ValueError(f"the topics leave the public or the private part empty ({len(public)} public, "
                         f"{len(private)} private topics)")
    enc = {k: topics[k].encode("utf-8") for k in keys}
    cut = {k: int(len(enc[k]) * (1 - validation_fraction)) for k in private}
    length = seq_len + 1
    return Corpus(
        public=_windows([enc[k] for k in public], length),
        private=_windows([enc[k][: cut[k]] for k in private], length),
        validation=_windows([enc[k][cut[k]:] for k in private], length),
        public_topics=tuple(public),
        private_topics=tuple(private),
    )


# -- model ---------------------------------------------------------------------------------------
def _nnx() -> Any:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("the LM demo needs flax: pip install 'mfnoise[flax]'") from None
    return nnx


def make_model(cfg: Config, seed: int = 0) -> Any:
    """A ``Transformer`` (flax.nnx.Module): tokens (T,) int -> logits (T, VOCAB), T <= cfg.seq_len."""
    nnx = _nnx()

    class Block(nnx.Module):
        """Pre-norm block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)); causal attention over T."""

        def __init__(self, rngs: Any) -> None:
            d = cfg.width
            self.norm1 = nnx.RMSNorm(d, rngs=rngs)
            self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
            self.proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
            self.norm2 = nnx.RMSNorm(d, rngs=rngs)
            self.up = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
            self.down = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            t, d = x.shape
            h, dh = cfg.heads, d // cfg.heads
            q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(t, 3, h, dh), 3, axis=1)
            q, k, v = q[:, 0], k[:, 0], v[:, 0]  # (T, H, dh)
            scores = jnp.einsum("thd,shd->hts", q, k) / math.sqrt(dh)
            causal = jnp.tril(jnp.ones((t, t), bool))
            weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
            att = jnp.einsum("hts,shd->thd", weights, v).reshape(t, d)
            x = x + self.proj(att)
            return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

    class Transformer(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.embed = nnx.Embed(VOCAB, cfg.width, rngs=rngs)
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.width)))
            self.blocks = nnx.List([Block(rngs) for _ in range(cfg.layers)]) if hasattr(nnx, "List") \
                else [Block(rngs) for _ in range(cfg.layers)]
            self.norm = nnx.RMSNorm(cfg.width, rngs=rngs)
            self.head = None if cfg.tied else nnx.Linear(cfg.width, VOCAB, use_bias=False, rngs=rngs)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = self.embed(tokens) + self.pos[...][: tokens.shape[0]]
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
            return self.embed.attend(x) if self.head is None else self.head(x)

    return Transformer(nnx.Rngs(seed))


def split_model(model: Any) -> tuple[Any, Any]:
    """(graphdef, params): the static graph and the parameters (an ``nnx.State`` pytree)."""
    return _nnx().split(model, _nnx().Param)


def loss_function(graphdef: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """l(params, window (T + 1,) int) -> the mean next-byte cross-entropy over the window's T
    positions (ONE example, no batch axis): a pure function of the parameters."""
    import optax

    nnx = _nnx()

    def example_loss(params: Any, window: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params)(window[:-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, window[1:]))

    return example_loss


def count_params(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def perplexity_fn(example_loss: Callable) -> Callable[[Any, jax.Array], jax.Array]:
    """jitted f(params, windows (N, T + 1)) -> exp(mean cross-entropy per byte) over the windows
    (every window has T targets, so the mean of the windows' means is the mean per byte)."""

    @jax.jit
    def f(params: Any, windows: jax.Array) -> jax.Array:
        losses = jax.lax.map(lambda w: example_loss(params, w), windows, batch_size=64)
        return jnp.exp(jnp.mean(losses))

    return f


# -- training ------------------------------------------------------------------------------------
def pretrain(params: Any, example_loss: Callable, public: np.ndarray, cfg: Config) -> Any:
    """Adam (cosine-decayed learning rate) on random batches of the public windows: one jitted scan.
    Not private (public data)."""
    import optax

    if cfg.pretrain_steps == 0:
        return params
    rng = np.random.default_rng(cfg.seed)
    idx = jnp.asarray(rng.integers(0, public.shape[0], size=(cfg.pretrain_steps, cfg.pretrain_batch)), jnp.int32)
    opt = optax.adam(optax.cosine_decay_schedule(cfg.pretrain_lr, cfg.pretrain_steps, alpha=0.1))

    def mean_loss(p: Any, x: jax.Array) -> jax.Array:
        return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0))(p, x))

    @jax.jit
    def run(params: Any, data: jax.Array, idx: jax.Array) -> Any:
        def step(carry: Any, i: jax.Array) -> tuple[Any, None]:
            p, s = carry
            g = jax.grad(mean_loss)(p, data[i])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), idx)
        return params

    return run(params, jnp.asarray(public), idx)


def _epochs_runner(grad: Callable, tx: Any) -> Callable:
    """jitted f(params, state, data, indices (b, cap), mask (b, cap)) -> (params, state): one epoch
    of steps params <- params + tx(grad(params, data[indices_t], mask_t)) in a ``lax.scan``."""
    import optax

    @jax.jit
    def epoch(params: Any, state: Any, data: jax.Array, indices: jax.Array, mask: jax.Array) -> tuple[Any, Any]:
        def step(carry: Any, batch: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
            p, s = carry
            idx, m = batch
            g = grad(p, data[idx], m)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, state), _ = jax.lax.scan(step, (params, state), (indices, mask))
        return params, state

    return epoch


def make_plan(method: str, dataset_size: int, cfg: Config) -> Any:
    """``mfnoise.plan`` for one method with fixed cyclic batches (every method shares the schema, the
    batches of a seed and the calibrated noise multiplier: one Gaussian mechanism)."""
    from mfnoise.planning.choose import plan

    return plan(cfg.epsilon, cfg.delta, dataset_size=dataset_size, batch_size=cfg.batch_size, epochs=cfg.epochs,
                optimizer=cfg.optimizer, mechanism=method, sampling="cyclic", accountant=cfg.accountant,
                l2_clip_norm=cfg.clip, optimize_seconds=cfg.plan_optimize_seconds, progress=False)


def fine_tune(params: Any, example_loss: Callable, data: jax.Array, validation: jax.Array, batch_plan: Any,
              epochs: int, grad: Callable, tx: Any, perplexity: Callable) -> tuple[Any, Any, list[float]]:
    """Runs ``batch_plan`` (indices, mask (n, cap), n = epochs * b) epoch by epoch; returns the final
    params, the optimizer state and the validation perplexity after each epoch."""
    indices = np.asarray(batch_plan.indices, np.int32)
    mask = np.asarray(batch_plan.mask, bool)
    n = indices.shape[0]
    b = n // epochs
    run = _epochs_runner(grad, tx)
    state = tx.init(params)
    curve = []
    for e in range(epochs):
        stop = n if e == epochs - 1 else (e + 1) * b
        params, state = run(params, state, data, jnp.asarray(indices[e * b: stop]), jnp.asarray(mask[e * b: stop]))
        curve.append(float(perplexity(params, validation)))
    return params, state, curve


def _mean_grad(example_loss: Callable) -> Callable:
    """f(params, x (cap, T + 1), mask (cap,)) -> the mean gradient over the real rows (non-private)."""

    def grad(params: Any, x: jax.Array, mask: jax.Array) -> Any:
        w = mask.astype(jnp.float32)

        def loss(p: Any) -> jax.Array:
            return jnp.sum(w * jax.vmap(example_loss, in_axes=(None, 0))(p, x)) / jnp.sum(w)

        return jax.grad(loss)(params)

    return grad


def run(cfg: Config, log: Callable[[str], None] | None = None) -> dict:
    """Pretrain, then fine-tune privately with every method of ``cfg`` (and the non-private
    reference); returns the results dict (``mfnoise demo --task lm --json`` prints it)."""
    import optax

    from mfnoise.planning.report import summary
    from mfnoise.strategies.error import rmse

    log = log or (lambda s: None)
    start, cpu_start = time.perf_counter(), time.process_time()
    corpus = load_corpus(cfg.seq_len, cfg.validation_fraction)
    private = corpus.private[: cfg.max_private] if cfg.max_private else corpus.private
    validation = corpus.validation[: cfg.max_validation] if cfg.max_validation else corpus.validation
    dataset_size = int(private.shape[0])
    log(f"corpus pydoc_data.topics: {len(corpus.public_topics)} public topics ({corpus.public.shape[0]} windows), "
        f"{len(corpus.private_topics)} private topics ({dataset_size} training / {validation.shape[0]} validation "
        f"windows of {cfg.seq_len} + 1 bytes)")

    model = make_model(cfg, cfg.seed)
    graphdef, params0 = split_model(model)
    example_loss = loss_function(graphdef)
    perplexity = perplexity_fn(example_loss)
    n_params = count_params(params0)
    jdata, jval = jnp.asarray(private), jnp.asarray(validation)
    log(f"model: {cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, {n_params} parameters "
        f"({'tied' if cfg.tied else 'untied'} embedding)")

    t0 = time.perf_counter()
    pretrained = pretrain(params0, example_loss, corpus.public, cfg)
    jax.block_until_ready(pretrained)
    pretrain_seconds = time.perf_counter() - t0
    base_ppl = float(perplexity(pretrained, jval))
    init_ppl = float(perplexity(params0, jval))
    log(f"pretraining: {cfg.pretrain_steps} steps in {pretrain_seconds:.1f} s; validation perplexity "
        f"{init_ppl:.2f} (initial) -> {base_ppl:.2f} (pretrained)")

    results = []
    schema = batch_plan = None
    workload = None
    for method in cfg.methods:
        t0 = time.perf_counter()
        plan = make_plan(method, dataset_size, cfg)
        batches = plan.batches(cfg.seed)
        plan.check_batches(batches)
        batching.check(batches.batch_plan, plan.participation)  # never train on batches that break the schema
        if schema is None:
            schema, batch_plan = plan.participation, batches.batch_plan
            # the trajectory the strategies were scored on: SGD with momentum beta (prefix sums for 0)
            workload = workloads.parse(f"momentum:{cfg.momentum:g}" if cfg.momentum > 0 else "prefix", schema.n)
        assert batch_plan is not None and workload is not None
        if plan.participation != schema or not np.array_equal(batches.batch_plan.indices, batch_plan.indices):
            raise AssertionError(f"{method}'s plan has other batches than {cfg.methods[0]}'s")  # pragma: no cover
        plan_seconds = time.perf_counter() - t0
        tx = plan.transform(optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None),
                            key=jax.random.key(cfg.seed + 1))
        grad = plan.clipped_grad(example_loss)
        t0 = time.perf_counter()
        params, state, curve = fine_tune(pretrained, example_loss, jdata, jval, batches.batch_plan, cfg.epochs,
                                         grad, tx, perplexity)
        train_seconds = time.perf_counter() - t0
        plan.check_state(state)  # the plan's own state, and the noise never ran past the strategy's n
        results.append({
            "method": method,
            "label": LABELS[method],
            "family": plan.strategy.family,
            **{k: v for k, v in plan.strategy.params().items() if isinstance(v, (int, float, str))},
            "epsilon": float(plan.epsilon),
            "target_epsilon": cfg.epsilon,
            "delta": cfg.delta,
            "noise_multiplier": float(plan.noise_multiplier),
            "noise_stddev": float(tx.info.noise_stddev(np.float32)),
            "sensitivity": float(plan.strategy.sensitivity(plan.participation).value),
            "noise_rmse": float(rmse(plan.strategy, workload, plan.participation))
            * float(plan.noise_multiplier),
            "fingerprint": plan.fingerprint,
            "source": summary(plan).get("source"),
            "perplexity": curve[-1],
            "curve": curve,
            "plan_seconds": plan_seconds,
            "train_seconds": train_seconds,
            "plan": summary(plan),
        })
        log(f"{LABELS[method]:>8}: validation perplexity {curve[-1]:.3f} at epsilon {plan.epsilon:.3f} "
            f"(z {plan.noise_multiplier:.4f}; plan {plan_seconds:.1f} s, training {train_seconds:.1f} s)")
        del params

    reference = None
    if cfg.non_private:
        assert batch_plan is not None
        t0 = time.perf_counter()
        tx = optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None)
        _, _, curve = fine_tune(pretrained, example_loss, jdata, jval, batch_plan, cfg.epochs,
                                _mean_grad(example_loss), tx, perplexity)
        reference = {"perplexity": curve[-1], "curve": curve, "train_seconds": time.perf_counter() - t0}
        log(f"non-private fine-tuning (no clipping, no noise): validation perplexity {curve[-1]:.3f} "
            f"({reference['train_seconds']:.1f} s)")
    assert schema is not None and batch_plan is not None
    return {
        "task": "lm",
        "results": results,
        "non_private": reference,
        "pretrained": {"perplexity": base_ppl, "initial_perplexity": init_ppl, "steps": cfg.pretrain_steps,
                       "seconds": pretrain_seconds},
        "config": {**dataclasses.asdict(cfg), "methods": list(cfg.methods)},
        "dataset": "pydoc_data.topics (Python's own documentation text), UTF-8 bytes",
        "public_topics": list(corpus.public_topics),
        "private_topics": list(corpus.private_topics),
        "public_windows": int(corpus.public.shape[0]),
        "train_size": dataset_size,
        "validation_size": int(validation.shape[0]),
        "params": n_params,
        "n": schema.n,
        "max_participations": schema.max_participations,
        "min_sep": schema.min_sep,
        "capacity": int(np.asarray(batch_plan.indices).shape[1]),
        "seconds": time.perf_counter() - start,
        # CPU time of this process (all its threads): on a shared machine the wall time above is not the cost
        "cpu_seconds": time.process_time() - cpu_start,
    }


def plot(result: dict, path: str) -> str:
    """Validation perplexity after each fine-tuning epoch per method (epoch 0: the pretrained model),
    with the non-private reference dashed; the format follows ``path``'s extension (png without one),
    written atomically."""
    fmt = plot_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    base = result["pretrained"]["perplexity"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in result["results"]:
        curve = [base, *r["curve"]]
        ax.plot(range(len(curve)), curve, marker="o", ms=3, label=f"{r['label']}: {r['perplexity']:.3f}")
    ref = result.get("non_private")
    if ref:
        curve = [base, *ref["curve"]]
        ax.plot(range(len(curve)), curve, ls="--", color="gray", label=f"non-private: {ref['perplexity']:.3f}")
    cfg = result["config"]
    ax.set_xlabel("fine-tuning epoch (0: pretrained)")
    ax.set_ylabel("validation perplexity (per byte)")
    ax.set_title(f"LM fine-tuning on pydoc topics, (ε={cfg['epsilon']:g}, δ={cfg['delta']:g}), "
                 f"batch {cfg['batch_size']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    from mfnoise.strategies.files import save_figure

    return save_figure(fig, path, fmt)


def plot_format(path: str, argument: str = "plot") -> str:
    """The image format ``plot`` writes to ``path`` (``files.figure_format``)."""
    from mfnoise.strategies.files import figure_format

    return figure_format(path, argument)
