"""``mfnoise evaluate`` through ``mfnoise.cli.main``: JSON output, strategy files, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import mfnoise
from mfnoise.cli import main
from mfnoise.core import workloads

REQUIRED = {"family", "n", "max_participations", "min_sep", "sensitivity", "rmse", "max_error", "seconds"}


def run_json(capsys, *argv):
    code = main(["evaluate", *argv, "--json"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # exactly one JSON object on stdout
    return code, json.loads(lines[0])


def test_known_values(capsys):
    code, r = run_json(capsys, "--family", "sqrt-toeplitz", "--n", "4096", "--epochs", "1")
    assert code == 0 and REQUIRED <= r.keys()
    assert r["family"] == "sqrt-toeplitz" and r["n"] == 4096
    assert (r["max_participations"], r["min_sep"]) == (1, 4096)
    assert round(r["max_error"], 5) == 3.71388 and round(r["rmse"], 5) == 3.55129
    assert round(r["sensitivity"], 5) == 1.92714
    assert r["seconds"] >= 0
    code, r = run_json(capsys, "--family", "identity", "--n", "4096")
    assert code == 0 and round(r["rmse"], 4) == 45.2604 and r["max_error"] == 64.0


@pytest.mark.parametrize(
    "argv,family,p,w",
    [
        (["--family", "bsr", "--bands", "4", "--n", "64", "--epochs", "4"], "bsr",
         mfnoise.Participation.epochs(64, 4), "prefix"),
        (["--family", "bisr", "--bands", "5", "--n", "50", "--min-sep", "10", "--max-participations", "3",
          "--workload", "momentum:0.9"], "bisr", mfnoise.Participation(50, 3, 10), "momentum:0.9"),
        (["--family", "identity", "--n", "30", "--epochs", "7"], "identity",
         mfnoise.Participation.epochs(30, 7), "prefix"),
        (["--family", "identity", "--n", "40", "--epochs", "3", "--workload", "momentum:0.5:cooldown:0.25"],
         "identity", mfnoise.Participation.epochs(40, 3), "momentum:0.5:cooldown:0.25"),
        (["--family", "sqrt-toeplitz", "--n", "40", "--epochs", "3", "--workload", "momentum:0.5"],
         "sqrt-toeplitz", mfnoise.Participation.epochs(40, 3), "momentum:0.5"),
    ],
)
def test_closed_forms_match_the_library(capsys, argv, family, p, w):
    code, r = run_json(capsys, *argv)
    assert code == 0 and REQUIRED <= r.keys()
    assert r["family"] == family and r["n"] == p.n
    assert (r["max_participations"], r["min_sep"]) == (p.max_participations, p.min_sep)
    assert r["participation"] == p.kind and r["workload"] == w
    wl = workloads.parse(w, p.n)
    bands = int(argv[argv.index("--bands") + 1]) if "--bands" in argv else None
    s = {"bsr": lambda: mfnoise.bsr(p.n, bands, wl), "bisr": lambda: mfnoise.bisr(p.n, bands, wl),
         "identity": lambda: mfnoise.Identity(p.n), "sqrt-toeplitz": lambda: mfnoise.sqrt_toeplitz(p.n, wl)}[family]()
    ev = mfnoise.evaluate(s, wl, p)
    for key in ("sensitivity", "rmse", "max_error"):
        assert r[key] == pytest.approx(ev[key], rel=1e-12)


def test_strategy_file(capsys, tmp_path):
    n = 24
    p = mfnoise.Participation(n, 2, 6)
    w = workloads.momentum(n, 0.8)
    s = mfnoise.Toeplitz(np.array([1.0, 0.6, 0.3, 0.1]), n)
    path = s.save(str(tmp_path / "s.npz"), participation=p, workload=w)
    ev = mfnoise.evaluate(s, w, p)
    # Schema and workload from the file.
    code, r = run_json(capsys, path)
    assert code == 0 and REQUIRED <= r.keys()
    assert r["family"] == "toeplitz" and r["n"] == n and r["path"] == path
    assert (r["max_participations"], r["min_sep"], r["workload"]) == (2, 6, "momentum:0.8")
    assert r["rmse"] == pytest.approx(ev["rmse"], rel=1e-12)
    assert r["max_error"] == pytest.approx(ev["max_error"], rel=1e-12)
    # Overridden on the command line.
    code, r = run_json(capsys, path, "--n", str(n), "--epochs", "3", "--workload", "prefix")
    p3 = mfnoise.Participation.epochs(n, 3)
    ev = mfnoise.evaluate(s, workloads.prefix_sum(n), p3)
    assert code == 0 and (r["max_participations"], r["min_sep"]) == (3, 8)
    assert r["rmse"] == pytest.approx(ev["rmse"], rel=1e-12)


def test_strategy_file_half_schema_refused(capsys, tmp_path):
    """--max-participations without --min-sep is refused, not silently replaced by the file's schema."""
    path = mfnoise.sqrt_toeplitz(12).save(str(tmp_path / "s.npz"), participation=mfnoise.Participation.single(12))
    assert main(["evaluate", path, "--max-participations", "3"]) == 2
    assert "--min-sep" in capsys.readouterr().err


