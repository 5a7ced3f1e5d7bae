"""Batch selection that honours a participation schema, and a check that proves it did.

A strategy's sensitivity is a privacy guarantee only if every example really takes part in a
pattern the schema allows. Two samplers, both deterministic from a seed and both returning a
``BatchPlan`` of fixed shape (n, capacity) for ``jax.jit``, padded and masked:

* ``cyclic_batches``: fixed cyclic batches for k epochs. The examples are shuffled once and split
  into b = min_sep groups (sizes differ by at most one when b does not divide the dataset; the
  smaller groups are padded and masked, so no example is dropped or repeated); step t uses
  group t mod b. Example e of group c takes part in steps {c, c + b, ...}: a cyclic pattern.
* ``cyclic_poisson_batches``: the same groups; step t includes each example of group t mod b
  independently with probability q = batch_size / (dataset_size / b) ("(Amplified) Banded Matrix
  Factorization: A unified approach to private training", Choquette-Choo et al. 2023). The
  capacity is the largest group, so nothing is ever truncated (truncation would void the
  Poisson analysis).

``pack(plan)`` moves each step's real slots to the front and cuts the padding to the largest batch
the plan holds. ``check(plan, participation)`` scans a plan and reports every example that takes part more than
k times, twice in one step, or closer than min_sep (for a cyclic schema, also outside one residue
class mod b). ``schedule(dataset_size, batch_size, epochs)`` names the schema such a plan follows.

Padded slots hold index 0 with mask False: zero their per-example gradients (multiply by the
mask) and divide by a data-independent batch size (the capacity, or the expected batch size).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from mfnoise.participation import Participation


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples each step uses.

    Attributes:
      indices: (n, capacity) int32 example indices; padded slots hold 0.
      mask: (n, capacity) bool, True where the slot holds a real participation.
      dataset_size: number of examples.
      min_sep: b, the number of groups (step t uses group t mod b).
      sampling: "cyclic" or "cyclic-poisson".
      sampling_probability: q for "cyclic-poisson", 1.0 for "cyclic".
      groups: (dataset_size,) the group of each example.
    """

    indices: np.ndarray
    mask: np.ndarray
    dataset_size: int
    min_sep: int
    sampling: str
    sampling_probability: float
    groups: np.ndarray

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.indices.shape[1])

    @property
    def expected_batch_size(self) -> float:
        """Expected number of real examples per step, averaged over steps (data-independent)."""
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
    """Fixed cyclic batches: step t uses every example of group t mod b (b = min_sep)."""
    p = _check_participation(participation)
    groups = assign_groups(dataset_size, p.min_sep, seed)
    members, member_mask = _group_table(groups, p.min_sep)
    step_group = np.arange(p.n) % p.min_sep
    return BatchPlan(
        indices=members[step_group],
        mask=member_mask[step_group],
        dataset_size=int(dataset_size),
        min_sep=p.min_sep,
        sampling="cyclic",
        sampling_probability=1.0,
        groups=groups,
    )


def cyclic_poisson_batches(
    dataset_size: int,
    participation: Participation,
    batch_size: int,
    seed: int = 0,
) -> BatchPlan:
    """Cyclic Poisson sampling: step t includes each example of group t mod b independently with
    probability q = batch_size * b / dataset_size; shape (n, largest group), masked."""
    p = _check_participation(participation)
    q = sampling_probability(dataset_size, batch_size, p.min_sep)
    groups = assign_groups(dataset_size, p.min_sep, seed)
    members, member_mask = _group_table(groups, p.min_sep)
    step_group = np.arange(p.n) % p.min_sep
    coins = np.random.default_rng(_seed_seq(seed, 1)).random((p.n, members.shape[1])) < q
    return BatchPlan(
        indices=members[step_group],
        mask=member_mask[step_group] & coins,
        dataset_size=int(dataset_size),
        min_sep=p.min_sep,
        sampling="cyclic-poisson",
        sampling_probability=q,
        groups=groups,
    )


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


