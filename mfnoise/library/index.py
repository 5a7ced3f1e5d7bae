"""The library folder and its index: finding it, reading and writing ``index.json``, and queries.

Layout: ``<folder>/index.json`` plus one strategy file (``mfnoise.strategies.io`` format) per entry,
``<folder>/<name>.npz``. The index is

    {"format": "mfnoise-library", "format_version": 1, "mfnoise_version": ...,
     "build": {...how and when it was built...},
     "strategies": [{"name", "file", "family", "optimizer_family", "workload", "objective",
                     "n", "epochs", "max_participations", "min_sep", "participation",
                     "bands" | "buffers", "requested_bands" | "requested_buffers", "state_arrays",
                     "rmse", "max_error", "sensitivity", "sensitivity_exact", "sha256", "digest",
                     "bytes", "command", "seconds"}, ...]}

- ``name`` identifies the entry (``mfnoise.library.specs.Spec.name``); names are fixed identifiers
  of the shipped files, so a ``toeplitz`` entry keeps its historical token in the name
  (``prefix-n1000-e1-banded-toeplitz16-rmse``). ``file`` is ``<name>.npz``, relative to the folder.
- ``family`` is the stored strategy's family and ``optimizer_family`` the family the grid asked the
  optimizer for, both in the strategy vocabulary (``blt``, ``toeplitz``, ``banded``); queries also
  accept the alias ``banded-toeplitz``.
- ``bands`` / ``buffers`` and ``state_arrays`` are those of the stored strategy (the optimizer may
  return fewer buffers than asked); ``requested_*`` keeps the request. ``state_arrays`` is the number
  of parameter-sized arrays the noise generator keeps, so the noise state of a model with P float32
  parameters takes ``state_arrays * P * 4`` bytes.
- ``sha256`` is the digest of the file's bytes; ``digest`` is the strategy file's own integrity
  digest (``mfnoise.strategies.io.digest``) that ``mfnoise.load`` checks.
- ``command`` is the ``mfnoise optimize`` call that regenerates the file, with no folder in it: run
  in the library folder, its ``--out`` is the entry's ``file``. (Files built before the command
  was path-free record ``--out strategies/<file>`` and ``--family banded-toeplitz`` in their own
  metadata; they describe the same optimization.) ``mfnoise library build --only NAME`` does the
  same through ``mfnoise.library.building`` and checks the losses against the shipped ones.

The folder is found, in order, from ``$MFNOISE_LIBRARY``, the installed package data
``mfnoise.library.data``, and the checkout (``<repo>/strategies``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.resources
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mfnoise.library.lock import locked
from mfnoise.library.specs import FAMILY_ALIASES, Spec, spec
from mfnoise.strategies import io
from mfnoise.strategies.base import Strategy

INDEX_NAME = "index.json"
INDEX_FORMAT = "mfnoise-library"
INDEX_FORMAT_VERSION = 1
ENV_VAR = "MFNOISE_LIBRARY"

_FAMILY_FIELDS = ("family", "optimizer_family")


def directory() -> Path:
    """The library folder: $MFNOISE_LIBRARY, else the installed package data, else the checkout."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    for candidate in _candidates():
        if (candidate / INDEX_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        "the mfnoise strategy library was not found (looked in "
        + ", ".join(str(c) for c in _candidates())
        + f"); set {ENV_VAR} to its folder"
    )


def default_directory() -> Path:
    """``directory()``, or where a first build goes when there is no library yet: the checkout's."""
    try:
        return directory()
    except FileNotFoundError:
        return _checkout()


def _checkout() -> Path:
    return Path(__file__).resolve().parents[2] / "strategies"


def _candidates() -> list[Path]:
    out = []
    try:
        # The package data mfnoise.library.data: the checkout's strategies/ (editable install) or
        # its installed copy (pyproject.toml maps the one to the other).
        data = importlib.resources.files("mfnoise.library.data")
    except ModuleNotFoundError:
        pass
    else:
        if isinstance(data, os.PathLike):  # not in a zipped install, which has no file system path
            out.append(Path(data))
    out.append(_checkout())  # a source checkout on sys.path
    return out


def _folder(folder: str | os.PathLike | None) -> Path:
    return directory() if folder is None else Path(folder)


def empty_index() -> dict[str, Any]:
    from mfnoise._version import __version__

    return {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
            "mfnoise_version": __version__, "build": {}, "strategies": []}


