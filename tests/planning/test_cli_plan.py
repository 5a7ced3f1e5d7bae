"""``mfnoise plan``: the JSON object and the saved plan are the library call's (docs/design.md, "Plan")."""

from __future__ import annotations

import json

import pytest

import mfnoise
from mfnoise.cli import main as cli_main

ARGS = ["plan", "--epsilon", "3", "--delta", "1e-5", "--dataset-size", "300", "--batch-size", "50", "--epochs", "2",
        "--mechanism", "dp-sgd"]


def test_json_and_out(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli_main([*ARGS, "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    loaded = mfnoise.planning.load(out)
    assert result["fingerprint"] == loaded.fingerprint
    assert result["mechanism"] == "dp-sgd" and result["epsilon"] == loaded.epsilon <= 3.0
    assert result["noise_multiplier"] == loaded.noise_multiplier
    rows = result["candidates"]
    assert sum(r["chosen"] for r in rows) == 1
    assert all(r["dropped"] for r in rows if r["mechanism"] != "dp-sgd")
    direct = mfnoise.plan(3.0, 1e-5, dataset_size=300, batch_size=50, epochs=2, mechanism="dp-sgd")
    assert direct.fingerprint == loaded.fingerprint


def test_text_and_refusals(tmp_path, capsys):
    assert cli_main([*ARGS, "--sampling", "cyclic"]) == 0
    text = capsys.readouterr().out
    assert "mechanism dp-sgd" in text and "candidates" in text and "arXiv:2211.06530" in text
    assert cli_main([*ARGS, "--out", str(tmp_path / "missing" / "plan.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main([*ARGS, "--params", "1.5"]) == 2
    assert "--params must be a positive whole number, got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["plan", "--epsilon", "1", "--delta", "1e-5", "--dataset-size", "10", "--batch-size", "5"])


def test_progress_goes_to_stderr_unless_quiet(capsys, monkeypatch):
    from mfnoise.planning import choose

    monkeypatch.setattr(choose, "PROGRESS_DELAY", 0.0)  # as if the plan had already lasted 2 s
    assert cli_main([*ARGS, "--json"]) == 0
    captured = capsys.readouterr()
    assert "mfnoise.plan [" in captured.err and "chose dp-sgd" in captured.err
    assert json.loads(captured.out)["mechanism"] == "dp-sgd"  # stdout stays the JSON object alone
    assert cli_main([*ARGS, "--json", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
