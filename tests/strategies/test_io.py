"""Strategy files: exact round trip for every family, and refusal of corrupted or edited files."""

from __future__ import annotations

import io as _io
import json
import os
import zipfile

import numpy as np
import pytest

import mfnoise
from mfnoise.core import workloads
from mfnoise.strategies import io

from conftest import FAMILIES, make_strategy


def _strategies():
    rng = np.random.default_rng(2)
    out = [make_strategy(f, 9, rng, bands=4)[0] for f in FAMILIES]
    out.append(mfnoise.Toeplitz(np.array([1.0, 0.5, 0.25]), 9))  # banded Toeplitz
    return out


IDS = FAMILIES + ["banded-toeplitz"]


@pytest.mark.parametrize("s", _strategies(), ids=IDS)
def test_round_trip_is_exact(s, tmp_path):
    p = mfnoise.Participation.epochs(9, 3)
    w = workloads.momentum(9, 0.9)
    ev = mfnoise.evaluate(s, w, p)
    path = s.save(str(tmp_path / "s"), participation=p, workload=w, rmse=ev["rmse"],
                  max_error=ev["max_error"], sensitivity=ev["sensitivity"], note=np.float64(0.1))
    assert path.endswith(".npz") and os.path.exists(path)
    back = mfnoise.load(path)
    assert type(back) is type(s) and back.family == s.family and back.n == s.n
    assert back.params() == s.params()
    assert back.arrays().keys() == s.arrays().keys()
    for k, v in s.arrays().items():
        assert back.arrays()[k].dtype == np.float64
        np.testing.assert_array_equal(back.arrays()[k], v)  # bit for bit
    np.testing.assert_array_equal(back.dense(), s.dense())
    arrays, meta = io.read(path)
    assert meta["family"] == s.family and meta["params"] == s.params()
    assert meta["format"] == io.FORMAT_NAME and meta["format_version"] == io.FORMAT_VERSION
    assert meta["mfnoise_version"] == mfnoise.__version__
    assert meta["participation"] == p.to_dict()
    assert mfnoise.Participation.from_dict(meta["participation"]) == p
    assert meta["workload"] == w.to_dict()
    assert meta["rmse"] == ev["rmse"] and meta["max_error"] == ev["max_error"]  # floats exact through JSON
    assert meta["sensitivity"] == ev["sensitivity"] and meta["note"] == 0.1
    assert len(meta["sha256"]) == 64


def test_round_trip_through_io_save(tmp_path):
    s = mfnoise.bsr(20, 4)
    path = io.save(s, tmp_path / "x.npz")  # accepts PathLike
    np.testing.assert_array_equal(mfnoise.load(path).columns, s.columns)
    assert os.listdir(tmp_path) == ["x.npz"]  # no temporary files left


@pytest.fixture
def saved(tmp_path):
    s = mfnoise.BLT(np.array([0.3, 0.8]), np.array([0.4, 0.1]), 16)
    path = s.save(str(tmp_path / "blt.npz"), participation=mfnoise.Participation.single(16), rmse=1.25)
    with open(path, "rb") as f:
        raw = f.read()
    return s, path, raw


def _write(tmp_path, raw, name="t.npz"):
    q = tmp_path / name
    q.write_bytes(bytes(raw))
    return str(q)


def _member_span(raw, name):
    """(start, end) of a member's stored bytes inside the zip."""
    with zipfile.ZipFile(_io.BytesIO(raw)) as z:
        info = z.getinfo(name)
    # Local header: 30 bytes + file name + extra field, then the data.
    n_name = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    n_extra = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + n_name + n_extra
    return start, start + info.compress_size


