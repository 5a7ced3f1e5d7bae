"""The optimization ``Problem`` and the registry of problem builders, one per strategy family.

A family's loss module (``mfnoise.optim.<family>``) provides a builder

    problem(workload, participation, *, objective="rmse", bands=None, buffers=None,
            init=None) -> Problem

(``objective``: a name in ``OBJECTIVES``, "rmse", "max", "last-iterate", or a
``mfnoise.optim.objectives.Weighted``; see that module for what each means and how a family
supports it; a family refuses one it does not support, naming it)

and registers it here under the family's name (``register``), so that the solver
(``mfnoise.optim.solver``) and the command line know the families without naming them. The
minimiser of the problem's loss gives a strategy valid for ``participation``; the final
strategy's sensitivity and error are always recomputed by the foundation's exact routines
(``mfnoise.strategies.error.evaluate``), never taken from the loss. One family vocabulary is used
everywhere (docs/design.md, "Architecture: layers"): the names here are the strategy families'
names (``toeplitz`` is banded Toeplitz when ``bands`` is given); a few older names are accepted as
deprecated aliases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload
from mfnoise.optim import objectives
from mfnoise.strategies.base import Strategy

if TYPE_CHECKING:
    from mfnoise.optim.result import OptimizeResult

OBJECTIVES = objectives.OBJECTIVES

FAST_COMPILE: Mapping[str, Any] = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""XLA CPU options for losses whose graphs are small and cheap to run (Toeplitz, BLT), where
compiling dominates a run: about 2x faster to compile, the same speed to run."""


def _single_stage(x: np.ndarray, stage: int) -> Sequence[np.ndarray]:
    raise ValueError(f"this problem has one stage (asked for the starts of stage {stage})")


def _no_details(x: np.ndarray, result: OptimizeResult) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Problem:
    """min_x loss(x) over a flat float64 vector x (optionally within box ``bounds``).

    Every field but the first three has a default that suits a plain one-stage problem whose
    loss is all the solver reports; a family's builder sets the ones its problem needs.

    Attributes:
      x0: initial parameters, float64 of shape (m,).
      value_and_grad: x -> (loss, dloss/dx); jittable JAX in float64 (call it inside
        ``jax.enable_x64(True)``). The loss is any increasing function of the objective.
      to_strategy: x (numpy) -> the Strategy it parametrises.
      bounds: (lower, upper) arrays of shape (m,) for box-constrained methods, or None.
      name: a short description for progress output and the report.
      stages: the problem is solved in this many rounds; round s > 1 starts from each point of
        ``next_stage(best x so far, s)``, and the best point over all rounds is the result.
      next_stage: (best x, stage) -> the starting points of that stage (used when stages > 1).
      objective_from_loss: loss -> the objective's value (``objectives``) it stands for, or what it
        certifies about it (the dense dual: a lower bound); None when the loss history is all
        the report gives (``OptimizeResult.objective_history`` is then None).
      extra_report: (best x, result) -> family-specific report entries
        (``OptimizeResult.details``; the dense dual: its bound and the duality gap).
      cpu_compiler_options: XLA compiler options for the jitted loss on the CPU backend, or None.
      single_threaded_blas: run the optimization, the map back and the evaluation with a
        single-threaded BLAS (the dense family's O(n^3) LAPACK calls: a second thread gains
        little and loses much when other work shares the cores).
      method: the solver method that ``optimize(method="auto")`` runs (``mfnoise.optim.solver``):
        "scipy" (L-BFGS-B), or "lbfgs" for a problem of few parameters and no bounds, whose
        iterations cost less than scipy's wrapper around them (and its import).
      formulation: which formulation of its family's problem this is, where a family has several
        (the dense family: "primal" or "dual"), else None.
    """

    x0: np.ndarray
    value_and_grad: Callable[[Any], Any]
    to_strategy: Callable[[np.ndarray], Strategy]
    bounds: tuple[np.ndarray, np.ndarray] | None = None
    name: str = ""
    stages: int = 1
    next_stage: Callable[[np.ndarray, int], Sequence[np.ndarray]] = _single_stage
    objective_from_loss: Callable[[float], float] | None = None
    extra_report: Callable[[np.ndarray, OptimizeResult], dict[str, Any]] = _no_details
    cpu_compiler_options: Mapping[str, Any] | None = None
    single_threaded_blas: bool = False
    formulation: str | None = None
    method: str = "scipy"

    def __post_init__(self) -> None:
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"stages must be a positive integer, got {self.stages!r}")
        if self.method not in ("scipy", "lbfgs", "optax"):
            raise ValueError(f"method must be 'scipy', 'lbfgs' or 'optax', got {self.method!r}")


