"""The ``Plan``: a strategy, its participation schema, its sampler and its calibrated noise, which cannot disagree.

A plan is the one place the six parts of a private run come from (docs/design.md, "Plan"):

* ``plan.batches(seed)``: batches from the sampler the accounting assumed, never another:
  ``cyclic_batches`` (fixed cyclic batches) for ``sampling="cyclic"`` (unamplified: one Gaussian
  mechanism, "Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning",
  Choquette-Choo et al. 2023, arXiv:2211.06530), ``cyclic_poisson_batches`` (packed) for
  ``sampling="cyclic-poisson"`` (amplified: "(Amplified) Banded Matrix Factorization: A unified
  approach to private training", Choquette-Choo et al. 2023, arXiv:2306.08153), ``poisson_batches``
  for ``sampling="poisson"`` (every step samples each example with q = batch_size / dataset_size,
  schema Participation(n, n, 1); a non-diagonal C >= 0 is priced by MMCC, "Privacy Amplification
  for Matrix Mechanisms", Choquette-Choo, Ganesh, Steinke, Thakurta, ICLR 2024, arXiv:2310.15526).
* ``plan.transform(optimizer, key=...)``: ``optax.chain(dp_aggregate(strategy, l2_clip_norm,
  noise_multiplier, key, participation, expected_batch_size), optimizer)``, whose state
  (``PlanState``) records the plan's fingerprint.
* ``plan.loss(loss_fn)``: (params, (example, weight)) -> weight * loss_fn(params, example), weight
  the batch's mask (0 for a padded slot), and ``plan.clipped_grad(loss_fn)`` its clipped sum.

Construction verifies the accounting: ``Plan(...)`` recomputes epsilon(noise_multiplier, delta)
for its sampling with ``mfnoise.training.accounting.epsilon`` and refuses a plan whose stored
epsilon differs or exceeds its target. So a plan claiming amplified noise with fixed cyclic batches
cannot exist, however it is built (``plan()``, ``from_json``, ``dataclasses.replace``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from mfnoise.core.participation import Participation, check_participation
from mfnoise.planning import fingerprint as fp
from mfnoise.planning.fingerprint import Fingerprint
from mfnoise.strategies.base import Strategy
from mfnoise.strategies.registry import FAMILIES
from mfnoise.training import batching

SAMPLINGS = ("cyclic", "cyclic-poisson", "poisson")
# The accounting vocabulary of each sampler (mfnoise.training.accounting.ROUTED_SAMPLINGS). Balls-in-bins
# is not a plan's sampling: its only accountant here is a Monte Carlo estimate (provable=False), and a
# plan's epsilon is a proven bound.
ACCOUNTING_SAMPLING = {"cyclic": "none", "cyclic-poisson": "cyclic-poisson", "poisson": "poisson"}
PLAN_FORMAT = "mfnoise-plan"
PLAN_FORMAT_VERSION = 1
# Recomputed epsilon may differ from the stored one by float noise of the accountant only.
_EPSILON_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One row of ``plan.candidates``: a mechanism the chooser compared.

    ``trajectory_rmse`` = noise_multiplier * sens(C, p) * ||A C^{-1}||_F / sqrt(n), the root-mean-
    square noise the mechanism puts into the training trajectory A G (units of the clip norm);
    ``rmse`` is the same at noise multiplier 1. ``accountant`` says what priced
    ``noise_multiplier`` ("pld", "rdp"; "rdp-screen": RDP on dp-accounting's integer orders, used
    only to rank amplified candidates, whose best ones are then priced by the plan's accountant).
    ``dropped`` is why the candidate was not eligible (memory, a theorem that does not apply, ...) or None.
    """

    mechanism: str
    sampling: str
    family: str | None
    bands: int | None
    buffers: int | None
    min_sep: int
    state_arrays: int | None
    state_bytes: int | None
    noise_multiplier: float | None = None
    accountant: str | None = None
    rmse: float | None = None
    trajectory_rmse: float | None = None
    source: str = ""
    dropped: str | None = None
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(**d)


