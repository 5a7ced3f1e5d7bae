"""The shipped strategy library: index, files, lookup, packaging, rebuild, and every file verifies."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shlex
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

import mfnoise
from mfnoise import cli, library
from mfnoise.core.participation import Participation
from mfnoise.strategies import io
from mfnoise.verify import checks as verify

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "strategies"
INDEX = json.loads((FOLDER / "index.json").read_text())
ENTRIES = INDEX["strategies"]
BY_NAME = {e["name"]: e for e in ENTRIES}


NEW_ENTRIES = (
    # Built last (2026-11-26, second session): the optimum's largest decay is 1 (saturated, theta < 1).
    "momentum0.9-n2000-e4-blt4-max",
    # Formerly failed with theta = 1.0, and other sizes and objectives first built then.
    "prefix-n10000-e64-blt5-rmse",
    "prefix-n100000-e1-blt5-max",
    "momentum0.9-n10000-e16-blt3-max",
    "prefix-n1000-e8-banded64-rmse",
)


def _optimize_args(command: str) -> dict:
    """What an ``mfnoise optimize`` command asks for, as the CLI parses it (the family in the
    library's vocabulary, the output by its file name)."""
    argv = shlex.split(command)
    assert argv[:2] == ["mfnoise", "optimize"]
    args = cli.build_parser()[0].parse_args(argv[1:])
    return {"family": library.canonical_family(args.family), "bands": args.bands, "buffers": args.buffers,
            "n": args.n, "epochs": args.epochs, "workload": args.workload, "objective": args.objective,
            "out": Path(args.out).name}


def _subset() -> list[dict]:
    """One entry per (optimizer family, objective, size class): the smallest n, and the largest;
    plus NEW_ENTRIES (those that exercised the optimizer's saturated decays and the last build)."""
    chosen: dict[object, dict] = {name: BY_NAME[name] for name in NEW_ENTRIES if name in BY_NAME}
    for e in sorted(ENTRIES, key=lambda e: (e["n"], -e["epochs"], e["name"])):
        size = e.get("buffers", e.get("bands"))
        chosen.setdefault((e["optimizer_family"], e["objective"], size > 4), e)
    for e in sorted(ENTRIES, key=lambda e: (-e["n"], e["name"])):
        chosen.setdefault((e["optimizer_family"], "largest"), e)
    return sorted(chosen.values(), key=lambda e: e["name"])


def test_index_is_well_formed():
    assert INDEX["format"] == library.INDEX_FORMAT and INDEX["format_version"] == library.INDEX_FORMAT_VERSION
    assert len(ENTRIES) == len(BY_NAME) > 0
    grid = {s.name: s for s in library.grid()}
    for e in ENTRIES:
        s = grid[e["name"]]  # every entry is a point of the grid, and fits it
        p = s.participation()
        assert (e["workload"], e["n"], e["epochs"], e["optimizer_family"], e["objective"]) == \
            (s.workload, s.n, s.epochs, s.family, s.objective)
        assert (e["max_participations"], e["min_sep"], e["participation"]) == \
            (p.max_participations, p.min_sep, "cyclic")
        assert e["requested_" + s.size_key] == s.size and e[s.size_key] <= s.size
        assert e["file"] == f"{s.name}.npz"
        # The command regenerates this entry: run in the library folder, it writes the entry's file.
        assert e["command"] == s.command()
        assert _optimize_args(e["command"]) == {"family": s.family, "bands": None, "buffers": None,
                                                "n": s.n, "epochs": s.epochs, "workload": s.workload,
                                                "objective": s.objective, "out": e["file"],
                                                s.size_key: s.size}
        if s.family != "blt":
            assert s.size <= p.min_sep  # "where they fit"
        for key in ("rmse", "max_error", "sensitivity"):
            assert np.isfinite(e[key]) and e[key] > 0


def test_folder_holds_exactly_the_indexed_files_under_40_mib():
    files = {f.name for f in FOLDER.iterdir()}
    assert files - {"README.md", "__init__.py", "__pycache__"} == {e["file"] for e in ENTRIES} | {"index.json"}
    total = sum(f.stat().st_size for f in FOLDER.iterdir())
    assert total < 40 * 2**20
    assert library.total_bytes(FOLDER) == total


def test_every_file_matches_its_index_entry():
    """sha256 of the bytes, the file's own digest, and the metadata numbers, for every file."""
    for e in ENTRIES:
        path = FOLDER / e["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"], e["name"]
        assert path.stat().st_size == e["bytes"]
        _, meta = io.read(os.fspath(path))
        assert meta["sha256"] == e["digest"]
        # The file records the command it was built with (older files: with a folder and the
        # optimizer's former family name); it asks for the same optimization as the index's.
        assert meta["name"] == e["name"] and _optimize_args(meta["command"]) == _optimize_args(e["command"])
        for key in ("rmse", "max_error", "sensitivity"):
            assert meta[key] == e[key]
        assert Participation.from_dict(meta["participation"]) == library.schema(e["n"], e["epochs"])
        assert meta["workload"]["name"] == e["workload"]
        # The state the noise generator keeps is that of the stored strategy.
        size = meta["params"].get("buffers", meta["params"].get("bands", 0) - 1)
        assert e["state_arrays"] == size and e.get("buffers", e.get("bands")) == meta["params"].get(
            "buffers", meta["params"].get("bands"))


@pytest.mark.parametrize("name", [e["name"] for e in _subset()])
def test_shipped_subset_verifies(name):
    e = BY_NAME[name]
    report = verify.verify(FOLDER / e["file"], index_entry=e)
    assert report.ok, [c for c in report.checks if c["status"] == "fail"]
    assert {c["name"] for c in report.checks if c["status"] == "pass"} >= {
        "integrity", "index", "schema", "sensitivity", "factorization", "inverse", "streaming", "losses"}


def test_new_entries_are_shipped():
    assert set(NEW_ENTRIES) <= set(BY_NAME)


def test_more_buffers_are_never_worse():
    """Issue 3: for one workload, schema and objective, an entry asked for more BLT buffers never has a
    larger objective than one asked for fewer (the staged optimizer grows buffers one at a time and
    keeps the best); and a BLT with fewer buffers than asked is at least as good as the smaller ones."""
    groups: dict[tuple, dict[int, dict]] = {}
    for e in ENTRIES:
        if e["optimizer_family"] == "blt":
            key = (e["workload"], e["n"], e["epochs"], e["objective"])
            groups.setdefault(key, {})[e["requested_buffers"]] = e
    worse = []
    for key, by_size in groups.items():
        obj = "rmse" if key[3] == "rmse" else "max_error"
        for small, a in by_size.items():
            for large, b in by_size.items():
                if large > small and b[obj] > a[obj] * (1 + 1e-6):
                    worse.append((b["name"], b[obj], a["name"], a[obj]))
    assert not worse, worse[:10]


@pytest.mark.slow
def test_whole_library_verifies():
    """Every shipped file; the streaming generator (a JAX compilation each) on the fast subset above."""
    failed = [e["name"] for e in ENTRIES
              if not verify.verify(FOLDER / e["file"], index_entry=e, streaming=False).ok]
    assert not failed


def test_edited_library_file_fails_verify(tmp_path):
    e = min(ENTRIES, key=lambda e: e["bytes"])
    data = bytearray((FOLDER / e["file"]).read_bytes())
    copy = tmp_path / e["file"]
    # Flip one bit in every stored float in turn until the file still opens (a zip member's body).
    with np.load(FOLDER / e["file"]) as z:
        arr = z[next(k for k in z.files if k.startswith("array/"))]
    raw = np.ascontiguousarray(arr).tobytes()
    at = bytes(data).find(raw)
    assert at > 0
    data[at + 1] ^= 0x10
    copy.write_bytes(bytes(data))
    report = verify.verify(copy, index_entry=e)
    assert not report.ok
    status = {c["name"]: c["status"] for c in report.checks}
    assert status["integrity"] == "fail"


def test_forged_library_file_fails_index_check(tmp_path):
    """A valid strategy file put in place of a shipped one: the index check catches it."""
    e = min(ENTRIES, key=lambda e: e["bytes"])
    strategy = library.get(e["name"], folder=FOLDER)
    _, meta = io.read(os.fspath(FOLDER / e["file"]))
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "family", "params",
                                                       "mfnoise_version", "sha256")}
    meta["rmse"] *= 0.99
    forged = io.save(strategy, os.fspath(tmp_path / e["file"]), **meta)
    report = verify.verify(forged, index_entry=e, streaming=False)
    status = {c["name"]: c["status"] for c in report.checks}
    assert not report.ok and status["index"] == "fail" and status["losses"] == "fail"


