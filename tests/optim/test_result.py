"""``OptimizeResult`` (mfnoise.optim.result): a typed, frozen report with the dict report's keys.

``to_dict()`` has exactly the keys the dict report had, ``result[key]`` equals
``result.to_dict()[key]`` (the compatibility shim), and the exact numbers are those of
``mfnoise.evaluate`` on the returned strategy.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import mfnoise
from mfnoise import Participation
from mfnoise.core import workloads
from mfnoise.optim.result import OptimizeResult
from mfnoise.optim.solver import optimize

# The keys of the report dict that mfnoise.optimize returned before OptimizeResult.
REPORT_KEYS = {
    "family", "n", "max_participations", "min_sep", "participation", "workload", "objective", "method",
    "problem", "iterations", "evaluations", "history", "objective_history", "initial_loss", "loss",
    "converged", "stopped", "interrupted", "compile_seconds", "optimize_seconds", "seconds",
    "sensitivity", "sensitivity_exact", "sensitivity_method", "rmse", "max_error",
    # added with the tolerance stop and the buffers note (issue 16)
    "tol", "tol_window", "stops", "buffers_requested", "buffers_kept", "buffers_dropped", "buffers_message",
    "last_iterate_error", "objective_value",
}
DUAL_KEYS = {"formulation", "dual_bound", "duality_gap", "final_relative_change"}


@pytest.mark.parametrize("family, kw, extra", [
    ("toeplitz", {"bands": 4}, {"bands"}),
    ("blt", {"buffers": 2}, {"buffers"}),
    ("banded", {"bands": 4}, {"bands"}),
    ("dense", {}, DUAL_KEYS),
], ids=lambda v: str(sorted(v)) if isinstance(v, (set, frozenset)) else str(v))  # set order varies by hash seed
def test_to_dict_has_the_report_keys_and_the_shim_reads_them(family, kw, extra):
    p, w = Participation.epochs(32, 2), workloads.prefix_sum(32)
    strategy, result = optimize(w, p, family, progress=False, **kw)
    assert isinstance(result, OptimizeResult) and mfnoise.OptimizeResult is OptimizeResult
    d = result.to_dict()
    assert set(d) == REPORT_KEYS | extra
    assert set(result.keys()) == set(d) and dict(result.items()) == d
    for key, value in d.items():
        assert key in result and result[key] == value and result.get(key) == value
    assert "nope" not in result and result.get("nope", 7) == 7
    with pytest.raises(KeyError):
        result["nope"]
    json.dumps(d)  # JSON-ready: lists, not tuples
    assert isinstance(d["history"], list) and isinstance(result["history"], list)
    assert d["iterations"] == len(result.history) and not result.interrupted
    if extra == DUAL_KEYS:
        assert set(result.details) == DUAL_KEYS and d["formulation"] == "dual"
    else:
        assert {k: d[k] for k in extra} == {k: strategy.params()[k] for k in extra} and not result.details
    ev = mfnoise.evaluate(strategy, w, p)
    for key in ("sensitivity", "sensitivity_exact", "sensitivity_method", "rmse", "max_error"):
        assert getattr(result, key) == ev[key]
    assert result.compile_seconds <= result.optimize_seconds <= result.seconds


def test_the_result_is_frozen():
    p, w = Participation.single(16), workloads.prefix_sum(16)
    _, result = optimize(w, p, "toeplitz", bands=2, progress=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.rmse = 0.0  # type: ignore[misc]
    assert "OptimizeResult" in dir(mfnoise)
