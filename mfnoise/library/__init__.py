"""Layer 3, the precomputed strategy library (``strategies/`` in the checkout, package data
``mfnoise.library.data`` when installed) and ``recommend``.

Modules: ``specs`` (the grid: ``Spec``, its constants, ``grid``/``spec``/``select``), ``index``
(finding the folder, the index format and its queries), ``building`` (build, compare, merge),
``lock`` (the index's file lock), ``recommend`` (the best entry for a memory budget).
"""

from mfnoise.library.building import build, build_entry, compare, merge, missing, record_build, state_arrays
from mfnoise.library.index import (
    ENV_VAR,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    INDEX_NAME,
    add_entries,
    default_directory,
    directory,
    empty_index,
    entries,
    entry,
    file_sha256,
    get,
    iter_files,
    path,
    read_index,
    shipped_specs,
    total_bytes,
    write_index,
)
from mfnoise.library.specs import (
    BANDED_BANDS,
    BANDED_MAX_N,
    BLT_BUFFERS,
    BLT_OBJECTIVES,
    EPOCHS,
    FAMILY_ALIASES,
    NS,
    OPTIMIZER_FAMILIES,
    TOEPLITZ_BANDS,
    WORKLOADS,
    Spec,
    canonical_family,
    grid,
    schema,
    select,
    spec,
)

__all__ = [
    "BANDED_BANDS", "BANDED_MAX_N", "BLT_BUFFERS", "BLT_OBJECTIVES", "ENV_VAR", "EPOCHS", "FAMILY_ALIASES",
    "INDEX_FORMAT", "INDEX_FORMAT_VERSION", "INDEX_NAME", "NS", "OPTIMIZER_FAMILIES", "TOEPLITZ_BANDS",
    "WORKLOADS", "Spec", "add_entries", "build", "build_entry", "canonical_family", "compare",
    "default_directory", "directory", "empty_index", "entries", "entry", "file_sha256", "get", "grid",
    "iter_files", "merge", "missing", "path", "read_index", "record_build", "schema", "select",
    "shipped_specs", "spec", "state_arrays", "total_bytes", "write_index",
]
