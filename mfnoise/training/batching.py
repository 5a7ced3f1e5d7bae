"""Batch selection that honours a participation schema, and a check that proves it did
(docs/design.md, "Batching").

A strategy's sensitivity is a privacy guarantee only if every example really takes part in a
pattern the schema allows. Two samplers, both deterministic from a seed and both returning a
``BatchPlan`` of fixed shape (n, capacity) for ``jax.jit``, padded and masked:

* ``cyclic_batches``: fixed cyclic batches. The examples are shuffled once and split into
  b = min_sep groups (sizes differ by at most one when b does not divide the dataset; the
  smaller groups are padded and masked, so no example is dropped or repeated); step t uses
  group t mod b. Example e of group c takes part in steps {c, c + b, ...}: a cyclic pattern of
  ceil((n - c) / b) steps. A schema allowing fewer (a min-sep k < ceil(n / b)) is refused: the
  surplus steps would hold no example at all.
* ``cyclic_poisson_batches``: the same groups; step t includes each example of group t mod b
  independently with probability q = batch_size / (dataset_size / b) ("(Amplified) Banded Matrix
  Factorization: A unified approach to private training", Choquette-Choo et al. 2023,
  arXiv:2306.08153), with fresh coins at every step. The capacity is the largest group, so
  nothing is ever truncated (truncation would void the Poisson analysis). Under a min-sep
  k < ceil(n / b) an example is retired after its k-th realised participation (its later slots
  are masked out): given everything released before a round, its inclusion probability is then
  q times the chance it is not yet retired, at most q; and it never takes part more than k times.
* ``poisson_batches``: step t includes each of the dataset_size examples independently with
  probability q = batch_size / dataset_size, fresh coins every step (DP-SGD's Poisson
  subsampling). It honours no separation: an example may take part in adjacent steps, so only
  schemas with min_sep = 1 are accepted (any k; under k < n an example is retired after its k-th
  participation as above). Its accounting is per step (amplified by q), not by a schema's
  sensitivity.
* ``balls_in_bins_batches``: b = min_sep bins; every example goes into one bin c, uniformly at
  random and independently of the others, and takes part in exactly the steps {c, c + b, ...}:
  one uniformly random step per epoch of b steps, at the same position in every epoch. This is
  balls-in-bins as "Near Exact Privacy Amplification for Matrix Mechanisms" (Choquette-Choo et
  al. 2024, arXiv:2410.06266) and jax-privacy's ``BallsInBinsSampling`` define it; for one epoch
  it is the sampler of "Balls-and-Bins Sampling for DP-SGD" (Chua et al. 2025,
  arXiv:2412.16802). Every pattern is the cyclic pattern of its bin, so it honours the cyclic
  schema ``Participation.epochs(n, n // b)``: k = ceil(n / b), min_sep = b exactly (a redraw of
  the bins every epoch would give min_sep 1 across an epoch boundary; it is not this sampler, and
  its multi-epoch matrix-mechanism accounting is not in the literature we found). Batch sizes are
  random (Binomial(dataset_size, 1 / b) per bin); a bin may be empty.
* ``b_min_sep_batches``: b-min-sep sampling for BandMF (arXiv:2602.09338, as jax-privacy's
  Monte Carlo sample generation for that paper implements it; the paper's own text was not in
  the stored corpora): every example independently, at every step t at which it did not take
  part in any of the steps t - b + 1 .. t - 1, takes part with probability p. Consecutive
  participations are therefore at least b = min_sep apart (it honours min-sep(n, k, b); under
  k < ceil(n / b) an example is retired after its k-th participation). An example takes part in
  about a fraction 1 / (b - 1 + 1 / p) of the steps, so p = batch_size / (dataset_size -
  (b - 1) batch_size) gives an expected batch of batch_size once the start-up has passed (the
  first b - 1 steps, when every example is eligible, are larger). b = 1 is Poisson sampling.

Every sampler builds its candidate plan and hands it to one shared step (``_finish``) that
retires each example after k participations and then runs ``check``: a plan that breaks the
schema is never returned (a ValueError says why). ``check(plan, participation)`` scans a plan and
raises (one summary line, then the details) on every example that takes part more than k times,
twice in one step, closer than min_sep, or (cyclic schema) outside one residue class mod b; on
participations the plan's own sampler cannot produce (``plan.sampling``: balls-in-bins, every
example in exactly every step of its bin's residue class; b-min-sep, consecutive participations
at least the plan's min_sep apart); on
a plan whose number of steps is not the schema's n; and on a step that is structurally empty
(no draw of the sampler's coins can put any example in it). ``check(..., raise_on_error=False)``
returns the ``PlanCheck`` report instead, with the count of each kind of violation.

``pack(plan)`` moves each step's real slots to the front and cuts the padding to the largest batch
the plan holds. ``schedule(dataset_size, batch_size, epochs)`` names the schema such a plan follows.

Resuming a run. Every plan a sampler returns carries a ``PlanIdentity``: the sampler, seed,
dataset size, participation schema, the sampler's parameters (batch size, sampling probability)
and a digest of the participations (the sorted examples of every step). Save ``plan.identity.to_dict()`` (JSON) with
the checkpoint; on resumption rebuild the plan and call ``plan.check_resume(saved)``, which raises
a ValueError naming every field that differs. A changed dataset size regroups every example (the
shuffle deals a different permutation into the groups), so the second part of the run would put
examples into steps the first part's sensitivity never allowed for; a changed seed does the same.
``from_identity(saved)`` rebuilds the saved plan itself.

Padded slots hold index 0 with mask False: zero their per-example gradients (multiply by the
mask) and divide by the batch size you state (a public constant), never by a realised count: the
dataset size, and so the group sizes, are private unless declared public.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mfnoise.core.participation import Participation, check_participation

SAMPLERS = ("cyclic", "cyclic-poisson", "poisson", "balls-in-bins", "b-min-sep")


@dataclasses.dataclass(frozen=True)
class PlanIdentity:
    """What a batch plan is made from, to refuse resuming a run with a different one.

    Attributes:
      sampler: one of ``SAMPLERS``.
      seed: the sampler's seed.
      dataset_size: number of examples.
      participation: the schema the plan honours.
      batch_size: the expected batch size asked of (cyclic) Poisson or b-min-sep sampling (None for
        "cyclic" and "balls-in-bins").
      sampling_probability: q, the probability of a coin (1.0 for "cyclic" and "balls-in-bins").
      digest: sha256 (hex) of the plan's participations, batch by batch (see ``BatchPlan.digest``):
        equal inputs must give an equal plan, and this catches a sampler that changed between two
        mfnoise versions.

    ``to_dict`` gives JSON-ready values; ``from_dict`` reads them back and refuses missing or
    unknown fields.
    """

    sampler: str
    seed: int
    dataset_size: int
    participation: Participation
    batch_size: int | None
    sampling_probability: float
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "participation": self.participation.to_dict(),
            "batch_size": self.batch_size,
            "sampling_probability": self.sampling_probability,
            "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanIdentity:
        if not isinstance(d, Mapping):
            raise TypeError(f"a saved plan identity must be a dict, got {type(d).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [f for f in fields if f not in d]
        unknown = sorted(set(d) - set(fields))
        if missing or unknown:
            raise ValueError(f"not a saved plan identity: missing fields {missing}, unknown fields {unknown}")
        if d["sampler"] not in SAMPLERS:
            raise ValueError(f"unknown sampler {d['sampler']!r}; expected one of {SAMPLERS}")
        return cls(
            sampler=str(d["sampler"]),
            seed=_nonneg_int("seed", d["seed"]),
            dataset_size=_positive_int("dataset_size", d["dataset_size"]),
            participation=Participation.from_dict(d["participation"]),
            batch_size=None if d["batch_size"] is None else _positive_int("batch_size", d["batch_size"]),
            sampling_probability=float(d["sampling_probability"]),
            digest=str(d["digest"]),
        )

    def differences(self, other: PlanIdentity) -> list[str]:
        """One line per field in which ``other`` differs: "field: saved X, now Y" (self is now)."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name}: saved {theirs}, now {mine}")
        return out


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples each step uses.

    Attributes:
      indices: (n, capacity) int32 example indices; padded slots hold 0.
      mask: (n, capacity) bool, True where the slot holds a real participation.
      dataset_size: number of examples.
      min_sep: b, the number of groups (step t uses group t mod b).
      sampling: the sampler, one of ``SAMPLERS`` (``check`` verifies its definition where it can).
      sampling_probability: q for "cyclic-poisson" and "poisson", the coin p for "b-min-sep", 1.0
        for "cyclic" and "balls-in-bins".
      groups: (dataset_size,) the group of each example (the bin for "balls-in-bins"; all 0 for
        "poisson" and "b-min-sep").
      max_batch_sizes: (n,) the most examples any draw of the sampler's coins can put in each
        step; 0 marks a structurally empty step. None (a plan built by hand): the realised
        batch sizes, as for a deterministic plan.
      identity: what the plan was made from (None for a plan built by hand); see ``check_resume``.
    """

    indices: np.ndarray
    mask: np.ndarray
    dataset_size: int
    min_sep: int
    sampling: str
    sampling_probability: float
    groups: np.ndarray
    max_batch_sizes: np.ndarray | None = None
    identity: PlanIdentity | None = None

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.indices.shape[1])

    @property
    def expected_batch_size(self) -> float:
        """q times the group size, averaged over steps (before any retirement); for b-min-sep the
        long-run rate dataset_size / (b - 1 + 1 / p).

        It depends on the dataset size, which is private unless you declare it public: normalise
        updates by the batch size you state (for Poisson sampling, ``identity.batch_size``)."""
        if self.sampling == "b-min-sep":  # long-run rate of the renewal process: 1 / (b - 1 + 1 / p)
            return float(self.dataset_size / (self.min_sep - 1 + 1 / self.sampling_probability))
        sizes = np.bincount(self.groups, minlength=self.min_sep)[np.arange(self.n) % self.min_sep]
        return float(self.sampling_probability * sizes.mean())

    def batch(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, mask) of step t, each of shape (capacity,)."""
        return self.indices[t], self.mask[t]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for t in range(self.n):
            yield self.batch(t)

    def __len__(self) -> int:
        return self.n

    def digest(self) -> str:
        """sha256 (hex) of the int64 sequence n, dataset_size, the batch sizes |B_0|, ..., |B_{n-1}|,
        then each batch's examples in increasing order: the same for every padding or slot order
        of the same participations."""
        return _digest(self.indices, self.mask, self.dataset_size)

    def check_resume(self, saved: PlanIdentity | Mapping[str, Any]) -> None:
        """Raises ValueError unless this plan is the one ``saved`` (a ``PlanIdentity`` or its
        ``to_dict()``) describes, naming every field that differs; also when this plan's arrays
        no longer match its own identity's digest, or it has no identity."""
        if self.identity is None:
            raise ValueError("this batch plan has no identity (it was not made by an mfnoise sampler), "
                             "so resuming with it cannot be checked")
        if not isinstance(saved, PlanIdentity):
            saved = PlanIdentity.from_dict(saved)
        actual = self.digest()
        if actual != self.identity.digest:
            raise ValueError(f"this batch plan's participations (digest {actual[:16]}...) no longer match "
                             f"its identity (digest {self.identity.digest[:16]}...): it was modified")
        diffs = self.identity.differences(saved)
        if diffs:
            hint = ""
            if [d.split(":")[0] for d in diffs] == ["digest"]:
                hint = " (the same sampler inputs give a different plan: a different mfnoise version?)"
            raise ValueError("cannot resume: this batch plan differs from the saved one in "
                             + "; ".join(diffs) + hint
                             + ". Changing the dataset size or the seed regroups the examples, so the two parts "
                             "of the run together would break the participation schema")


