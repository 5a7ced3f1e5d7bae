"""``mfnoise evaluate`` names the sensitivity routine that was actually run, and its value is right.

The reference values are brute force on the dense C: sens^2 = max over patterns P of sum_{i,j in P}
X[i, j], X = C^T C (exact when X >= 0 on the patterns, which holds for the positive BLTs and banded
matrices here); a single participation's is the largest column norm.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math

import numpy as np
import pytest

import mfnoise
from mfnoise.cli import main


def _evaluate(path: str, *argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["evaluate", path, *argv, "--json"]) == 0
    return json.loads(out.getvalue())


def _brute_force(c: np.ndarray, k: int, b: int) -> float:
    """max over min-sep patterns (at most k steps, pairwise >= b apart) of sqrt(sum_{i,j in P} X_ij)."""
    n = c.shape[0]
    x = c.T @ c
    assert np.all(x >= -1e-12)  # so that the |X| sum is the sensitivity, not only a bound
    best = 0.0
    for size in range(1, k + 1):
        for pat in itertools.combinations(range(n), size):
            if all(q - p >= b for p, q in zip(pat, pat[1:])):
                best = max(best, float(x[np.ix_(pat, pat)].sum()))
    return math.sqrt(best)


BLT = mfnoise.BLT(np.array([0.9, 0.5]), np.array([0.3, 0.2]), 12)


@pytest.mark.parametrize("blt,methods", [
    (BLT, {"blt-closed-form", "max-column-norm"}),  # omega > 0: the BLT's closed form may take it
    # omega of mixed signs: no closed form; the column-norm routine runs as the single-participation max
    (mfnoise.BLT(np.array([0.9, 0.5]), np.array([0.3, -0.1]), 12), {"max-column-norm"}),
])
def test_blt_single_participation_is_its_largest_column_norm(tmp_path, blt, methods):
    path = str(blt.save(tmp_path / "blt.npz", participation=mfnoise.Participation.epochs(12, 1)))
    r = _evaluate(path)
    assert r["family"] == "blt" and r["max_participations"] == 1
    # A BLT is not banded: never reported as the banded column-norm programme.
    assert r["sensitivity_method"] in methods
    assert r["sensitivity_exact"] is True
    expected = float(np.max(np.linalg.norm(blt.dense(), axis=0)))
    assert r["sensitivity"] == pytest.approx(expected, rel=1e-12)


def test_blt_several_participations_is_not_reported_as_banded(tmp_path):
    path = str(BLT.save(tmp_path / "blt.npz", participation=mfnoise.Participation(12, 3, 4)))
    r = _evaluate(path)
    assert r["max_participations"] == 3 and r["min_sep"] == 4
    assert r["sensitivity_method"] != "banded-dp" and "banded" not in r["sensitivity_method"]
    assert r["sensitivity"] == pytest.approx(_brute_force(BLT.dense(), 3, 4), rel=1e-10)


def test_banded_with_bands_within_min_sep_is_the_banded_dp(tmp_path):
    rng = np.random.default_rng(3)
    cols = rng.uniform(0.1, 1.0, (12, 3))
    cols[np.add.outer(np.arange(12), np.arange(3)) >= 12] = 0.0  # C[t + j, t] exists only for t + j < n
    banded = mfnoise.Banded(cols)
    path = str(banded.save(tmp_path / "banded.npz", participation=mfnoise.Participation(12, 3, 4)))
    r = _evaluate(path)
    assert r["sensitivity_method"] == "banded-dp"
    assert r["sensitivity"] == pytest.approx(_brute_force(banded.dense(), 3, 4), rel=1e-10)
    r = _evaluate(path, "--epochs", "1")  # the same matrix, one participation
    assert r["sensitivity_method"] == "max-column-norm"
    assert r["sensitivity"] == pytest.approx(float(np.max(np.linalg.norm(banded.dense(), axis=0))), rel=1e-12)


def test_closed_form_single_participation(capsys):
    assert main(["evaluate", "--family", "sqrt-toeplitz", "--n", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    c = mfnoise.sqrt_toeplitz(64).dense()
    assert r["sensitivity_method"] == "max-column-norm"
    assert r["sensitivity"] == pytest.approx(float(np.max(np.linalg.norm(c, axis=0))), rel=1e-12)
