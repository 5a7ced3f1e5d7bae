"""Which shipped strategy to use: the lowest expected error whose noise state fits a memory budget.

The noise generator keeps ``state_arrays`` parameter-sized arrays (BLT: buffers; banded and banded
Toeplitz: bands - 1; DP-SGD's independent noise: none), so for P float32 parameters the state
takes ``state_arrays * P * 4`` bytes. Among the library entries built for the same workload, n and
number of epochs, and DP-SGD (identity, always feasible), ``recommend`` picks the one with the
smallest error (rmse or max_error, noise multiplier 1, sensitivity-normalised) whose state fits
``memory_budget``, and says how it compares with DP-SGD and with the best entry regardless of
memory. Errors are at equal privacy: each is sens(C, p) times the decoder norm, so the noise
multiplier that calibration gives applies to all of them alike.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from mfnoise.core import workloads
from mfnoise.library.index import directory, entries, read_index
from mfnoise.library.specs import schema
from mfnoise.strategies import error
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


def candidates(n: int, epochs: int, workload: str = "prefix",
               folder: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Library entries for (workload, n, epochs), then DP-SGD (``dp_sgd``), last."""
    found = entries(folder, workload=workload, n=n, epochs=epochs)
    if not found:
        have = sorted({(e["workload"], e["n"], e["epochs"]) for e in read_index(folder)["strategies"]})
        ns = sorted({x[1] for x in have if x[0] == workload})
        es = sorted({x[2] for x in have if x[0] == workload and x[1] == n})
        hint = (f"for n={n} it has epochs {es}" if es else f"it has n in {ns}") if ns else \
            f"it has workloads {sorted({x[0] for x in have})}"
        raise ValueError(f"the library holds no strategy for workload {workload!r}, n={n}, epochs={epochs}; "
                         f"{hint} (or run `mfnoise optimize`)")
    folder = directory() if folder is None else folder
    out = [dict(e, path=os.fspath(os.path.join(folder, e["file"]))) for e in found]
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