def check_arguments(workload: Workload, participation: Participation, objective: objectives.Objective,
                    supported: tuple[str, ...] = ("rmse", "max")) -> int:
    """The common checks of every builder: matching n and a known objective that the family
    supports (``supported``: names from ``OBJECTIVES``, "weighted" for a ``Weighted``; a family opts
    in to each), ValueError naming it otherwise; returns n."""
    if participation.n != workload.n:
        raise ValueError(f"participation has n={participation.n} but the workload has n={workload.n}")
    objectives.check(objective, workload.n)
    if objectives.name(objective) not in supported:
        raise ValueError(f"this family supports the objectives {supported}, got {objective!r}")
    return workload.n


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """The BLAS limited to one thread for the duration (threadpoolctl, a dependency).

    L-BFGS-B's BLAS calls are on vectors of a few thousand entries, where threads only add
    hand-off latency, and the dense family's LAPACK calls lose far more to a busy second core
    than they gain from a quiet one. Without threadpoolctl (a stripped install) the BLAS keeps
    its own threading. threadpoolctl limits only the BLAS libraries loaded when it is entered, and
    scipy's wheels bundle their own OpenBLAS, so scipy.linalg (which scipy.optimize loads too) is
    loaded first: importing it lazily inside the limited block would leave its BLAS multi-threaded."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS before the limit is set)

    with threadpool_limits(1, user_api="blas"):
        yield


# -- the registry ---------------------------------------------------------------------------------
class ProblemBuilder(Protocol):
    """What a family registers: the builder of its problem."""

    def __call__(self, workload: Workload, participation: Participation, *, objective: objectives.Objective = ...,
                 bands: int | None = ..., buffers: int | None = ..., init: Any = ...) -> Problem: ...


_BUILDERS: dict[str, ProblemBuilder] = {}
_ALIASES: dict[str, str] = {}


def register(family: str, builder: ProblemBuilder, *, deprecated_aliases: Sequence[str] = ()) -> None:
    """Registers ``builder`` as the problem of ``family`` (a strategy family's name), and older
    names for it that are still accepted with a DeprecationWarning."""
    for name in (family, *deprecated_aliases):
        if name in _BUILDERS or name in _ALIASES:
            raise ValueError(f"family {name!r} is already registered")
    _BUILDERS[family] = builder
    _ALIASES.update(dict.fromkeys(deprecated_aliases, family))


def families() -> tuple[str, ...]:
    """The registered families' names, sorted."""
    return tuple(sorted(_BUILDERS))


def deprecated_aliases() -> dict[str, str]:
    """Older family names still accepted: alias -> the family's name."""
    return dict(_ALIASES)


def family_name(family: str) -> str:
    """The registered family that ``family`` names: itself, or the family of a deprecated alias
    (with a DeprecationWarning). ValueError naming the families if it is neither."""
    if family in _BUILDERS:
        return family
    if family in _ALIASES:
        name = _ALIASES[family]
        warnings.warn(f"family {family!r} is deprecated: use {name!r}", DeprecationWarning, stacklevel=3)
        return name
    raise ValueError(f"unknown family {family!r}: expected one of {list(families())}")


def builder(family: str) -> ProblemBuilder:
    """The problem builder of a registered family (or of a deprecated alias, with a warning)."""
    return _BUILDERS[family_name(family)]
