"""``mfnoise verify`` from a folder that is not the checkout: library names, paths, and what is refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest

from mfnoise import library
from mfnoise.cli import main

NAME = "prefix-n1000-e4-blt4-rmse"  # a small shipped entry (n = 1000, dense checks are quick)


def _verify(capsys, *argv: str) -> tuple[int, dict | None, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["verify", "--no-streaming", "--json", *argv])
    err = capsys.readouterr().err
    return rc, json.loads(out.getvalue()), err


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A temporary working folder that holds no strategies/."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_library_name_is_verified_from_any_folder(capsys, elsewhere):
    rc, r, _ = _verify(capsys, NAME)
    assert rc == 0 and r is not None and r["ok"]
    assert os.path.samefile(r["path"], library.path(NAME))
    assert any(c["name"] == "index" and c["status"] == "pass" for c in r["checks"])


def test_the_readme_path_outside_the_checkout_is_the_library_file(capsys, elsewhere):
    given = f"strategies/{NAME}.npz"
    rc, r, err = _verify(capsys, given)
    assert rc == 0 and r is not None and r["ok"]
    assert os.path.samefile(r["path"], library.path(NAME))
    # The substitution is said, with where the path was looked up first.
    assert str(elsewhere / given) in err and NAME in err


def test_an_existing_file_is_itself_even_with_a_library_name(capsys, elsewhere):
    shutil.copy(library.path(NAME), elsewhere / f"{NAME}.npz")
    rc, r, err = _verify(capsys, f"{NAME}.npz")
    assert rc == 0 and r is not None and r["path"] == f"{NAME}.npz"
    assert err == ""


@pytest.mark.parametrize("given", ["strategies/no-such-entry.npz", "no-such-entry"])
def test_a_relative_path_found_nowhere_says_where_it_was_looked_up(capsys, elsewhere, given):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["verify", given])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(elsewhere / given) in err  # the working folder
    assert str(library.directory()) in err  # and the library
    assert repr(given) in err


def test_an_absolute_path_is_not_substituted(capsys, elsewhere):
    missing = elsewhere / "strategies" / f"{NAME}.npz"  # a library file's name, but an absolute path
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["verify", str(missing)])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "absolute" in err
