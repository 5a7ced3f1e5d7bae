"""Strategy files: ``.npz`` archives of plain arrays plus one JSON metadata entry.

Layout: ``array/<name>`` for each array of ``strategy.arrays()`` and ``metadata``, a 0-d unicode
array holding JSON: format version, family, params (n, bands or buffers), the participation schema
and workload it was built for, rmse, max_error, sensitivity, the mfnoise version, and ``sha256``.
The digest covers every array (name, dtype, shape, bytes) and the metadata without the digest
itself, so an edited number anywhere is refused. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from mfnoise.strategy import FAMILIES, Strategy

FORMAT_VERSION = 1
FORMAT_NAME = "mfnoise-strategy"


def _version() -> str:
    from mfnoise import __version__

    return __version__


def digest(arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> str:
    """sha256 over the arrays (sorted by name) and the canonical JSON of metadata sans sha256."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    meta = {k: v for k, v in metadata.items() if k != "sha256"}
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def save(strategy: Strategy, path: str, **metadata: Any) -> str:
    """Writes ``strategy`` and ``metadata`` (participation, workload, rmse, ...) atomically.

    ``participation`` and ``workload`` may be given as objects with ``to_dict()``.
    """
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in strategy.arrays().items()}
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": strategy.family,
        "params": strategy.params(),
        "mfnoise_version": _version(),
    }
    for key, value in metadata.items():
        meta[key] = value.to_dict() if hasattr(value, "to_dict") else value
    meta = json.loads(json.dumps(meta, default=_json_default))  # canonical, JSON-only values
    meta["sha256"] = digest(arrays, meta)
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Write then rename, so a crash never leaves a half-written strategy file behind.
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, metadata=np.array(json.dumps(meta, sort_keys=True)),
                     **{f"array/{k}": v for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in strategy metadata")


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The verified (arrays, metadata) of a strategy file; ValueError if corrupted or edited."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "metadata" not in z.files:
                raise ValueError("no metadata entry")
            meta = json.loads(str(z["metadata"][()]))
            arrays = {k[len("array/"):]: z[k] for k in z.files if k.startswith("array/")}
    except FileNotFoundError:
        raise
    except Exception as e:
        # Any damage to the container (bad CRC, a flipped compression method or encryption flag,
        # a broken .npy header, ...) is a refusal, never an unexpected exception type.
        raise ValueError(f"{path} is not a readable mfnoise strategy file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} is not an mfnoise strategy file (format={found!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version={meta.get('format_version')!r}; "
                         f"this mfnoise reads version {FORMAT_VERSION}")
    expected = meta.get("sha256")
    actual = digest(arrays, meta)
    if expected != actual:
        raise ValueError(f"{path} failed its integrity check: sha256 {actual} != recorded {expected}; "
                         "the file was corrupted or edited")
    return arrays, meta


def load(path: str) -> Strategy:
    """The strategy in a verified strategy file; its metadata is on ``mfnoise.io.read``."""
    arrays, meta = read(path)
    family = meta.get("family")
    if family not in FAMILIES:
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
