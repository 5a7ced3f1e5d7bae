"""Offline strategy optimization: ``mfnoise.optimize(workload, participation, family=...)``.

Each family's loss module (``mfnoise.optim.<family>``) registers a builder of its ``Problem``
(``mfnoise.optim.problem``): a flat float64 parameter vector, a jittable loss (an increasing
function of rmse or max_error) with its gradient, and the map back to a Strategy. Here a
quasi-Newton method minimises it, whatever the family:

* ``method="scipy"``: scipy's L-BFGS-B ("A Limited Memory Algorithm for Bound
  Constrained Optimization", Byrd, Lu, Nocedal & Zhu 1995, SIAM J. Sci. Comput. 16(5)) on the
  jitted float64 value-and-gradient; box bounds are honoured. benchmarks/optimize.py compares it
  with ``method="optax"`` (optax.lbfgs with its zoom line search, one jitted step per iteration).
* ``method="lbfgs"``: L-BFGS in numpy (``mfnoise.optim.lbfgs``: the same memory of 30 pairs and
  line-search constants as the L-BFGS-B call here, no bounds), for problems of a few dozen
  parameters, where scipy's import (0.29 s) and its per-iteration wrapper cost more than the loss
  (BLT, n = 10^7, 8 buffers, max error: 1.04 -> 0.71 s of CPU, medians of 3 fresh processes at
  load ~15; about 0.7 s on a quiet machine; benchmarks/README.md).
* ``method="auto"`` (default): the family's choice (``Problem.method``): "lbfgs" for the BLT
  family (2 * buffers parameters), "scipy" for every other. ``OptimizeResult.method`` says which ran.
* Stopping on a tolerance (``stopped == "tolerance"``): the objective (``Problem.objective_from_loss``
  of the loss where the family says how, else the loss) decreased by at most ``TOL_MARGIN * tol``
  relative over the last ``TOL_WINDOW`` iterations. The margin is there so that what is left of
  the descent is below ``tol`` (on L-BFGS's linear tail the rest is a few windows' worth: for the
  banded problem n = 4096, 32 bands, 4 epochs the stop at tol = 1e-7 is 5e-8 above the objective
  a run to L-BFGS-B's own stop reaches; tests/optim/test_solver_tolerance.py checks it against a
  run at a 10^4 times tighter tol). The default ``DEFAULT_TOL`` = 1e-7 matches what the reports print:
  6 significant digits (the CLI's table, ``OptimizeResult.summary``), whose last digit is 1e-6 to
  1e-5 relative. L-BFGS-B's own stops remain (``"converged"``: its per-iteration decrease below
  min(tol, 1e-12), or the projected gradient below ``gtol``), with ``max_iterations`` as a safety
  net only. ``OptimizeResult.tol``, ``tol_window`` and ``stops`` report them.
* Stages: a problem with ``stages`` > 1 is solved in rounds from ``next_stage``'s starts, the
  best point over all of them kept. Every start is screened at the looser ``SCREEN_TOL`` over a
  shorter window of ``SCREEN_WINDOW`` iterations: most starts of a round reach the same optimum,
  or stall where they began (a new buffer that cancels), and need not each be run to ``tol``; the
  screen only has to rank them. The best ``POLISH_STARTS`` end points of all starts (each start's
  own best point) are then polished at ``tol`` over ``TOL_WINDOW``, so that two optima closer than
  the screen can resolve are both run to ``tol``, each restarted (a fresh curvature memory) while a
  restart still gains more than ``tol``; the result is the best point seen. (BLT, n = 10^7, 8
  buffers, max error: 1986 iterations with every start screened at 1e-6 over 10 iterations, 1612
  now; on nine BLT problems the optima are within 1e-7 relative of that screen's, some lower; a
  screen at 1e-4 over 5 iterations cost 1211 but was 5e-6 worse on one: benchmarks/README.md.)
* Progress: a tqdm bar on stderr (loss, iteration) once a run has lasted ``progress_delay``
  seconds; ``callback(Progress)`` after every iteration (return True to stop); Ctrl-C stops the
  run and keeps the best strategy found so far (``OptimizeResult.interrupted``).

The returned strategy's sensitivity, rmse and max_error are always recomputed by the
foundation's exact routines (``mfnoise.strategies.error.evaluate``), never taken from the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload, parse
from mfnoise.optim import objectives
from mfnoise.optim import problem as problems
from mfnoise.optim.problem import Problem, single_threaded_blas
from mfnoise.optim.result import OptimizeResult
from mfnoise.strategies.base import Strategy

METHODS = ("auto", "scipy", "lbfgs", "optax")
DEFAULT_TOL = 1e-7
TOL_WINDOW = 10
TOL_MARGIN = 0.25
SCREEN_TOL = 1e-5
SCREEN_WINDOW = 7
POLISH_STARTS = 3
POLISH_RESTARTS = 8
FTOL_FLOOR = 1e-12
"""L-BFGS-B's ftol (per-iteration relative decrease of the loss) is min(tol, FTOL_FLOOR): the
windowed tolerance is what ``tol`` means; scipy's own test only ends a start that cannot go on."""