def test_get_by_name_and_by_criteria():
    e = ENTRIES[0]
    s = library.get(e["name"])
    assert isinstance(s, mfnoise.Strategy) and s.n == e["n"] and s.family == e["family"]
    size_key = "requested_buffers" if e["optimizer_family"] == "blt" else "requested_bands"
    s2 = library.get(workload=e["workload"], n=e["n"], epochs=e["epochs"], family=e["optimizer_family"],
                     objective=e["objective"], **{size_key: e[size_key]})
    assert s2.arrays().keys() == s.arrays().keys()
    assert all(np.array_equal(s.arrays()[k], s2.arrays()[k]) for k in s.arrays())
    assert library.path(e["name"]) == FOLDER.resolve() / e["file"] or \
        library.path(e["name"]).samefile(FOLDER / e["file"])
    assert mfnoise.library.get is library.get
    with pytest.raises(ValueError, match="no strategy named"):
        library.get("no-such-strategy")
    with pytest.raises(ValueError, match="entries match"):
        library.get(n=e["n"])  # ambiguous


def test_found_from_env_checkout_and_package(tmp_path, monkeypatch):
    monkeypatch.delenv(library.ENV_VAR, raising=False)
    assert library.directory().samefile(FOLDER)
    # The installed-package route: the package data mfnoise.library.data (the checkout's strategies/).
    import importlib.resources

    packaged = Path(str(importlib.resources.files("mfnoise.library.data")))
    assert (packaged / "index.json").is_file() and packaged.samefile(FOLDER)
    monkeypatch.setenv(library.ENV_VAR, os.fspath(tmp_path))
    assert library.directory() == tmp_path
    with pytest.raises(FileNotFoundError):
        library.read_index()


