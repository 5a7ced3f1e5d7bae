"""Brute-force references for the batching tests, written from the schema's definition (docs/design.md)
with plain Python loops; nothing here calls mfnoise.batching."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

import numpy as np

import mfnoise
from mfnoise.core.participation import EpochsWarning


def epochs(n: int, k: int) -> mfnoise.Participation:
    """``Participation.epochs`` without its warning about k not dividing n (tested elsewhere)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EpochsWarning)
        return mfnoise.Participation.epochs(n, k)


def steps_by_example(indices, mask) -> dict[int, list[int]]:
    """The steps of each example (real slots only), in step order, by a plain scan of the plan."""
    out: dict[int, list[int]] = {}
    for t in range(len(indices)):
        for slot in range(len(indices[t])):
            if mask[t][slot]:
                out.setdefault(int(indices[t][slot]), []).append(t)
    return out


def violations(indices, mask, dataset_size: int, p: mfnoise.Participation, reach=None) -> dict[str, int]:
    """The number of violations of each kind, from the definition of a pattern of p = (n, k, b).

    steps: the plan does not have n steps (1). index: real slots outside [0, dataset_size).
    For each example with steps s_1 <= s_2 <= ...: count: more than k of them (1 per example);
    repeat: s_{i+1} == s_i; gap: 0 < s_{i+1} - s_i < b; residue (cyclic schema only):
    s_{i+1} != s_i mod b (each per consecutive pair). empty: steps no example can take part in
    (``reach[t] == 0``, or without ``reach`` a step with no real slot).
    """
    n, k, b = p.n, p.max_participations, p.min_sep
    out: Counter[str] = Counter()
    if len(indices) != n:
        out["steps"] += 1
    per: dict[int, list[int]] = {}
    for e, steps in steps_by_example(indices, mask).items():
        if 0 <= e < dataset_size:
            per[e] = steps
        else:
            out["index"] += len(steps)
    for steps in per.values():
        steps = sorted(steps)
        if len(steps) > k:
            out["count"] += 1
        for s0, s1 in itertools.pairwise(steps):
            if s1 == s0:
                out["repeat"] += 1
            elif s1 - s0 < b:
                out["gap"] += 1
            if p.cyclic and s0 % b != s1 % b:
                out["residue"] += 1
    for t in range(len(indices)):
        possible = reach[t] if reach is not None else sum(bool(m) for m in mask[t])
        if possible == 0:
            out["empty"] += 1
    return dict(out)


def plan_violations(plan, p: mfnoise.Participation, use_reach: bool = True) -> dict[str, int]:
    reach = None if (plan.max_batch_sizes is None or not use_reach) else list(plan.max_batch_sizes)
    return violations(np.asarray(plan.indices).tolist(), np.asarray(plan.mask).tolist(), plan.dataset_size, p,
                      reach)