@dataclasses.dataclass(frozen=True)
class PlanCheck:
    """The result of ``check``: ``ok`` and one line per violation (the first ``limit``, then a
    line counting the rest)."""

    ok: bool
    violations: tuple[str, ...]
    max_participations: int
    min_gap: int | None  # least distance between two steps of one example (None: nobody repeats)

    def raise_if_invalid(self) -> None:
        if not self.ok:
            raise ValueError("batch plan breaks the participation schema: " + "; ".join(self.violations))


def check(plan: BatchPlan, participation: Participation, limit: int = 20) -> PlanCheck:
    """Scans every (step, example) of ``plan`` against the schema.

    Reports examples that take part more than k = max_participations times, twice in one step,
    in two steps closer than min_sep, or (cyclic schema) in steps of different residues mod b;
    and a plan whose number of steps is not the schema's n.
    """
    p = _check_participation(participation)
    indices = np.asarray(plan.indices)
    mask = np.asarray(plan.mask, dtype=bool)
    violations: list[str] = []
    if indices.shape != mask.shape or indices.ndim != 2:
        raise ValueError(f"plan indices {indices.shape} and mask {mask.shape} must be the same 2-d shape")
    if indices.shape[0] != p.n:
        violations.append(f"the plan has {indices.shape[0]} steps but the schema has n={p.n}")
    steps, _ = np.nonzero(mask)
    examples = indices[mask].astype(np.int64)
    if examples.size and (examples.min() < 0 or examples.max() >= plan.dataset_size):
        bad = examples[(examples < 0) | (examples >= plan.dataset_size)][0]
        violations.append(f"example index {bad} is outside [0, dataset_size={plan.dataset_size})")
        keep = (examples >= 0) & (examples < plan.dataset_size)
        steps, examples = steps[keep], examples[keep]
    order = np.lexsort((steps, examples))  # by example, then step
    steps, examples = steps[order], examples[order]
    counts = np.bincount(examples, minlength=max(plan.dataset_size, 1))
    worst = int(counts.max()) if counts.size else 0
    total = len(violations)
    # Count every violation, but format only the first ``limit`` (a badly broken plan of a large
    # dataset can have millions).
    too_many = np.flatnonzero(counts > p.max_participations)
    total += too_many.size
    for e in too_many[: max(0, limit - len(violations))]:
        violations.append(
            f"example {e} takes part {counts[e]} times (steps {_steps_of(e, steps, examples)}), "
            f"more than max_participations={p.max_participations}"
        )
    same = examples[1:] == examples[:-1]
    gaps = np.diff(steps)[same]
    min_gap = int(gaps.min()) if gaps.size else None
    close = np.flatnonzero(same & (np.diff(steps) < p.min_sep))
    total += close.size
    for i in close[: max(0, limit - len(violations))]:
        e, s0, s1 = examples[i], steps[i], steps[i + 1]
        what = "twice in step" if s0 == s1 else "in steps"
        where = f"{s0}" if s0 == s1 else f"{s0} and {s1}"
        violations.append(f"example {e} takes part {what} {where}, closer than min_sep={p.min_sep}")
    if p.cyclic:
        mixed = np.flatnonzero(same & (steps[1:] % p.min_sep != steps[:-1] % p.min_sep))
        total += mixed.size
        for i in mixed[: max(0, limit - len(violations))]:
            violations.append(
                f"example {examples[i]} takes part in steps {steps[i]} and {steps[i + 1]}, of different "
                f"residues mod min_sep={p.min_sep}: not a cyclic pattern"
            )
    if total > len(violations):
        violations.append(f"({total - len(violations)} more violations not listed)")
    return PlanCheck(ok=total == 0, violations=tuple(violations), max_participations=worst, min_gap=min_gap)


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


def _check_participation(p: Participation) -> Participation:
    if not isinstance(p, Participation):
        raise TypeError(f"expected a Participation, got {type(p).__name__}")
    return p


__all__ = [
    "BatchPlan",
    "PlanCheck",
    "assign_groups",
    "check",
    "cyclic_batches",
    "cyclic_poisson_batches",
    "pack",
    "sampling_probability",
    "schedule",
]
