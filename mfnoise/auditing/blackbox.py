"""Black-box auditing of a training run the user supplies: input-space canaries and the one-run bound.

The auditor holds out m examples of the user's data, turns each into a canary (a mislabelled copy:
the same input with a label drawn uniformly from the other classes; or a crafted example: an input
drawn uniformly from the data's range, with a random label), and flips a fair coin for each: the
canary is *in* (trained on) or *out* (never seen). Everything is deterministic from ``seed``. The
user's ``train_fn`` trains on the resulting dataset and returns one score per canary (e.g. minus the
trained model's loss on it: a memorised canary has a small loss); the one-run estimators turn the
scores and the coins into an epsilon lower bound ("Privacy Auditing with One (1) Training Run",
Steinke, Nasr, Jagielski, NeurIPS 2023, arXiv:2305.08846; its f-DP refinement, "Auditing
f-Differential Privacy in One Run", Mahloujifar, Melis, Chaudhuri 2024, arXiv:2410.22235):
if the training run is (epsilon, delta)-DP with respect to each canary, the number of correct
in/out guesses of any attacker is stochastically dominated by the paper's distribution, so an
observed count that this distribution makes unlikely (below 1 - confidence) proves epsilon larger.

Neighbouring datasets. mfnoise's adjacency is add/remove one example (docs/design.md, "Threat
model"). ``CanaryDataset`` gives two views of the same dataset: ``x, y`` (the user's examples and
the *in* canaries only: the add/remove view) and ``x_all, y_all, present`` (every canary in its
seeded slot, an out canary marked ``present = False``: the fixed-shape view). A mechanism that
multiplies an absent slot's loss by 0 and never divides by a data-derived count releases exactly
what it would release without that example (the clipped sum is the same), and its batches (which
slots go to which step) do not depend on the coins: that is the view ``mfnoise audit --demo`` trains
on, so the demo's claimed epsilon (calibrated for that one schema) is the claim audited.

Shapes: ``x`` (N, *feature_shape), ``y`` (N,) integer labels in [0, num_classes); m canaries need
m <= N // 2 held out (the rest is the training data every run shares).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

CANARY_KINDS = ("mislabelled", "crafted")
BLACKBOX_ESTIMATORS = ("one-run", "one-run-fdp")


@dataclasses.dataclass(frozen=True)
class CanaryDataset:
    """The user's data with m canaries, each present with probability 1/2 (see the module doc).

    ``x_all`` (N', *f), ``y_all`` (N',): the user's N - m remaining examples and the m canaries in
    seeded slots (N' = N); ``present`` (N',) bool: False exactly at the out canaries' slots;
    ``canary_slots`` (m,) the canaries' slots in ``x_all``; ``canary_x`` (m, *f), ``canary_y``
    (m,) the canaries themselves (in canary order, in or out); ``is_in`` (m,) bool, the coins;
    ``source_indices`` (m,) the held-out examples of the user's data each canary was made from.
    """

    x_all: np.ndarray
    y_all: np.ndarray
    present: np.ndarray
    canary_slots: np.ndarray
    canary_x: np.ndarray
    canary_y: np.ndarray
    is_in: np.ndarray
    source_indices: np.ndarray
    kind: str
    seed: int

    @property
    def m(self) -> int:
        return int(self.is_in.size)

    @property
    def x(self) -> np.ndarray:
        """The training inputs of the add/remove view: the user's examples and the in canaries."""
        return self.x_all[self.present]

    @property
    def y(self) -> np.ndarray:
        return self.y_all[self.present]

    @property
    def weights(self) -> np.ndarray:
        """``present`` as float32 weights (0 for an out canary's slot): the fixed-shape view's loss weights."""
        return self.present.astype(np.float32)


