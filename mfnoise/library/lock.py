"""An exclusive lock on a library folder's index, so that several builds may fill one library at once."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive ``flock`` on the index of ``folder`` for the ``with`` block.

    The lock file lives in the temporary folder, named by a digest of the folder's resolved path,
    so that the library folder holds only its index and strategy files.
    """
    import fcntl  # POSIX only; the library's queries do not need it

    digest = hashlib.sha256(os.fspath(Path(folder).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mfnoise-library-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
