"""The mechanisms the white-box audit observes: mfnoise's real transform, and broken fixtures.

A white-box run (``mfnoise.auditing.whitebox``) has a parameter vector of d coordinates and d
canaries: canary j is an example whose per-example gradient at step t is u_t * a * e_j (e_j the
j-th unit vector, a the canary norm, u in {-1, 0, 1}^n its participation pattern with signs, the
same for every canary), present with probability 1/2 (``members[j]``). The other examples'
gradients are zero. A mechanism returns the n x d array O of releases, row t the noisy clipped sum
of step t (the transform's output before its division by the public batch constant, or with the
division undone):

    O = X + sigma_abs * (C'^{-1} W),    X[t, j] = members[j] * clip(u_t a e_j)[j],

sigma_abs = z * c * S, S = ``strategy.noise_sensitivity(p, dtype)``, W with iid N(0, 1) entries.
Noise is independent across coordinates (the generator draws every entry of w_t independently), so
one run gives d independent trials of the in/out test.

``honest()`` runs the real code path: the canary gradients clipped by ``mfnoise.training.clipping``'s
``clipped_sum`` and fed to ``mfnoise.dp_aggregate`` (real strategy object, participation schema,
sensitivity and noise generator) as a ``ClippedSum``, one ``update`` per step.

Clipping the d canaries. Materialising the (d, d) per-example gradients costs d^2 entries per step;
instead the real ``clipped_sum`` clips one canary of each sign (a (2, d) per-example array, leaf
shape (d,) like the run's, so the same rounding bound N_b >= ||g_b|| applies), and X takes that
clipped value at every present canary's coordinate. This is exact, bit for bit: a Dirac's sum of
squares adds only exact zeros to a^2 whatever its position, and each coordinate of the clipped sum
receives one non-zero term (``tests/auditing/test_whitebox.py`` checks it against the full
per-example clipping).

Broken fixtures (each models a privacy bug the audit must catch; ``FIXTURES``):

* ``sensitivity_k1()``: the noise is scaled by the sensitivity of single participation
  (S_1 = sens(C, Participation.single(n)), the largest column norm) when the schema has k > 1.
* ``wrong_strategy(other)``: the noise is (C_o^{-1} W) of another strategy C_o, scaled by the claimed
  strategy's S (the generator got the wrong strategy object). The releases are then mu-GDP with
  mu = ||C_o u|| / (z S) for the canary's pattern u: only a C_o whose noise is smaller where the
  canary is (||C_o u|| > S) is a privacy bug (one with more noise is not). The default C_o is the
  un-normalised square root of the prefix sum, A^{1/2} (``mfnoise.sqrt_toeplitz``, what the banded
  square root is cut from and normalised): for C = ``bsr(16, 4)`` under 4 epochs ||C_o u|| / S = 1.81
  (the C-whitened score sees 1.70 of it); for C = I, 1.86 (the C-whitened score sees 0.93: the
  empirical attack of ``whitebox`` finds it).
* ``reused_last_row(after)``: the generator yields its rows 0 .. after - 1 and then repeats row
  after - 1 (default after = n - max(1, n // 4)): past its end the last noise row is reused, the
  bug ``mfnoise.training.noise`` guards against with NaN. Releases t >= after - 1 share one noise
  row, so their differences are noiseless.
* ``no_clipping()``: the canary gradients enter the sum unclipped (norm a > c passes as is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.core.participation import Participation
from mfnoise.strategies.base import Strategy
from mfnoise.strategies.closed_forms import sqrt_toeplitz
from mfnoise.training import noise as noise_lib
from mfnoise.training.clipping import ClippedSum, clipped_sum
from mfnoise.training.transforms import correlated_noise, dp_aggregate


@runtime_checkable
class Mechanism(Protocol):
    """What ``whitebox_audit`` calls: ``name`` and ``releases(...) -> O`` of shape (n, d) (module doc)."""

    @property
    def name(self) -> str: ...

    def releases(self, strategy: Strategy, participation: Participation, noise_multiplier: float, *,
                 pattern: np.ndarray, members: np.ndarray, l2_clip_norm: float, canary_norm: float,
                 key: jax.Array, dtype: Any) -> np.ndarray: ...


def _check_pattern(pattern: Any, members: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(pattern)
    if u.shape != (n,) or not np.all(np.isin(u, (-1, 0, 1))):
        raise ValueError(f"pattern must be an ({n},) array of -1, 0, 1, got shape {u.shape} "
                         f"with values {np.unique(u)[:5]}")
    m = np.asarray(members)
    if m.ndim != 1 or m.dtype != np.bool_ or m.size < 2:
        raise ValueError(f"members must be a 1-d bool array of at least 2 canaries, got {m.dtype} {m.shape}")
    return u.astype(np.int8), m


def clipped_canary(canary_norm: float, l2_clip_norm: float, d: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(clip(+a e_0)[0], clip(-a e_1)[1]) by the real ``clipped_sum`` on a (2, d) per-example array.

    The values every present canary contributes at its own coordinate (module docstring: the same,
    bit for bit, as clipping all d canaries together).
    """
    g = jnp.zeros((2, d), dtype).at[0, 0].set(canary_norm).at[1, 1].set(-canary_norm)
    summed, dropped = clipped_sum(g, l2_clip_norm)
    if int(dropped):
        raise ValueError(f"canary of norm {canary_norm} was dropped as non-finite by the clipping")
    return summed[0], summed[1]


