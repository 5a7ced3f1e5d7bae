"""Building the library: optimizing grid entries, checking them against the shipped ones, merging.

``build_entry`` optimizes one ``Spec`` and writes its file; ``build`` does a list of them into a
folder and compares each with the shipped entry (``compare``); ``merge`` moves the better
regenerated entries into a library; ``missing`` lists the grid entries a library lacks;
``record_build`` stores how it was built. The losses recorded are recomputed by the foundation's
exact routines (``mfnoise.strategies.error.evaluate``), never taken from the optimizer.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mfnoise.library.index import add_entries, empty_index, file_sha256, read_index, write_index
from mfnoise.library.lock import locked
from mfnoise.library.specs import Spec, grid
from mfnoise.strategies import error, io
from mfnoise.strategies.base import Strategy


def state_arrays(strategy: Strategy) -> int:
    """Parameter-sized arrays of noise state the generator keeps for ``strategy``
    (``Strategy.state_arrays()``: BLT: buffers; banded families: bands - 1; identity: none)."""
    return strategy.state_arrays()


def build_entry(s: Spec, folder: str | os.PathLike) -> dict[str, Any]:
    """Optimizes ``s``, writes ``<folder>/<name>.npz`` and returns its index entry."""
    from mfnoise.optim.solver import optimize  # loads JAX; the library's queries do not need it

    w, p = s.make_workload(), s.participation()
    start = time.perf_counter()
    strategy, report = optimize(w, p, **s.optimize_kwargs(), progress=False)
    seconds = time.perf_counter() - start
    if report.interrupted:
        # The optimizer keeps its best point on Ctrl-C; an unconverged entry is never shipped.
        raise KeyboardInterrupt
    result = error.evaluate(strategy, w, p)
    command = s.command()
    out = io.save(strategy, os.path.join(folder, s.file),
                  name=s.name, participation=p, workload=w, objective=s.objective,
                  optimizer_family=s.family, epochs=s.epochs,
                  rmse=result["rmse"], max_error=result["max_error"], sensitivity=result["sensitivity"],
                  sensitivity_exact=result["sensitivity_exact"], sensitivity_method=result["sensitivity_method"],
                  command=command, optimize_seconds=seconds,
                  iterations=report.iterations, stopped=report.stopped)
    meta = io.read(out)[1]
    return {
        "name": s.name,
        "file": s.file,
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


def compare(new: dict[str, Any], old: dict[str, Any] | None, rtol: float) -> dict[str, Any]:
    """How a regenerated entry's losses compare with the shipped ones (relative differences).

    ``ok`` judges the loss the entry was optimized for (rmse or max_error); the other one is
    reported but may move more between two optima of nearly equal objective.
    """
    if old is None:
        return {"shipped": False, "ok": True}
    diffs = {k: (new[k] - old[k]) / old[k] for k in ("rmse", "max_error")}
    key = _objective_key(new)
    return {"shipped": True, "shipped_rmse": old["rmse"], "shipped_max_error": old["max_error"],
            "rel_diff_rmse": diffs["rmse"], "rel_diff_max_error": diffs["max_error"],
            "ok": abs(diffs[key]) <= rtol}


def _objective_key(e: dict[str, Any]) -> str:
    return "rmse" if e.get("objective", "rmse") == "rmse" else "max_error"


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
        key = _objective_key(new)
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


def record_build(folder: str | os.PathLike, **info: Any) -> Path:
    """Stores how the library was built (wall time, machine, date, ...) in its index."""
    with locked(folder):
        index = read_index(folder)
        index["build"] = {**index.get("build", {}), **info}
        return write_index(index, folder)
