"""The objectives a strategy is optimized for: which error of the trajectory A G counts.

For noise multiplier 1 and the decoder B = A C^{-1} (docs/design.md, "The mathematics"), with
sens = sens(C, p) and r_i = ||B[i, :]||_2^2 the squared error of step i's model:

    "rmse"          sens * sqrt(sum_i r_i / n)                    (every step's model alike)
    "max"           sens * sqrt(max_i r_i)                        (the worst step)
    "last-iterate"  sens * sqrt(r_{n-1})                          (the final model only: the
                                                                   reduction jax-privacy offers)
    Weighted(w)     sens * sqrt(sum_i w_i r_i / sum_i w_i)        (w >= 0, not all zero)

rmse is Weighted(ones), last-iterate is Weighted(e_{n-1}). An objective is one of the names in
``OBJECTIVES`` or a ``Weighted``; ``mfnoise.optimize(..., objective=...)`` passes it unchanged to the
family's problem builder, which checks it with ``check``.

How a family supports them. Every objective but "max" is a weighted sum of the r_i:
``row_weights`` gives the normalised w (w / sum w; None for "max"), so a family that computes the
row norms r_i (banded, dense) supports them all. A Toeplitz strategy on a Toeplitz workload has
B Toeplitz, its row i the prefix b_0..b_i of b = C^{-1} a, so r_i = sum_{j<=i} b_j^2 and

    sum_i w_i r_i = sum_j W_j b_j^2,   W_j = sum_{i>=j} w_i            (O(n); ``toeplitz_weights``)

(rmse: W_j = (n - j) / n; "max" and "last-iterate": W_j = 1, the same objective, since the rows
grow). The reported numbers are always the exact ones of ``mfnoise.strategies.error.evaluate``;
``value`` reads the objective's value from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload
from mfnoise.strategies import error
from mfnoise.strategies.base import Strategy

OBJECTIVES = ("rmse", "max", "last-iterate")
"""The named objectives; a ``Weighted`` is the one objective with data."""


class Weighted:
    """The weighted-steps objective sens * sqrt(sum_i w_i ||B[i, :]||^2 / sum_i w_i).

    ``weights``: n finite non-negative numbers, not all zero (float64, read-only); only their ratios
    matter. Weighted(np.ones(n)) is rmse; a one-hot e_{n-1} is the last-iterate error.
    """

    __slots__ = ("weights",)
    weights: np.ndarray

    def __init__(self, weights: Any) -> None:
        w = np.array(weights, dtype=np.float64)
        if w.ndim != 1 or w.size < 1:
            raise ValueError(f"Weighted weights must be a non-empty 1-D array, got shape {w.shape}")
        bad = ~(np.isfinite(w) & (w >= 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"Weighted weights must be finite and non-negative, got weights[{i}]={float(w[i])!r}")
        if not (w > 0).any():
            raise ValueError("Weighted weights are all zero: no step would count")
        w.setflags(write=False)
        object.__setattr__(self, "weights", w)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Weighted is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Weighted) and np.array_equal(self.weights, other.weights)

    __hash__ = None  # type: ignore[assignment]  # holds an array

    def __repr__(self) -> str:
        return f"Weighted(<{self.weights.size} weights>)"

    def __str__(self) -> str:
        return "weighted"


Objective = str | Weighted


def check(objective: Any, n: int) -> Objective:
    """``objective`` if it is a known objective for size n, else ValueError naming it."""
    if isinstance(objective, Weighted):
        if objective.weights.size != n:
            raise ValueError(f"Weighted objective has {objective.weights.size} weights, expected n={n}")
        return objective
    if isinstance(objective, str) and objective in OBJECTIVES:
        return objective
    raise ValueError(f"objective must be one of {OBJECTIVES} or a Weighted, got {objective!r}")


def name(objective: Objective) -> str:
    """The objective's name in reports, files and problem names ("weighted" for a Weighted)."""
    return "weighted" if isinstance(objective, Weighted) else objective


def row_weights(objective: Objective, n: int) -> np.ndarray | None:
    """w / sum(w), shape (n,), for the sum-type objectives; None for "max"."""
    objective = check(objective, n)
    if objective == "max":
        return None
    if objective == "rmse":
        return np.full(n, 1.0 / n)
    if objective == "last-iterate":
        w = np.zeros(n)
        w[-1] = 1.0
        return w
    assert isinstance(objective, Weighted)
    return objective.weights / objective.weights.sum()


def toeplitz_weights(objective: Objective, n: int) -> np.ndarray:
    """W, shape (n,), with objective^2 = sens^2 sum_j W_j b_j^2 for a Toeplitz decoder (first column b).

    W_j = sum_{i>=j} w_i / sum w (the suffix sums of ``row_weights``); "max" and "last-iterate" give
    W = 1 (the largest row of a Toeplitz B is its last).
    """
    objective = check(objective, n)
    if objective == "rmse":
        return np.arange(n, 0, -1) / n  # (n - j) / n, as the rmse of docs/design.md
    if objective in ("max", "last-iterate"):
        return np.ones(n)
    w = row_weights(objective, n)
    assert w is not None
    return np.cumsum(w[::-1])[::-1]


def evaluate(objective: Objective, strategy: Strategy, workload: Workload, p: Participation) -> dict[str, Any]:
    """``mfnoise.strategies.error.evaluate`` (sensitivity, rmse, max_error, last_iterate_error; for a
    Weighted also weighted_error) plus "objective_value": the exact value of ``objective``."""
    objective = check(objective, strategy.n)
    weights = objective.weights if isinstance(objective, Weighted) else None
    out = error.evaluate(strategy, workload, p, weights=weights)
    out["objective_value"] = value(objective, out)
    return out


def value(objective: Objective, evaluated: Mapping[str, Any]) -> float:
    """The objective's value read from ``mfnoise.strategies.error.evaluate``'s dict (a Weighted
    objective's from its "weighted_error", which ``evaluate`` gives when passed the weights)."""
    if isinstance(objective, Weighted):
        return float(evaluated["weighted_error"])
    return float(evaluated[_ERROR_KEYS[objective]])


_ERROR_KEYS = {"rmse": "rmse", "max": "max_error", "last-iterate": "last_iterate_error"}
