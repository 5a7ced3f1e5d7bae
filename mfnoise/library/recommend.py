"""Which shipped strategy to use: the lowest expected error whose noise state fits a memory budget.

The noise generator keeps ``state_arrays`` parameter-sized arrays (BLT: buffers; banded and banded
Toeplitz: bands - 1; DP-SGD's independent noise: none), so for P float32 parameters the state
takes ``state_arrays * P * 4`` bytes. Among the library entries built for the same workload and n,
and DP-SGD (identity, always feasible), ``recommend`` picks the one with the smallest error (rmse or
max_error, noise multiplier 1, sensitivity-normalised) whose state fits ``memory_budget``, and says
how it compares with DP-SGD and with the best entry regardless of memory. Errors are at equal
privacy: each is sens(C, p) times the decoder norm, so the noise multiplier that calibration gives
applies to all of them alike.

Fewer epochs than the library's. The library holds k in 1, 2, 4, ..., 64 epochs. A strategy built
for more participations stays a valid strategy for fewer: what privacy needs is its sensitivity
under the schema the training really uses, sens(C, p), and that is recomputed here (exactly: a
BLT's or a decreasing Toeplitz C's by the worst pattern {0, b, 2b, ...}, a banded C's with bands
<= n // k' <= n // k by its column norms). So for k epochs that the library does not hold, the
entries built for the nearest library epochs k' > k are offered, with their sensitivity, rmse and
max_error recomputed for ``Participation.epochs(n, k)`` (``built_for`` keeps what the file stores);
they are optimized for k', not k, so an entry optimized for k itself (``mfnoise optimize``) can only
do better. The file's own stored sensitivity also bounds the one under k where the stored schema
covers the user's (``Participation.covers``; for k' cyclic epochs: n // k' divides n // k), which
``stored_schema_covers`` says; with ``dp_aggregate(..., participation=p)`` the noise is scaled by
sens(C, p) in any case.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from mfnoise.core import workloads
from mfnoise.library.index import directory, entries, read_index
from mfnoise.library.specs import schema
from mfnoise.strategies import error, io
from mfnoise.strategies.identity import Identity

OBJECTIVE_KEYS = {"rmse": "rmse", "max": "max_error"}


def state_bytes(state_arrays: int, params: int, itemsize: int = 4) -> int:
    """Bytes of noise state: ``state_arrays`` arrays of ``params`` values of ``itemsize`` bytes."""
    return int(state_arrays) * int(params) * int(itemsize)


@functools.lru_cache(maxsize=64)
def _dp_sgd(n: int, epochs: int, workload: str) -> tuple[float, float, float]:
    r = error.evaluate(Identity(n), workloads.parse(workload, n), schema(n, epochs))
    return r["rmse"], r["max_error"], r["sensitivity"]


def dp_sgd(n: int, epochs: int, workload: str = "prefix") -> dict[str, Any]:
    """The DP-SGD (identity strategy, independent noise) candidate for the same schema."""
    rmse, max_error, sens = _dp_sgd(n, epochs, workload)
    return {"name": "dp-sgd", "family": Identity.family, "optimizer_family": Identity.family, "state_arrays": 0,
            "rmse": rmse, "max_error": max_error, "sensitivity": sens, "path": None}


@functools.lru_cache(maxsize=256)
def _recomputed(path: str, sha256: str, workload: str, n: int, epochs: int) -> dict[str, Any]:
    """sens, rmse and max_error of the strategy file at ``path`` (of digest ``sha256``, the cache key's
    guard against a rebuilt file) under ``schema(n, epochs)``."""
    r = error.evaluate(io.load(path), workloads.parse(workload, n), schema(n, epochs))
    return {k: r[k] for k in ("rmse", "max_error", "sensitivity", "sensitivity_exact", "sensitivity_method")}


def candidates(n: int, epochs: int, workload: str = "prefix",
               folder: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Library entries for (workload, n) built for the fewest epochs k' >= ``epochs``, then DP-SGD
    (``dp_sgd``), last.

    k' = epochs: the entries as stored. k' > epochs (the library holds no entry for these epochs):
    each entry's sensitivity, rmse and max_error recomputed for ``schema(n, epochs)`` (module
    docstring), with ``built_for`` (the stored schema and values) and ``stored_schema_covers``.
    """
    have = entries(folder, workload=workload, n=n)
    built = sorted({e["epochs"] for e in have if e["epochs"] >= epochs})
    if not built:
        every = sorted({(e["workload"], e["n"], e["epochs"]) for e in read_index(folder)["strategies"]})
        ns = sorted({x[1] for x in every if x[0] == workload})
        es = sorted({x[2] for x in every if x[0] == workload and x[1] == n})
        hint = (f"for n={n} it has epochs {es} (an entry built for more epochs also serves fewer)" if es
                else f"it has n in {ns}") if ns else f"it has workloads {sorted({x[0] for x in every})}"
        raise ValueError(f"the library holds no strategy for workload {workload!r}, n={n}, epochs={epochs} or more; "
                         f"{hint} (or run `mfnoise optimize`)")
    folder = directory() if folder is None else folder
    nearest = built[0]
    mine = schema(n, epochs)
    out = []
    for e in have:
        if e["epochs"] != nearest:
            continue
        path = os.fspath(os.path.join(folder, e["file"]))
        c = dict(e, path=path)
        if nearest != epochs:
            stored = schema(n, e["epochs"])
            c["built_for"] = {"epochs": e["epochs"], "max_participations": e["max_participations"],
                              "min_sep": e["min_sep"], **{k: e[k] for k in ("rmse", "max_error", "sensitivity")}}
            c["stored_schema_covers"] = stored.covers(mine)
            c.update(_recomputed(path, e["sha256"], workload, n, epochs))
            c.update(epochs=epochs, max_participations=mine.max_participations, min_sep=mine.min_sep)
        out.append(c)
    return out + [dp_sgd(n, epochs, workload)]


