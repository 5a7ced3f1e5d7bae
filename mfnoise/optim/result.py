"""``OptimizeResult``: what ``mfnoise.optimize`` reports about a run, as a typed record.

The numbers that describe the strategy (sensitivity, rmse, max_error) are the foundation's exact
ones (``mfnoise.strategies.error.evaluate`` on the returned strategy), never the loss's. The
loss-side numbers (history, loss, initial_loss) are the family's loss (``mfnoise.optim.problem``),
which is an increasing function of the objective; ``objective_history`` translates it where the
family says how.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import ItemsView, KeysView, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    """The report of one optimization run.

    Attributes:
      family: the strategy family optimized (its registered name, e.g. "toeplitz").
      n, max_participations, min_sep, participation: the participation schema (``kind``).
      workload: the workload's name.
      params: the strategy's parameters (``Strategy.params()``: n, and bands or buffers).
      objective: the objective's name ("rmse", "max", "last-iterate" or "weighted";
        ``mfnoise.optim.objectives``).
      method: the method that ran: "scipy" (L-BFGS-B), "lbfgs" (mfnoise.optim.lbfgs) or "optax" (optax.lbfgs).
      problem: the problem's description (``Problem.name``).
      iterations, evaluations: quasi-Newton iterations and loss evaluations, over all stages.
      history: the loss after each iteration.
      objective_history: the objective per iteration where the family's loss says how
        (``Problem.objective_from_loss``; the dense dual: its lower bound on rmse), else None.
      initial_loss, loss: the loss at the initial point and at the returned (best) point.
      converged: every start stopped on a tolerance ("tolerance" or "converged").
      stopped: why the last start stopped: "tolerance" (the objective fell by at most
        ``TOL_MARGIN * tol`` relative over the last ``tol_window`` iterations, mfnoise.optim.solver),
        "converged" (the method's own test: L-BFGS-B's per-iteration decrease or projected
        gradient), "max_iterations",
        "max_seconds", "callback", "interrupted", or the method's message.
      tol, tol_window: the tolerance the run stopped on and its window (iterations).
      stops: how many starts ended for each reason (a staged problem runs many starts: screened
        at a looser tolerance, the best one then polished at ``tol``; mfnoise.optim.solver).
      buffers_requested, buffers_kept, buffers_dropped: for families sized in buffers (BLT), the
        count asked for (the family default when None was given), the count the strategy holds,
        and what became of the others ("cancelled": a pair whose output scale is 0, exactly no
        buffer; "merged": decays equal in float64 held as one buffer); None for other families.
        ``buffers_message`` says it in words when fewer were kept.
      compile_seconds: the first loss call (tracing and compiling).
      optimize_seconds: from the call to the end of the iterations.
      seconds: the whole call, the exact evaluation included.
      sensitivity, sensitivity_exact, sensitivity_method, rmse, max_error, last_iterate_error,
        objective_value: the exact numbers of the returned strategy
        (``mfnoise.optim.objectives.evaluate``; objective_value is the objective's own error).
      details: family-specific entries (``Problem.extra_report``); the dense dual gives
        formulation, dual_bound, duality_gap (rmse / dual_bound - 1, a certificate of
        optimality) and final_relative_change.
    """

    family: str
    n: int
    max_participations: int
    min_sep: int
    participation: str
    workload: str
    params: Mapping[str, Any]
    objective: str
    method: str
    problem: str
    iterations: int
    evaluations: int
    history: tuple[float, ...]
    objective_history: tuple[float, ...] | None
    initial_loss: float
    loss: float
    converged: bool
    stopped: str | None
    compile_seconds: float
    optimize_seconds: float
    sensitivity: float
    sensitivity_exact: bool
    sensitivity_method: str
    rmse: float
    max_error: float
    seconds: float
    last_iterate_error: float = math.nan
    objective_value: float = math.nan
    tol: float = math.nan
    tol_window: int = 0
    stops: Mapping[str, int] = dataclasses.field(default_factory=dict)
    buffers_requested: int | None = None
    buffers_kept: int | None = None
    buffers_dropped: str | None = None
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        """Ctrl-C stopped the run (the strategy is the best point found before it)."""
        return self.stopped == "interrupted"

    @property
    def buffers_message(self) -> str | None:
        """E.g. "2 of 4 requested buffers kept: the others cancelled", or None when every requested
        buffer was kept (or the family has no buffers)."""
        if self.buffers_requested is None or self.buffers_kept is None:
            return None
        if self.buffers_kept >= self.buffers_requested:
            return None
        return (f"{self.buffers_kept} of {self.buffers_requested} requested buffers kept: "
                f"the others {self.buffers_dropped or 'cancelled'}")

    def summary(self) -> str:
        """A few lines for people: the strategy, its exact errors, how the run stopped (with the
        tolerance), and the buffers note when fewer buffers were kept than requested."""
        size = ", ".join(f"{k}={v}" for k, v in self.params.items() if k != "n")
        stops = ", ".join(f"{k} {v}" for k, v in sorted(self.stops.items()))
        lines = [
            f"{self.family} ({size}) for {self.workload}, n={self.n}, {self.participation} participation "
            f"(k={self.max_participations}, b={self.min_sep}), objective {self.objective}",
            f"rmse {self.rmse:.6g}, max_error {self.max_error:.6g}, sensitivity {self.sensitivity:.6g}"
            + ("" if self.sensitivity_exact else " (upper bound)"),
            f"{self.iterations} iterations, stopped: {self.stopped} (tol {self.tol:g} over {self.tol_window} "
            f"iterations{'; starts: ' + stops if stops else ''}), {self.seconds:.3g} s",
        ]
        if self.buffers_message is not None:
            lines.append(self.buffers_message)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict: every field (tuples as lists), ``interrupted``, the
        strategy's params and the details spread into it (the keys of the report dict that
        ``mfnoise.optimize`` returned before this type)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "params":
                out.update(self.params)
            elif f.name == "details":
                out.update(self.details)
            else:
                out[f.name] = _plain(getattr(self, f.name))
            if f.name == "stopped":
                out["interrupted"] = self.interrupted
            if f.name == "buffers_dropped":
                out["buffers_message"] = self.buffers_message
        return out

    # -- compatibility shim: the report used to be a dict; result["rmse"] still reads it -----------
    def __getitem__(self, key: str) -> Any:
        """``result[key]`` is ``result.to_dict()[key]`` (a compatibility shim for code written
        against the dict report; new code reads the attributes)."""
        if key in self.details:
            return self.details[key]
        if key in self.params:
            return self.params[key]
        if key in _FIELDS or key in ("interrupted", "buffers_message"):
            return _plain(getattr(self, key))
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return (key in self.details or key in self.params or key in _FIELDS
                or key in ("interrupted", "buffers_message"))

    def get(self, key: str, default: Any = None) -> Any:
        """``result.to_dict().get(key, default)`` (the compatibility shim)."""
        return self[key] if key in self else default

    def keys(self) -> KeysView[str]:
        """``to_dict().keys()`` (the compatibility shim)."""
        return self.to_dict().keys()

    def items(self) -> ItemsView[str, Any]:
        """``to_dict().items()`` (the compatibility shim)."""
        return self.to_dict().items()


_FIELDS = frozenset(f.name for f in dataclasses.fields(OptimizeResult)) - {"params", "details"}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    return list(value) if isinstance(value, tuple) else value
