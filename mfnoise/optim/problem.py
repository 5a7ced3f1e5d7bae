"""Optimization problems for strategy families, one module per family.

Each module ``mfnoise.optim.<family>`` provides

    problem(workload, participation, *, objective="rmse" | "max", bands=None, buffers=None,
            init=None) -> Problem

whose minimiser gives a strategy valid for ``participation``. ``mfnoise.optimize`` runs the
quasi-Newton method on it; the final strategy's sensitivity and error are always recomputed by the
foundation's exact routines (``mfnoise.strategies.error.evaluate``), never taken from the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload
from mfnoise.strategies.base import Strategy

OBJECTIVES = ("rmse", "max")


@dataclasses.dataclass(frozen=True)
class Problem:
    """min_x loss(x) over a flat float64 vector x (optionally within box ``bounds``).

    Attributes:
      x0: initial parameters, float64 of shape (m,).
      value_and_grad: x -> (loss, dloss/dx); jittable JAX in float64 (call it inside
        ``jax.enable_x64(True)``). The loss is any increasing function of the objective.
      to_strategy: x (numpy) -> the Strategy it parametrises.
      bounds: (lower, upper) arrays of shape (m,) for box-constrained methods, or None.
      name: a short description for progress output.
    """

    x0: np.ndarray
    value_and_grad: Callable
    to_strategy: Callable[[np.ndarray], Strategy]
    bounds: tuple[np.ndarray, np.ndarray] | None = None
    name: str = ""


def check_arguments(workload: Workload, participation: Participation, objective: str) -> int:
    """The common checks of every ``problem``: matching n and a known objective; returns n."""
    if participation.n != workload.n:
        raise ValueError(f"participation has n={participation.n} but the workload has n={workload.n}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be 'rmse' or 'max', got {objective!r}")
    return workload.n