def schedule(dataset_size: int, batch_size: int, epochs: int) -> Participation:
    """The cyclic schema of ``epochs`` passes over the data in batches of about ``batch_size``:
    b = max(1, dataset_size // batch_size) steps per epoch, n = epochs * b."""
    d = _positive_int("dataset_size", dataset_size)
    m = _positive_int("batch_size", batch_size)
    k = _positive_int("epochs", epochs)
    if m > d:
        raise ValueError(f"batch_size={m} is larger than dataset_size={d}")
    b = d // m
    return Participation.epochs(k * b, k)


def sampling_probability(dataset_size: int, batch_size: int, min_sep: int) -> float:
    """q = batch_size / (dataset_size / min_sep), which must lie in (0, 1]."""
    d = _positive_int("dataset_size", dataset_size)
    m = _positive_int("batch_size", batch_size)
    b = _positive_int("min_sep", min_sep)
    q = m * b / d
    if q > 1:
        raise ValueError(
            f"batch_size={m} is more than a group holds: dataset_size / min_sep = {d / b:.6g}, "
            f"so q = {q:.6g} > 1"
        )
    return q


def assign_groups(dataset_size: int, min_sep: int, seed: int) -> np.ndarray:
    """(dataset_size,) group of each example: a seeded shuffle dealt round-robin into b groups,
    so group sizes differ by at most one."""
    d = _positive_int("dataset_size", dataset_size)
    b = _positive_int("min_sep", min_sep)
    perm = np.random.default_rng(_seed_seq(seed, 0)).permutation(d)
    groups = np.empty(d, dtype=np.int64)
    groups[perm] = np.arange(d) % b
    return groups


