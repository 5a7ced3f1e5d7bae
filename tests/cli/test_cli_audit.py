"""``mfnoise audit``: the help explains the audit, a tiny white-box audit runs and writes its JSON and
its plot, a broken fixture exits 1 (flagged), bad input exits 2, a saved plan is audited, and the
demo's black-box audit runs at a test size."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

from mfnoise.cli import main


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse (--help, a refused option)
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


TINY = ("--family", "bsr", "--bands", "4", "--n", "8", "--epochs", "2", "--noise-multiplier", "1.08",
        "--delta", "1e-5", "--trials", "4000")


def test_help_explains_white_box_auditing_and_the_numbers():
    code, out, _ = _run("audit", "--help")
    assert code == 0
    text = " ".join(out.split())
    for phrase in ("White-box audit", "Dirac", "whitens the releases with C", "epsilon lower bound",
                   "tightness", "FLAGGED", "--mechanism", "Black-box audit", "one-run", "confidence"):
        assert phrase in text, phrase
    code, out, _ = _run("--help")
    assert "audit" in out


def test_a_tiny_audit_prints_the_bound_next_to_the_claim_and_writes_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    import mfnoise
    from mfnoise.training.accounting import epsilon

    out_file, plot = tmp_path / "audit.json", tmp_path / "roc.png"
    code, out, err = _run("audit", *TINY, "--seed", "1", "--out", str(out_file),
                          "--plot", str(plot))
    assert code == 0, err
    saved = json.loads(out_file.read_text())
    claimed = epsilon(1.08, 1e-5, mfnoise.Participation.epochs(8, 2))
    assert saved["claimed_epsilon"] == pytest.approx(claimed, rel=1e-12)
    assert 0 < saved["empirical_epsilon"] <= claimed and saved["flagged"] is False and saved["ok"] is True
    assert saved["tightness"] == pytest.approx(saved["empirical_epsilon"] / claimed)
    assert f"{saved['empirical_epsilon']:.4g}" in out and f"{claimed:.4g}" in out and "tightness" in out
    assert "white-box audit" in err  # progress on stderr
    assert saved["plot"] == os.path.abspath(plot) and plot.read_bytes()[:4] == b"\x89PNG"


def test_json_prints_one_object_and_a_broken_fixture_exits_1():
    code, out, _ = _run("audit", *TINY, "--mechanism", "sensitivity-k1", "--json", "--quiet")
    assert code == 1
    d = json.loads(out)
    assert d["flagged"] is True and d["empirical_epsilon"] > d["claimed_epsilon"] and d["mechanism"] == "sensitivity_k1"


def test_epsilon_is_calibrated_and_audited():
    import mfnoise
    from mfnoise.training.accounting import epsilon

    p = mfnoise.Participation.epochs(8, 2)
    code, out, _ = _run("audit", "--family", "identity", "--n", "8", "--epochs", "2", "--epsilon", "2",
                        "--delta", "1e-5", "--trials", "2000", "--json", "--quiet")
    assert code == 0
    d = json.loads(out)
    z = d["noise_multiplier"]
    assert d["claimed_epsilon"] == pytest.approx(epsilon(z, 1e-5, p), rel=1e-12)  # the claim is z's epsilon
    assert d["claimed_epsilon"] <= 2.0 and d["empirical_epsilon"] <= d["claimed_epsilon"]


def test_a_saved_plan_is_audited_with_its_own_claim(tmp_path):
    import mfnoise

    plan = mfnoise.plan(4.0, 1e-5, dataset_size=64, batch_size=16, epochs=2, mechanism="dp-sgd", sampling="cyclic")
    path = plan.save(tmp_path / "plan.json")
    code, out, err = _run("audit", "--plan", path, "--trials", "2000", "--json", "--quiet")
    assert code == 0, err
    d = json.loads(out)
    assert d["claimed_epsilon"] == plan.epsilon and d["noise_multiplier"] == plan.noise_multiplier
    code, out, err = _run("audit", "--plan", path, "--n", "8", "--trials", "10")
    assert code == 2 and "come from the plan file" in err


@pytest.mark.parametrize("argv, message", [
    ((), "say what to audit"),
    (("--family", "bsr", "--n", "8", "--noise-multiplier", "1"), "needs --bands"),
    (("--family", "nope", "--n", "8", "--noise-multiplier", "1"), "not a closed form"),
    (("--family", "identity", "--n", "8"), "--noise-multiplier Z or --epsilon"),
    (("--family", "identity", "--n", "8", "--noise-multiplier", "1", "--estimator", "one-run"), "black-box"),
    (("--family", "identity", "--n", "8", "--noise-multiplier", "1", "--confidence", "1.5"), "--confidence"),
    (("--family", "identity", "--n", "8", "--noise-multiplier", "1", "--out", "/no/such/folder/a.json"), "--out"),
    (("--family", "identity", "--n", "8", "--noise-multiplier", "1", "--plot", "roc.xyz"), "cannot write .xyz"),
    (("--demo", "--noise-multiplier", "1"), "give --epsilon"),
    (("--demo", "--mechanism", "no-clipping"), "do not apply to --demo"),
])
def test_bad_input_exits_2_with_a_message(argv, message):
    code, _, err = _run("audit", *argv)
    assert code == 2 and message in err, err


def test_the_demo_black_box_audit_runs_at_a_test_size():
    pytest.importorskip("sklearn")
    from mfnoise.cli.audit import demo_blackbox

    r = demo_blackbox(epsilon=8.0, epochs=2, canaries=60, max_train=240, seed=0)
    assert r.canaries == 60 and r.claimed_epsilon is not None and 0 < r.claimed_epsilon <= 8.0
    assert r.lower_bound.method == "one-run" and r.lower_bound.epsilon <= r.claimed_epsilon
    assert r.extra["steps"] == 2 * (240 // 64) and np.all(np.isfinite(r.scores))
    assert r.extra["plan_epsilon"] == r.claimed_epsilon


def test_a_strategy_file_is_audited_and_its_n_checked(tmp_path):
    import mfnoise
    from mfnoise.strategies import io as sio

    path = sio.save(mfnoise.bsr(8, 4), tmp_path / "bsr.npz")
    code, out, err = _run("audit", "--strategy", path, "--epochs", "2", "--noise-multiplier", "1.08",
                          "--trials", "2000", "--json", "--quiet")
    assert code == 0, err
    d = json.loads(out)
    assert d["participation"]["n"] == 8 and d["strategy"].startswith("Banded")
    code, _, err = _run("audit", "--strategy", path, "--n", "16", "--noise-multiplier", "1", "--trials", "10")
    assert code == 2 and "differs from the strategy file" in err
