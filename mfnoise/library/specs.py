"""The grid of the precomputed library: which strategies it holds, and how each one is built.

An entry is one ``Spec``: a workload, n steps, a number k of epochs of fixed cyclic batches
(``Participation.epochs(n, k)``, min_sep b = n // k), an optimizer family with its size (buffers
for ``blt``, bands for ``toeplitz`` and ``banded``), and an objective (``rmse`` or ``max``). The full
grid (``grid()``): workloads prefix and momentum 0.9; n in ``NS``; k in ``EPOCHS``; BLT with
``BLT_BUFFERS`` buffers for both objectives; banded Toeplitz with ``TOEPLITZ_BANDS`` bands; general
banded with ``BANDED_BANDS`` bands for n <= ``BANDED_MAX_N``. A family sized by bands is built only
where bands <= min_sep ("where it fits"), so that no two columns of one participation pattern
overlap and its sensitivity is the exact column-norm one (docs/design.md, "The mathematics").

Epochs not in ``EPOCHS``: a strategy built for more participations stays valid for fewer. Privacy
needs its sensitivity under the schema actually trained with, which ``dp_aggregate(...,
participation=p)`` and ``evaluate`` recompute for p; and where the entry's stored schema covers p
(``Participation.covers``: every pattern of p is one of the stored schema's; k' >= k min-sep
participations with the same min_sep always do, k' cyclic epochs cover k exactly when n // k'
divides n // k) its stored sensitivity already bounds sens(C, p). ``recommend`` offers, for k epochs
the grid lacks, the entries of the nearest k' > k with their sensitivity and errors recomputed for
``schema(n, k)``; bands <= n // k' <= n // k keep a banded entry's sensitivity the exact column-norm one.

Families are named by the strategy vocabulary (``Strategy.family``); ``banded-toeplitz``, the
optimizer's former name for ``toeplitz``, is accepted as an alias. Entry names are identifiers of
the shipped files and keep their historical family token (``prefix-n1000-e1-banded-toeplitz16-rmse``
is a ``toeplitz`` entry).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import shlex
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from mfnoise.core import workloads
from mfnoise.core.participation import EpochsWarning, Participation
from mfnoise.optim import problem
from mfnoise.optim.problem import OBJECTIVES
from mfnoise.strategies import BLT, Banded, Toeplitz

WORKLOADS = ("prefix", "momentum:0.9")
NS = (1000, 2000, 5000, 10000, 100000)
EPOCHS = (1, 2, 4, 8, 16, 32, 64)
BLT_BUFFERS = (2, 3, 4, 5, 6)
BLT_OBJECTIVES = ("rmse", "max")
TOEPLITZ_BANDS = (4, 16, 64)
BANDED_BANDS = (4, 16, 64)
BANDED_MAX_N = 2000

OPTIMIZER_FAMILIES = (BLT.family, Toeplitz.family, Banded.family)
# The optimizer's deprecated names of these families (``banded-toeplitz``), accepted here silently:
# the shipped files' metadata still says them.
FAMILY_ALIASES: Mapping[str, str] = {old: new for old, new in problem.deprecated_aliases().items()
                                     if new in OPTIMIZER_FAMILIES}


@dataclasses.dataclass(frozen=True)
class _GridFamily:
    """How the grid builds one optimizer family."""

    size_key: str  # the optimizer's size argument: "buffers" or "bands"
    token: str  # the family's part of entry names
    sizes: tuple[int, ...]
    objectives: tuple[str, ...]
    max_n: int | None  # the largest n built (None: every n)
    # Build order, most useful first, so that a partial build already covers every schema with a
    # few memory sizes; `mfnoise library build --missing` does the rest.
    tiers: Mapping[tuple[int, str], int]


_FAMILIES: dict[str, _GridFamily] = {
    BLT.family: _GridFamily(
        "buffers", BLT.family, BLT_BUFFERS, BLT_OBJECTIVES, None,
        {(4, "rmse"): 1, (2, "rmse"): 2, (4, "max"): 3, (6, "rmse"): 4, (3, "rmse"): 6, (5, "rmse"): 6,
         (2, "max"): 7, (6, "max"): 7, (3, "max"): 8, (5, "max"): 8}),
    Toeplitz.family: _GridFamily(
        "bands", "banded-toeplitz", TOEPLITZ_BANDS, ("rmse",), None, {(b, "rmse"): 0 for b in TOEPLITZ_BANDS}),
    # 64 general bands take minutes per entry: last.
    Banded.family: _GridFamily(
        "bands", Banded.family, BANDED_BANDS, ("rmse",), BANDED_MAX_N,
        {(b, "rmse"): 5 if b < 64 else 9 for b in BANDED_BANDS}),
}


def canonical_family(name: str) -> str:
    """The library family called ``name`` (an alias resolved), refused when it is not one."""
    name = FAMILY_ALIASES.get(name, name)
    if name not in _FAMILIES:
        raise ValueError(f"unknown library family {name!r}; expected one of {OPTIMIZER_FAMILIES}")
    return name


def schema(n: int, epochs: int) -> Participation:
    """``Participation.epochs(n, epochs)``: the library's schema for n steps and k epochs.

    Where k does not divide n the first batches take part ceil(n / (n // k)) > k times;
    ``Participation.epochs`` warns about that (``EpochsWarning``), but the grid means exactly the
    schema it defines (its entries store max_participations), so the warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EpochsWarning)
        return Participation.epochs(n, epochs)


@dataclasses.dataclass(frozen=True, order=True)
class Spec:
    """One library entry to build: ``mfnoise.optimize(workload(n), Participation.epochs(n, epochs),
    family=family, bands|buffers=size, objective=objective)``."""

    workload: str
    n: int
    epochs: int
    family: str  # an optimizer family of OPTIMIZER_FAMILIES (or an alias of one)
    size: int  # buffers for blt, bands otherwise
    objective: str = "rmse"

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", canonical_family(self.family))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")

    @property
    def name(self) -> str:
        wl = self.workload.replace(":", "")
        return f"{wl}-n{self.n}-e{self.epochs}-{_FAMILIES[self.family].token}{self.size}-{self.objective}"

    @property
    def file(self) -> str:
        """The entry's file name in the library folder."""
        return f"{self.name}.npz"

    @property
    def size_key(self) -> str:
        """The optimizer's size argument: "buffers" or "bands"."""
        return _FAMILIES[self.family].size_key

    def participation(self) -> Participation:
        return schema(self.n, self.epochs)

    def make_workload(self) -> workloads.Workload:
        return workloads.parse(self.workload, self.n)

    def fits(self) -> bool:
        """Whether the entry belongs to the grid: a family sized by bands needs bands <= min_sep."""
        if self.epochs > self.n:
            return False
        return self.size_key != "bands" or self.size <= self.n // self.epochs

    def command(self) -> str:
        """The ``mfnoise optimize`` call that regenerates this entry, run in the library folder."""
        return shlex.join(["mfnoise", "optimize", "--family", self.family, f"--{self.size_key}", str(self.size),
                           "--n", str(self.n), "--epochs", str(self.epochs), "--workload", self.workload,
                           "--objective", self.objective, "--out", self.file])

    def optimize_kwargs(self) -> dict[str, Any]:
        return {"family": self.family, self.size_key: self.size, "objective": self.objective}


def _tier(s: Spec) -> int:
    return _FAMILIES[s.family].tiers[(s.size, s.objective)]


def grid() -> list[Spec]:
    """Every entry of the full library, in build order (the families' tiers, then n)."""
    specs = [Spec(wl, n, k, name, size, objective)
             for n in NS for wl in WORKLOADS for k in EPOCHS
             for name, f in _FAMILIES.items() if f.max_n is None or n <= f.max_n
             for size in f.sizes for objective in f.objectives]
    return sorted((s for s in specs if s.fits()), key=lambda s: (_tier(s), s.n, s.workload, s.epochs, s.size))


@functools.cache
def _by_name() -> dict[str, Spec]:
    return {s.name: s for s in grid()}


def spec(name: str) -> Spec:
    """The grid entry called ``name``."""
    try:
        return _by_name()[name]
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
