"""The solver's tolerance stop (mfnoise/optim/solver.py): reported, and honest about distance.

A run that stops on the windowed tolerance says so (``stopped``, ``stops``, ``tol``) and its
objective is within ``tol`` (relative) of an independent run at a 10^4 times tighter tolerance.
"""

from __future__ import annotations

import pytest

import mfnoise
from mfnoise import Participation
from mfnoise.optim import solver


# The banded rmse loss is the objective itself (the max objective's loss is a smoothed max, so a
# tolerance on it says nothing finer than the smoothing about max_error).
@pytest.mark.parametrize("family, kw, objective", [("banded", {"bands": 8}, "rmse")])
def test_a_tolerance_stop_is_reported_and_within_tol_of_a_tight_run(family, kw, objective):
    p = Participation.epochs(512, 4)
    tol = 1e-6
    _, loose = mfnoise.optimize("prefix", p, family, objective=objective, tol=tol, progress=False, **kw)
    _, tight = mfnoise.optimize("prefix", p, family, objective=objective, tol=tol * 1e-4, progress=False, **kw)
    assert loose.stopped == "tolerance" and loose.stops == {"tolerance": 1} and loose.converged
    assert loose.tol == tol and loose.tol_window == solver.TOL_WINDOW
    assert loose.to_dict()["tol"] == tol and loose.to_dict()["stopped"] == "tolerance"
    assert f"stopped: tolerance (tol {tol:g}" in loose.summary()
    value = loose.rmse if objective == "rmse" else loose.max_error
    best = tight.rmse if objective == "rmse" else tight.max_error
    assert abs(value - best) <= tol * best
    assert loose.iterations < tight.iterations


def test_the_default_tolerance_is_reported():
    _, r = mfnoise.optimize("prefix", Participation(64, 1, 64), "toeplitz", bands=4, progress=False)
    assert r.tol == solver.DEFAULT_TOL and r.stopped in ("tolerance", "converged") and sum(r.stops.values()) == 1


@pytest.mark.parametrize("tol", [-1e-9, float("nan"), True, "1e-9"])
def test_a_bad_tolerance_is_refused_by_name(tol):
    with pytest.raises(ValueError, match="tol"):
        mfnoise.optimize("prefix", Participation(16, 1, 16), "toeplitz", bands=2, tol=tol, progress=False)


def test_the_progress_bar_counts_every_iteration_once_shown(capsys):
    never = solver._LazyBar("never", False, 0.0)
    for _ in range(5):
        never.update(1)
    assert never.bar is None  # progress=False: no tqdm bar at all
    late = solver._LazyBar("late", None, 3600.0)
    late.update(1)
    assert late.bar is None  # not shown before the delay
    late.delay = 0.0
    late.update(1)
    late.set_postfix(loss="1")
    assert late.bar is not None and late.bar.n == 2  # created with the earlier iteration counted
    late.close()
    shown = solver._LazyBar("shown", True, 3600.0)
    shown.update(1)
    assert shown.bar is not None and shown.bar.n == 1
    shown.close()
