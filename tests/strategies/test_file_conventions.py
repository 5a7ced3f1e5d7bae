"""Files mfnoise writes follow the usual conventions (issue 10, item 10): a new file gets mode
0o666 & ~umask, it replaces its path atomically, and an output into a missing folder is refused
(naming the folder) before any work, never silently created. Every CLI output flag is covered."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

import mfnoise
from mfnoise import cli, library
from mfnoise.library import building
from mfnoise.strategies import io

FOLDER = library.directory()
SMALLEST = min(library.read_index(FOLDER)["strategies"], key=lambda e: e["bytes"])


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it (the umask is process-wide)."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _usual_mode(folder) -> int:
    """The mode open(path, 'w') gives a new file in ``folder`` now: the reference, measured."""
    probe = os.path.join(folder, ".probe")
    with open(probe, "w"):
        pass
    mode = os.stat(probe).st_mode & 0o777
    os.remove(probe)
    return mode


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


# -- the writer: mfnoise.strategies.io.atomic_write ------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077], ids=lambda m: f"umask{m:03o}")
def test_saved_files_get_the_usual_mode(tmp_path, umask, mask):
    """A new file gets 0o666 & ~umask, as open(path, 'w') gives it (mkstemp's 0o600 made a shared
    strategy file unreadable to the group)."""
    umask(mask)
    expected = _usual_mode(tmp_path)
    assert expected == 0o666 & ~mask
    path = io.save(mfnoise.bsr(8, 2), tmp_path / "s.npz")
    assert _mode(path) == expected
    with io.atomic_write(tmp_path / "t.txt", "w") as f:
        f.write("x")
    assert _mode(tmp_path / "t.txt") == expected and (tmp_path / "t.txt").read_text() == "x"
    # an overwrite is a new file too (atomic rename), with the same mode
    os.chmod(path, 0o600)
    io.save(mfnoise.bsr(8, 2), path)
    assert _mode(path) == expected
    assert sorted(os.listdir(tmp_path)) == ["s.npz", "t.txt"]  # no temporary files left


def test_missing_folder_is_refused_not_created(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="no-such-folder.*does not exist"):
        io.save(mfnoise.bsr(8, 2), missing / "s.npz")
    with pytest.raises(FileNotFoundError, match="deeper.*does not exist"):
        mfnoise.bsr(8, 2).save(str(missing / "deeper" / "s.npz"))
    with pytest.raises(FileNotFoundError, match=r"--out .*no-such-folder"):
        io.output_folder(missing / "s.npz", "--out")
    assert not missing.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        io.save(mfnoise.bsr(8, 2), tmp_path / "file" / "s.npz")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_unwritable_outputs_name_the_output(tmp_path, capsys, monkeypatch):
    """A folder given as the output file, or a folder without write permission: the message names
    the output and the folder (never the temporary file), and the CLI exits 2 with one line."""
    with pytest.raises(IsADirectoryError, match=r"--out .* is a folder"):
        io.output_folder(tmp_path, "--out")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if os.access(locked, os.W_OK):
        # root writes into read-only folders: let the file system refuse as it would anyone else
        real_open = os.open

        def refusing_open(path, *args, **kwargs):
            if os.path.dirname(os.fspath(path)) == str(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    try:
        with pytest.raises(PermissionError, match=r"path .*s\.npz.*cannot create a file in .*locked"):
            io.save(mfnoise.bsr(8, 2), locked / "s.npz")
        argv = ["optimize", "--family", "banded", "--bands", "2", "--n", "8", "--no-progress",
                "--out", str(locked / "s.npz")]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot create a file in" in err and ".tmp" not in err
    finally:
        monkeypatch.undo()
        os.chmod(locked, 0o700)
    assert os.listdir(locked) == []


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    """Write to a temporary file, rename when complete: a failure midway (an exception here, as a
    crash would be) leaves the previous file intact and no temporary file behind."""
    target = tmp_path / "s.npz"
    io.save(mfnoise.bsr(8, 2), target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="midway"), io.atomic_write(target) as f:
        f.write(b"partial")
        raise RuntimeError("midway")
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.npz"]
    with pytest.raises(TypeError, match="cannot store"):  # bad metadata fails before anything is written
        io.save(mfnoise.bsr(8, 4), target, bad=object())
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["s.npz"]
    with pytest.raises(ValueError, match="mode must be"), io.atomic_write(target, "a"):
        pass


# -- the library's index and files ------------------------------------------------------------------
def test_library_index_and_merged_files_get_the_usual_mode(tmp_path, umask):
    umask(0o022)
    source, target = tmp_path / "new", tmp_path / "lib"
    source.mkdir(), target.mkdir()
    data = (FOLDER / SMALLEST["file"]).read_bytes()
    (source / SMALLEST["file"]).write_bytes(data)
    os.chmod(source / SMALLEST["file"], 0o600)  # the copy's mode is that of a new file, not the source's
    library.add_entries(source, [SMALLEST])
    assert _mode(source / library.INDEX_NAME) == 0o644
    out = library.merge(source, target)
    assert [r["name"] for r in out["taken"]] == [SMALLEST["name"]]
    assert (target / SMALLEST["file"]).read_bytes() == data
    assert _mode(target / SMALLEST["file"]) == 0o644 and _mode(target / library.INDEX_NAME) == 0o644
    assert sorted(os.listdir(target)) == sorted([SMALLEST["file"], library.INDEX_NAME])


def test_library_build_creates_its_folder_but_not_the_folders_above(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"out .*'.*missing'.*does not exist"):
        library.build([], tmp_path / "missing" / "lib")
    assert not (tmp_path / "missing").exists()
    result = library.build([], tmp_path / "lib")
    assert result["ok"] and (tmp_path / "lib").is_dir()
    assert library.build([], tmp_path / "lib")["ok"]  # an existing folder is filled, not refused
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        library.build([], tmp_path / "file")


# -- every CLI output flag ------------------------------------------------------------------------
def _options(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{prefix} {name}".strip())
        elif action.option_strings and action.nargs != 0:
            yield prefix, action


OUTPUT_FLAGS = {("optimize", "--out"), ("library build", "--out"), ("plan", "--out"), ("demo", "--plot"),
                ("audit", "--out"), ("audit", "--plot")}


def test_every_output_flag_is_covered_here():
    """The CLI flags that name something to write are exactly those tested below (demo --plot: in
    test_demo.py, which needs the demo extra; audit --plot's mode: in test_cli_audit_plot below): a
    new one must join OUTPUT_FLAGS and get a test."""
    parser, _ = cli.build_parser()
    found = {(command, a.option_strings[-1]) for command, a in _options(parser)
             if a.dest in ("out", "plot", "output") or a.dest.endswith("_out")
             or "write" in (a.help or "").lower()}
    assert found == OUTPUT_FLAGS


def _refused(capsys, argv, folder) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"'{folder}'" in err and "does not exist" in err, err
    assert not os.path.exists(folder)


def _never(*args, **kwargs):
    raise AssertionError("the command started working before checking its output folder")


def test_cli_optimize_out(tmp_path, capsys, monkeypatch, umask):
    umask(0o022)
    argv = ["optimize", "--family", "banded", "--bands", "2", "--n", "8", "--no-progress", "--out"]
    with monkeypatch.context() as m:
        m.setattr(sys.modules["mfnoise.optim.solver"], "optimize", _never)
        _refused(capsys, [*argv, str(tmp_path / "typo" / "s.npz")], str(tmp_path / "typo"))
    assert cli.main([*argv, str(tmp_path / "s.npz"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(tmp_path / "s.npz") and _mode(out["path"]) == 0o644
    assert mfnoise.load(out["path"]).n == 8


def test_cli_library_build_out(tmp_path, capsys, monkeypatch, umask):
    umask(0o022)
    monkeypatch.setattr(building, "build_entry", _never)
    argv = ["library", "build", "--only", SMALLEST["name"], "--json", "--out"]
    _refused(capsys, [*argv, str(tmp_path / "typo" / "lib")], str(tmp_path / "typo"))
    # the folder itself may be new (or exist); its index gets the usual mode
    monkeypatch.setattr(building, "build_entry", lambda s, out: dict(SMALLEST))
    for _ in range(2):
        assert cli.main([*argv, str(tmp_path / "lib")]) == 0
        assert json.loads(capsys.readouterr().out)["ok"]
        assert _mode(tmp_path / "lib" / library.INDEX_NAME) == 0o644


def test_cli_plan_out(tmp_path, capsys, monkeypatch, umask):
    umask(0o022)
    import mfnoise.planning

    argv = ["plan", "--epsilon", "8", "--delta", "1e-5", "--dataset-size", "200", "--batch-size", "20",
            "--epochs", "2", "--mechanism", "dp-sgd", "--sampling", "cyclic", "--json", "--out"]
    with monkeypatch.context() as m:
        m.setattr(mfnoise.planning, "plan", _never)
        _refused(capsys, [*argv, str(tmp_path / "typo" / "plan.json")], str(tmp_path / "typo"))
    assert cli.main([*argv, str(tmp_path / "plan.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["out"] == str(tmp_path / "plan.json") and _mode(out["out"]) == 0o644
    assert mfnoise.planning.load(out["out"]).fingerprint == out["fingerprint"]


AUDIT = ["audit", "--family", "identity", "--n", "8", "--epochs", "2", "--noise-multiplier", "1",
         "--delta", "1e-5", "--trials", "2000", "--quiet"]


def test_cli_audit_out(tmp_path, capsys, monkeypatch, umask):
    """--out and --plot into a missing folder fail before the audit; --out is written with the usual
    mode and holds the result."""
    umask(0o022)
    import mfnoise.auditing.api

    with monkeypatch.context() as m:
        m.setattr(mfnoise.auditing.api, "audit", _never)
        _refused(capsys, [*AUDIT, "--out", str(tmp_path / "typo" / "a.json")], str(tmp_path / "typo"))
        _refused(capsys, [*AUDIT, "--plot", str(tmp_path / "typo2" / "roc.png")], str(tmp_path / "typo2"))
    assert cli.main([*AUDIT, "--json", "--out", str(tmp_path / "a.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["out"] == str(tmp_path / "a.json") and _mode(out["out"]) == 0o644
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["claimed_epsilon"] == out["claimed_epsilon"] and saved["ok"] is True


def test_cli_audit_plot(tmp_path, capsys, umask):
    pytest.importorskip("matplotlib", reason="--plot needs the 'demo' extra (matplotlib)")
    umask(0o022)
    assert cli.main([*AUDIT, "--json", "--plot", str(tmp_path / "roc.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plot"] == str(tmp_path / "roc.png") and _mode(out["plot"]) == 0o644
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["roc.png"]  # no temporary file left
