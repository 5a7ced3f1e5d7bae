"""Strategy files: a strategy to a ``.npz`` file and back (docs/design.md, "Strategy files").

The container (its layout, ``read``, ``digest``, the format constants) and the conventions every
file mfnoise writes follows (``output_folder``, ``atomic_write``) live in
``mfnoise.strategies.files``, which knows no strategy classes (so ``Strategy.save`` can use it
without an import cycle); they are importable from here too, the module users know for files.
``load`` finds the class of a file's family in the family registry.
"""

from __future__ import annotations

import os
from typing import Any

from mfnoise.strategies.base import Strategy
from mfnoise.strategies.files import FORMAT_NAME, FORMAT_VERSION, atomic_write, digest, output_folder, read
from mfnoise.strategies.registry import FAMILIES

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "atomic_write", "digest", "load", "output_folder", "read", "save"]


def save(strategy: Strategy, path: str | os.PathLike, **metadata: Any) -> str:
    """Writes ``strategy`` and ``metadata`` (participation, workload, rmse, ...) atomically.

    The same as ``strategy.save(path, **metadata)``: ``.npz`` is appended to ``path`` unless
    present; its folder must exist. ``participation`` and ``workload`` may be given as objects
    with ``to_dict()``. Returns the path written.
    """
    return strategy.save(path, **metadata)


def load(path: str | os.PathLike) -> Strategy:
    """The strategy in a verified strategy file; its metadata is on ``read``."""
    path = os.fspath(path)
    arrays, meta = read(path)
    family = meta.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"{path} has unknown strategy family {family!r}")
    try:
        strategy = FAMILIES[family].from_arrays(arrays, meta.get("params", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} holds an invalid {family} strategy: {e}") from None
    params = meta.get("params")
    n = params.get("n") if isinstance(params, dict) else None
    if n is not None and strategy.n != n:
        raise ValueError(f"{path}: strategy has n={strategy.n} but metadata says n={n}")
    return strategy