def test_package_data_globs_ship_every_file():
    """pyproject's package-data patterns match every library file (so a wheel carries them)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["mfnoise.library.data"]
    for f in [e["file"] for e in ENTRIES] + ["index.json"]:
        assert any(fnmatch.fnmatchcase(f, pat) for pat in patterns), f


def test_grid_matches_the_issue():
    grid = library.grid()
    assert {s.workload for s in grid} == {"prefix", "momentum:0.9"}
    assert {s.n for s in grid} == {1000, 2000, 5000, 10000, 100000}
    assert {s.epochs for s in grid} == {1, 2, 4, 8, 16, 32, 64}
    assert {(s.size, s.objective) for s in grid if s.family == "blt"} == {
        (d, o) for d in range(2, 7) for o in ("rmse", "max")}
    assert {s.size for s in grid if s.family == "toeplitz"} == {4, 16, 64}
    assert max(s.n for s in grid if s.family == "banded") == 2000
    assert all(s.fits() for s in grid) and len({s.name for s in grid}) == len(grid)


def test_one_family_vocabulary_with_the_old_name_as_an_alias(capsys):
    """Families are the strategies' names; ``banded-toeplitz`` still selects ``toeplitz``; names stay."""
    assert library.OPTIMIZER_FAMILIES == ("blt", "toeplitz", "banded")
    assert {e["optimizer_family"] for e in ENTRIES} == {e["family"] for e in ENTRIES} == set(library.OPTIMIZER_FAMILIES)
    old = library.Spec("prefix", 1000, 4, "banded-toeplitz", 16)
    assert old == library.Spec("prefix", 1000, 4, "toeplitz", 16) and old.family == "toeplitz"
    assert old.name == "prefix-n1000-e4-banded-toeplitz16-rmse" and old.name in BY_NAME
    toeplitz = library.entries(optimizer_family="toeplitz")
    assert toeplitz == library.entries(optimizer_family="banded-toeplitz") == library.entries(family="toeplitz")
    assert toeplitz and all(e["family"] == "toeplitz" for e in toeplitz)
    with pytest.raises(ValueError, match="unknown library family"):
        library.Spec("prefix", 1000, 4, "dense", 16)
    for family in ("toeplitz", "banded-toeplitz"):
        assert cli.main(["library", "list", "--n", "1000", "--epochs", "4", "--family", family, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["strategies"]
        assert {r["name"] for r in rows} == {e["name"] for e in toeplitz if e["n"] == 1000 and e["epochs"] == 4}


def test_list_recommend_and_the_grid_give_no_warnings(capsys):
    """The grid builds schemas whose k does not divide n on purpose: no EpochsWarning for them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert any(s.participation().max_participations != s.epochs for s in library.grid())
        for argv in (["library", "list", "--n", "1000", "--epochs", "16"],
                     ["recommend", "--n", "1000", "--epochs", "16", "--params", "1000"]):
            assert cli.main(argv) == 0
            out = capsys.readouterr()
            assert "Warning" not in out.err and out.out.strip()


def test_build_reproduces_a_shipped_entry(tmp_path):
    """`library build` regenerates an entry and matches the shipped losses."""
    name = min((e for e in ENTRIES if e["optimizer_family"] != "banded" and e["objective"] == "rmse"),
               key=lambda e: (e["n"], e["seconds"]))["name"]
    result = library.build([library.spec(name)], tmp_path, shipped=FOLDER, update_index=True)
    row = result["built"][0]
    assert result["ok"] and row["shipped"] and abs(row["rel_diff_rmse"]) <= 1e-3
    assert verify.verify(tmp_path / f"{name}.npz", index_entry=library.entry(name, tmp_path), streaming=False).ok


def test_cli_list_show_path(capsys):
    assert cli.main(["library", "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["strategies"]) == len(ENTRIES)
    first = out["strategies"][0]
    assert {"name", "family", "n", "max_participations", "min_sep", "rmse", "max_error", "path"} <= set(first)
    assert Path(first["path"]).is_file()
    e = ENTRIES[-1]
    assert cli.main(["library", "list", "--n", str(e["n"]), "--epochs", str(e["epochs"]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["strategies"]
    assert rows and all(r["n"] == e["n"] and r["epochs"] == e["epochs"] for r in rows)
    assert cli.main(["library", "path", e["name"], "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["path"]).samefile(FOLDER / e["file"])
    assert cli.main(["library", "path", e["name"]]) == 0
    assert Path(capsys.readouterr().out.strip()).samefile(FOLDER / e["file"])
    assert cli.main(["library", "show", e["name"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == e["name"] and shown["metadata"]["sha256"] == e["digest"]
    assert cli.main(["library", "show", "nope", "--json"]) == 2
    assert "no strategy named" in json.loads(capsys.readouterr().out)["error"]


def test_cli_build_dry_run(capsys):
    assert cli.main(["library", "build", "--missing", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["names"]) == {s.name for s in library.grid()} - set(BY_NAME)


def test_merge_takes_better_or_new_entries_and_keeps_better_shipped_ones(tmp_path):
    """library.merge: a regenerated entry replaces the shipped one only when it is better (or the
    target lacks it); a worse one is reported and the shipped file stays."""
    import shutil

    picks = sorted(ENTRIES, key=lambda e: e["bytes"])[:4]
    source, target = tmp_path / "new", tmp_path / "lib"
    source.mkdir()
    target.mkdir()
    for e in picks:
        shutil.copyfile(FOLDER / e["file"], source / e["file"])
        shutil.copyfile(FOLDER / e["file"], target / e["file"])
    key = lambda e: "rmse" if e["objective"] == "rmse" else "max_error"  # noqa: E731
    better, worse, same, new = (dict(e) for e in picks)
    better[key(better)] *= 0.99
    worse[key(worse)] *= 1.01
    same[key(same)] *= 1 + 1e-6
    library.add_entries(source, [better, worse, same, new])
    library.add_entries(target, [picks[0], picks[1], picks[2]])
    out = library.merge(source, target)
    assert [r["name"] for r in out["taken"]] == sorted([better["name"], new["name"]])
    assert [r["name"] for r in out["worse"]] == [worse["name"]]
    assert [r["name"] for r in out["kept"]] == [same["name"]]
    merged = {e["name"]: e for e in library.read_index(target)["strategies"]}
    assert merged[better["name"]] == better and merged[worse["name"]] == picks[1]
    assert merged[same["name"]] == picks[2] and merged[new["name"]] == new