class Progress(NamedTuple):
    """What ``callback`` receives after each iteration."""

    iteration: int
    loss: float
    best_loss: float
    seconds: float
    x: np.ndarray


class _Window:
    """The tolerance stop of one start: the best objective of the last W + 1 iterations
    (o_k = objective(best loss within this start up to iteration k), W = ``window``, TOL_WINDOW
    unless screening); flat when |o_{k-W} - o_k| <= TOL_MARGIN tol |o_k|."""

    def __init__(self, tol: float, to_objective: Callable[[float], float] | None, window: int = TOL_WINDOW) -> None:
        self.tol = tol
        self.to_objective = to_objective
        self.window = window
        self.best = math.inf
        self.recent: list[float] = []

    def flat(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        self.best = min(self.best, loss)
        value = self.best if self.to_objective is None else self.to_objective(self.best)
        self.recent.append(value)
        if len(self.recent) <= self.window:
            return False
        del self.recent[0]
        return abs(self.recent[0] - value) <= TOL_MARGIN * self.tol * abs(value)


class _Tracker:
    """Records every evaluated point and keeps the best one (what Ctrl-C returns), and the best
    one of the current start (``begin`` starts one)."""

    def __init__(self) -> None:
        self.best_x: np.ndarray | None = None
        self.best_loss = math.inf
        self.evaluations = 0
        self.start_x: np.ndarray | None = None
        self.start_loss = math.inf

    def begin(self) -> None:
        self.start_x, self.start_loss = None, math.inf

    def see(self, x: np.ndarray, loss: float) -> None:
        self.evaluations += 1
        if math.isfinite(loss) and loss < self.start_loss:
            self.start_loss = loss
            self.start_x = np.array(x, dtype=np.float64, copy=True)
            if loss < self.best_loss:
                self.best_loss, self.best_x = loss, self.start_x


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the iterations give: the best point, its loss and how the run went."""

    x: np.ndarray
    loss: float
    initial_loss: float
    history: tuple[float, ...]
    evaluations: int
    converged: bool
    stopped: str | None
    compile_seconds: float
    stops: dict[str, int]


def optimize(
    workload: Workload | str,
    participation: Participation,
    family: str = "toeplitz",
    *,
    bands: int | None = None,
    buffers: int | None = None,
    objective: objectives.Objective = "rmse",
    init: Any = None,
    method: str = "auto",
    tol: float = DEFAULT_TOL,
    gtol: float = 1e-9,
    max_iterations: int = 20_000,
    max_seconds: float | None = None,
    callback: Callable[[Progress], bool | None] | None = None,
    progress: bool | None = None,
    progress_delay: float = 2.0,
) -> tuple[Strategy, OptimizeResult]:
    """Finds a strategy of ``family`` minimising ``objective`` for ``workload`` under ``participation``.

    Args:
      workload: a Workload (or its spec string, e.g. "prefix", "momentum:0.9") of size n.
      participation: the schema the strategy must be private for (its sensitivity is exact for it).
      family: a registered family (``mfnoise.optim.problem.families()``): "banded"
        (column-normalised BandMF), "toeplitz" (banded Toeplitz with ``bands``), "blt" or
        "dense"; "banded-toeplitz" is a deprecated alias of "toeplitz".
      bands / buffers: the size of the banded / BLT strategy (family defaults when None).
      objective: "rmse" (sens * ||A C^-1||_F / sqrt(n)), "max" (sens * max row norm),
        "last-iterate" (sens * ||(A C^-1)[n-1, :]||) or ``mfnoise.optim.objectives.Weighted(w)``,
        for the families that support it (``mfnoise.optim.objectives``).
      init: the family's initial value (see its problem module); default a closed form.
      method: "auto" (the family's ``Problem.method``: "lbfgs" for the BLT family, else "scipy"),
        "scipy" (L-BFGS-B), "lbfgs" (L-BFGS in numpy, ``mfnoise.optim.lbfgs``: for few
        parameters and no bounds) or "optax" (optax.lbfgs). The result's ``method`` is the one run.
      tol: stop a start when the objective decreased by at most ``tol`` relative over the last
        ``TOL_WINDOW`` iterations (module docstring; the default is below every printed digit).
      gtol: or when the projected gradient is below gtol.
      max_iterations, max_seconds: safety limits (the result says when one of them stopped it).
      callback: called with a Progress after each iteration; returning True stops the run.
      progress: show a progress bar on stderr (None: only once the run lasts progress_delay s).

    Returns:
      (strategy, result): the result (``OptimizeResult``) holds the run (iterations, history,
      loss, timings, why it stopped) and the exact sensitivity, rmse and max_error of the
      strategy from ``mfnoise.strategies.error.evaluate``; ``result["rmse"]`` reads it as the
      dict report did. The dense family with the rmse objective under cyclic or single
      participation is solved through its Lagrange dual (``mfnoise.optim.dense``): its loss is
      minus a lower bound on rmse^2, objective_history is that bound on rmse, and the details
      give the bound and the duality gap, a certificate of optimality.
    """
    start = time.perf_counter()
    if not isinstance(participation, Participation):
        raise TypeError(f"participation must be a Participation, got {type(participation).__name__}")
    if isinstance(workload, str):
        workload = parse(workload, participation.n)
    if workload.n != participation.n:
        raise ValueError(f"workload has n={workload.n} but participation has n={participation.n}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a non-negative finite number, got {tol!r}")
    family = problems.family_name(family)
    with jax.enable_x64(True):
        prob = problems.builder(family)(workload, participation, objective=objective, bands=bands,
                                        buffers=buffers, init=init)
    if method == "auto":
        method = prob.method
    blas = single_threaded_blas() if prob.single_threaded_blas else contextlib.nullcontext()
    with blas:
        with jax.enable_x64(True):
            kw = dict(tol=tol, gtol=gtol, max_iterations=max_iterations, max_seconds=max_seconds,
                      callback=callback, progress=progress, progress_delay=progress_delay, start=start)
            if method == "scipy":
                # L-BFGS-B's BLAS calls are on vectors of the parameters' size: one thread (set once
                # for the run; threadpoolctl's library scan costs ~1 ms, per start it was 5% of a BLT run).
                # scipy.optimize is loaded first: threadpoolctl limits only the BLAS libraries already
                # loaded, and with scipy's own OpenBLAS threaded a BLT run took 3-10x the CPU time.
                import scipy.optimize  # noqa: F401

                with single_threaded_blas():
                    run = _run_staged(_scipy_stage, prob, _jitted(prob), **kw)
            elif method == "lbfgs":
                run = _run_staged(_lbfgs_stage, prob, _jitted(prob), **kw)
            else:
                run = _run_staged(functools.partial(_optax_stage, prob=prob), prob, _jitted(prob), **kw)
        optimize_seconds = time.perf_counter() - start
        strategy = prob.to_strategy(run.x)
        exact = objectives.evaluate(objective, strategy, workload, participation)
    to_objective = prob.objective_from_loss
    result = OptimizeResult(
        family=family,
        n=participation.n,
        max_participations=participation.max_participations,
        min_sep=participation.min_sep,
        participation=participation.kind,
        workload=workload.name,
        params=strategy.params(),
        objective=objectives.name(objective),
        method=method,
        problem=prob.name,
        iterations=len(run.history),
        evaluations=run.evaluations,
        history=run.history,
        objective_history=None if to_objective is None else tuple(to_objective(v) for v in run.history),
        initial_loss=run.initial_loss,
        loss=run.loss,
        converged=run.converged,
        stopped=run.stopped,
        tol=float(tol),
        tol_window=TOL_WINDOW,
        stops=run.stops,
        compile_seconds=run.compile_seconds,
        optimize_seconds=optimize_seconds,
        sensitivity=exact["sensitivity"],
        sensitivity_exact=exact["sensitivity_exact"],
        sensitivity_method=exact["sensitivity_method"],
        rmse=exact["rmse"],
        max_error=exact["max_error"],
        last_iterate_error=exact["last_iterate_error"],
        objective_value=exact["objective_value"],
        seconds=math.nan,
    )
    details = dict(prob.extra_report(run.x, result))
    # The family's problem knows the size it was asked for (its default when None); what the
    # strategy holds can be smaller (cancelled or merged buffers).
    sizes = {key: details.pop(key) for key in ("buffers_requested", "buffers_dropped") if key in details}
    if "buffers_requested" in sizes:
        result = dataclasses.replace(result, buffers_requested=int(sizes["buffers_requested"]),
                                     buffers_kept=int(strategy.params()["buffers"]),
                                     buffers_dropped=sizes.get("buffers_dropped"))
    return strategy, dataclasses.replace(result, details=details, seconds=time.perf_counter() - start)


def _progress_bar(prob: Problem, progress: bool | None, delay: float) -> _LazyBar:
    return _LazyBar(prob.name or "optimize", progress, delay)


class _LazyBar:
    """A tqdm bar on stderr created only once it is shown: at once for progress=True, after ``delay``
    seconds for None, never for False (importing tqdm and making a bar cost more than a small run's
    iterations)."""

    def __init__(self, desc: str, progress: bool | None, delay: float) -> None:
        self.desc, self.progress, self.delay = desc, progress, delay
        self.start = time.perf_counter()
        self.count = 0
        self.bar: Any = None

    def _shown(self) -> bool:
        if self.bar is None and self.progress is not False and (
                self.progress or time.perf_counter() - self.start >= self.delay):
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=self.desc, unit="it", file=sys.stderr, leave=False, initial=self.count,
                            dynamic_ncols=True)
        return self.bar is not None

    def update(self, k: int) -> None:
        if self._shown():  # created with initial = the iterations before this one
            self.bar.update(k)
        self.count += k

    def set_postfix(self, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _jitted(prob: Problem) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """x -> (loss, gradient) as (float, float64 numpy array), through one jitted call.

    The value and the gradient come back packed in one array [loss, grad...] and x goes in as a
    numpy array: for the small losses (BLT: 16 parameters, ~70 us a call) a second device-to-host
    transfer and jnp.asarray's Python path cost more than the loss itself."""
    options = prob.cpu_compiler_options if jax.default_backend() == "cpu" else None

    def packed(x: jax.Array) -> jax.Array:
        v, g = prob.value_and_grad(x)
        return jnp.concatenate([jnp.reshape(v, (1,)).astype(jnp.float64), jnp.ravel(g).astype(jnp.float64)])

    vg = jax.jit(packed, compiler_options=None if options is None else dict(options))

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        out = np.asarray(vg(np.asarray(x, np.float64)))
        return float(out[0]), out[1:]

    return fun


_GO_ON_AFTER = ("converged", "tolerance", "max_iterations")
"""How a start may end and the run still go on to the next start (any other stop ends the run)."""


def _run_staged(runner, prob: Problem, fun, **kw) -> _Run:
    """Runs ``runner`` once per start of every stage of the problem, sharing the tracker, the
    history and the iteration budget; the best point over all of them is the result.

    With more than one start, each runs at tolerance max(tol, SCREEN_TOL) over SCREEN_WINDOW
    iterations, and the POLISH_STARTS best end points are polished at ``tol`` (one more run from
    each)."""
    tracker = _Tracker()
    history: list[float] = []
    x = np.asarray(prob.x0, np.float64)
    compile_start = time.perf_counter()
    initial_loss, _ = fun(x)  # the first call traces and compiles
    compile_seconds = time.perf_counter() - compile_start
    if not math.isfinite(initial_loss):
        raise ValueError(f"the loss of {prob.name} is not finite at its initial point (loss={initial_loss})")
    tracker.see(x, initial_loss)
    bar = _progress_bar(prob, kw.pop("progress"), kw.pop("progress_delay"))
    stopped, converged, ok = None, True, True
    stops: dict[str, int] = {}
    tol = kw.pop("tol")
    screen = prob.stages > 1 and tol < SCREEN_TOL

    ends: list[tuple[float, np.ndarray]] = []  # each screened start's best point
    to_objective = prob.objective_from_loss

    def objective(loss: float) -> float:
        return loss if to_objective is None else to_objective(loss)

    def run(x0: np.ndarray, start_tol: float, window: int) -> bool:
        nonlocal stopped, ok, converged
        tracker.begin()
        stopped, ok = runner(fun, x0, tracker, history, bar, prob.bounds,
                             window=_Window(start_tol, prob.objective_from_loss, window), tol=start_tol, **kw)
        if tracker.start_x is not None:
            ends.append((tracker.start_loss, tracker.start_x))
        converged = converged and ok
        stops[stopped] = stops.get(stopped, 0) + 1
        return stopped in _GO_ON_AFTER or ok

    try:
        go_on = True
        for stage in range(1, prob.stages + 1):
            assert tracker.best_x is not None  # the initial point is finite, so it was seen
            starts = [x] if stage == 1 else prob.next_stage(tracker.best_x, stage)
            for x in starts:  # the tracker keeps the best point over every start
                go_on = run(x, max(tol, SCREEN_TOL), SCREEN_WINDOW) if screen else run(x, tol, TOL_WINDOW)
                if not go_on:
                    break
            if not go_on:
                break
        if go_on and screen:
            # Sorted by loss only (a stable sort: the earlier of two equal ends first).
            for loss_end, x_end in sorted(ends, key=lambda e: e[0])[:POLISH_STARTS]:
                for _ in range(POLISH_RESTARTS):
                    go_on = run(x_end, tol, TOL_WINDOW)
                    if not go_on or tracker.start_x is None:
                        break
                    # L-BFGS-B's own stop can end a start in a flat valley that a fresh start (a new
                    # curvature memory) still descends: restart while that gains more than tol.
                    before, after = objective(loss_end), objective(tracker.start_loss)
                    if not abs(before - after) > tol * abs(after):
                        break
                    loss_end, x_end = tracker.start_loss, tracker.start_x
                if not go_on:
                    break
    except KeyboardInterrupt:
        stopped, converged = "interrupted", False
    finally:
        bar.close()
    assert tracker.best_x is not None
    return _Run(x=tracker.best_x, loss=tracker.best_loss, initial_loss=initial_loss, history=tuple(history),
                evaluations=tracker.evaluations, converged=converged, stopped=stopped,
                compile_seconds=compile_seconds, stops=stops)


def _report_iteration(history, bar, tracker, callback, start, max_seconds, v, x, window: _Window) -> str | None:
    history.append(v)
    bar.update(1)
    bar.set_postfix(loss=f"{v:.8g}", refresh=False)
    if callback is not None and callback(Progress(len(history), v, tracker.best_loss,
                                                  time.perf_counter() - start, np.asarray(x))):
        return "callback"
    if max_seconds is not None and time.perf_counter() - start > max_seconds:
        return "max_seconds"
    if window.flat(v):
        return "tolerance"
    return None


def _scipy_stage(fun, x0, tracker, history, bar, bounds, *, window, tol, gtol, max_iterations, max_seconds,
                 callback, start) -> tuple[str, bool]:
    """One L-BFGS-B run from x0; returns (why it stopped, converged)."""
    import scipy.optimize  # here, not at module level: the CLI reads DEFAULT_TOL without loading scipy

    stopped = None

    def f(x):
        v, g = fun(x)
        tracker.see(x, v)
        if not math.isfinite(v) or not np.all(np.isfinite(g)):
            # Outside the loss's domain (e.g. an overflowing trial step): a wall the line search backs off from.
            return 1e300, np.zeros_like(x)
        return v, g

    def cb(intermediate_result):
        nonlocal stopped
        stopped = _report_iteration(history, bar, tracker, callback, start, max_seconds,
                                    float(intermediate_result.fun), intermediate_result.x, window)
        if stopped is not None:
            raise StopIteration

    if bounds is not None:
        bounds = list(zip(np.asarray(bounds[0], np.float64), np.asarray(bounds[1], np.float64)))
    res = scipy.optimize.minimize(
        f, x0, jac=True, method="L-BFGS-B", bounds=bounds, callback=cb,
        options={"maxiter": max(1, max_iterations - len(history)), "ftol": min(tol, FTOL_FLOOR), "gtol": gtol,
                 "maxcor": 30, "maxls": 40},
    )
    if stopped == "tolerance":
        return stopped, True
    if stopped is not None:
        return stopped, False
    if res.status == 0:
        return "converged", True
    if res.status == 1:
        return "max_iterations", False
    # ABNORMAL line search at the tolerance floor: no further decrease is possible in float64.
    return str(res.message), "ABNORMAL" in str(res.message)


def _lbfgs_stage(fun, x0, tracker, history, bar, bounds, *, window, tol, gtol, max_iterations, max_seconds,
                callback, start) -> tuple[str, bool]:
    """One L-BFGS run from x0 (``mfnoise.optim.lbfgs``, numpy only); returns (why it stopped, converged)."""
    from mfnoise.optim import lbfgs

    if bounds is not None:
        raise ValueError("method 'lbfgs' has no box bounds: use method='scipy' (L-BFGS-B)")

    def on_iteration(x: np.ndarray, v: float) -> str | None:
        return _report_iteration(history, bar, tracker, callback, start, max_seconds, v, x, window)

    stopped = lbfgs.minimize(fun, x0, on_iteration=on_iteration, ftol=min(tol, FTOL_FLOOR), gtol=gtol,
                            max_iterations=max(1, max_iterations - len(history)), see=tracker.see)
    if stopped in ("tolerance", "converged", "line search"):
        # "line search": no decreasing step in float64 (L-BFGS-B's ABNORMAL at its tolerance floor).
        return stopped, True
    return stopped, False


def _optax_stage(fun_unused, x0, tracker, history, bar, bounds, *, prob, window, tol, gtol, max_iterations,
                 max_seconds, callback, start) -> tuple[str, bool]:
    """One optax.lbfgs run from x0 (a Python loop over a jitted step, for progress and Ctrl-C)."""

    step, opt = _optax_step(prob)
    x = jnp.asarray(x0, jnp.float64)
    state = opt.init(x)
    prev = math.inf
    for it in range(max(1, max_iterations - len(history)) + 1):
        x_new, state, v, g = step(x, state)
        v = float(v)
        tracker.see(np.asarray(x), v)
        if it > 0:
            why = _report_iteration(history, bar, tracker, callback, start, max_seconds, v, x, window)
            if why is not None:
                return why, why == "tolerance"
        if not math.isfinite(v):
            return "non-finite loss", False
        ftol = min(tol, FTOL_FLOOR)
        if float(jnp.max(jnp.abs(g))) <= gtol or (it > 0 and prev - v <= ftol * max(abs(v), abs(prev), 1.0)):
            return "converged", True
        prev = v
        x = x_new
    return "max_iterations", False


def _optax_step(prob: Problem):
    cached = _OPTAX_CACHE.get(id(prob))
    if cached is not None and cached[0] is prob:
        return cached[1], cached[2]
    import optax

    loss_fn = lambda x: prob.value_and_grad(x)[0]  # noqa: E731
    opt = optax.lbfgs(memory_size=30)
    lower = upper = None
    if prob.bounds is not None:
        lower = jnp.asarray(prob.bounds[0], jnp.float64)
        upper = jnp.asarray(prob.bounds[1], jnp.float64)

    @jax.jit
    def step(x, state):
        v, g = prob.value_and_grad(x)
        updates, state = opt.update(g, state, x, value=v, grad=g, value_fn=loss_fn)
        x_new = cast(jax.Array, optax.apply_updates(x, updates))
        if lower is not None:
            x_new = jnp.clip(x_new, lower, upper)  # projection: optax.lbfgs has no bounds
        return x_new, state, v, g

    _OPTAX_CACHE.clear()
    _OPTAX_CACHE[id(prob)] = (prob, step, opt)
    return step, opt


_OPTAX_CACHE: dict = {}
