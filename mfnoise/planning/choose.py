"""``mfnoise.plan``: from a privacy budget to a checked training plan, choosing the mechanism by its noise.

Candidates (docs/design.md, "Plan"), for n steps of batches of about ``batch_size`` from
``dataset_size`` examples (b = dataset_size // batch_size steps per epoch):

* ``sampling="cyclic-poisson"`` (amplified; "(Amplified) Banded Matrix Factorization: A unified
  approach to private training", Choquette-Choo et al. 2023, arXiv:2306.08153): the data split
  into ``bands`` groups, min_sep = bands, each example of group t mod bands sampled with
  q = batch_size * bands / dataset_size. One band is DP-SGD with Poisson sampling (C = I); more
  bands use BSR, the column-normalised banded square root of the workload ("Banded Square Root
  Matrix Factorization for Differentially Private Model Training", Kalinin & Lampert 2024,
  arXiv:2405.13763), bands in 2, 4, 8, ... up to b.
* ``sampling="cyclic"`` (fixed cyclic batches, unamplified: one Gaussian mechanism, "Multi-Epoch
  Matrix Factorization Mechanisms for Private Machine Learning", Choquette-Choo et al. 2023,
  arXiv:2211.06530): DP-SGD (C = I), BandMF (BSR with bands <= min_sep), BLT and banded Toeplitz
  (a library entry when the library holds this workload, n and schema, else the optimizer within
  ``optimize_seconds``), BISR (closed form).
* ``sampling="poisson"`` (amplified, every step samples each example with q = batch_size /
  dataset_size, schema Participation(n, n, 1)): BLT, banded Toeplitz and BISR (the same strategies
  as under fixed cyclic batches) priced by MMCC ("Privacy Amplification for Matrix Mechanisms",
  Choquette-Choo, Ganesh, Steinke, Thakurta, ICLR 2024, arXiv:2310.15526) through
  ``accounting.calibrate(sampling="poisson", strategy=...)``, which refuses a C with a negative entry
  (the row is listed with the reason). MMCC is expensive (minutes per calibration at n ~ 2000), so
  these candidates are evaluated only when ``mmcc_cost(n)``, a measured estimate of one calibration,
  fits ``amplification_seconds``; otherwise they are listed as "not evaluated", with the cost and the
  budget that would include them. DP-SGD under Poisson sampling is the one-band cyclic-Poisson
  candidate (the same mechanism), and BandMF stays with cyclic Poisson (amplified BandMF is exact).
  Balls-in-bins is not a candidate: its only accountant here is a Monte Carlo estimate
  (``balls_in_bins.epsilon_estimate``, provable=False), and a plan's epsilon must be a proven bound.

Each candidate is scored by the noise it puts into the training trajectory A G at this (epsilon,
delta): trajectory rmse = z * sens(C, p) * ||A C^{-1}||_F / sqrt(n) (``strategies.error.decoder_norms``
gives ||A C^{-1}||_F once per strategy, ``sensitivity`` once per schema), A the workload the
optimizer implies. Fixed cyclic candidates share one z, calibrated once (one Gaussian mechanism,
whatever C is). Amplified ones are ranked by z calibrated with dp-accounting's RDP accountant on
the integer orders ``SCREEN_ORDERS`` ("rdp-screen"); the best ``PRICED`` of them, and any other within
``SCREEN_MARGIN`` of the best score, are then calibrated by the plan's accountant, the PLD search
starting from the screened z. The plan is the lowest trajectory rmse among candidates priced by
that accountant whose noise state (``state_arrays`` parameter-sized float32 arrays) fits
``memory_budget``; its epsilon is recomputed by that accountant for its own sampling (``Plan``).

Speed (benchmarks/plan.py): the RDP screen, one calibration per shared z and one decoder norm per
strategy keep ``mfnoise plan`` for 60000 examples, batch 512, 20 epochs to seconds; progress goes
to stderr once a plan has lasted ``PROGRESS_DELAY`` seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mfnoise.core import workloads
from mfnoise.core.participation import EpochsWarning, Participation, check_participation
from mfnoise.core.workloads import Workload
from mfnoise.library.recommend import state_bytes
from mfnoise.planning.plans import SAMPLINGS, Candidate, Plan
from mfnoise.strategies.base import Strategy
from mfnoise.strategies.closed_forms import bisr, bsr
from mfnoise.strategies.identity import Identity
from mfnoise.training import accounting

_LOG = logging.getLogger("mfnoise.planning")
MECHANISMS = ("dp-sgd", "bandmf", "blt", "toeplitz", "bisr")
BLT_BUFFERS = (2, 4)
TOEPLITZ_BANDS = (16,)
BISR_BANDS = (4, 16, 64)
FIXED_BANDS = (4, 16, 64)  # BandMF under fixed cyclic batches, and min_sep itself
PRICED = 1  # amplified candidates priced by the plan's accountant after the RDP ranking, besides the margin's
# The RDP screen's orders: the integer orders of dp-accounting's default list (DEFAULT_RDP_ORDERS
# without 1.1, 1.2, ..., 10.9, whose series cost ~90% of an evaluation). Fewer orders only raise
# epsilon, so the screened z is at least the default list's: by under 0.5% at epsilon <= 8, ~4% at 16.
SCREEN_ORDERS = (*range(2, 64), 128, 256, 512, 1024)
# The screened z over PLD's varies across band counts by at most 1.7% where measured (1.047 for one
# band to 1.064 for 64 at epsilon 4, 60000 examples, batch 512, 20 epochs; spreads of 1.1% at
# epsilon 1, 1.3% at 16, 1.0% for the README's plan). A candidate screened more than this factor
# above the best overtakes it under PLD only if its ratio exceeds the best's by more than that, so
# every amplified candidate within it of the best screened score is priced by the plan's accountant.
SCREEN_MARGIN = 1.03
# Relative tolerance of a screened z (ranking only; priced z keep accounting.calibrate's tolerance).
SCREEN_RTOL = 1e-4
PROGRESS_DELAY = 2.0  # seconds before the plan says on stderr what it is doing
OPTIMIZE_SECONDS = 20.0
# The PLD grid: 10x dp-accounting's default (1e-4). Every grid gives an upper bound on epsilon; this
# one calibrates z within ~0.05% of the finer grid's (0.0225386 vs 0.0225285 for 60000 examples,
# batch 512, 20 epochs, epsilon 2) in a fraction of its time.
PLD_DISCRETIZATION = 1e-3
POISSON_MECHANISMS = ("blt", "toeplitz", "bisr")  # priced by MMCC under Poisson sampling
# Seconds of MMCC accounting the plan may spend per Poisson candidate (one calibration each): the
# default keeps `mfnoise plan` at 60000 examples / batch 512 / 20 epochs (n = 2340) to seconds by
# listing them as not evaluated there; small n (a few hundred steps) fits.
AMPLIFICATION_SECONDS = 10.0
# mmcc_cost's model, refitted after the MMCC review fixes and speed-ups (benchmarks/mmcc_cost.py,
# the fit's data in benchmarks/results/mmcc_cost.json, rows "profile" and "calibration"): one
# evaluation of a Toeplitz C (BLT, BISR, banded Toeplitz: mmcc's Toeplitz path) costs about
# MMCC_EVAL_BASE + rows * (MMCC_EVAL_PER_ROW + MMCC_EVAL_PER_ROW_N * n) + MMCC_EVAL_PER_N2 * n^2
# CPU seconds, rows = min(n, mmcc.DEFAULT_MAX_DISTINCT_ROWS) mixture PLDs (a fixed-size output grid
# each: PER_ROW), their compositions (supports ~ 1 / d ~ n: PER_ROW_N) and the lag-wise Chernoff
# tail bounds (PER_N2); measured BISR, n = 117: 7.6 s (34 rows), n = 1170: 15.4 s (41 rows), with
# stage times. A calibration takes about MMCC_EVALS evaluations (accounting.mmcc_search: 7-8
# measured at n = 117 and 1170; the former bisection took 16-19). CPU seconds, i.e. wall seconds on
# an idle core: on this shared 2-core machine under a load average L the wall time was ~L / 2 times
# that (n = 1170 at load 19: 194 s wall, 15.4 s CPU). The former model (20 evaluations of 1 + 0.08
# rows + 2e-7 n^2 s) priced n = 2000 at 113 s where 506 s was measured with the former search and
# evaluation. An estimate for deciding what to evaluate, never part of a guarantee.
MMCC_EVAL_BASE = 0.5
MMCC_EVAL_PER_ROW = 0.2
MMCC_EVAL_PER_ROW_N = 1.2e-4
MMCC_EVAL_PER_N2 = 5.6e-7
MMCC_EVALS = 8


@dataclasses.dataclass
class _Spec:
    """A candidate to evaluate: ``build()`` -> (strategy, source)."""

    mechanism: str
    sampling: str
    family: str | None
    bands: int | None
    buffers: int | None
    participation: Participation
    state_arrays: int
    build: Callable[[], tuple[Strategy, str]] | None
    dropped: str | None = None


def workload_for(optimizer: Any, n: int) -> Workload:
    """The workload A whose product A G is the trajectory the optimizer follows (docs/design.md).

    "sgd": the prefix sum; ("momentum", beta) or ("momentum", beta, learning_rates): momentum;
    an array of n learning rates: SGD with that schedule (momentum 0); a ``Workload`` of size n as is.
    """
    if isinstance(optimizer, Workload):
        if optimizer.n != n:
            raise ValueError(f"optimizer workload has n={optimizer.n}, but the plan has {n} steps")
        return optimizer
    if isinstance(optimizer, str):
        if optimizer == "sgd":
            return workloads.prefix_sum(n)
        raise ValueError(f"optimizer must be 'sgd', ('momentum', beta), a learning-rate array or a Workload, "
                         f"got {optimizer!r}")
    if isinstance(optimizer, tuple) and optimizer and optimizer[0] == "momentum":
        if len(optimizer) == 2:
            return workloads.momentum(n, float(optimizer[1]))
        if len(optimizer) == 3:
            return workloads.momentum(n, float(optimizer[1]), np.asarray(optimizer[2], np.float64))
        raise ValueError(f"optimizer=('momentum', beta[, learning_rates]), got {optimizer!r}")
    lrs = np.asarray(optimizer, dtype=np.float64) if isinstance(optimizer, (list, np.ndarray)) else None
    if lrs is not None and lrs.ndim == 1:
        if lrs.shape != (n,):
            raise ValueError(f"optimizer learning rates have shape {lrs.shape}, but the plan has {n} steps")
        return workloads.momentum(n, 0.0, lrs)
    raise ValueError(f"optimizer must be 'sgd', ('momentum', beta), a learning-rate array of the plan's {n} steps "
                     f"or a Workload, got {optimizer!r}")


def _toeplitz_proxy(w: Workload) -> Workload:
    """The Toeplitz workload closed forms are built from: w itself, else momentum with w's beta
    at a constant learning rate (the strategy is still scored on w)."""
    return w if w.is_toeplitz else workloads.momentum(w.n, w.beta or 0.0)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _schema(dataset_size: int, batch_size: int, epochs: int | None, steps: int | None) -> Participation:
    """Fixed cyclic batches: b = dataset_size // batch_size steps per epoch; n = epochs * b or ``steps``."""
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs and steps, got epochs={epochs!r}, steps={steps!r}")
    if batch_size > dataset_size:
        raise ValueError(f"batch_size={batch_size} is larger than dataset_size={dataset_size}")
    b = dataset_size // batch_size
    n = _positive_int("epochs", epochs) * b if epochs is not None else _positive_int("steps", steps)
    b = min(b, n)
    return Participation(n, -(-n // b), b, cyclic=True)


def _sizes(limit: int, grid: Sequence[int], include_limit: bool) -> list[int]:
    out = sorted({s for s in grid if s <= limit} | ({limit} if include_limit else set()))
    return out


def _library_entry(w: Workload, p: Participation, family: str, key: str, size: int) -> tuple[Strategy, str] | None:
    """The library's strategy for (workload, n, schema, family, size), or None when it holds none."""
    try:
        from mfnoise.library import index
        from mfnoise.library.specs import schema as library_schema

        found = [e for e in index.entries(workload=w.name, n=p.n, optimizer_family=family, objective="rmse")
                 if e.get(key) == size or e.get(f"requested_{key}") == size]
        found = [e for e in found if library_schema(e["n"], e["epochs"]) == p]
    except (FileNotFoundError, ValueError):
        return None
    if not found:
        return None
    e = found[0]
    return index.get(e["name"]), f"library {e['name']}"


def _optimized(w: Workload, p: Participation, family: str, key: str, size: int,
               seconds: float) -> tuple[Strategy, str]:
    entry = _library_entry(w, p, family, key, size)
    if entry is not None:
        return entry
    from mfnoise.optim.solver import optimize

    sizes: dict[str, Any] = {"bands": size} if key == "bands" else {"buffers": size}
    strategy, result = optimize(w, p, family=family, progress=False, max_seconds=seconds, **sizes)
    how = "converged" if result.converged else f"stopped ({result.stopped}) after {result.iterations} iterations"
    return strategy, f"optimize(family={family!r}, {key}={size}): {how}, {result.seconds:.1f} s"


def mmcc_cost(n: int) -> float:
    """Estimated seconds of one MMCC calibration (``accounting.calibrate(sampling="poisson")``) of a
    Toeplitz C with n steps at MMCC's default options (the model's constants above: a measured
    estimate on this machine, not a bound; the plan uses it only to decide what to evaluate)."""
    from mfnoise.training.mmcc import DEFAULT_MAX_DISTINCT_ROWS

    rows = min(n, DEFAULT_MAX_DISTINCT_ROWS)
    return MMCC_EVALS * (MMCC_EVAL_BASE + rows * (MMCC_EVAL_PER_ROW + MMCC_EVAL_PER_ROW_N * n)
                         + MMCC_EVAL_PER_N2 * n * n)


def _specs(w: Workload, p: Participation, dataset_size: int, batch_size: int, optimize_seconds: float) -> list[_Spec]:
    n, b = p.n, p.min_sep
    proxy = _toeplitz_proxy(w)

    @functools.cache
    def closed_bsr(bands: int) -> tuple[Strategy, str]:
        # one object per band count, so its decoder norm is computed once for both samplings
        return bsr(n, bands, proxy), f"closed form bsr(bands={bands})"

    specs: list[_Spec] = []
    # amplified: min_sep = bands groups, each sampled with q = batch_size * bands / dataset_size <= 1
    # bands = b (q close to 1) is fixed cyclic BandMF with b bands, listed below
    for bands in [1] + _sizes(b, [2**j for j in range(1, 31)], include_limit=False):
        if bands > n:
            continue
        pa = Participation(n, -(-n // bands), bands, cyclic=True)
        if bands == 1:
            specs.append(_Spec("dp-sgd", "cyclic-poisson", Identity.family, 1, None, pa, 0,
                               lambda: (Identity(n), "C = I, Poisson sampling")))
        else:
            specs.append(_Spec("bandmf", "cyclic-poisson", "banded", bands, None, pa, bands - 1,
                               lambda bands=bands: closed_bsr(bands)))
    for mech, why in (("blt", "a BLT is not banded"), ("bisr", "BISR's C is not banded")):
        specs.append(_Spec(mech, "cyclic-poisson", None, None, None, p, 0, None,
                           dropped=f"amplification does not apply: {why}"))
    # fixed cyclic batches: one Gaussian mechanism
    specs.append(_Spec("dp-sgd", "cyclic", Identity.family, 1, None, p, 0, lambda: (Identity(n), "C = I")))
    for bands in _sizes(b, FIXED_BANDS, include_limit=True):
        if bands > 1:
            specs.append(_Spec("bandmf", "cyclic", "banded", bands, None, p, bands - 1,
                               lambda bands=bands: _library_entry(w, p, "banded", "bands", bands)
                               or closed_bsr(bands)))
    optimized = [("blt", "buffers", d) for d in BLT_BUFFERS if d < n] + \
                [("toeplitz", "bands", s) for s in TOEPLITZ_BANDS if s <= b]
    share = optimize_seconds / max(1, len(optimized))

    @functools.cache
    def optimized_strategy(family: str, key: str, size: int) -> tuple[Strategy, str]:
        # optimized once for the fixed cyclic schema and shared with its Poisson candidate: any C is
        # valid under any schema, only its sensitivity (and so its score) is the schema's
        return _optimized(w, p, family, key, size, share)

    @functools.cache
    def closed_bisr(bands: int) -> tuple[Strategy, str]:
        return bisr(n, bands, proxy), f"closed form bisr(bands={bands})"

    poisson: list[_Spec] = []
    p_all = Participation(n, n, 1)  # Poisson sampling: any example may take part in every step
    for family, key, size in optimized:
        for spec_sampling, schema in (("cyclic", p), ("poisson", p_all)):
            (specs if spec_sampling == "cyclic" else poisson).append(_Spec(
                family, spec_sampling, family, size if key == "bands" else None, size if key == "buffers" else None,
                schema, size if key == "buffers" else size - 1,
                lambda family=family, key=key, size=size: optimized_strategy(family, key, size)))
    for bands in [s for s in BISR_BANDS if s <= n]:
        for spec_sampling, schema in (("cyclic", p), ("poisson", p_all)):
            (specs if spec_sampling == "cyclic" else poisson).append(_Spec(
                "bisr", spec_sampling, "inverse-toeplitz", bands, None, schema, bands - 1,
                lambda bands=bands: closed_bisr(bands)))
    return specs + poisson


def plan(
    epsilon: float,
    delta: float,
    *,
    dataset_size: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    optimizer: Any = "sgd",
    params: int | None = None,
    memory_budget: float | None = None,
    mechanism: str = "auto",
    sampling: str = "auto",
    accountant: str = "pld",
    l2_clip_norm: float = 1.0,
    pld_discretization: float = PLD_DISCRETIZATION,
    optimize_seconds: float = OPTIMIZE_SECONDS,
    amplification_seconds: float = AMPLIFICATION_SECONDS,
    mmcc_options: dict | None = None,
    progress: bool | Callable[[str], None] | None = None,
) -> Plan:
    """The (epsilon, delta)-DP plan with the least noise in the training trajectory (module doc).

    Args:
      epsilon, delta: the privacy budget (add or remove one example).
      dataset_size, batch_size: public; b = dataset_size // batch_size steps per epoch.
      epochs | steps: the length, n = epochs * b steps, or n = ``steps``.
      optimizer: what the trajectory is ("sgd", ("momentum", beta), an array of n learning rates,
        or a ``Workload``); it picks the workload A the candidates are scored on.
      params, memory_budget: the model's parameter count and the bytes the noise state may take
        (float32: state_arrays * params * 4); a candidate over the budget is dropped.
      mechanism: "auto" or one of ``MECHANISMS``; sampling: "auto" or one of ``SAMPLINGS``.
      accountant: "pld" (tight) or "rdp"; l2_clip_norm: the per-example clip norm.
      optimize_seconds: the optimizer's time budget over all candidates that need it.
      amplification_seconds: the MMCC accounting one Poisson candidate may cost (``mmcc_cost(n)``,
        estimated): those over it are listed as not evaluated, with the budget that includes them.
      mmcc_options: keywords of ``mfnoise.training.mmcc.epsilon`` (``pld_discretization``,
        ``max_components``, ...) for the Poisson candidates; every choice gives an upper bound, coarser
        ones a looser and cheaper one. The plan keeps them (``Plan.mmcc_options``) and re-prices with them.
      progress: None (default) says on stderr what the plan is doing once it has lasted
        ``PROGRESS_DELAY`` seconds; True from the start; False never; a callable gets each line.

    Returns a ``Plan`` (verified on construction); ``plan.candidates`` lists what was compared.
    """
    d = _positive_int("dataset_size", dataset_size)
    m = _positive_int("batch_size", batch_size)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be positive and finite, got {epsilon!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if mechanism != "auto" and mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be 'auto' or one of {MECHANISMS}, got {mechanism!r}")
    if sampling != "auto" and sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be 'auto' or one of {SAMPLINGS}, got {sampling!r}")
    if accountant not in accounting.ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {accounting.ACCOUNTANTS}, got {accountant!r}")
    if params is not None:
        params = _positive_int("params", params)
    if memory_budget is not None:
        if params is None:
            raise ValueError(f"memory_budget={memory_budget!r} needs params (the model's parameter count)")
        if not memory_budget >= 0:
            raise ValueError(f"memory_budget must be non-negative bytes, got {memory_budget!r}")
    if not (l2_clip_norm > 0 and math.isfinite(l2_clip_norm)):
        raise ValueError(f"l2_clip_norm must be positive and finite, got {l2_clip_norm!r}")
    if not amplification_seconds >= 0:
        raise ValueError(f"amplification_seconds must be non-negative seconds, got {amplification_seconds!r}")
    if mmcc_options is not None and not isinstance(mmcc_options, dict):
        raise ValueError(f"mmcc_options must be a dict of mmcc.epsilon's keywords, got {mmcc_options!r}")
    p = _schema(d, m, epochs, steps)
    w = workload_for(optimizer, p.n)
    with accounting.quiet_rdp():
        return _choose(epsilon, delta, d, m, p, w, params, memory_budget, mechanism, sampling, accountant,
                       float(l2_clip_norm), float(pld_discretization), float(optimize_seconds),
                       _Progress(progress), float(amplification_seconds), dict(mmcc_options or {}))




def _choose(epsilon: float, delta: float, d: int, m: int, p: Participation, w: Workload, params: int | None,
            memory_budget: float | None, mechanism: str, sampling: str, accountant: str, l2_clip_norm: float,
            pld_discretization: float, optimize_seconds: float, say: _Progress, amplification_seconds: float,
            mmcc_options: dict) -> Plan:
    acc: Any = accountant

    def calibrate(schema: Participation, spec_sampling: str, strategy: Strategy, how: Any,
                  guess: float | None = None) -> float:
        kwargs: dict[str, Any] = {"accountant": how, "pld_discretization": pld_discretization}
        if spec_sampling in ("cyclic-poisson", "poisson"):
            kwargs.update(sampling=spec_sampling, dataset_size=d, batch_size=m, strategy=strategy)
        if spec_sampling == "poisson" and mmcc_options:
            kwargs["mmcc_options"] = dict(mmcc_options)
        if guess is not None:
            kwargs["guess"] = guess
        return accounting.calibrate(epsilon, delta, schema, **kwargs)

    rows: list[dict[str, Any]] = []
    built: dict[int, tuple[Strategy, Participation]] = {}
    norms: dict[int, tuple[Strategy, float]] = {}  # id(strategy) -> (strategy, ||A C^{-1}||_F^2)
    fixed_z: dict[str, float] = {}
    rising: list[float] = []  # the amplified candidates' scores, in order of bands
    screened_z: list[float] = []  # the last screened z: the next band count's search starts near it
    specs = _specs(w, p, d, m, optimize_seconds)
    for i, spec in enumerate(specs):
        row: dict[str, Any] = {
            "mechanism": spec.mechanism, "sampling": spec.sampling, "family": spec.family, "bands": spec.bands,
            "buffers": spec.buffers, "min_sep": spec.participation.min_sep, "state_arrays": spec.state_arrays,
            "state_bytes": None if params is None else state_bytes(spec.state_arrays, params), "dropped": spec.dropped,
        }
        rows.append(row)
        if mechanism != "auto" and spec.mechanism != mechanism:
            row["dropped"] = row["dropped"] or f"not the mechanism asked for ({mechanism})"
        if sampling != "auto" and spec.sampling != sampling:
            row["dropped"] = row["dropped"] or f"not the sampling asked for ({sampling})"
        if row["dropped"] is None and memory_budget is not None and row["state_bytes"] > memory_budget:
            row["dropped"] = f"memory: {row['state_bytes']:.3g} B of noise state > budget {memory_budget:.3g} B"
        if row["dropped"] is None and spec.sampling == "cyclic-poisson" and len(rising) >= 3 \
                and rising[-1] > rising[-2] > rising[-3]:
            row["dropped"] = "not evaluated: the trajectory rmse rose over the two previous band counts"
        if row["dropped"] is None and spec.sampling == "poisson" and mmcc_cost(p.n) > amplification_seconds:
            cost = mmcc_cost(p.n)
            row["dropped"] = (f"not evaluated: MMCC at n = {p.n} costs about {cost:.3g} s (pass amplification_seconds="
                              f"{math.ceil(cost)}, --amplification-seconds {math.ceil(cost)}, to include)")
        if row["dropped"] is not None or spec.build is None:
            continue
        try:
            t0 = time.perf_counter()
            say(f"candidate {i + 1}/{len(specs)}: {_label(spec)}: building the strategy and its error")
            strategy, source = spec.build()
            row["source"] = source
            row["state_arrays"] = strategy.state_arrays()
            row["state_bytes"] = nbytes = None if params is None else state_bytes(strategy.state_arrays(), params)
            if memory_budget is not None and nbytes is not None and nbytes > memory_budget:
                row["dropped"] = f"memory: {nbytes:.3g} B of noise state > budget {memory_budget:.3g} B"
                continue
            row["rmse"] = _rmse(strategy, w, spec.participation, norms, all_steps=spec.sampling == "poisson")
            if spec.sampling == "poisson":
                say(f"candidate {i + 1}/{len(specs)}: {_label(spec)}: calibrating its noise by MMCC")
                row["noise_multiplier"] = calibrate(spec.participation, "poisson", strategy, acc)
                row["accountant"] = "mmcc"
            elif spec.sampling == "cyclic":
                if "z" not in fixed_z:
                    say(f"calibrating the noise of fixed cyclic batches ({accountant}, one Gaussian mechanism)")
                    fixed_z["z"] = calibrate(p, "cyclic", strategy, acc)
                row["noise_multiplier"], row["accountant"] = fixed_z["z"], accountant
            elif accountant == "pld":
                say(f"candidate {i + 1}/{len(specs)}: {_label(spec)}: screening its noise by RDP")
                z = _screen(epsilon, delta, spec.participation, strategy, d, m,
                            guess=2.0 * screened_z[-1] if screened_z else 1.0)
                screened_z.append(z)
                row["noise_multiplier"], row["accountant"] = z, "rdp-screen"
            else:
                row["noise_multiplier"] = calibrate(spec.participation, "cyclic-poisson", strategy, acc)
                row["accountant"] = accountant
            row["trajectory_rmse"] = row["noise_multiplier"] * row["rmse"]
            if spec.sampling == "cyclic-poisson":
                rising.append(row["trajectory_rmse"])
            row["seconds"] = time.perf_counter() - t0
            _LOG.debug("candidate %s %s %s: %.2f s", spec.mechanism, spec.sampling, spec.bands or spec.buffers,
                       row["seconds"])
            built[i] = (strategy, spec.participation)
        except Exception as e:  # a candidate that cannot be built or priced is listed with why, not fatal
            row["dropped"] = f"{type(e).__name__}: {e}".split("\n")[0][:200]
    # the best amplified candidates by the RDP screen (and any within SCREEN_MARGIN of the best),
    # priced by the plan's accountant, its search starting from the screened z
    for i in _finalists(rows):
        strategy, schema = built[i]
        say(f"pricing {_label(specs[i])} by the {accountant.upper()} accountant")
        rows[i]["noise_multiplier"] = calibrate(schema, "cyclic-poisson", strategy, acc,
                                                guess=rows[i]["noise_multiplier"])
        rows[i]["accountant"] = accountant
        rows[i]["trajectory_rmse"] = rows[i]["noise_multiplier"] * rows[i]["rmse"]
    eligible = [i for i, r in enumerate(rows) if r["dropped"] is None and r.get("accountant") in (accountant, "mmcc")]
    if not eligible:
        reasons = sorted({r["dropped"] for r in rows if r["dropped"]})
        raise ValueError("no candidate mechanism is eligible: " + "; ".join(reasons))
    best = min(eligible, key=lambda i: (rows[i]["trajectory_rmse"], rows[i]["state_arrays"]))
    rows[best]["chosen"] = True
    strategy, schema = built[best]
    chosen = rows[best]
    candidates = tuple(Candidate(**{k: v for k, v in r.items() if k != "seconds"}) for r in rows)
    spec_sampling = chosen["sampling"]
    kwargs: dict[str, Any] = {"sampling": "none"} if spec_sampling == "cyclic" else {
        "sampling": spec_sampling, "dataset_size": d, "batch_size": m}
    plan_mmcc = dict(mmcc_options) if spec_sampling == "poisson" else {}
    if plan_mmcc:
        kwargs["mmcc_options"] = plan_mmcc
    say(f"chose {_label(specs[best])}; computing its epsilon ({accountant}) and checking the plan")
    achieved = accounting.epsilon(chosen["noise_multiplier"], delta, schema, accountant=acc,
                                  pld_discretization=pld_discretization, strategy=strategy, **kwargs)
    return Plan(strategy=strategy, participation=schema, noise_multiplier=chosen["noise_multiplier"],
                l2_clip_norm=l2_clip_norm, mechanism=chosen["mechanism"], sampling=spec_sampling,
                dataset_size=d, batch_size=m, delta=float(delta), target_epsilon=float(epsilon), epsilon=achieved,
                accountant=accountant, pld_discretization=pld_discretization, workload=w.to_dict(),
                source=chosen.get("source", ""), candidates=candidates, mmcc_options=plan_mmcc)


def _finalists(rows: list[dict[str, Any]]) -> list[int]:
    """The screened rows to price: the ``PRICED`` lowest scores and any within ``SCREEN_MARGIN`` of the lowest."""
    screened = sorted((i for i, r in enumerate(rows) if r.get("accountant") == "rdp-screen"),
                      key=lambda i: rows[i]["trajectory_rmse"])
    if not screened:
        return []
    bound = SCREEN_MARGIN * rows[screened[0]]["trajectory_rmse"]
    return [i for k, i in enumerate(screened) if k < PRICED or rows[i]["trajectory_rmse"] <= bound]


def _screen(epsilon: float, delta: float, schema: Participation, strategy: Strategy, d: int, m: int,
            guess: float) -> float:
    """The amplified candidate's z calibrated by dp-accounting's RDP accountant on ``SCREEN_ORDERS``
    (relative tolerance ``SCREEN_RTOL``): a ranking, never a plan's noise (module doc)."""
    import dp_accounting

    make = accounting._event_maker(schema, sampling="cyclic-poisson", dataset_size=d, batch_size=m,
                                   strategy=strategy)

    def screen_accountant() -> dp_accounting.PrivacyAccountant:
        return dp_accounting.rdp.RdpAccountant(list(SCREEN_ORDERS))

    def too_small(z: float) -> bool:
        return screen_accountant().compose(make(z)).get_epsilon(delta) > epsilon

    lo, hi = accounting._bracket(too_small, guess, epsilon)
    return float(dp_accounting.calibrate_dp_mechanism(
        screen_accountant, make, epsilon, delta, bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
        tol=SCREEN_RTOL * lo))


def _rmse(strategy: Strategy, w: Workload, p: Participation, norms: dict[int, tuple[Strategy, float]],
          all_steps: bool = False) -> float:
    """sens(C, p) * ||A C^{-1}||_F / sqrt(n), as ``strategies.error.evaluate`` computes it, with
    ||A C^{-1}||_F^2 (``decoder_norms``: dense for a banded C) computed once per strategy object:
    a BSR of the same bands serves the amplified and the fixed cyclic schema.

    ``all_steps`` (Poisson sampling, p = Participation(n, n, 1)): sens = ||C 1|| for C >= 0
    (``mmcc.all_steps_sensitivity``, the scale MMCC prices; O(n) for a Toeplitz C where the generic
    sensitivity searches patterns), and a ValueError naming the entry where C has a negative one."""
    from mfnoise.strategies.error import decoder_norms

    check_participation(p, strategy.n)
    if all_steps:  # first: a C with a negative entry is refused before its decoder norm is computed
        from mfnoise.training.mmcc import all_steps_sensitivity

        sens_value = all_steps_sensitivity(strategy)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EpochsWarning)
            sens_value = float(strategy.sensitivity(p).value)
    if id(strategy) not in norms:
        norms[id(strategy)] = (strategy, decoder_norms(strategy, w).frobenius_sq)
    return float(sens_value * math.sqrt(norms[id(strategy)][1] / strategy.n))


def _label(spec: _Spec) -> str:
    size = f"{spec.bands} bands" if spec.bands is not None else f"{spec.buffers} buffers"
    return f"{spec.mechanism} ({spec.sampling}, {size})"


class _Progress:
    """Says what the plan is doing: on stderr once it has lasted ``PROGRESS_DELAY`` s
    (``progress=None``), from the start (True), never (False), or to a callable."""

    def __init__(self, progress: bool | Callable[[str], None] | None) -> None:
        self._progress = progress
        self._start = time.perf_counter()

    def __call__(self, what: str) -> None:
        elapsed = time.perf_counter() - self._start
        if callable(self._progress):
            self._progress(what)
        elif self._progress is True or (self._progress is None and elapsed >= PROGRESS_DELAY):
            print(f"mfnoise.plan [{elapsed:5.1f} s] {what}", file=sys.stderr, flush=True)
