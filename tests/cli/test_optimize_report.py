"""``mfnoise optimize``: the solver's tolerance by default, and the run's summary in its report."""

from __future__ import annotations

import contextlib
import io
import json

import mfnoise
from mfnoise import Participation
from mfnoise.cli import build_parser
from mfnoise.cli import main as cli_main
from mfnoise.optim import solver


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = cli_main(argv)
    return rc, out.getvalue()


def test_the_default_tolerance_is_the_solvers():
    parser, _ = build_parser("optimize")
    args = parser.parse_args(["optimize", "--family", "blt", "--n", "8", "--out", "x.npz"])
    assert args.tol == solver.DEFAULT_TOL


def test_report_has_the_tolerance_stop_and_the_buffers_note(tmp_path):
    n = 16  # at n = 16 the optimum holds fewer than 8 buffers (tests/optim/test_blt_closed_form_optimize.py)
    argv = ["optimize", "--family", "blt", "--buffers", "8", "--n", str(n), "--objective", "rmse",
            "--no-progress", "--out", str(tmp_path / "s.npz")]
    rc, out = _cli([*argv[:1], "--json", *argv[1:]])
    assert rc == 0
    report = json.loads(out)
    # The same run through the library with its defaults: the CLI used the solver's tolerance.
    s, r = mfnoise.optimize("prefix", Participation.epochs(n, 1), "blt", buffers=8, objective="rmse", progress=False)
    assert report["tol"] == r.tol == solver.DEFAULT_TOL and report["tol_window"] == solver.TOL_WINDOW
    assert report["iterations"] == r.iterations and report["stops"] == dict(r.stops)
    assert report["stopped"] == r.stopped and report["rmse"] == r.rmse
    kept = s.params()["buffers"]
    assert report["buffers_requested"] == 8 and report["buffers_kept"] == kept < 8
    message = f"{kept} of 8 requested buffers kept: the others cancelled"
    assert report["buffers_message"] == r.buffers_message == message
    assert report["summary"].splitlines()[:2] == r.summary().splitlines()[:2]
    rc, text = _cli(argv)
    assert rc == 0
    assert f"stopped: {r.stopped} (tol {solver.DEFAULT_TOL:g} over {solver.TOL_WINDOW} iterations" in text
    assert message in text and "buffers_kept" in text
    _, meta = mfnoise.strategies.io.read(str(tmp_path / "s.npz"))
    assert "--tol" not in meta["command"]  # the default is not spelled out


def test_a_given_tolerance_is_used_and_recorded(tmp_path):
    path = str(tmp_path / "t.npz")
    rc, out = _cli(["optimize", "--json", "--family", "toeplitz", "--bands", "4", "--n", "64", "--tol", "1e-4",
                    "--no-progress", "--out", path])
    assert rc == 0
    report = json.loads(out)
    assert report["tol"] == 1e-4 and "buffers_message" not in report
    _, meta = mfnoise.strategies.io.read(path)
    assert "--tol 0.0001" in meta["command"]
