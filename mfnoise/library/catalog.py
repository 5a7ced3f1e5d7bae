"""The library of precomputed strategies shipped in ``strategies/``, and the grid that builds it.

Layout: ``strategies/index.json`` plus one strategy file (``mfnoise.strategies.io`` format) per entry,
``strategies/<name>.npz``. The index is

    {"format": "mfnoise-library", "format_version": 1, "mfnoise_version": ...,
     "build": {...how and when it was built...},
     "strategies": [{"name", "file", "family", "optimizer_family", "workload", "objective",
                     "n", "epochs", "max_participations", "min_sep", "participation",
                     "bands" | "buffers", "state_arrays", "rmse", "max_error", "sensitivity",
                     "sensitivity_exact", "sha256", "digest", "bytes", "command", "seconds"}, ...]}

``sha256`` is the digest of the file's bytes; ``digest`` is the strategy file's own integrity
digest (``mfnoise.strategies.io.digest``) that ``mfnoise.load`` checks; ``state_arrays`` is the number of
parameter-sized arrays the noise generator keeps (buffers, or bands - 1), so the noise state of a
model with P float32 parameters takes ``state_arrays * P * 4`` bytes.

Every entry comes from one ``Spec`` of the grid (``GRID``): a workload, n, a number of epochs of
fixed cyclic batches, an optimizer family with its size, and an objective. ``command`` is the exact
``mfnoise optimize`` call that regenerates the file; ``mfnoise library build --only NAME`` does the
same through this module and checks the losses against the shipped ones.

The folder is found, in order, from ``$MFNOISE_LIBRARY``, the installed package
(``mfnoise/strategies``, shipped as package data), and the checkout (``<repo>/strategies``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import importlib.resources
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mfnoise.core import workloads
from mfnoise.core.participation import Participation
from mfnoise.strategies import error, io
from mfnoise.strategies.base import Strategy

INDEX_NAME = "index.json"
INDEX_FORMAT = "mfnoise-library"
INDEX_FORMAT_VERSION = 1
ENV_VAR = "MFNOISE_LIBRARY"

# The grid of issue 5 ("where they fit": a banded family needs bands <= min_sep = n // epochs, so
# that its exact sensitivity needs no overlap of columns in one participation pattern).
WORKLOADS = ("prefix", "momentum:0.9")
NS = (1000, 2000, 5000, 10000, 100000)
EPOCHS = (1, 2, 4, 8, 16, 32, 64)
BLT_BUFFERS = (2, 3, 4, 5, 6)
BLT_OBJECTIVES = ("rmse", "max")
TOEPLITZ_BANDS = (4, 16, 64)
BANDED_BANDS = (4, 16, 64)
BANDED_MAX_N = 2000

OPTIMIZER_FAMILIES = ("blt", "banded-toeplitz", "banded")


@dataclasses.dataclass(frozen=True, order=True)
class Spec:
    """One library entry to build: ``mfnoise.optimize(workload(n), Participation.epochs(n, epochs),
    family=family, bands|buffers=size, objective=objective)``."""

    workload: str
    n: int
    epochs: int
    family: str  # an optimizer family: "blt", "banded-toeplitz" or "banded"
    size: int  # buffers for blt, bands otherwise
    objective: str = "rmse"

    def __post_init__(self) -> None:
        if self.family not in OPTIMIZER_FAMILIES:
            raise ValueError(f"unknown library family {self.family!r}; expected one of {OPTIMIZER_FAMILIES}")
        if self.objective not in ("rmse", "max"):
            raise ValueError(f"unknown objective {self.objective!r}; expected 'rmse' or 'max'")

    @property
    def name(self) -> str:
        wl = self.workload.replace(":", "")
        return f"{wl}-n{self.n}-e{self.epochs}-{self.family}{self.size}-{self.objective}"

    @property
    def size_key(self) -> str:
        return "buffers" if self.family == "blt" else "bands"

    @property
    def state_arrays(self) -> int:
        """Parameter-sized arrays of noise state: buffers for BLT, bands - 1 for banded families."""
        return self.size if self.family == "blt" else self.size - 1

    def participation(self) -> Participation:
        return Participation.epochs(self.n, self.epochs)

    def make_workload(self) -> workloads.Workload:
        return workloads.parse(self.workload, self.n)

    def fits(self) -> bool:
        """Whether the entry belongs to the grid: a banded family needs bands <= min_sep."""
        if self.epochs > self.n:
            return False
        if self.family == "blt":
            return True
        return self.size <= self.n // self.epochs

    def command(self, path: str) -> str:
        """The ``mfnoise optimize`` call that regenerates this entry into ``path``."""
        return (f"mfnoise optimize --family {self.family} --{self.size_key} {self.size} --n {self.n} "
                f"--epochs {self.epochs} --workload {self.workload} --objective {self.objective} "
                f"--out {path}")

    def optimize_kwargs(self) -> dict[str, Any]:
        return {"family": self.family, self.size_key: self.size, "objective": self.objective}


# Build order: the most useful entries first, so that a partial build (on a small machine) already
# covers every schema with a few memory sizes; `mfnoise library build --missing` does the rest.
_BLT_TIERS = {(4, "rmse"): 1, (2, "rmse"): 2, (4, "max"): 3, (6, "rmse"): 4, (3, "rmse"): 6, (5, "rmse"): 6,
              (2, "max"): 7, (6, "max"): 7, (3, "max"): 8, (5, "max"): 8}


def _tier(s: Spec) -> int:
    if s.family == "banded-toeplitz":
        return 0
    if s.family == "banded":
        return 5 if s.size < 64 else 9  # 64 general bands: minutes per entry here
    return _BLT_TIERS[(s.size, s.objective)]


def grid() -> list[Spec]:
    """Every entry of the full library (issue 5), in build order (``_tier``, then n)."""
    specs = []
    for n in NS:
        for wl in WORKLOADS:
            for k in EPOCHS:
                for d in BLT_BUFFERS:
                    for obj in BLT_OBJECTIVES:
                        specs.append(Spec(wl, n, k, "blt", d, obj))
                for b in TOEPLITZ_BANDS:
                    specs.append(Spec(wl, n, k, "banded-toeplitz", b))
                if n <= BANDED_MAX_N:
                    for b in BANDED_BANDS:
                        specs.append(Spec(wl, n, k, "banded", b))
    return sorted((s for s in specs if s.fits()), key=lambda s: (_tier(s), s.n, s.workload, s.epochs, s.size))


GRID_BY_NAME: dict[str, Spec] = {}


def spec(name: str) -> Spec:
    """The grid entry called ``name``."""
    if not GRID_BY_NAME:
        GRID_BY_NAME.update({s.name: s for s in grid()})
    try:
        return GRID_BY_NAME[name]
    except KeyError:
        raise ValueError(f"{name!r} is not an entry of the library grid") from None


def select(patterns: Iterable[str] | None = None, specs: Iterable[Spec] | None = None) -> list[Spec]:
    """Grid entries whose name matches any of the shell patterns (all entries when None)."""
    specs = grid() if specs is None else list(specs)
    if patterns is None:
        return specs
    patterns = list(patterns)
    chosen = [s for s in specs if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"no library entry matches {patterns}")
    return chosen


# -- finding the library ------------------------------------------------------------------------


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


def _candidates() -> list[Path]:
    out = []
    try:
        # The package data mfnoise.library.data: the checkout's strategies/ (editable install) or
        # its installed copy (pyproject.toml maps the one to the other).
        out.append(Path(os.fspath(importlib.resources.files("mfnoise.library.data"))))
    except (TypeError, ModuleNotFoundError):  # a zipped install without a file system path
        pass
    out.append(Path(__file__).resolve().parents[2] / "strategies")  # a source checkout on sys.path
    return out


def empty_index() -> dict[str, Any]:
    from mfnoise._version import __version__

    return {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
            "mfnoise_version": __version__, "build": {}, "strategies": []}


def read_index(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parsed index.json of the library in ``folder`` (default: ``directory()``)."""
    folder = directory() if folder is None else Path(folder)
    path = Path(folder) / INDEX_NAME
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not an mfnoise library index (format={index.get('format')!r})")
    if index.get("format_version") != INDEX_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version={index.get('format_version')!r}; "
                         f"this mfnoise reads version {INDEX_FORMAT_VERSION}")
    return index


