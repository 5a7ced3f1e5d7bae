"""Participation schemas: which sets of steps one example may take part in.

A participation pattern is a set of steps P in [0, n). Two kinds of schema (docs/design.md):

* min-sep ``(n, k, b)``: any P with |P| <= k and |i - j| >= b for distinct i, j in P.
* cyclic (k epochs of fixed batches, b = n // k): P is a subset of {c, c + b, c + 2b, ...} ∩ [0, n)
  for one c in [0, b). This is what fixed cyclic batches produce ("Multi-Epoch Matrix
  Factorization Mechanisms for Private Machine Learning", Choquette-Choo et al. 2023,
  arXiv:2211.06530).

Single participation (k = 1) is both kinds.

``Participation.epochs(n, k)`` takes b = n // k; when k does not divide n that gives
ceil(n / b) > k participations, so it warns (``EpochsWarning``) and says how to ask for exactly k.
``check_participation`` is the one validator of a schema argument every layer uses.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Iterator
from typing import Any


class EpochsWarning(UserWarning):
    """``Participation.epochs(n, k)`` with k not dividing n: more than k participations result."""


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Participation:
    """A participation schema of ``n`` steps.

    Attributes:
      n: number of steps.
      max_participations: k, the most steps one example takes part in.
      min_sep: b, the least distance between two participations of one example.
      cyclic: True for fixed cyclic batches (patterns {c, c + b, ...}); False for min-sep.

    A ``max_participations`` above ``ceil(n / min_sep)`` is legal and simply unreachable.
    """

    n: int
    max_participations: int
    min_sep: int
    cyclic: bool = False

    def __post_init__(self) -> None:
        n = _check_positive_int("n", self.n)
        k = _check_positive_int("max_participations", self.max_participations)
        b = _check_positive_int("min_sep", self.min_sep)
        if b > n:
            raise ValueError(f"min_sep={b} is larger than the number of steps n={n}")
        if self.cyclic and k != -(-n // b):
            raise ValueError(
                f"cyclic participation with n={n}, min_sep={b} has ceil(n / min_sep)={-(-n // b)} "
                f"participations, not max_participations={k}; use Participation.epochs"
            )
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "max_participations", k)
        object.__setattr__(self, "min_sep", b)
        object.__setattr__(self, "cyclic", bool(self.cyclic))

    @classmethod
    def single(cls, n: int) -> Participation:
        """Each example takes part in at most one step."""
        n = _check_positive_int("n", n)
        return cls(n, 1, n, cyclic=True)

    @classmethod
    def epochs(cls, n: int, k: int) -> Participation:
        """k epochs of fixed cyclic batches: min_sep b = n // k, step t uses batch t mod b.

        Batch c is used at steps {c, c + b, ...} ∩ [0, n): ceil((n - c) / b) times, so
        ``max_participations`` = ceil(n / b). That is k exactly when k divides n. Otherwise
        (n = k b + s with 0 < s < k) the first batches are used more than k times (k + ceil(s / b)
        for the first), ``max_participations`` says so, and an ``EpochsWarning`` names the number
        and how to ask for exactly k: ``Participation(n, max_participations=k, min_sep=b)``
        (a min-sep schema; fixed cyclic batches cannot honour it for n > k b, so use n = k b steps
        for them).
        """
        n = _check_positive_int("n", n)
        k = _check_positive_int("epochs", k)
        if k > n:
            raise ValueError(f"epochs={k} is larger than the number of steps n={n}")
        b = n // k
        participations = -(-n // b)
        if participations != k:
            warnings.warn(
                f"Participation.epochs(n={n}, k={k}): {k} does not divide {n}, so min_sep = n // k = {b} "
                f"and the first batches are used ceil(n / min_sep) = {participations} times: "
                f"max_participations={participations}, not {k}. For exactly {k} participations use "
                f"Participation({n}, max_participations={k}, min_sep={b}) (min-sep), or n = {k * b} steps "
                f"(Participation.epochs({k * b}, {k}))",
                EpochsWarning,
                stacklevel=2,
            )
        return cls(n, participations, b, cyclic=True)

    @property
    def kind(self) -> str:
        return "cyclic" if self.cyclic else "min-sep"

    @property
    def reachable_participations(self) -> int:
        """The largest pattern size the schema really allows: min(k, ceil(n / b))."""
        return min(self.max_participations, -(-self.n // self.min_sep))

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "max_participations": self.max_participations,
            "min_sep": self.min_sep,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Participation:
        kind = d.get("kind", "min-sep")
        if kind not in ("cyclic", "min-sep"):
            raise ValueError(f"unknown participation kind {kind!r}")
        return cls(int(d["n"]), int(d["max_participations"]), int(d["min_sep"]), kind == "cyclic")

    def cyclic_patterns(self) -> Iterator[tuple[int, ...]]:
        """The maximal cyclic patterns {c, c + b, ...} ∩ [0, n), c in [0, b)."""
        for c in range(self.min_sep):
            yield tuple(range(c, self.n, self.min_sep))

    def patterns(self) -> Iterator[tuple[int, ...]]:
        """Every pattern (exponential in n; for exhaustive search on small schemas only).

        Cyclic: the maximal patterns {c, c + b, ...} (every other pattern is a subset of one).
        Min-sep: every separated set of 1..min(k, ceil(n / b)) steps, generated in time
        proportional to their number.
        """
        if self.cyclic:
            yield from self.cyclic_patterns()
            return
        n, b, k = self.n, self.min_sep, self.reachable_participations

        def extend(prefix: tuple[int, ...], start: int) -> Iterator[tuple[int, ...]]:
            for t in range(start, n):
                pattern = prefix + (t,)
                yield pattern
                if len(pattern) < k:
                    yield from extend(pattern, t + b)

        yield from extend((), 0)

    def contains(self, pattern: tuple[int, ...] | list[int]) -> bool:
        """Whether a set of steps is a pattern the schema allows."""
        steps = sorted(int(t) for t in pattern)
        if any(t < 0 or t >= self.n for t in steps) or len(set(steps)) != len(steps):
            return False
        if self.cyclic:
            return len({t % self.min_sep for t in steps}) <= 1
        if len(steps) > self.max_participations:
            return False
        return all(j - i >= self.min_sep for i, j in zip(steps, steps[1:]))

    def covers(self, other: Participation) -> bool:
        """Whether every participation pattern of ``other`` is one of this schema's (same n).

        Then sens(C, other) <= sens(C, self) for every strategy C (the sensitivity is a maximum over
        patterns), so a strategy normalised or calibrated for this schema stays private, with noise
        to spare, under ``other``. Exactly, with m = ``other.reachable_participations`` and b, b' the
        min_seps of ``other`` and of this schema: when m = 1 always (singletons are patterns of every
        schema); otherwise, for this schema min-sep: m <= its max_participations and b >= b' (the
        patterns of ``other`` have up to m steps and gaps down to b); for this schema cyclic, all of
        them must lie in one residue class mod b': ``other`` cyclic: b' divides b; ``other`` min-sep:
        every gap in [b, n - 1] is a multiple of b', i.e. b' = 1 or b = n - 1 with b' dividing it.
        In particular k' >= k participations with the same min_sep (min-sep) always cover k, and
        k' cyclic epochs cover k < k' exactly when n // k' divides n // k.
        """
        if self.n != other.n:
            return False
        if other.reachable_participations == 1:
            return True
        b, mine = other.min_sep, self.min_sep
        if not self.cyclic:
            return other.reachable_participations <= self.max_participations and b >= mine
        if other.cyclic:
            return b % mine == 0
        return mine == 1 or (b == self.n - 1 and b % mine == 0)

    def __str__(self) -> str:
        if self.cyclic:
            return f"{self.kind}(n={self.n}, epochs={math.ceil(self.n / self.min_sep)}, min_sep={self.min_sep})"
        return f"min-sep(n={self.n}, max_participations={self.max_participations}, min_sep={self.min_sep})"


def check_participation(p: Any, n: int | None = None, what: str = "the strategy") -> Participation:
    """``p`` itself when it is a ``Participation`` (of ``n`` steps, when ``n`` is given).

    Raises TypeError naming the type of anything else, and ValueError naming both sizes when
    p.n != n (``what`` says what has n steps, e.g. "the banded strategy").
    """
    if not isinstance(p, Participation):
        raise TypeError(f"expected a Participation, got {type(p).__name__}")
    if n is not None and p.n != n:
        raise ValueError(f"participation has n={p.n} but {what} has n={n}")
    return p