def cyclic_batches(dataset_size: int, participation: Participation, seed: int = 0) -> BatchPlan:
    """Fixed cyclic batches: step t uses every example of group t mod b (b = min_sep).

    Example e of group c takes part in steps {c, c + b, ...} ∩ [0, n), ceil((n - c) / b) times.
    Refused (ValueError) when the schema allows fewer, k < ceil(n / b) (retiring examples would
    leave steps k b .. n - 1 with no example at all), and when dataset_size < b (groups, hence
    steps, without examples).
    """
    p = check_participation(participation)
    d = _positive_int("dataset_size", dataset_size)
    b, k, rounds = p.min_sep, p.max_participations, -(-p.n // p.min_sep)
    if d < b:
        raise ValueError(
            f"dataset_size={d} is smaller than min_sep={b}: fixed cyclic batches split the data into "
            f"{b} groups, so {b - d} of them, and every step using them, would hold no example"
        )
    if k < rounds:
        raise ValueError(
            f"fixed cyclic batches over min_sep={b} groups use each example in steps c, c + {b}, ... : "
            f"up to ceil(n / min_sep) = {rounds} times for n={p.n}, more than max_participations={k}; "
            f"retiring examples after {k} participations would leave steps {k * b}..{p.n - 1} empty. "
            f"Use n <= {k * b} steps, max_participations >= {rounds}, min_sep >= {-(-p.n // k)}, "
            f"or cyclic_poisson_batches"
        )
    groups = assign_groups(d, b, seed)
    members, member_mask = _group_table(groups, b)
    step_group = np.arange(p.n) % b
    return _finish(
        p, sampler="cyclic", seed=seed, dataset_size=d, indices=members[step_group], mask=member_mask[step_group],
        groups=groups, sampling_probability=1.0, batch_size=None, max_batch_sizes=None,
    )


def cyclic_poisson_batches(
    dataset_size: int,
    participation: Participation,
    batch_size: int,
    seed: int = 0,
) -> BatchPlan:
    """Cyclic Poisson sampling: step t includes each example of group t mod b independently with
    probability q = batch_size * b / dataset_size, with fresh coins at every step; shape
    (n, largest group), masked.

    Under a schema with k < ceil(n / b) an example is retired after its k-th realised
    participation (its later slots masked out), so it never takes part more than k times.
    """
    p = check_participation(participation)
    d = _positive_int("dataset_size", dataset_size)
    q = sampling_probability(d, batch_size, p.min_sep)
    k, rounds = p.max_participations, -(-p.n // p.min_sep)
    if q == 1 and k < rounds:
        raise ValueError(
            f"batch_size={batch_size} is a whole group (dataset_size / min_sep = {d / p.min_sep:.6g}), so q = 1 "
            f"and every example takes part in all of its ceil(n / min_sep) = {rounds} rounds, more than "
            f"max_participations={k}: retiring it after {k} would leave steps {k * p.min_sep}..{p.n - 1} empty. "
            f"Use a smaller batch_size, n <= {k * p.min_sep} steps or max_participations >= {rounds}"
        )
    groups = assign_groups(d, p.min_sep, seed)
    members, member_mask = _group_table(groups, p.min_sep)
    step_group = np.arange(p.n) % p.min_sep
    # one coin per (step, slot): slot j of step t belongs to one example of group t mod b, and
    # every step of a group draws its own row, so rounds are independent
    coins = np.random.default_rng(_seed_seq(seed, 1)).random((p.n, members.shape[1])) < q
    eligible = member_mask[step_group]
    return _finish(
        p, sampler="cyclic-poisson", seed=seed, dataset_size=d, indices=members[step_group],
        mask=eligible & coins, groups=groups, sampling_probability=q, batch_size=int(batch_size),
        # with q < 1 a retired example's earlier coins could all have failed, so any member of the
        # group may take part in any of its steps; with q = 1 the draw is the plan itself
        max_batch_sizes=eligible.sum(axis=1) if q < 1 else None,
    )


def poisson_batches(
    dataset_size: int,
    participation: Participation,
    batch_size: int,
    seed: int = 0,
) -> BatchPlan:
    """Poisson sampling: step t includes each of the dataset_size examples independently with
    probability q = batch_size / dataset_size, fresh coins at every step (module doc).

    The schema must have min_sep = 1 (Poisson sampling may put an example in adjacent steps;
    refused otherwise, naming the value). Under k < n an example is retired after its k-th
    realised participation. The capacity is the largest realised batch (at least 1): nothing is
    truncated, and the shape depends on the coins only, never on the data.
    """
    p = check_participation(participation)
    d = _positive_int("dataset_size", dataset_size)
    m = _positive_int("batch_size", batch_size)
    if p.min_sep != 1:
        raise ValueError(
            f"Poisson sampling can put an example in adjacent steps, so it honours only min_sep=1, not "
            f"min_sep={p.min_sep} of {p}: use Participation(n={p.n}, max_participations=..., min_sep=1), "
            f"or cyclic_poisson_batches / b_min_sep_batches for a separated schema"
        )
    if m > d:
        raise ValueError(f"batch_size={m} is larger than dataset_size={d}, so q = {m / d:.6g} > 1")
    q = m / d
    if q == 1 and p.max_participations < p.n:
        raise ValueError(
            f"batch_size={m} is the whole dataset, so q = 1 and every example takes part in all n={p.n} steps, "
            f"more than max_participations={p.max_participations}"
        )
    rng = np.random.default_rng(_seed_seq(seed, 2))
    # |B_t| ~ Binomial(d, q), then a uniform subset of that size: the same law as d fresh coins,
    # at O(|B_t|) cost per step instead of O(d)
    sizes = rng.binomial(d, q, size=p.n)
    steps, examples = _uniform_subsets(sizes, d, rng)
    indices, mask = _table(steps, examples, p.n)
    return _finish(
        p, sampler="poisson", seed=seed, dataset_size=d, indices=indices, mask=mask,
        groups=np.zeros(d, dtype=np.int64), sampling_probability=q, batch_size=m,
        # with q < 1 any example may be in any step (a retired one's earlier coins could have failed)
        max_batch_sizes=np.full(p.n, d) if q < 1 else None,
    )


def balls_in_bins_batches(dataset_size: int, participation: Participation, seed: int = 0) -> BatchPlan:
    """Balls-in-bins: b = min_sep bins, each example in one uniformly random bin c (independently
    of the others), taking part in every step c, c + b, ... (module doc; Choquette-Choo et al.
    2024, arXiv:2410.06266). Shape (n, largest bin), masked.

    Honours the cyclic schema of b groups: k = ceil(n / b), min_sep = b. Refused (ValueError)
    when the schema allows fewer participations (retiring examples would leave steps k b ..
    n - 1 empty, as for ``cyclic_batches``). The bins are random, so a step's batch may be empty,
    but no step is structurally empty: any example may land in any bin.
    """
    p = check_participation(participation)
    d = _positive_int("dataset_size", dataset_size)
    b, k, rounds = p.min_sep, p.max_participations, -(-p.n // p.min_sep)
    if k < rounds:
        raise ValueError(
            f"balls-in-bins over min_sep={b} bins puts each example in steps c, c + {b}, ... : up to "
            f"ceil(n / min_sep) = {rounds} times for n={p.n}, more than max_participations={k}. "
            f"Use n <= {k * b} steps, max_participations >= {rounds} or min_sep >= {-(-p.n // k)}"
        )
    bins = np.random.default_rng(_seed_seq(seed, 3)).integers(0, b, size=d)
    members, member_mask = _group_table(bins, b)
    step_group = np.arange(p.n) % b
    return _finish(
        p, sampler="balls-in-bins", seed=seed, dataset_size=d, indices=members[step_group],
        mask=member_mask[step_group], groups=bins, sampling_probability=1.0, batch_size=None,
        max_batch_sizes=np.full(p.n, d),
    )


def b_min_sep_probability(dataset_size: int, batch_size: int, min_sep: int) -> float:
    """p = batch_size / (dataset_size - (min_sep - 1) batch_size): the b-min-sep coin whose
    long-run expected batch is batch_size (an example takes part in a fraction
    1 / (b - 1 + 1 / p) of the steps). Must lie in (0, 1); p = 1 (dataset_size = b batch_size)
    is deterministic and leaves the steps between 0, b, 2b, ... empty, so it is refused too."""
    d = _positive_int("dataset_size", dataset_size)
    m = _positive_int("batch_size", batch_size)
    b = _positive_int("min_sep", min_sep)
    room = d - (b - 1) * m
    if room <= m:
        raise ValueError(
            f"batch_size={m} is too large for b-min-sep sampling with min_sep={b} over dataset_size={d}: "
            f"an example takes part in at most 1 of every {b} steps, so the expected batch is below "
            f"dataset_size / min_sep = {d / b:.6g} (the coin p = batch_size / (dataset_size - (min_sep - 1) "
            f"batch_size) must be < 1)"
        )
    return m / room


def b_min_sep_batches(
    dataset_size: int,
    participation: Participation,
    batch_size: int,
    seed: int = 0,
) -> BatchPlan:
    """b-min-sep sampling (b = min_sep; arXiv:2602.09338, module doc): each example, at each step
    at which it took part in none of the previous b - 1 steps, takes part with probability
    p = ``b_min_sep_probability(dataset_size, batch_size, b)``, independently of everything else.

    Drawn per example as a renewal process (the same law as one coin per eligible step): the
    first participation is at G_1 - 1 and each next one at s + b - 1 + G_j, the G_j i.i.d.
    Geometric(p) on {1, 2, ...}. Under k < ceil(n / b) an example is retired after its k-th
    participation. The capacity is the largest realised batch.
    """
    p = check_participation(participation)
    d = _positive_int("dataset_size", dataset_size)
    b = p.min_sep
    prob = b_min_sep_probability(d, batch_size, b)
    rng = np.random.default_rng(_seed_seq(seed, 4))
    rounds = -(-p.n // b)  # the most participations n steps allow
    chunk = max(1, (1 << 22) // rounds)
    steps_parts, example_parts = [], []
    for start in range(0, d, chunk):
        ex = np.arange(start, min(d, start + chunk))
        waits = rng.geometric(prob, size=(ex.size, rounds))
        # s_1 = G_1 - 1, s_{j+1} = s_j + (b - 1) + G_{j+1}
        s = np.cumsum(waits + (b - 1), axis=1) - b
        keep = s < p.n
        steps_parts.append(s[keep])
        example_parts.append(np.broadcast_to(ex[:, None], s.shape)[keep])
    steps = np.concatenate(steps_parts)
    examples = np.concatenate(example_parts)
    indices, mask = _table(steps, examples, p.n)
    return _finish(
        p, sampler="b-min-sep", seed=seed, dataset_size=d, indices=indices, mask=mask,
        groups=np.zeros(d, dtype=np.int64), sampling_probability=prob, batch_size=int(batch_size),
        max_batch_sizes=np.full(p.n, d),
    )


def from_identity(identity: PlanIdentity | Mapping[str, Any]) -> BatchPlan:
    """The plan a saved identity describes, rebuilt by its sampler; refused (ValueError) unless the
    rebuilt plan's digest matches (the sampler changed since the identity was saved)."""
    if not isinstance(identity, PlanIdentity):
        identity = PlanIdentity.from_dict(identity)
    if identity.sampler == "cyclic":
        plan = cyclic_batches(identity.dataset_size, identity.participation, identity.seed)
    elif identity.sampler == "balls-in-bins":
        plan = balls_in_bins_batches(identity.dataset_size, identity.participation, identity.seed)
    else:
        if identity.batch_size is None:
            raise ValueError(f"a saved {identity.sampler} identity needs its batch_size, got None")
        sampler = {"cyclic-poisson": cyclic_poisson_batches, "poisson": poisson_batches,
                   "b-min-sep": b_min_sep_batches}[identity.sampler]
        plan = sampler(identity.dataset_size, identity.participation, identity.batch_size, identity.seed)
    plan.check_resume(identity)
    return plan


def pack(plan: BatchPlan, capacity: int | None = None) -> BatchPlan:
    """The same plan with each step's real slots moved to the front and the capacity cut to the
    largest batch the plan actually holds (at least 1).

    Every step keeps exactly the same set of examples, so the schema and the sampling
    distribution are unchanged; only the padding shrinks (for Poisson sampling from a large group,
    from the group size to about q * group + a few standard deviations). The capacity then
    depends on the sampled batch sizes (never on the data): normalise updates by
    ``expected_batch_size``, not by the capacity. ``capacity`` fixes a larger common shape (e.g.
    the largest over several seeds, for one compilation); one below a batch is refused, never
    truncated.
    """
    mask = np.asarray(plan.mask, dtype=bool)
    largest = max(int(mask.sum(axis=1).max(initial=0)), 1)
    if capacity is None:
        capacity = largest
    elif capacity < largest:
        raise ValueError(f"capacity={capacity} is smaller than the plan's largest batch ({largest}); "
                         "packing never drops examples")
    order = np.argsort(~mask, axis=1, kind="stable")  # real slots first, in their original order
    if capacity > order.shape[1]:  # widen with padding slots
        extra = capacity - order.shape[1]
        mask = np.concatenate([mask, np.zeros((mask.shape[0], extra), bool)], axis=1)
        plan = dataclasses.replace(plan, indices=np.concatenate(
            [np.asarray(plan.indices), np.zeros((mask.shape[0], extra), np.int32)], axis=1))
        order = np.argsort(~mask, axis=1, kind="stable")
    order = order[:, :capacity]
    indices = np.take_along_axis(np.asarray(plan.indices), order, axis=1)
    new_mask = np.take_along_axis(mask, order, axis=1)
    indices = np.where(new_mask, indices, 0).astype(np.int32)
    return dataclasses.replace(plan, indices=indices, mask=new_mask)


# The kinds of violation ``check`` reports, each counted separately in ``PlanCheck.counts``.
KINDS = {
    "steps": "plan of the wrong number of steps",
    "index": "slots holding an example index outside [0, dataset_size)",
    "count": "examples taking part more than max_participations times",
    "repeat": "repeats of an example within one step",
    "gap": "pairs of consecutive steps of one example closer than min_sep",
    "residue": "pairs of consecutive steps of one example in different residue classes mod min_sep",
    "empty": "structurally empty steps",
    "sampler": "participations the plan's sampler cannot produce",
}


@dataclasses.dataclass(frozen=True)
class PlanCheck:
    """The result of ``check``: ``ok``, one line per violation (the first ``limit``, then a line
    counting the rest), and ``counts``: the number of violations of each kind in ``KINDS``
    (kinds without violations are left out)."""

    ok: bool
    violations: tuple[str, ...]
    max_participations: int
    min_gap: int | None  # least distance between two steps of one example (None: nobody repeats)
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict, hash=False)
    participation: Participation | None = None

    @property
    def summary(self) -> str:
        """One line: which schema is broken and how often, by kind."""
        if self.ok:
            return "batch plan honours the participation schema"
        parts = ", ".join(f"{KINDS[k]}: {c}" for k, c in self.counts.items())
        where = f" {self.participation}" if self.participation is not None else ""
        return f"batch plan breaks the participation schema{where}: {parts}"

    def raise_if_invalid(self) -> None:
        if not self.ok:
            raise ValueError(self.summary + "\n" + "\n".join(self.violations))


def check(
    plan: BatchPlan, participation: Participation, limit: int = 20, *, raise_on_error: bool = True
) -> PlanCheck:
    """Scans every (step, example) of ``plan`` against the schema p = (n, k, b).

    With each example's real steps s_1 <= s_2 <= ... (i.e. its pattern), a plan is valid iff it
    has n steps, every index lies in [0, dataset_size), and for every example: at most k steps
    ("count"), no step twice ("repeat": s_{i+1} = s_i), consecutive steps at least b apart ("gap":
    0 < s_{i+1} - s_i < b), and for a cyclic schema all steps in one residue class mod b
    ("residue": s_{i+1} != s_i mod b); and no step is structurally empty ("empty":
    ``max_batch_sizes[t] == 0``, or for a plan without them no real slot at step t): a step no
    example can take part in trains on noise alone. Each kind is counted in ``counts``.

    Raises ValueError (a one-line summary, then the first ``limit`` violations) unless the plan is
    valid; with ``raise_on_error=False`` returns the ``PlanCheck`` instead.
    """
    p = check_participation(participation)
    indices = np.asarray(plan.indices)
    mask = np.asarray(plan.mask, dtype=bool)
    if indices.shape != mask.shape or indices.ndim != 2:
        raise ValueError(f"plan indices {indices.shape} and mask {mask.shape} must be the same 2-d shape")
    violations: list[str] = []
    counts: dict[str, int] = {}

    def report(kind: str, number: int, lines: Iterator[str]) -> None:
        # Count every violation, but format only the first ``limit`` (a badly broken plan of a
        # large dataset can have millions).
        if number:
            counts[kind] = counts.get(kind, 0) + int(number)
            for line in lines:
                if len(violations) >= limit:
                    break
                violations.append(line)

    if indices.shape[0] != p.n:
        report("steps", 1, iter([f"the plan has {indices.shape[0]} steps but the schema has n={p.n}"]))
    steps, _ = np.nonzero(mask)
    examples = indices[mask].astype(np.int64)
    outside = (examples < 0) | (examples >= plan.dataset_size)
    if outside.any():
        report("index", int(outside.sum()), (
            f"example index {e} (step {t}) is outside [0, dataset_size={plan.dataset_size})"
            for e, t in zip(examples[outside], steps[outside])))
        steps, examples = steps[~outside], examples[~outside]
    order = np.argsort(examples, kind="stable")  # by example, then step (np.nonzero is in step order)
    steps, examples = steps[order], examples[order]
    per_example = np.bincount(examples, minlength=max(plan.dataset_size, 1))
    worst = int(per_example.max()) if per_example.size else 0
    too_many = np.flatnonzero(per_example > p.max_participations)
    report("count", too_many.size, (
        f"example {e} takes part {per_example[e]} times (steps {_steps_of(int(e), steps, examples)}), "
        f"more than max_participations={p.max_participations}" for e in too_many))
    same = examples[1:] == examples[:-1]
    diff = np.diff(steps)
    gaps = diff[same]
    min_gap = int(gaps.min()) if gaps.size else None
    repeat = np.flatnonzero(same & (diff == 0))
    report("repeat", repeat.size, (
        f"example {examples[i]} takes part twice in step {steps[i]}" for i in repeat))
    close = np.flatnonzero(same & (diff > 0) & (diff < p.min_sep))
    report("gap", close.size, (
        f"example {examples[i]} takes part in steps {steps[i]} and {steps[i + 1]}, closer than "
        f"min_sep={p.min_sep}" for i in close))
    if p.cyclic:
        mixed = np.flatnonzero(same & (steps[1:] % p.min_sep != steps[:-1] % p.min_sep))
        report("residue", mixed.size, (
            f"example {examples[i]} takes part in steps {steps[i]} and {steps[i + 1]}, of different "
            f"residues mod min_sep={p.min_sep}: not a cyclic pattern" for i in mixed))
    _check_sampler(plan, steps, examples, same, diff, report)
    if plan.max_batch_sizes is None:
        reach = mask.sum(axis=1)
    else:
        reach = np.asarray(plan.max_batch_sizes)
        if reach.shape != (indices.shape[0],):
            raise ValueError(f"plan max_batch_sizes {reach.shape} must have one entry per step "
                             f"({indices.shape[0]},)")
    empty = np.flatnonzero(reach == 0)
    report("empty", empty.size, (
        f"step {t} is structurally empty: no example can take part in it" for t in empty))
    total = sum(counts.values())
    if total > len(violations):
        violations.append(f"({total - len(violations)} more violations not listed)")
    result = PlanCheck(ok=total == 0, violations=tuple(violations), max_participations=worst, min_gap=min_gap,
                       counts=counts, participation=p)
    if raise_on_error:
        result.raise_if_invalid()
    return result


def _check_sampler(plan: BatchPlan, steps: np.ndarray, examples: np.ndarray, same: np.ndarray, diff: np.ndarray,
                   report: Any) -> None:
    """The part of the plan's own sampler's definition a plan can show (``steps``/``examples``
    sorted by example, then step; ``same``/``diff`` their consecutive comparisons).

    balls-in-bins: example e takes part in exactly the steps t < n with t = groups[e] mod min_sep,
    every one of them. b-min-sep: consecutive participations of one example at least the plan's
    min_sep apart, whatever schema the plan is checked against. Poisson and cyclic samplers: their
    coins leave nothing more to check on one plan (their sample statistics are tested instead)."""
    b = max(int(plan.min_sep), 1)
    if plan.sampling == "balls-in-bins":
        groups = np.asarray(plan.groups, dtype=np.int64)
        if groups.shape != (plan.dataset_size,):
            report("sampler", 1, iter([f"a balls-in-bins plan needs one bin per example: groups has shape "
                                       f"{groups.shape}, dataset_size={plan.dataset_size}"]))
            return
        wrong = np.flatnonzero(steps % b != groups[examples])
        report("sampler", wrong.size, (
            f"example {examples[i]} takes part in step {steps[i]}, outside its bin {groups[examples[i]]} "
            f"(mod min_sep={b})" for i in wrong))
        n = int(plan.indices.shape[0])
        want = np.maximum(0, -(-(n - groups) // b))  # |{t < n : t = c mod b}| for bin c
        got = np.bincount(examples, minlength=plan.dataset_size)
        missing = np.flatnonzero(got != want)
        report("sampler", missing.size, (
            f"example {e} takes part {got[e]} times, but balls-in-bins puts it in all {want[e]} steps of "
            f"bin {groups[e]}" for e in missing))
    elif plan.sampling == "b-min-sep":
        close = np.flatnonzero(same & (diff > 0) & (diff < b))
        report("sampler", close.size, (
            f"example {examples[i]} takes part in steps {steps[i]} and {steps[i + 1]}, closer than the "
            f"b-min-sep sampler's min_sep={b}" for i in close))


def _finish(
    p: Participation,
    *,
    sampler: str,
    seed: int,
    dataset_size: int,
    indices: np.ndarray,
    mask: np.ndarray,
    groups: np.ndarray,
    sampling_probability: float,
    batch_size: int | None,
    max_batch_sizes: np.ndarray | None,
) -> BatchPlan:
    """The one way every sampler returns a plan: retire each example after its k-th participation
    (in step order), stamp the identity, and ``check`` the result against the schema, so a plan
    that breaks it is refused (ValueError), never returned.

    ``max_batch_sizes``: the most examples any draw of the sampler's coins can put in each step
    (retirement included); None for a deterministic plan, whose realised batch sizes after
    retirement it then is."""
    indices = np.asarray(indices, dtype=np.int32)
    mask = _retire(indices, np.asarray(mask, dtype=bool), p.max_participations)
    if max_batch_sizes is None:
        max_batch_sizes = mask.sum(axis=1)
    identity = PlanIdentity(
        sampler=sampler, seed=_nonneg_int("seed", seed), dataset_size=int(dataset_size), participation=p,
        batch_size=batch_size, sampling_probability=float(sampling_probability),
        digest=_digest(indices, mask, dataset_size),
    )
    plan = BatchPlan(
        indices=np.where(mask, indices, 0).astype(np.int32), mask=mask, dataset_size=int(dataset_size),
        min_sep=p.min_sep, sampling=sampler, sampling_probability=float(sampling_probability), groups=groups,
        max_batch_sizes=np.asarray(max_batch_sizes, dtype=np.int64), identity=identity,
    )
    result = check(plan, p, raise_on_error=False)
    if not result.ok:
        raise ValueError(f"{sampler} sampling cannot honour {p} with dataset_size={dataset_size}: "
                         + result.summary + "\n" + "\n".join(result.violations))
    return plan


def _retire(indices: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """``mask`` with every real participation after an example's k-th (in step order) masked out."""
    steps, slots = np.nonzero(mask)  # row-major: in step order
    examples = indices[steps, slots].astype(np.int64)
    if examples.size == 0 or np.bincount(examples - examples.min()).max() <= k:
        return mask  # nobody over k (the usual case): skip the sort
    order = np.argsort(examples, kind="stable")  # by example, steps still in order within one
    sorted_examples = examples[order]
    starts = np.flatnonzero(np.r_[True, sorted_examples[1:] != sorted_examples[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, sorted_examples.size]))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - run_start  # 0 for an example's first participation
    late = rank >= k
    out = mask.copy()
    out[steps[late], slots[late]] = False
    return out


def _digest(indices: np.ndarray, mask: np.ndarray, dataset_size: int) -> str:
    """sha256 (hex) of the little-endian int64 sequence n, dataset_size, |B_0|, ..., |B_{n-1}|,
    then the examples of each batch B_t (real slots of step t) in increasing order, step by step."""
    mask = np.asarray(mask, dtype=bool)
    real_first = np.sort(np.where(mask, np.asarray(indices, dtype=np.int64), np.iinfo(np.int64).max), axis=1)
    sizes = mask.sum(axis=1)
    keep = np.arange(mask.shape[1])[None, :] < sizes[:, None]
    h = hashlib.sha256()
    h.update(np.array([mask.shape[0], int(dataset_size)], dtype="<i8").tobytes())
    h.update(sizes.astype("<i8").tobytes())
    h.update(real_first[keep].astype("<i8").tobytes())
    return h.hexdigest()


# -- helpers --------------------------------------------------------------------------------------
def _group_table(groups: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, capacity) members of each group, padded with 0, and the matching mask."""
    sizes = np.bincount(groups, minlength=b)
    capacity = max(int(sizes.max()), 1)
    order = np.argsort(groups, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    members = np.zeros((b, capacity), dtype=np.int32)
    mask = np.arange(capacity)[None, :] < sizes[:, None]
    rows = np.repeat(np.arange(b), sizes)
    cols = np.arange(groups.size) - np.repeat(starts, sizes)
    members[rows, cols] = order
    return members, mask


def _uniform_subsets(sizes: np.ndarray, d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(steps, examples): for each step t a uniformly random subset of [0, d) of size sizes[t].

    Draws with replacement, drops repeats within a step and draws the shortfall again until every
    step has its size. Every step of this procedure treats the d labels alike, so the final
    subset is uniform among those of its size (and the steps are independent)."""
    n = sizes.size
    keys = np.zeros(0, dtype=np.int64)  # t * d + e, unique
    missing = sizes.astype(np.int64)
    while missing.sum():
        t = np.repeat(np.arange(n), missing)
        keys = np.sort(np.concatenate([keys, t * d + rng.integers(0, d, size=t.size)]))
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]]  # (sort + diff: np.unique is far slower here)
        missing = sizes - np.bincount(keys // d, minlength=n)
    return keys // d, keys % d


def _table(steps: np.ndarray, examples: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, capacity) indices and mask holding example ``examples[i]`` at step ``steps[i]``, each
    step's examples in increasing order; capacity = the largest batch (at least 1)."""
    steps = np.asarray(steps, dtype=np.int64)
    examples = np.asarray(examples, dtype=np.int64)
    width = int(examples.max(initial=0)) + 1
    keys = np.sort(steps * width + examples)  # one int64 sort: by step, then example
    steps, examples = keys // width, keys % width
    sizes = np.bincount(steps, minlength=n)
    capacity = max(int(sizes.max(initial=0)), 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slots = np.arange(steps.size) - np.repeat(starts, sizes)
    indices = np.zeros((n, capacity), dtype=np.int32)
    mask = np.zeros((n, capacity), dtype=bool)
    indices[steps, slots] = examples
    mask[steps, slots] = True
    return indices, mask


def _steps_of(e: int, steps: np.ndarray, examples: np.ndarray) -> list[int]:
    """The first steps of example e (``examples`` sorted, ``steps`` sorted within each example)."""
    lo, hi = np.searchsorted(examples, [e, e + 1])
    return [int(s) for s in steps[lo : min(hi, lo + 10)]]


def _seed_seq(seed: int, stream: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([_nonneg_int("seed", seed), stream])


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


__all__ = [
    "KINDS",
    "SAMPLERS",
    "BatchPlan",
    "PlanCheck",
    "PlanIdentity",
    "assign_groups",
    "b_min_sep_batches",
    "b_min_sep_probability",
    "balls_in_bins_batches",
    "check",
    "cyclic_batches",
    "cyclic_poisson_batches",
    "from_identity",
    "pack",
    "poisson_batches",
    "sampling_probability",
    "schedule",
]