def write_index(index: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Writes index.json atomically, entries sorted by name."""
    index = dict(index)
    index["strategies"] = sorted(index["strategies"], key=lambda e: e["name"])
    path = Path(folder) / INDEX_NAME
    with io.atomic_write(path, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def add_entries(folder: str | os.PathLike, new: list[dict[str, Any]]) -> Path:
    """Adds (or replaces, by name) entries in the index of ``folder``.

    Read-modify-write under an exclusive lock, so several builds may fill one library at once.
    """
    folder = Path(folder)
    with _locked(folder):
        try:
            index = read_index(folder)
        except FileNotFoundError:
            index = empty_index()
        names = {e["name"] for e in new}
        index["strategies"] = [e for e in index["strategies"] if e["name"] not in names] + list(new)
        return write_index(index, folder)


def entries(folder: str | os.PathLike | None = None, **criteria: Any) -> list[dict[str, Any]]:
    """Index entries whose fields equal every given criterion, e.g. ``entries(n=1000, epochs=4)``.

    ``name`` may be a shell pattern; a criterion of None is ignored.
    """
    out = []
    for e in read_index(folder)["strategies"]:
        ok = True
        for key, want in criteria.items():
            if want is None:
                continue
            if key == "name":
                ok = fnmatch.fnmatchcase(e["name"], str(want))
            else:
                ok = e.get(key) == want
            if not ok:
                break
        if ok:
            out.append(e)
    return out


def entry(name: str, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The index entry called ``name``."""
    for e in read_index(folder)["strategies"]:
        if e["name"] == name:
            return e
    raise ValueError(f"no strategy named {name!r} in the library; `mfnoise library list` shows them")


def path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The file of the entry called ``name``."""
    folder = directory() if folder is None else Path(folder)
    return Path(folder) / entry(name, folder)["file"]


def get(name: str | None = None, *, folder: str | os.PathLike | None = None, **criteria: Any) -> Strategy:
    """A shipped strategy, loaded and integrity-checked (``mfnoise.load``).

    Either by name, ``get("prefix-n1000-e4-blt4-rmse")``, or by criteria that pick exactly one
    entry, ``get(workload="prefix", n=1000, epochs=4, family="blt", buffers=4, objective="rmse")``
    (``family`` is the optimizer family: "blt", "banded-toeplitz" or "banded").
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
    folder = directory() if folder is None else Path(folder)
    file = Path(folder) / e["file"]
    strategy = io.load(os.fspath(file))
    digest = io.read(os.fspath(file))[1]["sha256"]
    if digest != e["digest"]:
        raise ValueError(f"{file} does not match the library index (digest {digest} != {e['digest']})")
    return strategy


# -- building -----------------------------------------------------------------------------------


def file_sha256(file: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _report_value(report: Any, key: str, default: Any = None) -> Any:
    if isinstance(report, dict):
        return report.get(key, default)
    return getattr(report, key, default)


def build_entry(s: Spec, folder: str | os.PathLike, command_folder: str = "strategies") -> dict[str, Any]:
    """Optimizes ``s``, writes ``<folder>/<name>.npz`` and returns its index entry.

    The losses recorded are recomputed by the foundation's exact routines (``mfnoise.evaluate``),
    never taken from the optimizer.
    """
    from mfnoise.optim.solver import optimize

    w, p = s.make_workload(), s.participation()
    start = time.perf_counter()
    strategy, report = optimize(w, p, **s.optimize_kwargs(), progress=False)
    seconds = time.perf_counter() - start
    if _report_value(report, "interrupted"):
        # The optimizer keeps its best point on Ctrl-C; an unconverged entry is never shipped.
        raise KeyboardInterrupt
    result = error.evaluate(strategy, w, p)
    file = f"{s.name}.npz"
    command = s.command(f"{command_folder}/{file}")
    iterations = _report_value(report, "iterations")
    out = io.save(strategy, os.path.join(folder, file),
                  name=s.name, participation=p, workload=w, objective=s.objective,
                  optimizer_family=s.family, epochs=s.epochs,
                  rmse=result["rmse"], max_error=result["max_error"], sensitivity=result["sensitivity"],
                  sensitivity_exact=result["sensitivity_exact"], sensitivity_method=result["sensitivity_method"],
                  command=command, optimize_seconds=seconds,
                  iterations=None if iterations is None else int(iterations),
                  stopped=_report_value(report, "stopped"))
    meta = io.read(out)[1]
    return {
        "name": s.name,
        "file": file,
        "family": strategy.family,
        "optimizer_family": s.family,
        "workload": s.workload,
        "objective": s.objective,
        "n": s.n,
        "epochs": s.epochs,
        "max_participations": p.max_participations,
        "min_sep": p.min_sep,
        "participation": p.kind,
        # What the file holds (the optimizer may return fewer buffers than asked, e.g. when two
        # decays merge); the noise state is that of the stored strategy.
        s.size_key: strategy.params()[s.size_key],
        "requested_" + s.size_key: s.size,
        "state_arrays": state_arrays(strategy),
        "rmse": result["rmse"],
        "max_error": result["max_error"],
        "sensitivity": result["sensitivity"],
        "sensitivity_exact": result["sensitivity_exact"],
        "sha256": file_sha256(out),
        "digest": meta["sha256"],
        "bytes": os.path.getsize(out),
        "command": command,
        "seconds": seconds,
    }


def state_arrays(strategy: Strategy) -> int:
    """Parameter-sized arrays of noise state: buffers for a BLT, bands - 1 for banded families."""
    params = strategy.params()
    return int(params["buffers"]) if "buffers" in params else int(params["bands"]) - 1


def compare(new: dict[str, Any], old: dict[str, Any] | None, rtol: float) -> dict[str, Any]:
    """How a regenerated entry's losses compare with the shipped ones (relative differences).

    ``ok`` judges the loss the entry was optimized for (rmse or max_error); the other one is
    reported but may move more between two optima of nearly equal objective.
    """
    if old is None:
        return {"shipped": False, "ok": True}
    diffs = {k: (new[k] - old[k]) / old[k] for k in ("rmse", "max_error")}
    key = "rmse" if new.get("objective", "rmse") == "rmse" else "max_error"
    return {"shipped": True, "shipped_rmse": old["rmse"], "shipped_max_error": old["max_error"],
            "rel_diff_rmse": diffs["rmse"], "rel_diff_max_error": diffs["max_error"],
            "ok": abs(diffs[key]) <= rtol}


def build(specs: Iterable[Spec], out: str | os.PathLike, *, shipped: str | os.PathLike | None = None,
          update_index: bool = False, rtol: float = 1e-3,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Builds ``specs`` into folder ``out`` and checks them against the shipped library.

    Args:
      specs: grid entries to (re)generate.
      out: folder for the new files, created when missing (the folder that holds it must exist:
        FileNotFoundError otherwise). With ``update_index`` its index.json gains (or replaces) the
        new entries; ``out`` may be the library folder itself to add to or refresh it.
      shipped: the library folder to compare with (default: ``directory()`` when it exists).
      rtol: the largest relative difference of rmse and max_error from the shipped entry that
        counts as reproduced (optimizers stop on a tolerance, so a rerun on another machine may
        land a little apart).
    Returns ``{"ok", "seconds", "built": [{"name", "rmse", "max_error", "seconds", ...}]}``.
    """
    specs = list(specs)
    out = Path(out)
    # ``out`` itself may be new; a missing folder above it is a typo, refused before any work.
    io.output_folder(out, "out", folder_output=True)
    out.mkdir(exist_ok=True)
    try:
        old_index = read_index(shipped)
    except FileNotFoundError:
        old_index = empty_index()
    old = {e["name"]: e for e in old_index["strategies"]}
    start = time.perf_counter()
    built = []
    for i, s in enumerate(specs):
        try:
            e = build_entry(s, out)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as err:
            # One entry the optimizer cannot produce must not stop the rest; it is reported.
            built.append({"name": s.name, "ok": False, "error": f"{type(err).__name__}: {err}"})
            if progress is not None:
                progress(f"[{i + 1}/{len(specs)}] {s.name}: FAILED ({type(err).__name__}: {err})")
            continue
        row = {"name": s.name, "rmse": e["rmse"], "max_error": e["max_error"], "seconds": e["seconds"],
               **compare(e, old.get(s.name), rtol)}
        built.append(row)
        if progress is not None:
            progress(f"[{i + 1}/{len(specs)}] {s.name}: rmse {e['rmse']:.6g} max_error {e['max_error']:.6g} "
                     f"({e['seconds']:.1f} s){'' if row['ok'] else '  DIFFERS FROM SHIPPED'}")
        if update_index:
            # Rewritten after every entry, so an interrupted build keeps what it finished.
            add_entries(out, [e])
    seconds = time.perf_counter() - start
    return {"ok": all(r["ok"] for r in built), "seconds": seconds, "directory": os.fspath(out),
            "built": built}


def merge(source: str | os.PathLike, target: str | os.PathLike, *, rtol: float = 1e-3,
          names: Iterable[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Moves regenerated entries of ``source`` (a ``build`` output folder) into library ``target``
    where they are better or the shipped one does not reproduce; keeps the shipped one otherwise.

    An entry is taken when the target lacks it, when its own objective (rmse or max_error) is
    lower than the shipped one's by more than 1e-9 relative, or when it differs by more than ``rtol``
    *and* is not worse (a regenerated entry that is worse by more than ``rtol`` is reported, not
    taken: the shipped strategy stays the better one). Files are copied, then the index is updated.
    Returns {"taken": [...], "kept": [...], "worse": [...]} rows with both objectives.
    """
    import shutil

    source, target = Path(source), Path(target)
    new_entries = {e["name"]: e for e in read_index(source)["strategies"]}
    try:
        old_entries = {e["name"]: e for e in read_index(target)["strategies"]}
    except FileNotFoundError:
        old_entries = {}
    chosen = sorted(new_entries) if names is None else list(names)
    out: dict[str, list[dict[str, Any]]] = {"taken": [], "kept": [], "worse": []}
    take = []
    for name in chosen:
        new = new_entries[name]
        old = old_entries.get(name)
        key = "rmse" if new["objective"] == "rmse" else "max_error"
        row = {"name": name, "objective": key, "new": new[key], "shipped": None if old is None else old[key]}
        if old is None or new[key] < old[key] * (1 - 1e-9):
            verdict = "taken"
        elif new[key] > old[key] * (1 + rtol):
            verdict = "worse"
        else:
            verdict = "kept"
        out[verdict].append(row)
        if verdict == "taken":
            if file_sha256(source / new["file"]) != new["sha256"]:
                raise ValueError(f"{source / new['file']} does not match its index entry")
            with open(source / new["file"], "rb") as src, io.atomic_write(target / new["file"]) as dst:
                shutil.copyfileobj(src, dst)
            take.append(new)
    if take:
        add_entries(target, take)
    return out


def missing(folder: str | os.PathLike | None = None) -> list[Spec]:
    """Grid entries that the library in ``folder`` does not hold yet."""
    try:
        have = {e["name"] for e in read_index(folder)["strategies"]}
    except FileNotFoundError:
        have = set()
    return [s for s in grid() if s.name not in have]


def shipped_specs(folder: str | os.PathLike | None = None) -> list[Spec]:
    """The grid entries the library holds."""
    return [spec(e["name"]) for e in read_index(folder)["strategies"]]


def total_bytes(folder: str | os.PathLike | None = None) -> int:
    folder = directory() if folder is None else Path(folder)
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def iter_files(folder: str | os.PathLike | None = None) -> Iterator[tuple[dict[str, Any], Path]]:
    """(entry, file path) for every shipped strategy."""
    folder = directory() if folder is None else Path(folder)
    for e in read_index(folder)["strategies"]:
        yield e, Path(folder) / e["file"]


def record_build(folder: str | os.PathLike, **info: Any) -> Path:
    """Stores how the library was built (wall time, machine, date, ...) in its index."""
    folder = Path(folder)
    with _locked(folder):
        index = read_index(folder)
        index["build"] = {**index.get("build", {}), **info}
        return write_index(index, folder)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the index of ``folder`` (a lock file outside the library folder)."""
    import fcntl

    digest = hashlib.sha256(os.fspath(folder.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mfnoise-library-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
