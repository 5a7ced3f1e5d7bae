"""``mfnoise verify``: honest files pass every check; edited or forged ones fail the right check."""

from __future__ import annotations

import json
import math
import os
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise import cli
from mfnoise.core import workloads
from mfnoise.core.participation import Participation
from mfnoise.strategies import error, io
from mfnoise.verify import checks as verify


def _write(path, strategy, workload, p, **overrides):
    """A strategy file with honest metadata (overridden by ``overrides``), digest recomputed."""
    r = error.evaluate(strategy, workload, p)
    meta = dict(participation=p, workload=workload, rmse=r["rmse"], max_error=r["max_error"],
                sensitivity=r["sensitivity"], objective="rmse")
    meta.update(overrides)
    return io.save(strategy, os.fspath(path), **meta)


def _status(report) -> dict:
    return {c["name"]: c["status"] for c in report.checks}


CASES = {
    "bsr": lambda n, w: mfnoise.bsr(n, 8, w),
    "bisr": lambda n, w: mfnoise.bisr(n, 8, w),
    "blt": lambda n, w: mfnoise.BLT(np.array([0.95, 0.4]), np.array([0.3, 0.2]), n),
    "banded-toeplitz": lambda n, w: mfnoise.Toeplitz(np.array([1.0, 0.6, 0.3, 0.1]), n),
    "toeplitz-signs": lambda n, w: mfnoise.Toeplitz(np.array([1.0, -0.4, 0.2]), n),
    "identity": lambda n, w: mfnoise.Identity(n),
    "dense": lambda n, w: mfnoise.Dense(np.tril(np.full((n, n), 0.1)) + np.eye(n)),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("n,epochs,wl", [(96, 4, "prefix"), (120, 1, "momentum:0.9")])
def test_honest_files_verify(tmp_path, family, n, epochs, wl):
    w, p = workloads.parse(wl, n), Participation.epochs(n, epochs)
    path = _write(tmp_path / "s.npz", CASES[family](n, w), w, p)
    report = verify.verify(path, streaming=family in ("blt", "bsr"))
    assert report.ok, report.checks
    assert {c["status"] for c in report.checks} <= {"pass", "skip"}
    names = [c["name"] for c in report.checks]
    assert names[:3] == ["integrity", "schema", "sensitivity"]
    assert "losses" in names and "factorization" in names and "inverse" in names


@pytest.mark.parametrize("family", ["blt", "banded-toeplitz", "bisr"])
def test_structured_path_beyond_the_dense_limit(tmp_path, family):
    n = verify.DENSE_LIMIT + 500
    w, p = workloads.prefix_sum(n), Participation.epochs(n, 8)
    path = _write(tmp_path / "s.npz", CASES[family](n, w), w, p)
    report = verify.verify(path, streaming=False)
    assert report.ok, report.checks
    sens = next(c for c in report.checks if c["name"] == "sensitivity")
    assert "worst-pattern Gram" in sens["detail"]  # the independent route at large n


def test_edited_byte_fails_integrity(tmp_path):
    n = 64
    w, p = workloads.prefix_sum(n), Participation.epochs(n, 2)
    path = _write(tmp_path / "s.npz", mfnoise.bsr(n, 4), w, p)
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    name = next(k for k in members if k.startswith("array/"))
    data = bytearray(members[name])
    data[-3] ^= 0x01  # one bit of one float in the strategy
    members[name] = bytes(data)
    edited = tmp_path / "edited.npz"
    with zipfile.ZipFile(edited, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    report = verify.verify(edited)
    assert not report.ok
    assert report.checks[0]["name"] == "integrity" and report.checks[0]["status"] == "fail"


def test_metadata_edited_in_place_fails_integrity(tmp_path):
    n = 64
    w, p = workloads.prefix_sum(n), Participation.epochs(n, 2)
    path = _write(tmp_path / "s.npz", mfnoise.bsr(n, 4), w, p)
    with np.load(path) as z:
        items = {k: z[k] for k in z.files}
    meta = json.loads(str(items["metadata"][()]))
    meta["sensitivity"] *= 0.5  # a smaller sensitivity would mean too little noise
    items["metadata"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(tmp_path / "edited.npz", **items)
    report = verify.verify(tmp_path / "edited.npz")
    assert not report.ok and _status(report)["integrity"] == "fail"


# Forgeries with a valid digest: the file is "intact" but its claim is false.
@pytest.mark.parametrize("n", [96, verify.DENSE_LIMIT + 200])
def test_forged_low_sensitivity_fails(tmp_path, n):
    w, p = workloads.prefix_sum(n), Participation.epochs(n, 4)
    s = mfnoise.BLT(np.array([0.9]), np.array([0.3]), n)
    true = s.sensitivity(p).value
    path = _write(tmp_path / "s.npz", s, w, p, sensitivity=true * (1 - 1e-6))
    report = verify.verify(path, streaming=False)
    assert not report.ok and _status(report)["sensitivity"] == "fail"


def test_forged_schema_fails(tmp_path):
    """A strategy with 16 bands claimed for min_sep 8 with the per-column sensitivity sqrt(k)."""
    n = 64
    w = workloads.prefix_sum(n)
    s = mfnoise.bsr(n, 16)
    p = Participation.epochs(n, 8)  # min_sep 8 < bands: columns of one pattern overlap
    path = _write(tmp_path / "s.npz", s, w, p, sensitivity=math.sqrt(8.0))
    report = verify.verify(path, streaming=False)
    assert not report.ok and _status(report)["sensitivity"] == "fail"


def test_forged_participation_fails(tmp_path):
    """Sensitivity honest for one epoch, file claims four."""
    n = 96
    w, s = workloads.prefix_sum(n), mfnoise.sqrt_toeplitz(n)
    one = error.evaluate(s, w, Participation.epochs(n, 1))
    path = _write(tmp_path / "s.npz", s, w, Participation.epochs(n, 4), sensitivity=one["sensitivity"],
                  rmse=one["rmse"], max_error=one["max_error"])
    report = verify.verify(path, streaming=False)
    assert not report.ok and _status(report)["sensitivity"] == "fail"


@pytest.mark.parametrize("key", ["rmse", "max_error"])
def test_forged_losses_fail(tmp_path, key):
    n = 96
    w, p = workloads.momentum(n, 0.9), Participation.epochs(n, 2)
    s = mfnoise.bisr(n, 4, w)
    honest = error.evaluate(s, w, p)[key]
    path = _write(tmp_path / "s.npz", s, w, p, **{key: honest * (1 - 1e-6)})
    report = verify.verify(path, streaming=False)
    assert not report.ok and _status(report)["losses"] == "fail"


def test_missing_metadata_fails_schema(tmp_path):
    n = 32
    s = mfnoise.Toeplitz(np.array([1.0, 0.5]), n)
    path = io.save(s, os.fspath(tmp_path / "s.npz"), rmse=1.0, max_error=1.0, sensitivity=1.0)
    report = verify.verify(path)
    assert not report.ok and _status(report) == {"integrity": "pass", "schema": "fail"}
    assert "participation" in report.checks[-1]["detail"]


def test_not_a_strategy_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    report = verify.verify(bad)
    assert not report.ok and report.checks[0]["status"] == "fail"


@settings(max_examples=15)
@given(n=st.integers(8, 40), epochs=st.integers(1, 6), bands=st.integers(1, 12),
       signs=st.booleans(), factor=st.floats(0.5, 0.999), seed=st.integers(0, 2**16))
def test_random_toeplitz_claims(tmp_path_factory, n, epochs, bands, signs, factor, seed):
    """Honest random Toeplitz files pass; the same file claiming less sensitivity fails."""
    rng = np.random.default_rng(seed)
    epochs = min(epochs, n)
    coeffs = np.sort(rng.uniform(0.05, 1.0, min(bands, n)))[::-1]
    if signs:
        coeffs = coeffs * rng.choice([-1.0, 1.0], coeffs.size)
        coeffs[0] = 1.0
    s = mfnoise.Toeplitz(coeffs, n)
    w, p = workloads.prefix_sum(n), Participation.epochs(n, epochs)
    try:
        honest = error.evaluate(s, w, p)
    except ValueError:
        return  # a sensitivity the foundation refuses to bound is never written
    folder = tmp_path_factory.mktemp("claims")
    good = _write(folder / "good.npz", s, w, p)
    assert verify.verify(good, streaming=False).ok
    if honest["sensitivity_exact"]:
        bad = _write(folder / "bad.npz", s, w, p, sensitivity=honest["sensitivity"] * factor)
        assert not verify.verify(bad, streaming=False).ok


def test_cli_json_and_exit_status(tmp_path, capsys):
    n = 64
    w, p = workloads.prefix_sum(n), Participation.epochs(n, 2)
    good = _write(tmp_path / "good.npz", mfnoise.bsr(n, 4), w, p)
    bad = _write(tmp_path / "bad.npz", mfnoise.bsr(n, 4), w, p, rmse=1.0)
    assert cli.main(["verify", good, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and isinstance(out["checks"], list)
    assert {"name", "status", "ok", "detail"} <= set(out["checks"][0])
    assert cli.main(["verify", bad, "--json", "--no-streaming"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert cli.main(["verify", good, bad, "--json", "--no-streaming"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["failed"] == [bad] and out["files"] == 2


@pytest.mark.parametrize("rel", [1e-6, 1e-3])
def test_a_wrong_inverse_fails_the_factorization(tmp_path, monkeypatch, rel):
    """An inverse_apply off by a relative 1e-6 is caught, also for an ill-conditioned C whose
    decoder B is 1e7 times larger than A (the check is scaled by |B| |C|, not by |A| alone)."""
    for coeffs in ([1.0, 0.5, 0.25], [1.0, 0.9236986, -0.79043499, 0.75070924, -0.47722169, 0.45811406]):
        s = mfnoise.Toeplitz(np.array(coeffs), 31)
        w, p = workloads.prefix_sum(31), Participation.single(31)
        path = _write(tmp_path / "s.npz", s, w, p)
        assert verify.verify(path, streaming=False).ok
        honest = mfnoise.Toeplitz.inverse_apply
        monkeypatch.setattr(mfnoise.Toeplitz, "inverse_apply",
                            lambda self, z, honest=honest: honest(self, z) * (1 + rel))
        checks = {c["name"]: c for c in verify.verify(path, streaming=False).checks}
        assert checks["factorization"]["status"] == "fail", checks["factorization"]
        monkeypatch.undo()


def test_mixed_sign_blt_verifies_with_streaming(tmp_path):
    """A BLT whose inverse has complex decays streams C's own buffers; verify checks those rows."""
    n = 64
    w, p = workloads.prefix_sum(n), Participation.epochs(n, 4)
    path = _write(tmp_path / "s.npz", mfnoise.BLT(np.array([0.9, 0.5]), np.array([0.5, -0.1]), n), w, p)
    report = verify.verify(path)
    assert report.ok, report.checks
    assert _status(report)["streaming"] == "pass"


def test_banded_routes_need_no_family_name(tmp_path):
    """A dense C with 3 bands gets the banded solve and the column-norm check, as a Banded C does."""
    n = 48
    rng = np.random.default_rng(0)
    c = np.tril(np.triu(rng.uniform(0.1, 1.0, (n, n)), -2)) + np.eye(n)
    w, p = workloads.prefix_sum(n), Participation.epochs(n, 4)
    checks = {c["name"]: c for c in verify.verify(_write(tmp_path / "d.npz", mfnoise.Dense(c), w, p)).checks}
    assert all(c["status"] == "pass" for c in checks.values()), checks
    assert "banded solve" in checks["factorization"]["detail"]
    assert "column-norm pattern sum" in checks["sensitivity"]["detail"]