def recommend(n: int, epochs: int, params: int, memory_budget: int | None = None, *,
              workload: str = "prefix", objective: str = "rmse", itemsize: int = 4,
              folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The lowest-error strategy whose noise state fits ``memory_budget`` bytes (None: no limit).

    Returns the chosen entry's fields plus ``state_bytes``, ``error`` (by ``objective``),
    ``relative_to_dp_sgd`` and ``relative_to_best`` (its error over DP-SGD's and over the best
    entry's without the budget), and ``dp_sgd`` / ``best_unconstrained`` summaries.
    """
    if objective not in OBJECTIVE_KEYS:
        raise ValueError(f"objective must be 'rmse' or 'max', got {objective!r}")
    if isinstance(params, bool) or int(params) != params or params < 1:
        raise ValueError(f"params must be a positive integer number of parameters, got {params!r}")
    if memory_budget is not None and memory_budget < 0:
        raise ValueError(f"memory budget must be non-negative bytes, got {memory_budget!r}")
    key = OBJECTIVE_KEYS[objective]
    cands = candidates(n, epochs, workload, folder)
    for c in cands:
        c["state_bytes"] = state_bytes(c["state_arrays"], params, itemsize)
    # Ties go to the smaller state, then the name, so the answer is deterministic.
    rank = sorted(cands, key=lambda c: (c[key], c["state_bytes"], c["name"]))
    fitting = [c for c in rank if memory_budget is None or c["state_bytes"] <= memory_budget]
    best, chosen = rank[0], fitting[0]  # DP-SGD needs no state, so something always fits
    sgd = cands[-1]  # candidates() lists DP-SGD last

    def summary(c: dict[str, Any]) -> dict[str, Any]:
        return {"name": c["name"], key: c[key], "state_bytes": c["state_bytes"]}

    out = {k: v for k, v in chosen.items() if k not in ("command", "digest", "sha256", "file")}
    out.update({
        "built_for_epochs": cands[0]["built_for"]["epochs"] if "built_for" in cands[0] else epochs,
        "objective": objective,
        "error": chosen[key],
        "memory_budget": memory_budget,
        "params": int(params),
        "itemsize": itemsize,
        "relative_to_dp_sgd": chosen[key] / sgd[key],
        "relative_to_best": chosen[key] / best[key],
        "dp_sgd": summary(sgd),
        "best_unconstrained": summary(best),
        "candidates": len(cands),
        "fitting": len(fitting),
    })
    p = schema(n, epochs)
    out.update({"n": n, "epochs": epochs, "max_participations": p.max_participations, "min_sep": p.min_sep,
                "workload": workload})
    return out