def make_canaries(x: Any, y: Any, m: int, *, kind: Literal["mislabelled", "crafted"] = "mislabelled",
                  num_classes: int | None = None, seed: int = 0) -> CanaryDataset:
    """m canaries from the data (x (N, *f), y (N,)), each in with probability 1/2, all from ``seed``.

    The m source examples are drawn without replacement and held out of every run; canary j is
    ``mislabelled``: x[source_j] with a label uniform over the other ``num_classes - 1`` classes, or
    ``crafted``: an input uniform on [min x, max x] (per feature) with a uniform label. The coins
    is_in_j are i.i.d. Bernoulli(1/2); the canaries take m seeded slots among the N slots of
    ``x_all`` (the other N - m hold the remaining user examples, in their order).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (N, ...) and y (N,) with the same N, got shapes {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    n_data = int(x.shape[0])
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ValueError(f"the number of canaries must be a positive integer, got {m!r}")
    m = int(m)
    if m > n_data // 2:
        raise ValueError(f"{m} canaries need at least {2 * m} examples (half held out at most), got {n_data}")
    if kind not in CANARY_KINDS:
        raise ValueError(f"kind must be one of {CANARY_KINDS}, got {kind!r}")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found {int(y.min())}..{int(y.max())}")
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    # One generator per purpose (spawned from the seed): the coins do not change when, say, the
    # crafted inputs' shape does, and no stream is reused for two things.
    g_source, g_label, g_coin, g_slot, g_input = (np.random.default_rng(s)
                                                  for s in np.random.SeedSequence(int(seed)).spawn(5))
    source = np.sort(g_source.choice(n_data, size=m, replace=False))
    if kind == "mislabelled":
        # uniform over the other classes: shift the true label by 1..num_classes-1 (mod num_classes)
        canary_y = (y[source] + g_label.integers(1, num_classes, size=m)) % num_classes
        canary_x = x[source].copy()
    else:
        canary_y = g_label.integers(0, num_classes, size=m)
        lo, hi = x.min(axis=0), x.max(axis=0)
        canary_x = (lo + (hi - lo) * g_input.random((m, *x.shape[1:]))).astype(x.dtype)
    canary_y = canary_y.astype(y.dtype)
    is_in = g_coin.random(m) < 0.5
    keep = np.setdiff1d(np.arange(n_data), source)
    slots = np.sort(g_slot.choice(n_data, size=m, replace=False))
    # the canaries take their slots in canary order (canary j at slots[perm[j]]: slots are random, order too)
    slots = slots[g_slot.permutation(m)]
    x_all = np.empty_like(x)
    y_all = np.empty_like(y)
    others = np.setdiff1d(np.arange(n_data), slots)
    x_all[others], y_all[others] = x[keep], y[keep]
    x_all[slots], y_all[slots] = canary_x, canary_y
    present = np.ones(n_data, dtype=bool)
    present[slots[~is_in]] = False
    return CanaryDataset(x_all=x_all, y_all=y_all, present=present, canary_slots=slots, canary_x=canary_x,
                         canary_y=canary_y, is_in=is_in, source_indices=source, kind=kind, seed=int(seed))


@dataclasses.dataclass(frozen=True)
class BlackBoxResult:
    """A black-box audit: the lower bound next to the claim.

    ``claimed_epsilon`` (None when no claim was given), ``lower_bound`` (an ``EpsilonLowerBound``
    from ``mfnoise.auditing.estimators``), ``tightness`` = lower bound / claimed (None without a
    claim), ``scores`` (m,) and ``is_in`` (m,) as returned and drawn, ``scores_in`` / ``scores_out``
    (the in and out canaries' scores: the ROC), ``seconds`` (training included), ``mechanism``
    (a label for what was trained), ``canaries`` (m), ``kind``, ``seed``, ``extra`` (what the
    train function reported besides the scores).
    """

    claimed_epsilon: float | None
    lower_bound: Any
    tightness: float | None
    scores: np.ndarray
    is_in: np.ndarray
    seconds: float
    mechanism: str
    canaries: int
    kind: str
    seed: int
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def scores_in(self) -> np.ndarray:
        return self.scores[self.is_in]

    @property
    def scores_out(self) -> np.ndarray:
        return self.scores[~self.is_in]

    @property
    def delta(self) -> float:
        return float(self.lower_bound.delta)

    @property
    def flagged(self) -> bool:
        """True when the lower bound exceeds the claim: the run leaks more than it claims (at the confidence)."""
        return self.claimed_epsilon is not None and float(self.lower_bound.epsilon) > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {
            "audit": "black-box",
            "mechanism": self.mechanism,
            "claimed_epsilon": self.claimed_epsilon,
            "epsilon_lower_bound": float(self.lower_bound.epsilon),
            "tightness": self.tightness,
            "flagged": self.flagged,
            "delta": self.delta,
            "confidence": float(self.lower_bound.confidence),
            "estimator": self.lower_bound.method,
            "trials": self.canaries,
            "canaries": self.canaries,
            "canaries_in": int(self.is_in.sum()),
            "kind": self.kind,
            "seed": self.seed,
            "seconds": self.seconds,
            "lower_bound": self.lower_bound.to_dict(),
            "extra": dict(self.extra),
        }


def scores_to_bound(scores: Any, is_in: Any, *, delta: float, confidence: float = 0.95,
                    estimator: str = "one-run",
                    guesses: int | Sequence[int] | Sequence[tuple[int, int]] | None = None) -> Any:
    """The one-run epsilon lower bound (``estimators.one_run`` or ``one_run_fdp``) of per-canary scores
    (m,) against the coins is_in (m,): the attacker guesses "in" for the highest scores and "out"
    for the lowest (abstaining in the middle)."""
    from mfnoise.auditing import estimators

    if estimator not in BLACKBOX_ESTIMATORS:
        raise ValueError(f"a black-box audit takes estimator one of {BLACKBOX_ESTIMATORS}, got {estimator!r}")
    scores = np.asarray(scores, dtype=np.float64)
    is_in = np.asarray(is_in, dtype=bool)
    if scores.shape != is_in.shape or scores.ndim != 1:
        raise ValueError(f"scores must be one per canary, shape {is_in.shape}, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be finite; {int((~np.isfinite(scores)).sum())} are not")
    fn = estimators.one_run if estimator == "one-run" else estimators.one_run_fdp
    return fn(scores, is_in, delta=delta, confidence=confidence, guesses=guesses)


def audit_blackbox(train_fn: Callable[[CanaryDataset], Any], x: Any, y: Any, *, canaries: int, delta: float,
                   claimed_epsilon: float | None = None, kind: Literal["mislabelled", "crafted"] = "mislabelled",
                   num_classes: int | None = None, estimator: str = "one-run", confidence: float = 0.95,
                   guesses: int | Sequence[int] | Sequence[tuple[int, int]] | None = None, seed: int = 0,
                   mechanism: str = "train_fn") -> BlackBoxResult:
    """Black-box audit of ``train_fn``: make ``canaries`` canaries (``make_canaries``), call
    ``train_fn(dataset)`` once, and bound epsilon from the scores it returns (``scores_to_bound``).

    ``train_fn(dataset: CanaryDataset)`` trains on ``dataset.x, dataset.y`` (or the fixed-shape view
    ``x_all, y_all`` with weights ``present``) and returns the m scores of ``dataset.canary_x,
    canary_y`` (higher = more likely trained on, e.g. minus the loss), or a dict with ``"scores"``
    and anything else worth keeping (returned in ``extra``). One training run: the m canaries are
    the trials ("Privacy Auditing with One (1) Training Run", Steinke, Nasr, Jagielski 2023).
    The bound holds at ``confidence`` over the coins whatever ``train_fn`` does; it is a lower bound
    on the epsilon of the run with respect to one canary, to compare with ``claimed_epsilon``.
    """
    if claimed_epsilon is not None and not (claimed_epsilon >= 0 and math.isfinite(claimed_epsilon)):
        raise ValueError(f"claimed_epsilon must be finite and >= 0, got {claimed_epsilon!r}")
    start = time.perf_counter()
    ds = make_canaries(x, y, canaries, kind=kind, num_classes=num_classes, seed=seed)
    out = train_fn(ds)
    extra: dict = {}
    if isinstance(out, dict):
        if "scores" not in out:
            raise ValueError(f"train_fn returned a dict without 'scores' (keys {sorted(out)})")
        extra = {k: v for k, v in out.items() if k != "scores"}
        out = out["scores"]
    scores = np.asarray(out, dtype=np.float64).reshape(-1)
    if scores.size != ds.m:
        raise ValueError(f"train_fn must return one score per canary ({ds.m}), got {scores.size}")
    bound = scores_to_bound(scores, ds.is_in, delta=delta, confidence=confidence, estimator=estimator,
                            guesses=guesses)
    lb = float(bound.epsilon)
    tightness = None if claimed_epsilon is None else _ratio(lb, float(claimed_epsilon))
    return BlackBoxResult(claimed_epsilon=None if claimed_epsilon is None else float(claimed_epsilon),
                          lower_bound=bound, tightness=tightness, scores=scores, is_in=ds.is_in,
                          seconds=time.perf_counter() - start, mechanism=mechanism, canaries=ds.m, kind=kind,
                          seed=int(seed), extra=extra)


def _ratio(lower: float, claimed: float) -> float:
    """lower / claimed, with 0 / 0 = 0 (nothing shown against nothing claimed) and x / 0 = inf."""
    if claimed > 0:
        return lower / claimed
    return 0.0 if lower <= 0 else math.inf
