"""Closed-form strategies built from the square root of a Toeplitz workload, and their registry.

* sqrt-Toeplitz: C = A^{1/2}; for the prefix sum c_j = binom(2j, j) / 4^j, the coefficients of
  (1 - x)^{-1/2} ("Constant Matters: Fine-grained Error Bound on Differentially Private Continual
  Observation", Fichtenberger et al. 2023, arXiv:2202.11205).
* BSR, banded square root: the first ``bands`` coefficients of A^{1/2}, each column scaled to
  unit norm ("Banded Square Root Matrix Factorization for Differentially Private Model Training",
  Kalinin & Lampert 2024, arXiv:2405.13763).
* BISR, banded inverse square root: C^{-1} is the first ``bands`` coefficients of A^{-1/2}
  (same paper).

``CLOSED_FORMS`` maps each name (with "identity", C = I) to its builder; ``closed_form(name, ...)``
builds one, and the command line takes its choices from the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from mfnoise.core import series
from mfnoise.core.workloads import Workload
from mfnoise.strategies.banded import Banded
from mfnoise.strategies.base import Strategy
from mfnoise.strategies.identity import Identity
from mfnoise.strategies.inverse_toeplitz import InverseToeplitz
from mfnoise.strategies.toeplitz import Toeplitz


def _workload_sqrt(n: int, workload: Workload | None, m: int) -> np.ndarray:
    """First m coefficients of A^{1/2} for a Toeplitz workload (prefix sum by default)."""
    if workload is not None and workload.n != n:
        raise ValueError(f"workload has n={workload.n}, expected n={n}")
    if workload is None or workload.name == "prefix":
        j = np.arange(1, m)
        return np.concatenate([[1.0], np.cumprod((2 * j - 1) / (2 * j))])
    if workload.coeffs is None:
        raise ValueError(f"closed forms need a Toeplitz workload, got {workload.name!r}")
    return series.sqrt(workload.coeffs, m)


def _check_bands(n: int, bands: int) -> int:
    bands = int(bands)
    if not 1 <= bands <= n:
        raise ValueError(f"bands={bands} must be in [1, n={n}]")
    return bands


def sqrt_toeplitz(n: int, workload: Workload | None = None) -> Toeplitz:
    """C = A^{1/2} (Toeplitz, n coefficients)."""
    return Toeplitz(_workload_sqrt(n, workload, n), n)


def bsr(n: int, bands: int, workload: Workload | None = None) -> Banded:
    """Banded square root: columns t of A^{1/2} truncated to ``bands`` rows, normalised."""
    bands = _check_bands(n, bands)
    c = _workload_sqrt(n, workload, bands)
    cols = np.tile(c, (n, 1))
    t, j = np.meshgrid(np.arange(n), np.arange(bands), indexing="ij")
    cols[t + j >= n] = 0.0
    return Banded.normalized_columns(cols)


def bisr(n: int, bands: int, workload: Workload | None = None) -> InverseToeplitz:
    """Banded inverse square root: C^{-1} = first ``bands`` coefficients of A^{-1/2}."""
    bands = _check_bands(n, bands)
    s = _workload_sqrt(n, workload, bands)
    return InverseToeplitz(series.reciprocal(s, bands), n)


@dataclasses.dataclass(frozen=True)
class ClosedForm:
    """A closed-form strategy: ``build(n, bands, workload)``, ``bands`` used iff ``needs_bands``."""

    build: Callable[[int, int, Workload | None], Strategy]
    needs_bands: bool
    description: str


CLOSED_FORMS: dict[str, ClosedForm] = {
    "identity": ClosedForm(lambda n, bands, workload: Identity(n), False, "C = I (DP-SGD)"),
    "sqrt-toeplitz": ClosedForm(lambda n, bands, workload: sqrt_toeplitz(n, workload), False, "C = A^(1/2)"),
    "bsr": ClosedForm(bsr, True, "banded square root: A^(1/2) truncated to bands, column-normalised"),
    "bisr": ClosedForm(bisr, True, "banded inverse square root: C^-1 = A^(-1/2) truncated to bands"),
}
"""Name -> closed form, in the order the command line lists them."""


def closed_form(name: str, n: int, bands: int | None = None, workload: Workload | None = None) -> Strategy:
    """The closed-form strategy ``name`` (a key of ``CLOSED_FORMS``) of size n."""
    if name not in CLOSED_FORMS:
        raise ValueError(f"unknown closed form {name!r}; expected one of {', '.join(CLOSED_FORMS)}")
    form = CLOSED_FORMS[name]
    if form.needs_bands and bands is None:
        raise ValueError(f"the {name} closed form needs bands")
    return form.build(n, 0 if bands is None else bands, workload)
