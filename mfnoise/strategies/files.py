"""Strategy files as plain data: the ``.npz`` container, its digest, and the file conventions.

This module knows nothing of the strategy classes (``mfnoise.strategies.io`` turns a strategy into
a file and back; ``Strategy.save`` writes through ``write`` here), so the base class can save
without an import cycle.

Layout: ``array/<name>`` for each array of ``strategy.arrays()`` and ``metadata``, a 0-d unicode
array holding JSON: format version, family, params (n, bands or buffers), the participation schema
and workload it was built for, rmse, max_error, sensitivity, the mfnoise version, and ``sha256``.
The digest covers every array (name, dtype, shape, bytes) and the metadata without the digest
itself, so an edited number anywhere is refused. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from mfnoise._version import __version__

FORMAT_VERSION = 1
FORMAT_NAME = "mfnoise-strategy"


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


def write(path: str | os.PathLike, family: str, params: dict[str, Any], arrays: dict[str, np.ndarray],
          **metadata: Any) -> str:
    """Writes one strategy file: ``arrays`` as float64, ``family``, ``params`` and ``metadata``
    (participation, workload, rmse, ...) in the JSON entry, with the digest, atomically.

    ``.npz`` is appended to ``path`` unless present; its folder must exist (``atomic_write``: the
    file gets mode ``0o666 & ~umask`` and replaces ``path`` only once complete). Returns the path.

    Metadata values may be objects with ``to_dict()`` (``Participation``, ``Workload``).
    """
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": family,
        "params": params,
        "mfnoise_version": __version__,
    }
    for key, value in metadata.items():
        meta[key] = value.to_dict() if hasattr(value, "to_dict") else value
    meta = json.loads(json.dumps(meta, default=_json_default))  # canonical, JSON-only values
    meta["sha256"] = digest(arrays, meta)
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    entries: dict[str, Any] = {"metadata": np.array(json.dumps(meta, sort_keys=True))}
    entries.update({f"array/{k}": v for k, v in arrays.items()})
    with atomic_write(path, "wb") as f:
        np.savez(f, **entries)
    return path


# -- file conventions: every file mfnoise writes goes through these two ----------------------------
def output_folder(path: str | os.PathLike, argument: str = "path", *, folder_output: bool = False) -> str:
    """The existing folder that will hold the output ``path``, checked before anything is written.

    Raises, naming ``argument``, ``path`` and the folder: FileNotFoundError when the folder is
    missing (a mistyped folder is never created: making folders is the caller's decision),
    PermissionError when it is not writable, IsADirectoryError when ``path`` is itself a folder
    (unless ``folder_output``: then ``path`` is a folder to fill, new or not, and NotADirectoryError
    is raised when it is a file). Call it before long work, so a typo fails at once.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"{argument} {path!r}: the folder {folder!r} {what}; "
                                "create it first (mfnoise does not create folders)")
    if folder_output and os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{argument} {path!r} is a file, not a folder")
    if not folder_output and os.path.isdir(path):
        raise IsADirectoryError(f"{argument} {path!r} is a folder; give the name of a file in it")
    target = path if folder_output and os.path.isdir(path) else folder
    if not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(13, f"{argument} {path!r}: cannot create a file in {target!r} (Permission denied)")
    return folder


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", argument: str = "path") -> Iterator[IO[Any]]:
    """Opens a new file that replaces ``path`` only once it is completely written.

    The data go to a temporary file in the same folder (so the rename cannot cross file systems),
    which is flushed to disk and renamed over ``path`` (``os.replace``, atomic on POSIX): a reader or
    a crash sees the old file or the new one, never part of one; on an exception the temporary file
    is removed and ``path`` is untouched. The file gets the usual mode of a new file,
    ``0o666 & ~umask`` (0644 under the common umask 022): it is created with ``os.open(..., 0o666)``
    and the kernel applies the umask, as for ``open(path, "w")`` (``tempfile.mkstemp`` would give
    0600). The folder must exist (``output_folder``). ``mode`` is "w" (text) or "wb".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = output_folder(path, argument)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # pragma: no cover - a 64-bit random name taken
            continue
        except OSError as e:  # e.g. a read-only folder: name the output, not the temporary file
            raise type(e)(e.errno, f"{argument} {path!r}: cannot create a file in {folder!r} ({e.strerror})") from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def figure_format(path: str | os.PathLike, argument: str = "plot") -> str:
    """The image format a figure written to ``path`` gets (its extension; png without one), after
    checking that the folder exists and that matplotlib is installed and writes that format
    (FileNotFoundError / ValueError naming ``argument`` and the path). Commands call it before their
    work, so a typo fails at once."""
    path = os.fspath(path)
    output_folder(path, argument)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ValueError(f"{argument} needs matplotlib: pip install 'mfnoise[demo]'") from None
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{argument} {path!r}: matplotlib cannot write .{fmt} files; "
                         f"use one of {', '.join('.' + k for k in sorted(supported))}")
    return fmt


def save_figure(fig: Any, path: str | os.PathLike, fmt: str, argument: str = "plot") -> str:
    """Writes a matplotlib figure to ``path`` atomically (``atomic_write``: the usual file mode, no
    partial file on a crash) and closes it; returns the path."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, "wb", argument) as f:
            fig.savefig(f, format=fmt)
    finally:
        plt.close(fig)
    return os.fspath(path)


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
