"""Toeplitz strategies defined by a banded inverse: C^{-1}[i, j] = r_{i-j} for i - j < bands.

BISR (banded inverse square root, "Banded Square Root Matrix Factorization for Differentially
Private Model Training", Kalinin & Lampert 2024, arXiv:2405.13763) is of this kind. C itself is a
full Toeplitz matrix (the series reciprocal of r), so ``bands`` is None; ``inverse_bands`` is the
length of r, and the noise C^{-1} W streams from the last inverse_bands - 1 inputs w.

Under cyclic participation C's sensitivity is computed in O(m n) over every cyclic pattern
(``cyclic_sensitivity``): exact wherever X = C^T C is non-negative on the worst pattern (so wherever
c = 1 / r >= 0, monotone or not), else the proven bound sum |X|; optimized coefficients
(``mfnoise.optim.inverse_toeplitz``) are often not monotone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core import series
from mfnoise.core.participation import Participation
from mfnoise.core.workloads import check_n
from mfnoise.strategies import registry
from mfnoise.strategies.base import Strategy, StreamTable, as_float64, round_to
from mfnoise.strategies.toeplitz import majorant_bound, toeplitz_sensitivity


def cyclic_pattern_sums(c: Any, p: Participation, xp: Any = np, term: Callable[[Any], Any] | None = None) -> Any:
    """sum_{i, j in P_s} term((C^T C)[i, j]) for every cyclic pattern P_s = {s, s + b, ...} ∩ [0, n), s < b.

    C is the n×n lower-triangular Toeplitz matrix of ``c`` (shape (n,)), b = ``p.min_sep``; returns
    shape (b,); ``term`` applies to each entry (None: the entry itself; ``xp.abs``: |X|). With
    S_d[l] = sum_{l' <= l} c_{l'} c_{l'+d}, X = C^T C has X[i, j] = S_{j-i}[n-1-j] for j >= i, and
    the pairs of one pattern have j - i = q b, q = 0..m-1 (m = ceil(n / b)), so

        F_s = sum_q (2 - [q = 0]) sum_{j = s + q b + a b < n} term(S_{q b}[n-1-j]),     O(m n) in all.

    ``xp`` is numpy or jax.numpy (the optimizer's loss differentiates it). With term = |.|,
    sens(C, p)^2 <= max_s F_s (docs/design.md, "The mathematics": sens^2 <= max_P sum_P |X|, and a
    subset of a pattern sums less), with equality when the block of X on the maximising pattern is
    non-negative (every u_t equal), e.g. wherever c >= 0 (then X >= 0), monotone or not. Cyclic
    schemas only: a min-sep schema has other patterns.
    """
    n, b = p.n, p.min_sep
    m = -(-n // b)
    total = xp.zeros(b)
    for q in range(m):
        d = q * b
        sums = xp.cumsum(c[: n - d] * c[d:])
        if term is not None:
            sums = term(sums)
        # v[j - d] = S_d[n-1-j] for j in [d, n), zero-padded to m b - d entries; d is a multiple of b,
        # so the column of the reshape is j mod b = s.
        v = xp.concatenate([sums[::-1], xp.zeros(m * b - n)])
        contrib = v.reshape(-1, b).sum(axis=0)
        total = total + (contrib if q == 0 else 2.0 * contrib)
    return total


def cyclic_sensitivity(c: np.ndarray, p: Participation) -> sens_lib.Sensitivity:
    """sens(C, p) for a cyclic schema and a Toeplitz C with first column ``c`` (shape (n,)):
    sqrt(max_s sum_{P_s} |X|) (``cyclic_pattern_sums``), exact when X has no negative entry on the
    maximising pattern (so wherever c >= 0), else that proven upper bound (exact=False)."""
    if not p.cyclic:
        raise ValueError(f"cyclic_sensitivity needs a cyclic participation schema, got {p.kind}")
    c = np.asarray(c, np.float64)
    if c.shape != (p.n,):
        raise ValueError(f"c has shape {c.shape}, expected ({p.n},)")
    sums = cyclic_pattern_sums(c, p, np, np.abs)
    worst = int(np.argmax(sums))
    exact = bool(cyclic_pattern_sums(c, p, np, lambda v: np.minimum(v, 0.0))[worst] == 0.0)
    return sens_lib.Sensitivity(math.sqrt(float(sums[worst])), exact,
                                "cyclic-toeplitz" if exact else "cyclic-toeplitz-abs-bound")


def separated_bound_squared(c: Any, p: Participation, xp: Any = np) -> Any:
    """A proven upper bound on sens(C, p)^2 for any Toeplitz C (first column ``c``, shape (n,)), any schema.

    With e_l = max_{l' >= l} |c_{l'}| (non-increasing) and X = C^T C, for i < j, d = j - i:
    |X[i, j]| <= sum_{l <= n-1-j} |c_l| e_{l+d} =: Y(d, j), non-increasing in d and in j (fewer
    non-negative terms), and X[i, i] = sum_{l <= n-1-i} c_l^2, non-increasing in i. A pattern
    t_1 < ... < t_m with gaps >= b has t_a >= (a-1) b and t_a' - t_a >= (a'-a) b, so
    sum_P |X| <= sum over a, a' < m of the same terms at P* = {0, b, ..., (m-1) b}:

        bound = sum_{a<m} X[ab, ab] + 2 sum_{q=1}^{m-1} sum_{a'=q}^{m-1} Y(q b, a' b),    O(m n).

    Only the later factor is enveloped, so the bound is exact (= ||C 1_{P*}||^2, a lower bound)
    when c >= 0 and c[b:] is non-increasing, whatever c does at lags below min_sep (where the
    envelope of |c| is loose for optimized BISR: its c may jump up at small lags). ``xp`` is numpy
    or jax.numpy.
    """
    n, b, m = p.n, p.min_sep, p.reachable_participations
    mag = xp.abs(c)
    env = np.maximum.accumulate(mag[::-1])[::-1] if xp is np else jax.lax.cummax(mag, reverse=True)
    total = xp.zeros(())
    for q in range(m):
        d = q * b
        sums = xp.cumsum(c * c if q == 0 else mag[: n - d] * env[d:])
        js = (np.arange(m - q) + q) * b
        contrib = xp.sum(sums[n - 1 - js])
        total = total + (contrib if q == 0 else 2.0 * contrib)
    return total


def separated_sensitivity(c: np.ndarray, p: Participation) -> sens_lib.Sensitivity:
    """sqrt(``separated_bound_squared``): exact when c >= 0 and c[min_sep:] is non-increasing
    (method ``toeplitz-tail-envelope``), else that proven upper bound (exact=False)."""
    c = np.asarray(c, np.float64)
    if c.shape != (p.n,):
        raise ValueError(f"c has shape {c.shape}, expected ({p.n},)")
    exact = bool(np.all(c >= 0) and np.all(np.diff(c[p.min_sep:]) <= 0))
    return sens_lib.Sensitivity(math.sqrt(float(separated_bound_squared(c, p))), exact,
                                "toeplitz-tail-envelope" if exact else "toeplitz-tail-envelope-bound")


@registry.family
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class InverseToeplitz(Strategy):
    """Toeplitz C of size n whose inverse has first column ``inverse_coeffs`` (length bands)."""

    inverse_coeffs: np.ndarray
    n: int
    family = "inverse-toeplitz"
    is_toeplitz = True

    def __post_init__(self) -> None:
        r = as_float64("inverse toeplitz coefficients", self.inverse_coeffs, 1)
        object.__setattr__(self, "inverse_coeffs", r)
        object.__setattr__(self, "n", check_n(self.n))
        if not isinstance(r, np.ndarray):
            return
        if not 1 <= r.size <= self.n:
            raise ValueError(f"inverse has {r.size} coefficients, expected 1..n={self.n}")
        if r[0] == 0:
            raise ValueError("inverse toeplitz coefficient r_0 = 0 is not invertible")

    @property
    def inverse_bands(self) -> int:
        """The number of bands of C^{-1} (the length of r)."""
        return int(self.inverse_coeffs.shape[0])

    def toeplitz_coeffs(self) -> np.ndarray:
        return series.reciprocal(self.inverse_coeffs, self.n)

    def _dense(self) -> np.ndarray:
        return series.to_dense(self.toeplitz_coeffs(), self.n)

    def inverse_apply(self, z: np.ndarray) -> np.ndarray:
        return series.apply(self.inverse_coeffs, z)

    def sensitivity(self, p: Participation) -> sens_lib.Sensitivity:
        """sens(C, p) from C's coefficients c = 1 / r.

        Several participations under a cyclic schema: ``cyclic_sensitivity``, max over the
        cyclic patterns of sum |C^T C| in O(m n), exact when C^T C is non-negative on the worst
        pattern (e.g. c >= 0, monotone or not), else that proven bound (exact=False); it is the
        bound the optimizer's loss minimises, and never above the majorant bound below or the
        dense routine's (the same sum). Otherwise (``strategies.toeplitz.toeplitz_sensitivity``):
        exact for one reachable participation (the first column's norm, any signs) or c
        non-negative and non-increasing (the closed form, worst pattern {0, b, 2b, ...}, never
        applied to other coefficients); else a proven upper bound, exact=False: the majorant bound
        sens(E, p), E the Toeplitz matrix of e_j = max_{l >= j} |c_l| (the min-sep loss's), or, for
        small n, the dense routine where it is smaller. Where that routine would refuse (n too
        large for the dense routine and the majorant bound more than ``MAJORANT_SLACK`` above a
        lower bound), the majorant bound is returned: it is proven for any coefficients, so every
        strategy of this family has a sensitivity.
        """
        self._check_participation(p)
        c = self.toeplitz_coeffs()
        several = p.reachable_participations > 1
        if several and p.cyclic:
            return cyclic_sensitivity(c, p)
        tail = separated_sensitivity(c, p) if several else None
        if tail is not None and tail.exact:
            return tail
        try:
            other = toeplitz_sensitivity(self, c, p)
        except ValueError:
            other = majorant_bound(c, p)[0]
        return tail if tail is not None and tail.value < other.value else other

    def stream_table(self, dtype: Any) -> StreamTable:
        """One "input" row: C^{-1}[t, t - j] = r_j, rounded to dtype."""
        r = round_to(self.inverse_coeffs, dtype)
        return StreamTable("input", r.size - 1, r[None, :], dtype)

    def realised(self, dtype: Any) -> InverseToeplitz:
        """The rounded r define C'^{-1} exactly (no reciprocal: r_0 is a multiplier)."""
        return InverseToeplitz(self.stream_table(dtype).table[0], self.n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"inverse_coeffs": np.asarray(self.inverse_coeffs)}

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "bands": self.inverse_bands}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> InverseToeplitz:
        return cls(arrays["inverse_coeffs"], int(params["n"]))


jax.tree_util.register_dataclass(InverseToeplitz, data_fields=["inverse_coeffs"], meta_fields=["n"])