class Batch(NamedTuple):
    """One step's batch: ``indices`` (capacity,) int32, ``mask`` (capacity,) bool (False: padding)."""

    step: int
    indices: np.ndarray
    mask: np.ndarray
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class Batches:
    """The batches of one seed: iterate for ``Batch`` rows, ``arrays()`` for ``lax.scan``.

    ``fingerprint`` is the plan's; ``identity`` (``batching.PlanIdentity``: sampler, seed,
    dataset size, schema, batch size, q, digest) is the batch plan's, to save with a checkpoint.
    """

    batch_plan: batching.BatchPlan
    seed: int
    fingerprint: str

    @property
    def identity(self) -> batching.PlanIdentity:
        identity = self.batch_plan.identity
        assert identity is not None  # every sampler stamps one
        return identity

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices (steps, capacity) int32, mask (steps, capacity) bool)."""
        return np.asarray(self.batch_plan.indices, np.int32), np.asarray(self.batch_plan.mask, bool)

    def __iter__(self) -> Iterator[Batch]:
        for t, (indices, mask) in enumerate(self.batch_plan):
            yield Batch(t, indices, mask, self.fingerprint)

    def __len__(self) -> int:
        return self.batch_plan.n


class PlanState(NamedTuple):
    """The state of ``plan.transform``: the plan's fingerprint as (8,) uint32 words, and the chain's state."""

    fingerprint: Any
    inner: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A checked training plan (see the module doc); build it with ``mfnoise.plan``.

    Attributes: ``strategy`` C and the ``participation`` schema its sensitivity is for,
    ``noise_multiplier`` (mfnoise's convention: that of C / sens(C, p)), ``l2_clip_norm``,
    ``mechanism`` and ``sampling`` (``SAMPLINGS``), ``dataset_size`` and ``batch_size`` (public),
    ``delta``, ``target_epsilon`` and ``epsilon`` (achieved), ``accountant``,
    ``pld_discretization``, ``workload`` (the trajectory the chooser scored, its ``to_dict()``),
    ``source`` (where the strategy came from), ``candidates`` and ``mmcc_options`` (the options
    MMCC priced a ``sampling="poisson"`` plan with, ``mfnoise.training.mmcc.epsilon``'s keywords;
    empty for the other samplings and for MMCC's defaults).
    """

    strategy: Strategy
    participation: Participation
    noise_multiplier: float
    l2_clip_norm: float
    mechanism: str
    sampling: str
    dataset_size: int
    batch_size: int
    delta: float
    target_epsilon: float
    epsilon: float
    accountant: str = "pld"
    pld_discretization: float = 1e-3
    workload: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    candidates: tuple[Candidate, ...] = ()
    mmcc_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, Strategy):
            raise TypeError(f"strategy must be a mfnoise.Strategy, got {type(self.strategy).__name__}")
        p = check_participation(self.participation, self.strategy.n, f"the {self.strategy.family} strategy")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be positive and finite, got {self.noise_multiplier!r}")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "mmcc_options", dict(self.mmcc_options))
        if self.mmcc_options and self.sampling != "poisson":
            raise ValueError(f"mmcc_options={self.mmcc_options!r} only apply to sampling='poisson' (MMCC), not "
                             f"{self.sampling!r}")
        self._check_epsilon(p)

    def _accounting_kwargs(self) -> dict[str, Any]:
        """The keywords of ``accounting.epsilon`` / ``explain`` for this plan's sampling."""
        if self.sampling == "cyclic":
            return {"sampling": "none", "strategy": self.strategy}
        out: dict[str, Any] = {"sampling": ACCOUNTING_SAMPLING[self.sampling], "strategy": self.strategy,
                               "dataset_size": self.dataset_size, "batch_size": self.batch_size}
        if self.sampling == "poisson" and self.mmcc_options:
            out["mmcc_options"] = dict(self.mmcc_options)
        return out

    def _check_epsilon(self, p: Participation) -> None:
        """epsilon(noise_multiplier) for this sampling, recomputed by ``accounting.explain`` (the number
        ``accounting.epsilon`` returns, with the theorem that gave it, kept for the report): equal to the
        stored one, <= the target. A sampling no theorem covers for this strategy is refused there."""
        from mfnoise.training import accounting

        how = accounting.explain(self.noise_multiplier, self.delta, p, accountant=self.accountant,  # type: ignore[arg-type]
                                 pld_discretization=self.pld_discretization, **self._accounting_kwargs())
        if not how.provable:  # no provable sampling routes to an estimate; a plan's epsilon is a bound
            raise ValueError(f"the plan's accounting ({how.theorem}) is an estimate, not a bound")
        object.__setattr__(self, "_accounting", how)
        achieved = how.epsilon
        if not abs(achieved - self.epsilon) <= _EPSILON_RTOL * max(1.0, abs(achieved)):
            raise ValueError(
                f"the plan says epsilon={self.epsilon!r}, but its mechanism ({self.sampling} sampling, noise "
                f"multiplier {self.noise_multiplier!r}, {self.accountant}) gives epsilon={achieved!r}: its accounting "
                "does not match its batches"
            )
        if not achieved <= self.target_epsilon:
            raise ValueError(
                f"the plan's mechanism ({self.sampling} sampling, noise multiplier {self.noise_multiplier!r}) is "
                f"epsilon={achieved!r}-DP, above its target epsilon={self.target_epsilon!r}"
            )

    # -- what it is -----------------------------------------------------------------------------
    @property
    def accounting(self) -> Any:
        """The ``accounting.Accounting`` that verified the plan: its epsilon, ``theorem`` and ``paper``."""
        return self.__dict__["_accounting"]

    @property
    def steps(self) -> int:
        return self.participation.n

    @property
    def expected_batch_size(self) -> float:
        """The public divisor of the noisy sum: the stated batch size. For cyclic Poisson sampling it is
        the expected batch size q * dataset_size / min_sep exactly (q is defined from it); for fixed
        cyclic batches it is within a factor 1 + 1 / min_sep of their real size."""
        return float(self.batch_size)

    @property
    def identity(self) -> Fingerprint:
        """The fields the fingerprint hashes."""
        return Fingerprint(
            strategy_sha256=fp.strategy_digest(self.strategy), family=self.strategy.family,
            participation=self.participation.to_dict(), sampling=self.sampling, dataset_size=int(self.dataset_size),
            batch_size=int(self.batch_size), noise_multiplier=float(self.noise_multiplier),
            l2_clip_norm=float(self.l2_clip_norm), expected_batch_size=self.expected_batch_size,
            delta=float(self.delta), accountant=self.accountant, accounting_options=dict(self.mmcc_options))

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of ``identity``."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            cached = self.identity.hex
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    # -- what it hands out -------------------------------------------------------------------------
    def batches(self, seed: int = 0) -> Batches:
        """The batches of ``seed`` from the plan's own sampler (``cyclic_batches``, ``poisson_batches``
        or, packed, ``cyclic_poisson_batches``), checked against the plan's participation schema."""
        if self.sampling == "cyclic":
            bp = batching.cyclic_batches(self.dataset_size, self.participation, seed)
        elif self.sampling == "poisson":
            bp = batching.poisson_batches(self.dataset_size, self.participation, self.batch_size, seed)
        else:
            bp = batching.pack(batching.cyclic_poisson_batches(self.dataset_size, self.participation,
                                                               self.batch_size, seed))
        batching.check(bp, self.participation)
        return Batches(bp, int(seed), self.fingerprint)

    def transform(self, optimizer: Any, *, key: Any, noise_dtype: Any = None, **aggregate_kwargs: Any) -> Any:
        """``optax.chain(dp_aggregate(...), optimizer)`` from the plan's strategy, clip norm, noise
        multiplier, participation and ``expected_batch_size``; its state is a ``PlanState`` holding
        the plan's fingerprint, refused by ``update`` (outside jit) and by ``check_state`` when it is
        another plan's. ``tx.info`` is ``dp_aggregate``'s."""
        import jax.numpy as jnp
        import optax
        from jax.core import Tracer

        from mfnoise.training.transforms import DPGradientTransformation, dp_aggregate

        agg = dp_aggregate(self.strategy, self.l2_clip_norm, self.noise_multiplier, key,
                           participation=self.participation, expected_batch_size=self.expected_batch_size,
                           noise_dtype=noise_dtype, **aggregate_kwargs)
        chain = optax.chain(agg, optimizer)
        words = fp.to_words(self.fingerprint)

        def init_fn(params: Any) -> PlanState:
            return PlanState(jnp.asarray(words), chain.init(params))

        def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, PlanState]:
            if not isinstance(state, PlanState):
                raise TypeError(f"expected the PlanState of this plan's transform, got {type(state).__name__}")
            if not isinstance(state.fingerprint, Tracer):
                self._check_words(state.fingerprint, "the optimizer state")
            out, inner = chain.update(updates, state.inner, params, **extra)
            return out, PlanState(state.fingerprint, inner)

        return DPGradientTransformation(init_fn, update_fn, agg.info)

    def loss(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """(params, (example, weight)) -> weight * loss_fn(params, example): ``loss_fn`` on ONE
        example, weighted by its slot's mask (0 for padding, so its clipped contribution is exactly 0)."""

        def weighted(params: Any, example_and_weight: Any, *args: Any) -> Any:
            example, weight = example_and_weight
            return weight * loss_fn(params, example, *args)

        return weighted

    def clipped_grad(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """f(params, examples, mask) -> the ``ClippedSum`` of ``self.loss(loss_fn)`` clipped at the
        plan's clip norm (``mfnoise.clipped_grad``); ``examples`` a pytree of (capacity, ...) arrays."""
        from mfnoise.training.clipping import clipped_grad

        clipped = clipped_grad(self.loss(loss_fn), self.l2_clip_norm)

        def grad(params: Any, examples: Any, mask: Any) -> Any:
            import jax.numpy as jnp

            return clipped(params, (examples, jnp.asarray(mask, jnp.float32)))

        return grad

    # -- refusals -------------------------------------------------------------------------------------
    def _check_fingerprint(self, found: str, what: str) -> None:
        if found != self.fingerprint:
            raise ValueError(fp.explain(self.identity, found, what))

    def _check_words(self, words: Any, what: str) -> None:
        self._check_fingerprint(fp.from_words(np.asarray(words)), what)

    def check_strategy(self, strategy: Strategy) -> None:
        """Raises ValueError unless ``strategy`` is the plan's (same sha256), saying what differs."""
        if not isinstance(strategy, Strategy):
            raise TypeError(f"expected a mfnoise.Strategy, got {type(strategy).__name__}")
        mine, theirs = fp.strategy_digest(self.strategy), fp.strategy_digest(strategy)
        if mine != theirs:
            what = []
            if strategy.family != self.strategy.family:
                what.append(f"family: plan {self.strategy.family}, given {strategy.family}")
            if strategy.params() != self.strategy.params():
                what.append(f"params: plan {self.strategy.params()}, given {strategy.params()}")
            what = what or ["the coefficients"]
            raise ValueError(f"the strategy is not the plan's (sha256 {theirs[:16]}... != {mine[:16]}...): it "
                             f"differs in " + "; ".join(what))

    def check_batch(self, batch: Batch) -> None:
        """Raises ValueError unless ``batch`` came from this plan (its fingerprint) and its step exists."""
        self._check_fingerprint(batch.fingerprint, "the batch")
        if not 0 <= int(batch.step) < self.steps:
            raise ValueError(f"the batch's step {batch.step} is outside the plan's {self.steps} steps")

    def check_batches(self, batches: Batches) -> None:
        """Raises ValueError unless ``batches`` are this plan's for their seed: the fingerprint, and the
        batch plan's identity and participations (``BatchPlan.check_resume``), naming what differs."""
        self._check_fingerprint(batches.fingerprint, "the batches")
        expected = self.batches(batches.seed)
        batches.batch_plan.check_resume(expected.identity)

    def check_state(self, state: Any) -> None:
        """Raises ValueError unless ``state`` (a ``PlanState``, or a tree holding one) was made by this
        plan's ``transform``, and the noise has not run past the strategy's n."""
        import jax

        from mfnoise.training import noise as noise_lib

        found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, PlanState))
                 if isinstance(s, PlanState)]
        if not found:
            raise ValueError("the state holds no PlanState: it was not made by plan.transform, so the plan it "
                             "belongs to cannot be checked")
        for s in found:
            self._check_words(jax.device_get(s.fingerprint), "the optimizer state")
        noise_lib.check(state)

    def check_resume(self, state: Any, batches: Batches | None = None) -> None:
        """``check_state(state)`` and, if given, ``check_batches(batches)``."""
        self.check_state(state)
        if batches is not None:
            self.check_batches(batches)

    # -- reports and files ---------------------------------------------------------------------------
    def report(self) -> str:
        from mfnoise.planning.report import text

        return text(self)

    def to_dict(self) -> dict[str, Any]:
        """Everything (the strategy's arrays included, exactly): ``from_dict`` rebuilds the same plan."""
        from mfnoise.planning.report import summary

        return {
            "format": PLAN_FORMAT,
            "format_version": PLAN_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            **summary(self),
            "strategy": _strategy_to_dict(self.strategy),
            "participation": self.participation.to_dict(),
            "workload": self.workload,
            "candidates": [c.to_dict() for c in self.candidates],
            "mmcc_options": dict(self.mmcc_options),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The plan ``to_dict`` wrote, verified: its accounting is recomputed (``Plan.__post_init__``)
        and its fingerprint must match the one stored (an edited field is refused)."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not an mfnoise plan (format={found!r})")
        if d.get("format_version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"plan format_version={d.get('format_version')!r}; this mfnoise reads "
                             f"{PLAN_FORMAT_VERSION}")
        plan = cls(
            strategy=_strategy_from_dict(d["strategy"]), participation=Participation.from_dict(d["participation"]),
            noise_multiplier=float(d["noise_multiplier"]), l2_clip_norm=float(d["l2_clip_norm"]),
            mechanism=str(d["mechanism"]), sampling=str(d["sampling"]), dataset_size=int(d["dataset_size"]),
            batch_size=int(d["batch_size"]), delta=float(d["delta"]), target_epsilon=float(d["target_epsilon"]),
            epsilon=float(d["epsilon"]), accountant=str(d["accountant"]),
            pld_discretization=float(d["pld_discretization"]), workload=dict(d.get("workload", {})),
            source=str(d.get("source", "")),
            candidates=tuple(Candidate.from_dict(c) for c in d.get("candidates", [])),
            mmcc_options=dict(d.get("mmcc_options", {})),
        )
        stored = d.get("fingerprint")
        if stored != plan.fingerprint:
            raise ValueError(fp.explain(plan.identity, str(stored), "the saved plan")
                             + " (the file was edited: its fields no longer give its fingerprint)")
        return plan

    @classmethod
    def from_json(cls, s: str) -> Plan:
        return cls.from_dict(json.loads(s))

    def save(self, path: str | os.PathLike) -> str:
        """Writes ``to_json()`` atomically (the folder must exist); returns the path."""
        from mfnoise.strategies.files import atomic_write

        with atomic_write(path, "w", "plan") as f:
            f.write(self.to_json())
        return os.fspath(path)