def read_index(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parsed index.json of the library in ``folder`` (default: ``directory()``)."""
    file = _folder(folder) / INDEX_NAME
    with open(file) as f:
        index = json.load(f)
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{file} is not an mfnoise library index (format={index.get('format')!r})")
    if index.get("format_version") != INDEX_FORMAT_VERSION:
        raise ValueError(f"{file} has format_version={index.get('format_version')!r}; "
                         f"this mfnoise reads version {INDEX_FORMAT_VERSION}")
    return index


def write_index(index: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Writes index.json atomically, entries sorted by name."""
    index = dict(index)
    index["strategies"] = sorted(index["strategies"], key=lambda e: e["name"])
    file = Path(folder) / INDEX_NAME
    with io.atomic_write(file, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    return file


def add_entries(folder: str | os.PathLike, new: list[dict[str, Any]]) -> Path:
    """Adds (or replaces, by name) entries in the index of ``folder``.

    Read-modify-write under an exclusive lock, so several builds may fill one library at once.
    """
    with locked(folder):
        try:
            index = read_index(folder)
        except FileNotFoundError:
            index = empty_index()
        names = {e["name"] for e in new}
        index["strategies"] = [e for e in index["strategies"] if e["name"] not in names] + list(new)
        return write_index(index, folder)


def entries(folder: str | os.PathLike | None = None, **criteria: Any) -> list[dict[str, Any]]:
    """Index entries whose fields equal every given criterion, e.g. ``entries(n=1000, epochs=4)``.

    ``name`` may be a shell pattern; ``family`` and ``optimizer_family`` accept an alias
    (``banded-toeplitz``); a criterion of None is ignored. ``bands`` / ``buffers`` match the count
    the entry was built for (``requested_bands`` / ``requested_buffers``: ``buffers=4`` finds an
    entry asked for 4 buffers that kept 2), or the stored count of an entry that records no request;
    ``kept_bands`` / ``kept_buffers`` match the stored count itself.
    """
    wanted = {key: FAMILY_ALIASES.get(want, want) if key in _FAMILY_FIELDS else want
              for key, want in criteria.items() if want is not None}
    return [e for e in read_index(folder)["strategies"]
            if all(_matches(e, key, want) for key, want in wanted.items())]


_SIZE_FIELDS = ("bands", "buffers")


def _matches(e: dict[str, Any], key: str, want: Any) -> bool:
    if key == "name":
        return fnmatch.fnmatchcase(e["name"], str(want))
    if key in _SIZE_FIELDS:
        return e.get("requested_" + key, e.get(key)) == want
    if key.startswith("kept_") and key[len("kept_"):] in _SIZE_FIELDS:
        return e.get(key[len("kept_"):]) == want
    return e.get(key) == want


def entry(name: str, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The index entry called ``name``."""
    for e in read_index(folder)["strategies"]:
        if e["name"] == name:
            return e
    raise ValueError(f"no strategy named {name!r} in the library; `mfnoise library list` shows them")


def path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The file of the entry called ``name``."""
    folder = _folder(folder)
    return folder / entry(name, folder)["file"]


def get(name: str | None = None, *, folder: str | os.PathLike | None = None, **criteria: Any) -> Strategy:
    """A shipped strategy, loaded and integrity-checked (``mfnoise.load``).

    Either by name, ``get("prefix-n1000-e4-blt4-rmse")``, or by criteria that pick exactly one
    entry, ``get(workload="prefix", n=1000, epochs=4, family="blt", buffers=4, objective="rmse")``
    (``family`` is the optimizer family: "blt", "toeplitz" (alias "banded-toeplitz") or "banded").
    """
    if name is not None:
        e = entry(name, folder)
    else:
        if "family" in criteria:
            criteria["optimizer_family"] = criteria.pop("family")
        found = entries(folder, **criteria)
        if len(found) != 1:
            names = ", ".join(x["name"] for x in found[:8])
            raise ValueError(f"{len(found)} library entries match {criteria}"
                             + (f" ({names}{', ...' if len(found) > 8 else ''})" if found else "")
                             + "; give more criteria or a name")
        e = found[0]
    file = os.fspath(_folder(folder) / e["file"])
    strategy = io.load(file)
    digest = io.read(file)[1]["sha256"]
    if digest != e["digest"]:
        raise ValueError(f"{file} does not match the library index (digest {digest} != {e['digest']})")
    return strategy


def file_sha256(file: str | os.PathLike) -> str:
    """The sha256 of the file's bytes (the index's ``sha256``)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_specs(folder: str | os.PathLike | None = None) -> list[Spec]:
    """The grid entries the library holds."""
    return [spec(e["name"]) for e in read_index(folder)["strategies"]]


def total_bytes(folder: str | os.PathLike | None = None) -> int:
    """Bytes of every file in the library folder."""
    return sum(f.stat().st_size for f in _folder(folder).iterdir() if f.is_file())


def iter_files(folder: str | os.PathLike | None = None) -> Iterator[tuple[dict[str, Any], Path]]:
    """(entry, file path) for every shipped strategy."""
    folder = _folder(folder)
    for e in read_index(folder)["strategies"]:
        yield e, folder / e["file"]
