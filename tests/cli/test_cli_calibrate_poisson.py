"""``mfnoise calibrate --sampling poisson --strategy FILE``: the noise multiplier accounting.calibrate
gives for the same arguments, priced by the theorem it names (MMCC for BISR, Poisson DP-SGD for C = I)."""

from __future__ import annotations

import json

import pytest

import mfnoise
from mfnoise.cli import format_table
from mfnoise.cli import main as cli_main
from mfnoise.core.participation import Participation
from mfnoise.strategies import io
from mfnoise.strategies.closed_forms import bisr
from mfnoise.training import accounting

N, D, M = 6, 300, 30
OPTS = {"pld_discretization": 1e-2, "max_components": 16}
FAST = ["--mmcc-discretization", "1e-2", "--mmcc-components", "16"]


def _args(path, *extra: str) -> list[str]:
    return ["calibrate", "--epsilon", "4", "--delta", "1e-5", "--strategy", str(path), "--sampling", "poisson",
            "--dataset-size", str(D), "--batch-size", str(M), *extra]


@pytest.fixture(scope="module")
def bisr_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "bisr.npz"
    io.save(bisr(N, 4), path)
    return path


@pytest.fixture(scope="module")
def mmcc_result(bisr_file):
    with pytest.MonkeyPatch.context() as mp:
        printed: list[str] = []
        mp.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
        assert cli_main([*_args(bisr_file, *FAST), "--json"]) == 0
    return json.loads(printed[-1])


def test_mmcc_calibration_matches_accounting(bisr_file, mmcc_result):
    out = mmcc_result
    kw = {"sampling": "poisson", "dataset_size": D, "batch_size": M, "strategy": io.load(bisr_file)}
    p = Participation(N, N, 1)  # the default schema of --sampling poisson
    z = accounting.calibrate(4.0, 1e-5, p, mmcc_options=dict(OPTS), **kw)
    assert out["noise_multiplier"] == z
    assert out["achieved_epsilon"] == accounting.epsilon(z, 1e-5, p, mmcc_options=dict(OPTS), **kw) <= 4.0
    assert out["theorem"] == "mmcc" and "arXiv:2310.15526" in out["paper"] and out["accountant"] == "mmcc"
    assert out["mmcc_options"] == OPTS and out["min_sep"] == 1 and out["max_participations"] == N


def test_text_names_the_theorem(mmcc_result):
    text = format_table(mmcc_result)  # what `mfnoise calibrate` prints without --json
    assert "theorem" in text and "mmcc" in text and "Privacy Amplification for Matrix Mechanisms" in text


def test_identity_is_poisson_dpsgd(tmp_path, capsys):
    path = tmp_path / "identity.npz"
    io.save(mfnoise.Identity(N), path)
    assert cli_main([*_args(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    z = accounting.calibrate(4.0, 1e-5, Participation(N, N, 1), sampling="poisson", dataset_size=D, batch_size=M,
                             strategy=mfnoise.Identity(N))
    assert out["theorem"] == "poisson-dpsgd" and out["noise_multiplier"] == z and out["accountant"] == "pld"


@pytest.mark.parametrize("extra, needle", [
    (["--epochs", "2"], "Participation(n, n, 1)"),  # Poisson accounting with a schema that retires examples
    (["--sampling", "balls-in-bins"], "provable"),  # a Monte Carlo estimate is not a noise multiplier
    (["--sampling", "b-min-sep"], "b-min-sep"),
    (["--sampling", "none", *FAST], "only apply to --sampling poisson"),
])
def test_refusals(bisr_file, capsys, extra, needle):
    assert cli_main(_args(bisr_file, *extra)) == 2
    assert needle in capsys.readouterr().err


def test_needs_strategy_and_sizes(bisr_file, capsys):
    assert cli_main(["calibrate", "--epsilon", "4", "--delta", "1e-5", "--n", "6", "--sampling", "poisson"]) == 2
    assert "--sampling poisson needs --strategy FILE" in capsys.readouterr().err
    assert cli_main(["calibrate", "--epsilon", "4", "--delta", "1e-5", "--strategy", str(bisr_file), "--sampling",
                     "poisson", "--batch-size", "30"]) == 2
    assert "--sampling poisson needs --dataset-size" in capsys.readouterr().err