def contributions(pattern: np.ndarray, members: np.ndarray, positive: Any, negative: Any, dtype: Any) -> jax.Array:
    """X (n, d): X[t, j] = members[j] * (positive if u_t = 1, negative if u_t = -1, else 0), by selection
    (no arithmetic on the values, so X holds the clipped values exactly)."""
    u = jnp.asarray(pattern)[:, None]
    m = jnp.asarray(members)[None, :]
    zero = jnp.zeros((), dtype)
    value = jnp.where(u > 0, jnp.asarray(positive, dtype), jnp.where(u < 0, jnp.asarray(negative, dtype), zero))
    return jnp.where(m & (u != 0), value, zero)


def _run_dp_aggregate(strategy: Strategy, participation: Participation, noise_multiplier: float,
                      x: jax.Array, l2_clip_norm: float, key: jax.Array,
                      expected_batch_size: float | None = None) -> np.ndarray:
    """The releases of ``mfnoise.dp_aggregate`` fed X's rows as ClippedSums, one update per step (its
    division by the public ``expected_batch_size`` undone: the releases are the noisy sums)."""
    tx = dp_aggregate(strategy, l2_clip_norm, noise_multiplier, key, participation=participation,
                      expected_batch_size=expected_batch_size)
    params = jnp.zeros(x.shape[1:], x.dtype)
    state = tx.init(params)

    def update(state: Any, row: jax.Array) -> Any:
        summed: Any = ClippedSum(row, jnp.zeros((), jnp.int32), x.shape[1], l2_clip_norm)  # optax's Updates type
        return tx.update(summed, state, params)

    step = _stepper(update, x.shape[0])
    rows = []
    for t in range(x.shape[0]):
        out, state = step(state, x[t])
        rows.append(out)
    noise_lib.check(state)
    out = np.asarray(jnp.stack(rows), np.float64)
    return out if expected_batch_size is None else out * expected_batch_size


JIT_MIN_STEPS = 64  # runs of at least this many steps compile their step (about 1 s); shorter ones run eagerly


def _clipped_contributions(strategy: Strategy, pattern: np.ndarray, members: np.ndarray, canary_norm: float,
                           l2_clip_norm: float, dtype: Any) -> jax.Array:
    """The clipped canary sums x (n, trials) of a mechanism that clips as the real one does."""
    u, m = _check_pattern(pattern, members, strategy.n)
    pos, neg = clipped_canary(canary_norm, l2_clip_norm, m.size, dtype)
    return contributions(u, m, pos, neg, dtype)