def test_edited_bytes_in_data_and_metadata_are_refused(saved, tmp_path):
    s, path, raw = saved
    positions = []
    for member in ("array/theta.npy", "array/omega.npy", "metadata.npy"):
        start, end = _member_span(raw, member)
        positions += [start, start + 10, (start + end) // 2, end - 8, end - 1]  # header and data
    # Inside the metadata JSON text (stored as UTF-32 in the .npy): the digits of rmse and the family.
    start, end = _member_span(raw, "metadata.npy")
    text = raw[start:end]
    for needle in ("1.25", "blt", "sha256", '"n"'):
        at = text.find(needle.encode("utf-32-le"))
        assert at >= 0, needle
        positions.append(start + at)
    for i in positions:
        for mask in (0x01, 0x80, 0xFF):
            b = bytearray(raw)
            b[i] ^= mask
            with pytest.raises(ValueError, match="strategy file|integrity|format"):
                mfnoise.load(_write(tmp_path, b))


def test_every_byte_flip_is_refused_or_harmless(saved, tmp_path):
    """Flip bytes all through the file: either ValueError, or exactly the same arrays and metadata.

    (Bytes the zip reader never looks at, such as timestamps and local-header copies of sizes, can
    change without changing what is loaded; everything that is loaded is covered by CRC-32 and the
    sha256.) No other exception type may escape.
    """
    s, path, raw = saved
    arrays0, meta0 = io.read(path)
    refused = 0
    for i in range(0, len(raw), 2):  # every other byte keeps this under a few seconds
        b = bytearray(raw)
        b[i] ^= 0x5A
        q = _write(tmp_path, b)
        try:
            arrays, meta = io.read(q)
            back = mfnoise.load(q)
        except ValueError:
            refused += 1
            continue
        assert meta == meta0, i
        assert arrays.keys() == arrays0.keys()
        for k in arrays0:
            np.testing.assert_array_equal(arrays[k], arrays0[k])
        np.testing.assert_array_equal(back.theta, s.theta)
    assert refused > 0.8 * len(raw) / 2


def test_edited_metadata_with_stale_sha_is_refused(saved, tmp_path):
    """A well-formed file (valid zip, valid CRCs) whose content changed but whose sha256 did not."""
    s, path, raw = saved
    arrays, meta = io.read(path)
    for key, value in [("rmse", 0.5), ("family", "toeplitz"), ("participation", None),
                       ("params", {"n": 16, "buffers": 2, "x": 1})]:
        edited = dict(meta, **{key: value})
        q = str(tmp_path / f"edit-{key}.npz")
        np.savez(q, metadata=np.array(json.dumps(edited, sort_keys=True)),
                 **{f"array/{k}": v for k, v in arrays.items()})
        with pytest.raises(ValueError, match="integrity check"):
            mfnoise.load(q)
    # An edited array value, metadata untouched.
    q = str(tmp_path / "edit-array.npz")
    theta = arrays["theta"].copy()
    theta[0] = np.nextafter(theta[0], 1.0)  # one ulp
    np.savez(q, metadata=np.array(json.dumps(meta, sort_keys=True)), **{"array/theta": theta,
                                                                         "array/omega": arrays["omega"]})
    with pytest.raises(ValueError, match="integrity check"):
        mfnoise.load(q)
    # A removed or added array.
    q = str(tmp_path / "edit-drop.npz")
    np.savez(q, metadata=np.array(json.dumps(meta, sort_keys=True)), **{"array/theta": arrays["theta"]})
    with pytest.raises(ValueError, match="integrity check"):
        mfnoise.load(q)
    q = str(tmp_path / "edit-add.npz")
    np.savez(q, metadata=np.array(json.dumps(meta, sort_keys=True)),
             **{f"array/{k}": v for k, v in arrays.items()}, **{"array/extra": np.ones(2)})
    with pytest.raises(ValueError, match="integrity check"):
        mfnoise.load(q)


def test_consistent_but_invalid_files_are_refused(saved, tmp_path):
    """Edits with a recomputed sha256 are not tampering-proof, but must still be valid strategies."""
    s, path, raw = saved
    arrays, meta = io.read(path)

    def write(arrays, meta, name):
        meta = dict(meta)
        meta["sha256"] = io.digest(arrays, meta)
        q = str(tmp_path / name)
        np.savez(q, metadata=np.array(json.dumps(meta, sort_keys=True)),
                 **{f"array/{k}": v for k, v in arrays.items()})
        return q

    with pytest.raises(ValueError, match="unknown strategy family 'nope'"):
        mfnoise.load(write(arrays, dict(meta, family="nope"), "a.npz"))
    with pytest.raises(ValueError, match="theta=1.5"):
        mfnoise.load(write(dict(arrays, theta=np.array([0.3, 1.5])), meta, "b.npz"))
    with pytest.raises(ValueError, match="invalid blt strategy"):
        mfnoise.load(write({"theta": arrays["theta"]}, meta, "c.npz"))
    with pytest.raises(ValueError, match="format_version=2"):
        mfnoise.load(write(arrays, dict(meta, format_version=2), "d.npz"))
    with pytest.raises(ValueError, match="format="):
        mfnoise.load(write(arrays, dict(meta, format="other"), "e.npz"))
    dense = mfnoise.Dense(np.eye(3))
    d_arrays, d_meta = io.read(dense.save(str(tmp_path / "dense.npz")))
    with pytest.raises(ValueError, match="metadata says n=5"):
        mfnoise.load(write(d_arrays, dict(d_meta, params={"n": 5}), "f.npz"))
    assert isinstance(mfnoise.load(write(d_arrays, dict(d_meta, params=[3]), "g.npz")), mfnoise.Dense)


def test_not_a_strategy_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        mfnoise.load(str(tmp_path / "missing.npz"))
    q = tmp_path / "text.npz"
    q.write_text("hello")
    with pytest.raises(ValueError, match="not a readable mfnoise strategy file"):
        mfnoise.load(str(q))
    q = str(tmp_path / "plain.npz")
    np.savez(q, x=np.ones(3))
    with pytest.raises(ValueError, match="no metadata"):
        mfnoise.load(q)
    q = str(tmp_path / "list.npz")
    np.savez(q, metadata=np.array(json.dumps([1, 2])))
    with pytest.raises(ValueError, match="not an mfnoise strategy file"):
        mfnoise.load(q)
    q = str(tmp_path / "pickle.npz")
    np.savez(q, metadata=np.array({"a": 1}, dtype=object))
    with pytest.raises(ValueError, match="not a readable"):
        mfnoise.load(q)  # allow_pickle=False: object arrays are never unpickled


def test_truncated_file_refused(saved, tmp_path):
    s, path, raw = saved
    for cut in (0, 10, len(raw) // 2, len(raw) - 1):
        with pytest.raises(ValueError):
            mfnoise.load(_write(tmp_path, raw[:cut]))


def test_metadata_must_be_json(tmp_path):
    s = mfnoise.Identity(4)
    with pytest.raises(TypeError, match="cannot store object"):
        s.save(str(tmp_path / "x.npz"), bad=object())