def test_text_output(capsys):
    assert main(["evaluate", "--family", "sqrt-toeplitz", "--n", "64"]) == 0
    out = capsys.readouterr().out
    assert "rmse" in out and "max_error" in out and "sensitivity" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--family", "bsr", "--n", "10"], "--bands"),
        (["--family", "bsr", "--n", "10", "--bands", "0"], "bands=0"),
        (["--family", "bsr", "--n", "10", "--bands", "11"], "bands=11"),
        (["--family", "identity"], "--n"),
        (["--family", "identity", "--n", "0"], "got 0"),
        (["--family", "identity", "--n", "-5"], "got -5"),
        (["--family", "identity", "--n", "10", "--epochs", "11"], "epochs=11"),
        (["--family", "identity", "--n", "10", "--epochs", "0"], "got 0"),
        (["--family", "identity", "--n", "10", "--min-sep", "3"], "--max-participations"),
        (["--family", "identity", "--n", "10", "--max-participations", "3"], "--min-sep"),
        (["--family", "identity", "--n", "10", "--min-sep", "11", "--max-participations", "1"], "min_sep=11"),
        (["--family", "identity", "--n", "10", "--workload", "adam"], "'adam'"),
        (["--family", "identity", "--n", "10", "--workload", "momentum:1.5"], "got 1.5"),
        ([], "FILE or --family"),
        (["--family", "sqrt-toeplitz", "--n", "40", "--workload", "momentum:0.5:cooldown:0.25"], "Toeplitz workload"),
    ],
)
def test_bad_input_exits_2(capsys, argv, match):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert "mfnoise evaluate: error:" in err and match in err
    assert main(["evaluate", *argv, "--json"]) == 2
    captured = capsys.readouterr()
    assert match in json.loads(captured.out)["error"]


def test_bad_file_exits_2(capsys, tmp_path):
    assert main(["evaluate", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert main(["evaluate", str(bad)]) == 2
    assert "not a readable mfnoise strategy file" in capsys.readouterr().err
    s = mfnoise.sqrt_toeplitz(8)
    path = s.save(str(tmp_path / "s.npz"))
    assert main(["evaluate", path, "--n", "9"]) == 2
    assert "n=8" in capsys.readouterr().err
    assert main(["evaluate", path, "--family", "identity", "--n", "8"]) == 2
    capsys.readouterr()
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 3] ^= 0xFF
    tampered = tmp_path / "t.npz"
    tampered.write_bytes(bytes(raw))
    assert main(["evaluate", str(tampered), "--json"]) == 2
    assert "error" in json.loads(capsys.readouterr().out)


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--family", "nope", "--n", "5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--family", "identity", "--n", "five"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--family", "identity", "--n", "5", "--epochs", "2", "--min-sep", "2"])
    assert e.value.code == 2
    capsys.readouterr()


def test_large_n_runs(capsys):
    """The structured path: n = 2^17 evaluates without building any n x n matrix."""
    code, r = run_json(capsys, "--family", "sqrt-toeplitz", "--n", str(2**17), "--epochs", "1")
    assert code == 0 and math.isfinite(r["rmse"]) and r["max_error"] > r["rmse"]