def load(path: str | os.PathLike) -> Plan:
    """The plan ``Plan.save`` wrote, verified (``Plan.from_dict``)."""
    with open(path) as f:
        return Plan.from_json(f.read())


def _strategy_to_dict(strategy: Strategy) -> dict[str, Any]:
    """{"family", "params", "arrays": {name: {"shape", "float64_base64"}}}: the arrays bit-exact."""
    arrays = {}
    for name, a in strategy.arrays().items():
        a = np.ascontiguousarray(np.asarray(a, dtype="<f8"))
        arrays[name] = {"shape": list(a.shape), "float64_base64": base64.b64encode(a.tobytes()).decode()}
    params = json.loads(json.dumps(strategy.params(), default=lambda x: x.item()))
    return {"family": strategy.family, "params": params, "arrays": arrays, "sha256": fp.strategy_digest(strategy)}


def _strategy_from_dict(d: dict[str, Any]) -> Strategy:
    family = d.get("family")
    if family not in FAMILIES:
        raise ValueError(f"the saved plan's strategy has unknown family {family!r}")
    arrays = {name: np.frombuffer(base64.b64decode(a["float64_base64"]), dtype="<f8").reshape(a["shape"]).copy()
              for name, a in d["arrays"].items()}
    strategy = FAMILIES[family].from_arrays(arrays, d["params"])
    if fp.strategy_digest(strategy) != d.get("sha256"):
        raise ValueError("the saved plan's strategy does not match its sha256: the file was edited")
    return strategy
