"""The ``inverse-toeplitz`` family's problem: optimized BISR, C^{-1}[i, j] = r_{i-j} for i - j < bands.

BISR (banded inverse square root, "Banded Square Root Matrix Factorization for Differentially
Private Model Training", Kalinin & Lampert 2024, arXiv:2405.13763; asymptotically optimal for
multiple participations by "Back to Square Roots: An Optimal Bound on the Matrix Factorization
Error for Multi-Epoch Differentially Private SGD", Kalinin et al. 2025, arXiv:2505.12128) fixes
r to the first ``bands`` coefficients of A^{-1/2}; here r is optimized, starting from that closed
form (``mfnoise.strategies.closed_forms.bisr``).

Loss, for a Toeplitz workload A with first column a. B = A C^{-1} is Toeplitz with first column
beta = a r mod x^n (one FFT product, ``optim.toeplitz.series_multiply``) and C is Toeplitz with
first column c = 1 / r mod x^n (the O(n bands) recurrence ``optim.toeplitz.decoder_coeffs``), so

    objective^2 = sens(C, p)^2 sum_j W_j beta_j^2

(``objectives.toeplitz_weights``: rmse W_j = (n - j) / n; max and last-iterate W_j = 1; a
Weighted's suffix sums), and the loss is log(objective). Scaling r by s > 0 scales B by s and C (so sens) by 1 / s: the
objective is scale-invariant, so r_0 = 1 is fixed and bands - 1 coefficients are free.

Sensitivity. The loss uses sens(C, p) itself where it has a closed form, else a proven upper
bound that is exact on the strategies where the closed form applies:

* One reachable participation: sens^2 = ||C[:, 0]||^2 = sum_{j<n} c_j^2 (the column norms
  sum_{j<n-t} c_j^2 decrease in t), exact for any signs.
* Several participations, cyclic schema: sens^2 <= max_s F_s, F_s the sum of |X| = |C^T C| over
  the cyclic pattern {s, s + b, ...} (``strategies.inverse_toeplitz.cyclic_pattern_sums``,
  O(m n)). Exact wherever X is non-negative on the worst pattern, so wherever c >= 0, monotone or
  not; optima are often non-negative but not monotone (n = 1024, 4 epochs, 16 bands: c jumps up
  at lag 15), where the envelope bound of the first version was loose and its kinks stopped L-BFGS-B
  1.5% short.
* Several participations, min-sep schema: the closed form (``core.sensitivity.toeplitz``, worst
  pattern {0, b, 2b, ...}) holds only when c is non-negative and non-increasing, which optimized
  coefficients need not be. The loss uses ``strategies.inverse_toeplitz.separated_bound_squared``:
  |X[i, j]| <= sum_l |c_l| e_{l+j-i}, e_l = max_{l' >= l} |c_{l'}|, which is non-increasing as
  the pattern spreads or moves right, so {0, b, 2b, ...} is the worst pattern for the bound;
  exact when c >= 0 and c[b:] is non-increasing, whatever c does below lag b. (The envelope of
  both factors, ``strategies.toeplitz.majorant_bound``, is loose wherever c jumps up at a small
  lag, and its kinks stopped L-BFGS-B 1.5% short at n = 1024, 4 participations, min_sep 256.)

At the start, the closed-form BISR, every bound is exact (for prefix and momentum workloads): the
coefficients binom(2j, j) / 4^j of A^{1/2} are log-convex, so Kaluza's theorem ("Über die
Koeffizienten reziproker Potenzreihen", Kaluza 1928) gives r_j <= 0 for j >= 1; then
c_j = sum_{i=1}^{bands-1} (-r_i) c_{j-i} >= 0, its first ``bands`` coefficients are those of
A^{1/2} (non-increasing), and each later difference c_{j+1} - c_j is a non-negative combination
of earlier ones, so c is non-increasing (the tests check momentum workloads too).

The final strategy's sensitivity is recomputed by ``InverseToeplitz.sensitivity``: exact where a
proof applies (above), otherwise a proven bound (exact=False) never above the loss's (the loss's
bound, or a smaller one: the majorant or, for small n, the dense routine). So the optimum, whose
loss is at most the start's, is never worse than the closed form by exact evaluation. It is nested
in ``bands`` (r with fewer bands is r with zero trailing coefficients).

Against BSR (the banded square root, C banded with the same number of bands): with
bands >= min_sep under many epochs BSR's C has columns of disjoint support within a pattern, which
no full C = 1 / r has, and BISR loses there (momentum 0.9, n = 512, 32 epochs, 16 bands: 231.99
against BSR's 229.19); the tests and benchmarks/README.md record the schemas.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.core.workloads import Workload
from mfnoise.optim import objectives
from mfnoise.optim.problem import FAST_COMPILE, Problem, check_arguments, register
from mfnoise.optim.toeplitz import (
    decoder_coeffs,
    series_multiply,
    workload_coeffs,
)
from mfnoise.strategies import closed_forms
from mfnoise.strategies.inverse_toeplitz import InverseToeplitz, cyclic_pattern_sums, separated_bound_squared

DEFAULT_MAX_BANDS = 64

STEP_SCALE = 0.01
"""The parameters are x = (r_1, ..., r_{bands-1}) / STEP_SCALE. L-BFGS-B's first trial step has unit
length in x; a unit change of r moves roots of r(z) well inside the unit disc, where c = 1 / r grows
geometrically and overflows over n steps (a wall the line search stops at, not a descent); a step
of 0.01 in r stays where the loss is finite. Later steps are quasi-Newton and scale-free."""


def _default_bands(p: Participation) -> int:
    return int(min(p.n, p.min_sep, DEFAULT_MAX_BANDS))


def _unit(m: int) -> np.ndarray:
    e = np.zeros(m)
    e[0] = 1.0
    return e


def problem(workload: Workload, participation: Participation, *, objective: objectives.Objective = "rmse",
            bands: int | None = None, buffers: int | None = None, init: np.ndarray | None = None) -> Problem:
    """min over r_1..r_{bands-1} (r_0 = 1) of log(objective): rmse, max, last-iterate or a Weighted
    (``mfnoise.optim.objectives``); see the module docstring.

    ``bands`` (default min(n, min_sep, 64)) is the number of bands of C^{-1}. ``init``: initial
    inverse coefficients r (any length, scaled so r_0 = 1, truncated or zero-padded to ``bands``), default
    the closed-form BISR (the first ``bands`` coefficients of A^{-1/2}).
    """
    p = participation
    n = check_arguments(workload, p, objective, supported=("rmse", "max", "last-iterate", "weighted"))
    if buffers is not None:
        raise ValueError("buffers applies to the blt family, not inverse-toeplitz")
    bands = _default_bands(p) if bands is None else int(bands)
    if not 1 <= bands <= n:
        raise ValueError(f"bands={bands} must be in [1, n={n}]")
    a = workload_coeffs(workload)
    if init is None:
        r0 = closed_forms.bisr(n, bands, workload).inverse_coeffs
    else:
        init = np.asarray(init, np.float64)
        if init.ndim != 1 or init.size < 1 or not np.all(np.isfinite(init)) or init[0] == 0:
            raise ValueError(f"init must be a finite 1-D coefficient vector with r_0 != 0, got {init!r}")
        r0 = np.zeros(bands)
        r0[: min(bands, init.size)] = init[:bands] / init[0]
    several = p.reachable_participations > 1
    kind = ("cyclic" if p.cyclic else "separated") if several else "single"
    x0 = r0[1:] / STEP_SCALE
    weights = objectives.toeplitz_weights(objective, n)
    e0 = _unit(n)

    def loss(x: jax.Array) -> jax.Array:
        r = jnp.concatenate([jnp.ones(1), STEP_SCALE * x])
        b = series_multiply(jnp.asarray(a), r, n)
        err2 = jnp.sum(jnp.asarray(weights) * b * b)
        c = decoder_coeffs(jnp.asarray(e0), r, n)
        if kind == "cyclic":
            sens2 = jnp.max(cyclic_pattern_sums(c, p, jnp, jnp.abs))
        elif kind == "separated":
            sens2 = separated_bound_squared(c, p, jnp)
        else:
            sens2 = jnp.sum(c * c)
        return 0.5 * (jnp.log(sens2) + jnp.log(err2))

    def to_strategy(x: np.ndarray) -> InverseToeplitz:
        return InverseToeplitz(np.concatenate([[1.0], STEP_SCALE * np.asarray(x, np.float64)]), n)

    return Problem(
        x0=np.asarray(x0, np.float64),
        value_and_grad=jax.value_and_grad(loss),
        to_strategy=to_strategy,
        name=f"inverse-toeplitz({kind}, n={n}, bands={bands}, {objectives.name(objective)})",
        objective_from_loss=math.exp,
        cpu_compiler_options=FAST_COMPILE,
    )


register("inverse-toeplitz", problem)