def _stepper(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
    """``fn`` jitted for runs of >= JIT_MIN_STEPS steps (a compilation per run pays off), else as is."""
    return jax.jit(fn) if n >= JIT_MIN_STEPS else fn


@dataclasses.dataclass(frozen=True)
class Honest:
    """The real mechanism: ``clipped_sum`` then ``mfnoise.dp_aggregate`` (module docstring).

    ``expected_batch_size``: the public constant the transform divides by (None: the noisy sum); the
    adversary knows it and multiplies it back.
    """

    expected_batch_size: float | None = None
    name: str = "honest"

    def releases(self, strategy: Strategy, participation: Participation, noise_multiplier: float, *,
                 pattern: np.ndarray, members: np.ndarray, l2_clip_norm: float, canary_norm: float,
                 key: jax.Array, dtype: Any) -> np.ndarray:
        x = _clipped_contributions(strategy, pattern, members, canary_norm, l2_clip_norm, dtype)
        return _run_dp_aggregate(strategy, participation, noise_multiplier, x, l2_clip_norm, key,
                                 self.expected_batch_size)


@dataclasses.dataclass(frozen=True)
class NoClipping:
    """Broken: the canary gradients are summed unclipped (then the real transform adds the noise)."""

    name: str = "no_clipping"

    def releases(self, strategy: Strategy, participation: Participation, noise_multiplier: float, *,
                 pattern: np.ndarray, members: np.ndarray, l2_clip_norm: float, canary_norm: float,
                 key: jax.Array, dtype: Any) -> np.ndarray:
        u, m = _check_pattern(pattern, members, strategy.n)
        x = contributions(u, m, canary_norm, -canary_norm, dtype)  # the bug: no clipping
        return _run_dp_aggregate(strategy, participation, noise_multiplier, x, l2_clip_norm, key)


@dataclasses.dataclass(frozen=True)
class SensitivityK1:
    """Broken: the noise is scaled by sens(C, single participation) although the schema has k > 1."""

    name: str = "sensitivity_k1"

    def releases(self, strategy: Strategy, participation: Participation, noise_multiplier: float, *,
                 pattern: np.ndarray, members: np.ndarray, l2_clip_norm: float, canary_norm: float,
                 key: jax.Array, dtype: Any) -> np.ndarray:
        x = _clipped_contributions(strategy, pattern, members, canary_norm, l2_clip_norm, dtype)
        # The bug: the transform is told k = 1 (its sensitivity is the largest column norm).
        return _run_dp_aggregate(strategy, Participation.single(strategy.n), noise_multiplier, x, l2_clip_norm, key)


def _scale(strategy: Strategy, participation: Participation, noise_multiplier: float, l2_clip_norm: float,
           dtype: Any) -> float:
    """sigma_abs = z c S, S = strategy.noise_sensitivity(p, dtype): what dp_aggregate scales its noise by."""
    return noise_multiplier * l2_clip_norm * float(strategy.noise_sensitivity(participation, dtype).value)


@dataclasses.dataclass(frozen=True)
class WrongStrategy:
    """Broken: noise (C_o^{-1} W) of another strategy C_o (default: A^{1/2}), scaled by the claimed C's S."""

    other: Strategy | None = None
    name: str = "wrong_strategy"

    def releases(self, strategy: Strategy, participation: Participation, noise_multiplier: float, *,
                 pattern: np.ndarray, members: np.ndarray, l2_clip_norm: float, canary_norm: float,
                 key: jax.Array, dtype: Any) -> np.ndarray:
        other = self.other if self.other is not None else sqrt_toeplitz(strategy.n)
        if other.n != strategy.n:
            raise ValueError(f"wrong_strategy's other strategy has n={other.n}, the audited one n={strategy.n}")
        x = _clipped_contributions(strategy, pattern, members, canary_norm, l2_clip_norm, dtype)
        stddev = _scale(strategy, participation, noise_multiplier, l2_clip_norm, dtype)
        tx = correlated_noise(other, stddev, key)  # the bug: the generator runs the other strategy
        state = tx.init(x[0])
        step = _stepper(tx.update, x.shape[0])
        rows = []
        for t in range(x.shape[0]):
            out, state = step(x[t], state)
            rows.append(out)
        return np.asarray(jnp.stack(rows))


@dataclasses.dataclass(frozen=True)
class ReusedLastRow:
    """Broken: the generator's rows 0 .. after - 1, then row after - 1 again (default after = n - max(1, n // 4))."""

    after: int | None = None
    name: str = "reused_last_row"

    def releases(self, strategy: Strategy, participation: Participation, noise_multiplier: float, *,
                 pattern: np.ndarray, members: np.ndarray, l2_clip_norm: float, canary_norm: float,
                 key: jax.Array, dtype: Any) -> np.ndarray:
        n = strategy.n
        after = self.after if self.after is not None else n - max(1, n // 4)
        if not 1 <= after < n:
            raise ValueError(f"reused_last_row's after={after} must be in [1, n={n})")
        x = _clipped_contributions(strategy, pattern, members, canary_norm, l2_clip_norm, dtype)
        stddev = jnp.asarray(_scale(strategy, participation, noise_multiplier, l2_clip_norm, dtype), dtype)
        gen = noise_lib.generator(strategy, key, dtype=dtype)
        state = gen.init(x[0])
        step = _stepper(gen.next, n)
        rows, z = [], None
        for t in range(n):
            if t < after:  # the bug: no new row past `after`, the last one is served again
                z, state = step(state, x[t])
            assert z is not None
            rows.append(x[t] + stddev * z)
        return np.asarray(jnp.stack(rows))


def honest(expected_batch_size: float | None = None) -> Honest:
    """The real mechanism (``mfnoise.dp_aggregate``; its division by ``expected_batch_size`` undone)."""
    return Honest(expected_batch_size)


def sensitivity_k1() -> SensitivityK1:
    """Broken fixture: noise scaled for single participation."""
    return SensitivityK1()


def wrong_strategy(other: Strategy | None = None) -> WrongStrategy:
    """Broken fixture: noise correlated with another strategy's inverse (default A^{1/2})."""
    return WrongStrategy(other)


def reused_last_row(after: int | None = None) -> ReusedLastRow:
    """Broken fixture: the last noise row reused past step ``after``."""
    return ReusedLastRow(after)


def no_clipping() -> NoClipping:
    """Broken fixture: canary gradients not clipped."""
    return NoClipping()


FIXTURES: dict[str, Callable[[], Mechanism]] = {
    "sensitivity_k1": sensitivity_k1,
    "wrong_strategy": wrong_strategy,
    "reused_last_row": reused_last_row,
    "no_clipping": no_clipping,
}
"""The broken mechanisms by name (each built with its defaults)."""

MECHANISMS: dict[str, Callable[[], Mechanism]] = {"honest": honest, **FIXTURES}
"""Every mechanism ``whitebox_audit(mechanism=<name>)`` accepts."""


def resolve(mechanism: Mechanism | str | None) -> Mechanism:
    """A Mechanism from a name in ``MECHANISMS``, an instance, or None (honest)."""
    if mechanism is None:
        return Honest()
    if isinstance(mechanism, str):
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}; choose one of {sorted(MECHANISMS)}")
        return MECHANISMS[mechanism]()
    if not isinstance(mechanism, Mechanism):
        raise TypeError(f"mechanism must be a name in {sorted(MECHANISMS)} or have name and releases(...), "
                        f"got {type(mechanism).__name__}")
    return mechanism
