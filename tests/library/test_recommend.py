"""``mfnoise recommend``: never over the memory budget, and the best of what fits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfnoise import cli
from mfnoise.library import recommend
from mfnoise.strategies import io

FOLDER = Path(__file__).resolve().parents[2] / "strategies"
ENTRIES = json.loads((FOLDER / "index.json").read_text())["strategies"]
SCHEMAS = sorted({(e["workload"], e["n"], e["epochs"]) for e in ENTRIES})
KEYS = {"rmse": "rmse", "max": "max_error"}


def _state_arrays(e: dict) -> int:
    # From the stored strategy's own parameters: a BLT keeps d buffers, banded b - 1 outputs.
    params = io.read(str(FOLDER / e["file"]))[1]["params"]
    return params["buffers"] if "buffers" in params else params["bands"] - 1


def _dp_sgd(n: int, epochs: int, workload: str, key: str) -> float:
    """Identity strategy, prefix sum: sens = sqrt(k) (orthogonal columns), ||A||_F^2 = n (n + 1) / 2,
    largest row norm sqrt(n)."""
    assert workload == "prefix"
    k = -(-n // (n // epochs))
    return math.sqrt(k) * (math.sqrt((n + 1) / 2) if key == "rmse" else math.sqrt(n))


@settings(max_examples=60)
@given(schema=st.sampled_from(SCHEMAS), params=st.integers(1, 10**9),
       budget_arrays=st.floats(0, 70), objective=st.sampled_from(["rmse", "max"]),
       itemsize=st.sampled_from([2, 4, 8]), unlimited=st.booleans())
def test_never_exceeds_the_budget_and_is_the_best_that_fits(schema, params, budget_arrays, objective, itemsize,
                                                            unlimited):
    workload, n, epochs = schema
    budget = None if unlimited else int(budget_arrays * params * itemsize)
    r = recommend.recommend(n, epochs, params, budget, workload=workload, objective=objective, itemsize=itemsize)
    key = KEYS[objective]
    mine = [e for e in ENTRIES if (e["workload"], e["n"], e["epochs"]) == schema]
    if r["name"] == "dp-sgd":
        assert r["state_bytes"] == 0 and r["family"] == "identity"
    else:
        e = next(e for e in mine if e["name"] == r["name"])
        assert r["state_bytes"] == _state_arrays(e) * params * itemsize
        assert r[key] == e[key]
    if budget is not None:
        assert r["state_bytes"] <= budget
    # Nothing that fits is better (brute force over the index read here).
    fitting = [e[key] for e in mine if budget is None or _state_arrays(e) * params * itemsize <= budget]
    assert all(r["error"] <= x for x in fitting)
    assert r["error"] <= r["dp_sgd"][key]
    best = min(e[key] for e in mine)
    assert r["relative_to_best"] == pytest.approx(r["error"] / min(best, r["dp_sgd"][key]))
    assert r["relative_to_best"] >= 1.0
    if budget is None:
        assert r["relative_to_best"] == 1.0
    assert r["relative_to_dp_sgd"] == pytest.approx(r["error"] / r["dp_sgd"][key])


@pytest.mark.parametrize("schema", [s for s in SCHEMAS if s[0] == "prefix"][:4])
@pytest.mark.parametrize("objective", ["rmse", "max"])
def test_dp_sgd_reference_is_independent(schema, objective):
    _, n, epochs = schema
    r = recommend.recommend(n, epochs, 1000, 0, objective=objective)
    assert r["name"] == "dp-sgd" and r["state_bytes"] == 0  # a zero budget leaves only DP-SGD
    assert r["error"] == pytest.approx(_dp_sgd(n, epochs, "prefix", KEYS[objective]), rel=1e-12)
    assert r["relative_to_dp_sgd"] == 1.0


def test_bad_input():
    workload, n, epochs = SCHEMAS[0]
    with pytest.raises(ValueError, match="no strategy"):
        recommend.recommend(n + 1, epochs, 10)
    with pytest.raises(ValueError, match="params"):
        recommend.recommend(n, epochs, 0, workload=workload)
    with pytest.raises(ValueError, match="budget"):
        recommend.recommend(n, epochs, 10, -1, workload=workload)
    with pytest.raises(ValueError, match="objective"):
        recommend.recommend(n, epochs, 10, workload=workload, objective="mse")


def test_cli(capsys):
    workload, n, epochs = SCHEMAS[0]
    args = ["recommend", "--n", str(n), "--epochs", str(epochs), "--params", "1000000",
            "--memory-budget", "20000000", "--workload", workload]
    assert cli.main(args + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["state_bytes"] <= 20_000_000
    assert {"name", "family", "rmse", "max_error", "state_bytes", "relative_to_dp_sgd", "relative_to_best",
            "n", "max_participations", "min_sep"} <= set(r)
    assert cli.main(args) == 0
    assert "x DP-SGD" in capsys.readouterr().out
    assert cli.main(["recommend", "--n", "7", "--epochs", "1", "--params", "5", "--json"]) == 2
