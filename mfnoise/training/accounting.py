"""Accounting: (epsilon, delta) <-> noise multiplier for matrix-factorization mechanisms.

Two halves, kept apart as dp-accounting keeps them apart:

* **Events** describe the mechanism (``dp_event``): which dp-accounting ``DpEvent`` a strategy,
  participation schema and sampling scheme release.
* **Accountants** price an event (``make_accountant``): dp-accounting's PLD accountant (default,
  tight) or its RDP accountant. Nothing here is a hand-rolled accountant.

The noise-multiplier convention is mfnoise's throughout: the mechanism releases C G + Z with
Z ~ N(0, sigma_abs^2), ``sigma_abs = noise_multiplier * l2_clip_norm * sens(C, p)``, i.e. the noise
multiplier of the *sensitivity-normalised* strategy C / sens(C, p).

Unamplified (any batches that honour p): with sens(C / sens, p) = 1, releasing the whole
trajectory is one Gaussian mechanism with noise multiplier z, whatever k is ("Multi-Epoch Matrix
Factorization Mechanisms for Private Machine Learning", Choquette-Choo et al. 2023,
arXiv:2211.06530). So z(epsilon = 8, delta = 1e-5) = 0.60023 for every k.

Amplified (cyclic Poisson sampling; "(Amplified) Banded Matrix Factorization: A unified approach
to private training", Choquette-Choo et al. 2023, arXiv:2306.08153; docs/design.md,
"Accounting"): the data is split into b = min_sep groups, step t samples each example of group
t mod b with probability q = batch / (dataset / b). The theorem's hypothesis is on C itself: C is
lower triangular with at most b non-zero bands. Then the columns of one example's steps
{c, c + b, ...} have disjoint row supports, and the release is ceil(n / b) adaptively composed
rounds, round i a Poisson-subsampled Gaussian whose sensitivity is ||C[:, c + i b]|| <= m = max
column norm of C. The theorem is stated for the noise multiplier relative to that maximum column
norm (dp-accounting's sibling jax_privacy builds the same event, ``amplified_bandmf_event``,
"assuming the strategy matrix has maximum L2 column norm of one"); a column-normalised C (every
column of norm m) is the special case in which no round is over-noised. In mfnoise's convention
the per-round noise multiplier is therefore z * sens(C, p) / m: sqrt(ceil(n / b)) for a
column-normalised C, less for any other C. That is why amplified accounting needs the strategy
(``strategy=``, the object or its file), never just its number of bands: a number of bands
implies sqrt(ceil(n / b)), which overstates the noise of a C that is not column-normalised
(epsilon 4.45 where 2 was asked), so ``bands=`` is refused. With more than b bands, or a C that
is not banded (BLT, BISR's C, a dense C with entries further below the diagonal), the rounds are
coupled and the theorem says nothing: ``dp_event`` refuses. The strategy is asked for all of
this (``bands``, ``squared_column_norms()``, ``sensitivity(p)``, ``runs_exactly(float32)``); no
family is named here.

Neighbouring datasets differ by adding or removing one example (dp-accounting's default
``ADD_OR_REMOVE_ONE``), whose clipped gradients change by at most ``l2_clip_norm`` per step; so
divide the noisy sum by a data-independent batch size (as ``dp_aggregate`` does). Under
replace-one adjacency the sensitivity doubles.

PLD grid. dp-accounting's PLD accountant discretises privacy losses on a grid of spacing d,
rounding every loss up (``pessimistic_estimate``), so any d gives an upper bound on epsilon, and a
grid d' = d / 2^j that refines it gives one at least as tight. Its memory is the number of grid
points: about W / d for one round, W = 1 / s^2 + 20 / s + 1 the width of the loss support of a
Gaussian with noise multiplier s truncated at e^-50 tail mass, and about S / d after composing
the rounds, S = 2 epsilon_RDP(delta = 1e-15) + 4 W. At large epsilon (small s) W grows like
1 / s^2 (``calibrate(epsilon=1e4)`` would need 23 GB on the default grid). So the PLD
accountant here (``GridPLDAccountant``) prices each event on the grid ``pld_grid`` picks: the
requested ``pld_discretization`` whenever it fits a budget (epsilon = 8 keeps 1e-4), else the
requested grid times the smallest power of two that fits a smaller budget. Beyond a grid of
``PLD_MAX_GRID`` (epsilon ~ 1e7) the PLD accountant is refused in favour of RDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import dp_accounting
import numpy as np

from mfnoise.core.participation import Participation, check_participation
from mfnoise.strategies.base import Strategy
from mfnoise.training.batching import sampling_probability

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("none", "cyclic-poisson")
# Every sampling name epsilon / calibrate / explain accept (the agreed names; see ``explain``).
ROUTED_SAMPLINGS = ("none", "cyclic-poisson", "poisson", "balls-in-bins", "b-min-sep")
# dp-accounting's default PLD grid: the finest grid used unless the caller asks for another.
PLD_DISCRETIZATION = 1e-4
# Grid-point budgets of one PLD evaluation (module doc). The requested grid is kept while it fits
# the first pair (epsilon = 8 at 1e-4: 3.6e5 points); a grid that has to be coarsened is
# coarsened to fit the second, smaller pair, as epsilon is then large (>= ~10) and a grid of
# W / 1e5 still resolves it to ~1e-4 relative.
PLD_ROUND_POINTS = 400_000
PLD_COMPOSED_POINTS = 4_000_000
PLD_COARSE_ROUND_POINTS = 100_000
PLD_COARSE_COMPOSED_POINTS = 1_000_000
# dp-accounting's pessimistic connect-the-dots PMF overflows exp(d) beyond d ~ 709; well before
# that (epsilon ~ 1e7 for one Gaussian) the PLD accountant is refused in favour of RDP. Up to it,
# its epsilon stays above the analytic Gaussian one (checked at d = 256 and 512).
PLD_MAX_GRID = 256.0
# The noise generator runs C' = strategy.realised(dtype), not C: for a banded C in float32 (coarser
# dtypes are refused for it), C'[t, t - j] = fl(C[t, t - j]) and C'[t, t] = 1 / fl(1 / C[t, t]), each
# within (1 + 2^-24) / (1 - 2^-24) < 1 + 2^-22 of C's in magnitude, so ||C'[:, t]|| <= (1 + 2^-22)
# ||C[:, t]||, while dp_aggregate scales the noise by S = noise_sensitivity(p, dtype) >= sens(C, p).
# Round t's noise multiplier z S / ||C'[:, t]|| is thus >= z sens(C, p) / (m COLUMN_NORM_MARGIN).
# The margin is 1 when float32 runs C exactly (``Strategy.runs_exactly``: float32 entries and a
# power-of-two diagonal, e.g. the identity).
COLUMN_NORM_MARGIN = 1.0 + 2.0**-20
# Searches never go below this noise multiplier: it would price epsilon ~ 1e34.
_MIN_NOISE_MULTIPLIER = 1e-17

AccountantName = Literal["pld", "rdp"]
SamplingName = Literal["none", "cyclic-poisson"]
StrategyLike = Strategy | str | os.PathLike


# -- accountants ---------------------------------------------------------------------------------
class GridPLDAccountant(dp_accounting.PrivacyAccountant):
    """dp-accounting's ``PLDAccountant`` on the grid ``pld_grid(ledger, pld_discretization)``.

    Events are recorded as they are composed and priced in ``get_epsilon`` by a fresh
    ``dp_accounting.pld.PLDAccountant`` on the grid that the whole composed event fits
    (``pld_discretization`` itself whenever it does). Every grid rounds losses up, so the result
    is an upper bound on epsilon like the plain accountant's; only the spacing is chosen here.
    """

    def __init__(self, pld_discretization: float = PLD_DISCRETIZATION) -> None:
        super().__init__(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        _check_discretization(pld_discretization)
        self._finest = float(pld_discretization)

    def _maybe_compose(self, event, count, do_compose):
        # Support is the PLD accountant's; the composition itself is the ledger's (base class).
        return dp_accounting.pld.PLDAccountant()._maybe_compose(event, count, False)

    def grid(self) -> float:
        """The grid spacing ``get_epsilon`` uses for the events composed so far."""
        return pld_grid(self.ledger, self._finest)

    def get_epsilon(self, target_delta: float) -> float:
        event = self.ledger
        grid = self.grid()
        if grid > PLD_MAX_GRID:
            raise ValueError(
                f"the PLD accountant cannot price this mechanism in bounded memory: its privacy losses span "
                f"~{_loss_width(_smallest_noise_multiplier(event) or 1.0):.3g}, which needs a grid of {grid:g} > "
                f"{PLD_MAX_GRID:g} (epsilon is then about 1e7 or more); use accountant='rdp', an upper bound "
                f"at any epsilon"
            )
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=grid)
        return float(acc.compose(event).get_epsilon(target_delta))


def make_accountant(
    accountant: AccountantName = "pld", *, pld_discretization: float = PLD_DISCRETIZATION
) -> Callable[[], dp_accounting.PrivacyAccountant]:
    """A factory of fresh dp-accounting accountants (add-or-remove-one neighbouring relation).

    ``pld`` (tight; the default): ``GridPLDAccountant``, dp-accounting's PLD accountant on the
    grid ``pld_grid`` picks (``pld_discretization`` whenever it fits in memory). ``rdp``:
    ``dp_accounting.rdp.RdpAccountant`` (looser, much faster, any epsilon).
    """
    if accountant == "pld":
        _check_discretization(pld_discretization)
        return lambda: GridPLDAccountant(pld_discretization)
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant
    raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")


def _loss_width(noise_multiplier: float) -> float:
    """W(s) = 1 / s^2 + 20 / s + 1: the width of the privacy-loss support of one (Poisson
    subsampled) Gaussian with noise multiplier s and sensitivity 1, as dp-accounting builds it.

    Its samples are truncated at e^-50 tail mass (about 10 s past either mean), so the loss
    (x - 1/2) / s^2 spans [-1 / (2 s^2) - 10 / s, 1 / (2 s^2) + 10 / s]; subsampling only narrows
    it. An estimate of memory, not of privacy (dp-accounting's support for q = 1 is 1 / s^2 + 19.5 / s).
    """
    s = float(noise_multiplier)
    return 1.0 / (s * s) + 20.0 / s + 1.0


def pld_grid(event: dp_accounting.DpEvent, pld_discretization: float = PLD_DISCRETIZATION) -> float:
    """The PLD grid spacing for ``event``: ``pld_discretization`` when W / d <= PLD_ROUND_POINTS
    and S / d <= PLD_COMPOSED_POINTS, else pld_discretization * 2^j with the smallest j that
    gives W / d <= PLD_COARSE_ROUND_POINTS and S / d <= PLD_COARSE_COMPOSED_POINTS.

    W = ``_loss_width`` of the event's smallest per-round noise multiplier, S = 2 epsilon_RDP(delta
    = 1e-15) + 4 W, an estimate of the composed support (module doc). The grid never gets finer as
    the noise multiplier shrinks, and powers of two keep every grid a refinement of the coarser
    ones (each pessimistic PLD on the coarse grid is the fine one with losses rounded further up),
    so epsilon(z) stays non-increasing in z for a search.
    """
    _check_discretization(pld_discretization)
    s = _smallest_noise_multiplier(event)
    if s is None or s == 0:  # nothing to discretise (no Gaussian), or a non-private event
        return float(pld_discretization)
    w = _loss_width(s)
    with quiet_rdp():
        composed = 2.0 * dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-15) + 4.0 * w
    composed = composed if math.isfinite(composed) else 0.0
    d = float(pld_discretization)
    if w / d <= PLD_ROUND_POINTS and composed / d <= PLD_COMPOSED_POINTS:
        return d
    needed = max(w / PLD_COARSE_ROUND_POINTS, composed / PLD_COARSE_COMPOSED_POINTS)
    return d * 2.0 ** max(0, math.ceil(math.log2(needed / d)))


def _smallest_noise_multiplier(event: dp_accounting.DpEvent, count: int = 1) -> float | None:
    """The smallest noise multiplier of one PLD the accountant builds for ``event``.

    A self-composed Gaussian is priced as one Gaussian with s / sqrt(count) (as dp-accounting's
    PLD accountant does); a Poisson-subsampled one is built once per round with s.
    """
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return event.noise_multiplier / math.sqrt(count)
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return _smallest_noise_multiplier(event.event)
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return _smallest_noise_multiplier(event.event, count * event.count)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        found = [s for e in event.events if (s := _smallest_noise_multiplier(e, count)) is not None]
        return min(found) if found else None
    return None


# -- events --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Amplification:
    """What cyclic Poisson sampling makes of the mechanism: ``rounds`` Poisson-subsampled
    Gaussians with sampling probability ``q`` and per-round noise multiplier
    ``noise_multiplier * scale``, scale = sens(C, p) / (max column norm * COLUMN_NORM_MARGIN), the
    margin 1 when float32 runs C exactly.

    ``column_spread`` = 1 - min / max column norm: 0 for a column-normalised C.
    """

    rounds: int
    q: float
    scale: float
    bands: int
    sensitivity: float
    max_column_norm: float
    column_spread: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _runs_exactly_in_float32(strategy: Strategy) -> bool:
    """``strategy.runs_exactly(float32)``; False where float32 cannot run it at all (its
    coefficients overflow), which only costs the margin (``COLUMN_NORM_MARGIN``)."""
    try:
        return bool(strategy.runs_exactly(np.float32))
    except ValueError:
        return False


def _as_strategy(strategy: StrategyLike) -> Strategy:
    """A Strategy, or the one in a strategy file (``mfnoise.strategies.io.load``, which verifies it)."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, (str, os.PathLike)):
        from mfnoise.strategies import io

        return io.load(os.fspath(strategy))
    raise TypeError(f"strategy must be a Strategy or a strategy file path, got {type(strategy).__name__}")


def amplification(
    participation: Participation,
    *,
    dataset_size: int,
    batch_size: int,
    strategy: StrategyLike | None = None,
    bands: int | None = None,
) -> Amplification:
    """Checks the hypotheses of amplified BandMF on the strategy and returns its ``Amplification``.

    The strategy (object or file) is required: its effective bands must be <= min_sep b, and the
    per-round noise multiplier is z * sens(C, p) / m with m its largest column norm (module doc).
    ``bands`` is refused: a number of bands does not determine sens(C, p) / m.
    Raises ValueError, saying why, when amplification does not apply.
    """
    p = check_participation(participation)
    if bands is not None:
        raise ValueError(
            f"amplified accounting takes the strategy, not bands={bands!r}: the per-round noise multiplier is "
            f"z * sens(C, p) / (max column norm of C), which the number of bands does not determine (a banded C "
            f"that is not column-normalised gets less than sqrt(ceil(n / min_sep))). Pass strategy=<the Strategy "
            f"or its file> (on the command line: --strategy FILE)"
        )
    if strategy is None:
        raise ValueError(
            "amplified accounting (sampling='cyclic-poisson') needs the strategy: pass strategy=<the Strategy or "
            "its file>; identity (DP-SGD) is mfnoise.Identity(n)"
        )
    strategy = _as_strategy(strategy)
    n, b = p.n, p.min_sep
    rounds = -(-n // b)
    if strategy.n != n:
        raise ValueError(f"the {strategy.family} strategy has n={strategy.n} but the participation has n={n}")
    sb = strategy.bands  # effective: trailing zero bands of the stored form do not count
    if sb is None:
        raise ValueError(
            f"privacy amplification by cyclic Poisson sampling is only proved for banded strategies; "
            f"a {strategy.family} strategy is not banded, so one example's steps share rows of C "
            f"and its rounds are not independent (use sampling='none')"
        )
    if sb > b:
        raise ValueError(
            f"cannot amplify: the {strategy.family} strategy has bands={sb} > min_sep={b}. Amplified BandMF needs "
            f"bands <= min_sep so that the columns of one example's steps {{c, c + b, ...}} have disjoint supports "
            f"and the release splits into independent Poisson-sampled rounds; with more bands they overlap "
            f"(use sampling='none', or a strategy with bands <= {b})"
        )
    if p.reachable_participations < rounds:
        raise ValueError(
            f"cyclic Poisson sampling lets an example take part in up to ceil(n / min_sep)={rounds} steps, "
            f"but the schema allows only max_participations={p.max_participations}"
        )
    q = sampling_probability(dataset_size, batch_size, b)
    sens = float(strategy.sensitivity(p).value)
    norms = np.sqrt(np.asarray(strategy.squared_column_norms(), dtype=np.float64))
    max_col, min_col = float(norms.max()), float(norms.min())
    if not (math.isfinite(sens) and sens > 0 and max_col > 0):
        raise ValueError(f"the {strategy.family} strategy has sensitivity {sens} and max column norm {max_col}")
    # A C that float32 runs exactly (identity: DP-SGD) needs no margin.
    scale = sens / (max_col * (1.0 if _runs_exactly_in_float32(strategy) else COLUMN_NORM_MARGIN))
    return Amplification(rounds=rounds, q=q, scale=scale, bands=sb, sensitivity=sens, max_column_norm=max_col,
                         column_spread=1.0 - min_col / max_col)


def dp_event(
    noise_multiplier: float,
    participation: Participation | None = None,
    *,
    sampling: SamplingName = "none",
    dataset_size: int | None = None,
    batch_size: int | None = None,
    strategy: StrategyLike | None = None,
    bands: int | None = None,
) -> dp_accounting.DpEvent:
    """The dp-accounting event of a sensitivity-normalised MF mechanism with this noise multiplier.

    sampling="none": ``GaussianDpEvent(z)`` (any batches that honour the schema).
    sampling="cyclic-poisson": ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
    GaussianDpEvent(z * scale)), rounds)`` for the given ``strategy`` (see ``amplification``).
    """
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be non-negative and finite, got {noise_multiplier}")
    amp = _mechanism(participation, sampling=sampling, dataset_size=dataset_size, batch_size=batch_size,
                     strategy=strategy, bands=bands)
    return dp_accounting.GaussianDpEvent(noise_multiplier) if amp is None else _amplified_event(noise_multiplier, amp)


def _mechanism(
    participation: Participation | None,
    *,
    sampling: SamplingName = "none",
    dataset_size: int | None = None,
    batch_size: int | None = None,
    strategy: StrategyLike | None = None,
    bands: int | None = None,
) -> Amplification | None:
    """The mechanism ``dp_event`` prices, checked (a refusal raised): None for one Gaussian
    mechanism (sampling="none"), else the ``Amplification`` of cyclic Poisson sampling."""
    if sampling == "none":
        extra = {"dataset_size": dataset_size, "batch_size": batch_size, "bands": bands}
        given = [k for k, v in extra.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only matter with sampling='cyclic-poisson'")
        if participation is not None:
            p = check_participation(participation)
            if strategy is not None:
                s = _as_strategy(strategy)
                if s.n != p.n:
                    raise ValueError(f"the {s.family} strategy has n={s.n} but the participation has n={p.n}")
        return None
    if sampling == "poisson":
        return _poisson_amplification(participation, dataset_size=dataset_size, batch_size=batch_size,
                                      strategy=strategy, bands=bands)
    if sampling in ("balls-in-bins", "b-min-sep"):
        raise ValueError(
            f"sampling={sampling!r} has no dp-accounting event: {_refusal(sampling)}; explain(...) reports what "
            f"applies"
        )
    if sampling != "cyclic-poisson":
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {ROUTED_SAMPLINGS}")
    if participation is None or dataset_size is None or batch_size is None:
        raise ValueError("sampling='cyclic-poisson' needs the participation, dataset_size and batch_size")
    return amplification(participation, dataset_size=dataset_size, batch_size=batch_size, strategy=strategy,
                         bands=bands)


def _event_maker(
    participation: Participation | None = None, **event_kwargs: Any
) -> Callable[[float], dp_accounting.DpEvent]:
    """z -> ``dp_event(z, participation, **event_kwargs)``, with the mechanism checked (and a
    refusal raised), a strategy file loaded and the amplification computed once, here."""
    amp = _mechanism(participation, **event_kwargs)
    if amp is None:
        return dp_accounting.GaussianDpEvent
    return lambda z: _amplified_event(z, amp)


def _amplified_event(noise_multiplier: float, amp: Amplification) -> dp_accounting.DpEvent:
    """``amp.rounds`` compositions of a Poisson-subsampled Gaussian (see ``amplification``)."""
    round_event = dp_accounting.PoissonSampledDpEvent(
        amp.q, dp_accounting.GaussianDpEvent(noise_multiplier * amp.scale)
    )
    return dp_accounting.SelfComposedDpEvent(round_event, amp.rounds)


# -- the two directions ---------------------------------------------------------------------------
def _event_epsilon(
    event: dp_accounting.DpEvent,
    delta: float,
    *,
    accountant: AccountantName = "pld",
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
    """epsilon at ``delta`` of a dp-accounting event, by ``make_accountant(accountant, ...)``."""
    _check_delta(delta)
    acc = make_accountant(accountant, pld_discretization=pld_discretization)()
    return float(acc.compose(event).get_epsilon(delta))


def epsilon(
    noise_multiplier: float,
    delta: float,
    participation: Participation | None = None,
    *,
    accountant: AccountantName = "pld",
    pld_discretization: float = PLD_DISCRETIZATION,
    **event_kwargs,
) -> float:
    """epsilon at ``delta`` of the mechanism ``dp_event(noise_multiplier, participation, **event_kwargs)``.

    PLD: on the grid ``pld_grid(event, pld_discretization)`` (``pld_discretization`` unless the
    event needs a coarser grid to fit in memory; either way an upper bound on epsilon).
    """
    _check_delta(delta)
    if event_kwargs.get("sampling", "none") in _ROUTED_ONLY:
        return explain(noise_multiplier, delta, participation, accountant=accountant,
                       pld_discretization=pld_discretization, **_provable_only(event_kwargs)).epsilon
    event = dp_event(noise_multiplier, participation, **event_kwargs)
    return _event_epsilon(event, delta, accountant=accountant, pld_discretization=pld_discretization)


def calibrate(
    epsilon: float,
    delta: float,
    participation: Participation | None = None,
    *,
    accountant: AccountantName = "pld",
    pld_discretization: float = PLD_DISCRETIZATION,
    tol: float = 1e-6,
    guess: float | None = None,
    **event_kwargs,
) -> float:
    """The smallest noise multiplier z (within tol, never below it) whose mechanism is
    (epsilon, delta)-DP; ``epsilon(z, delta, ...)`` with the same arguments is <= ``epsilon``
    (checked before returning: a z priced above the target is never returned).

    Search: dp-accounting's RDP accountant brackets z first (cheap at any epsilon; its z is
    normally above PLD's, and the bracket grows when a coarse PLD grid prices it higher), then
    ``dp_accounting.calibrate_dp_mechanism`` runs inside an explicit bracket [lo, hi] with the
    accountant of ``make_accountant`` (for PLD, the grid each z needs: bounded memory at any
    epsilon). The tolerance used is min(tol, 1e-5 lo), relative for small z.

    ``guess``: z from a cheaper accountant (``mfnoise.plan``'s RDP screen on fewer orders); with
    PLD it replaces the RDP search as the search's start (grown until an upper end, as RDP's z is),
    with RDP it starts the bracket. Either way the search and the one-sided check are the same.

    Keyword arguments besides the accountant's go to ``dp_event``: ``sampling``,
    ``dataset_size``, ``batch_size``, ``strategy`` (a Strategy or a strategy file).
    """
    target = epsilon
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"epsilon must be positive and finite, got {target}")
    _check_delta(delta)
    make_acc = make_accountant(accountant, pld_discretization=pld_discretization)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if event_kwargs.get("sampling", "none") in _ROUTED_ONLY:
        mmcc_options = event_kwargs.pop("mmcc_options", None)
        return _calibrate_routed(target, delta, participation, accountant=accountant,
                                 pld_discretization=pld_discretization, tol=tol, mmcc_options=mmcc_options,
                                 event_kwargs=_provable_only(event_kwargs))
    make = _event_maker(participation, **event_kwargs)

    def eps_of(z: float, acc: Callable[[], dp_accounting.PrivacyAccountant]) -> float:
        return float(acc().compose(make(z)).get_epsilon(delta))

    if guess is not None and not (guess > 0 and math.isfinite(guess)):
        raise ValueError(f"guess must be a positive finite noise multiplier, got {guess!r}")
    rdp = dp_accounting.rdp.RdpAccountant
    if guess is not None and accountant == "pld":
        z = float(guess)
    else:
        with quiet_rdp() if accountant == "pld" else contextlib.nullcontext():
            lo, hi = _bracket(lambda z: eps_of(z, rdp) > target, 1.0 if guess is None else float(guess), target)
            z = _search(rdp, make, target, delta, lo, hi, tol)
    if accountant == "pld":
        # z_rdp is an upper end unless a coarse grid prices PLD above RDP (then grow it); PLD's z
        # lies below it, found by stepping down.
        hi = z
        for _ in range(100):
            if eps_of(hi, make_acc) <= target:
                break
            hi *= 1.25
        lo = hi * 0.8
        while eps_of(lo, make_acc) <= target:
            hi, lo = lo, lo * 0.5
            if lo < _MIN_NOISE_MULTIPLIER:
                raise ValueError(f"no noise multiplier >= {_MIN_NOISE_MULTIPLIER} reaches epsilon={target}")
        z = _search(make_acc, make, target, delta, lo, hi, tol)
    # One-sided, with the very accountant a caller of ``epsilon`` gets.
    achieved = eps_of(z, make_acc)
    if not achieved <= target:
        raise RuntimeError(f"calibrate found z={z} but epsilon(z)={achieved} > target {target} (a bug)")
    return float(z)


def _bracket(too_small: Callable[[float], bool], guess: float, target: float) -> tuple[float, float]:
    """(lo, hi) with too_small(lo) and not too_small(hi), hi / lo = 2, by doubling or halving."""
    z = guess
    if too_small(z):
        for _ in range(200):
            z *= 2.0
            if not too_small(z):
                return z / 2.0, z
    else:
        for _ in range(200):
            z *= 0.5
            if z < _MIN_NOISE_MULTIPLIER:
                break
            if too_small(z):
                return z, 2.0 * z
    raise ValueError(f"no noise multiplier in [{_MIN_NOISE_MULTIPLIER}, 2^200] reaches epsilon={target}")


def _search(make_acc, make, target: float, delta: float, lo: float, hi: float, tol: float) -> float:
    """``dp_accounting.calibrate_dp_mechanism`` inside the explicit bracket [lo, hi]."""
    return float(
        dp_accounting.calibrate_dp_mechanism(
            make_acc, make, target, delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
            tol=min(tol, 1e-5 * lo),
        )
    )


@contextlib.contextmanager
def quiet_rdp() -> Iterator[None]:
    """Silences dp-accounting's RDP warnings ("Excluding this order") while RDP only estimates:
    a grid size, a search bracket or a ranking (mfnoise.plan's screen), never a reported epsilon."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_discretization(d: float) -> None:
    if not (d > 0 and math.isfinite(d)):
        raise ValueError(f"pld_discretization must be positive and finite, got {d}")


# -- routing from the strategy: which theorem prices which (strategy, sampling) -----------------
PAPERS = {
    "gaussian": "Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning (Choquette-Choo et al. "
                "2023, arXiv:2211.06530)",
    "amplified-bandmf": "(Amplified) Banded Matrix Factorization: A unified approach to private training "
                        "(Choquette-Choo et al. 2023, arXiv:2306.08153)",
    "poisson-dpsgd": "Deep Learning with Differential Privacy (Abadi et al. 2016), priced by dp-accounting's PLD "
                     "(PoissonSampledDpEvent)",
    "mmcc": "Privacy Amplification for Matrix Mechanisms (Choquette-Choo, Ganesh, Steinke, Thakurta, ICLR 2024, "
            "arXiv:2310.15526)",
    "balls-in-bins-monte-carlo": "Near Exact Privacy Amplification for Matrix Mechanisms (Choquette-Choo et al. "
                                 "2024); Balls-and-Bins Sampling for DP-SGD (Chua et al. 2025)",
}


@dataclasses.dataclass(frozen=True)
class Accounting:
    """What priced a mechanism: ``epsilon`` at ``delta`` for ``noise_multiplier``, by ``theorem``
    (a key of ``PAPERS``) from ``paper``. ``provable`` is False only for a Monte Carlo estimate
    (balls-in-bins), whose ``detail`` then holds the estimate with its confidence statement."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sampling: str
    theorem: str
    paper: str
    provable: bool
    seconds: float
    detail: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Route:
    """The accountant a (strategy, sampling) pair goes to: ``kind`` in {"gaussian", "amplified",
    "mmcc", "monte-carlo"}; ``amp`` for "amplified"; ``strategy``, ``sigma_scale`` (noise std per unit
    of noise multiplier, in clip-norm units) and ``q`` for "mmcc"."""

    kind: str
    theorem: str
    amp: Amplification | None = None
    strategy: Strategy | None = None
    sigma_scale: float = 1.0
    q: float = 0.0
    participation: Participation | None = None
    priced: Strategy | np.ndarray | None = None  # "mmcc": the C it prices (mmcc.priced_strategy)


def _refusal(sampling: str) -> str:
    if sampling == "balls-in-bins":
        return ("no provable accountant here covers balls-in-bins sampling; its Monte Carlo estimate (an estimate "
                "with a stated failure probability, not a bound) is reported by explain(..., sampling='balls-in-bins', "
                "samples=..., seed=...) with provable=False")
    return ("no accountant here implements b-min-sep sampling (arXiv:2602.09338): its theorem is not implemented, "
            "so it is refused rather than priced by a theorem that does not cover it")


def _is_diagonal(strategy: Strategy) -> bool:
    """C is diagonal (one band): its rounds are independent whatever the sampling."""
    if strategy.bands is not None:
        return strategy.bands <= 1
    c = strategy.toeplitz_coeffs()
    if c is not None:
        return not np.any(np.asarray(c, np.float64)[1:])
    return False


def _check_poisson(participation: Participation | None, dataset_size: int | None,
                   batch_size: int | None) -> Participation:
    if participation is None or dataset_size is None or batch_size is None:
        raise ValueError("sampling='poisson' needs the participation, dataset_size and batch_size")
    p = check_participation(participation)
    if p.min_sep != 1 or p.reachable_participations < p.n:
        raise ValueError(
            f"sampling='poisson' samples every step independently, so one example can take part in all n={p.n} "
            f"steps: the schema must be Participation(n, n, 1) (the noise is scaled by sens(C, p) for it), got "
            f"max_participations={p.max_participations}, min_sep={p.min_sep}. A sampler that retires examples "
            f"after k participations breaks the independence the Poisson theorems assume"
        )
    return p


def _poisson_amplification(participation, *, dataset_size, batch_size, strategy, bands) -> Amplification:
    """Poisson sampling of a diagonal C: amplified BandMF with min_sep = 1, i.e. n independent
    Poisson-subsampled Gaussians (C = I: DP-SGD)."""
    p = _check_poisson(participation, dataset_size, batch_size)
    s = _as_strategy(strategy) if strategy is not None else None
    if s is not None and not _is_diagonal(s):
        raise ValueError(
            f"sampling='poisson' with a non-diagonal {s.family} strategy is priced by MMCC, which is not a "
            f"dp-accounting event: use epsilon / calibrate / explain (they route to it)"
        )
    return amplification(p, dataset_size=dataset_size, batch_size=batch_size, strategy=strategy, bands=bands)


def _nonneg_problem(strategy: Strategy) -> str | None:
    """Why MMCC cannot take this C (None when it can): it needs C >= 0 entrywise."""
    c = strategy.toeplitz_coeffs()
    if c is not None:
        c = np.asarray(c, np.float64)
        if np.any(c < 0):
            k = int(np.argmax(c < 0))
            return f"its Toeplitz coefficient c_{k} = {c[k]:.6g} is negative"
        return None
    try:
        dense = strategy.dense()
    except ValueError as e:
        return f"its dense C is needed to check the entries' signs and is refused ({e})"
    if np.any(dense < 0):
        i, j = np.argwhere(dense < 0)[0]
        return f"its C[{i}, {j}] = {dense[i, j]:.6g} is negative"
    return None


def _route(participation: Participation | None, *, sampling: str = "none", dataset_size: int | None = None,
           batch_size: int | None = None, strategy: StrategyLike | None = None,
           bands: int | None = None) -> _Route:
    """The accountant for (strategy, sampling), asked of the strategy; a refusal raised with why."""
    if sampling not in ROUTED_SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {ROUTED_SAMPLINGS}")
    if sampling in ("balls-in-bins", "b-min-sep"):
        if sampling == "b-min-sep":
            raise ValueError(_refusal(sampling))
        if strategy is None or participation is None:
            raise ValueError("sampling='balls-in-bins' needs the strategy and the participation")
        return _Route("monte-carlo", "balls-in-bins-monte-carlo", strategy=_as_strategy(strategy),
                      participation=check_participation(participation))
    if sampling in ("none", "cyclic-poisson"):
        amp = _mechanism(participation, sampling=sampling, dataset_size=dataset_size,  # type: ignore[arg-type]
                         batch_size=batch_size, strategy=strategy, bands=bands)
        if amp is None:
            return _Route("gaussian", "gaussian")
        s = _as_strategy(strategy) if strategy is not None else None
        return _Route("amplified", "poisson-dpsgd" if s is not None and s.is_identity else "amplified-bandmf",
                      amp=amp)
    # poisson
    p = _check_poisson(participation, dataset_size, batch_size)
    if bands is not None:
        raise ValueError(f"sampling='poisson' takes the strategy, not bands={bands!r}")
    if strategy is None:
        raise ValueError("sampling='poisson' needs the strategy (identity for DP-SGD is mfnoise.Identity(n))")
    s = _as_strategy(strategy)
    if s.n != p.n:
        raise ValueError(f"the {s.family} strategy has n={s.n} but the participation has n={p.n}")
    if _is_diagonal(s):
        amp = amplification(p, dataset_size=dataset_size, batch_size=batch_size,  # type: ignore[arg-type]
                            strategy=s)
        return _Route("amplified", "poisson-dpsgd", amp=amp)
    why = _nonneg_problem(s)
    if why is not None:
        raise ValueError(
            f"no theorem here covers Poisson sampling of this {s.family} strategy: {why}. MMCC (arXiv:2310.15526) "
            f"needs C >= 0 entrywise (its bound on the posterior of a participation and the monotone row "
            f"sensitivity hold only then), and Poisson DP-SGD needs a diagonal C; use sampling='none'"
        )
    from mfnoise.training import mmcc

    # The noise std is z * noise_sensitivity(p, dtype) >= z * sens(C, p), sens(C, p) = ||C 1|| for
    # C >= 0 and p = Participation(n, n, 1) (mmcc.all_steps_sensitivity: O(n^2), where the generic
    # s.sensitivity(p) took 122 s for a banded C at n = 2000); the generator runs the rounded
    # C' = s.realised(dtype), so MMCC prices the entrywise maximum of C and its realisations
    # (mmcc.priced_strategy: the dominating pair is monotone in the entries of C >= 0).
    sens = mmcc.all_steps_sensitivity(s)
    q = sampling_probability(dataset_size, batch_size, 1)  # type: ignore[arg-type]
    return _Route("mmcc", "mmcc", strategy=s, sigma_scale=sens, q=q, participation=p,
                  priced=mmcc.priced_strategy(s))


def _route_epsilon(route: _Route, noise_multiplier: float, delta: float, *, accountant: AccountantName,
                   pld_discretization: float, mmcc_options: dict | None = None) -> tuple[float, dict]:
    """(epsilon, detail) of a provable route."""
    if route.kind == "gaussian":
        ev = dp_accounting.GaussianDpEvent(noise_multiplier)
        return _event_epsilon(ev, delta, accountant=accountant, pld_discretization=pld_discretization), {}
    if route.kind == "amplified":
        assert route.amp is not None
        ev = _amplified_event(noise_multiplier, route.amp)
        return (_event_epsilon(ev, delta, accountant=accountant, pld_discretization=pld_discretization),
                route.amp.to_dict())
    if route.kind == "mmcc":
        from mfnoise.training import mmcc

        assert route.strategy is not None
        if noise_multiplier == 0:
            return math.inf, {}
        priced = route.priced if route.priced is not None else route.strategy
        res = mmcc.epsilon(priced, noise_multiplier * route.sigma_scale, delta, route.q,
                           **(mmcc_options or {}))
        return res.epsilon, res.to_dict()
    raise ValueError(f"sampling priced by {route.theorem} has no provable epsilon: {_refusal('balls-in-bins')}")


# Samplings epsilon / calibrate send through ``explain``'s routing (the others keep their event path).
_ROUTED_ONLY = ("poisson", "balls-in-bins", "b-min-sep")


def _provable_only(event_kwargs: dict) -> dict:
    """epsilon / calibrate return provable numbers only: a balls-in-bins estimate is refused there."""
    if event_kwargs.get("sampling") == "balls-in-bins":
        raise ValueError(f"epsilon and calibrate return provable bounds only: {_refusal('balls-in-bins')}")
    return event_kwargs


def explain(
    noise_multiplier: float,
    delta: float,
    participation: Participation | None = None,
    *,
    accountant: AccountantName = "pld",
    pld_discretization: float = PLD_DISCRETIZATION,
    samples: int | None = None,
    seed: int | None = None,
    confidence: float = 0.95,
    mmcc_options: dict | None = None,
    **event_kwargs: Any,
) -> Accounting:
    """epsilon at ``delta`` with the theorem that gave it (``Accounting``), routed as ``epsilon`` routes.

    Routing, from the strategy itself: sampling="none": one Gaussian mechanism. "cyclic-poisson":
    amplified BandMF (bands <= min_sep, asked of ``strategy.bands``); refused otherwise.
    "poisson" (schema Participation(n, n, 1)): a diagonal C (C = I: DP-SGD) is n independent
    Poisson-subsampled Gaussians, priced by dp-accounting as such; any other C with non-negative
    entries goes to MMCC (``mfnoise.training.mmcc``); a negative entry is refused.
    "balls-in-bins": the Monte Carlo estimator (``mfnoise.training.balls_in_bins.epsilon_estimate``,
    needs ``samples`` and ``seed``), reported with provable=False and its confidence statement in
    ``detail``: an estimate, never a bound. "b-min-sep": refused (no theorem implemented here).
    """
    t0 = time.perf_counter()
    _check_delta(delta)
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be non-negative and finite, got {noise_multiplier}")
    sampling = event_kwargs.get("sampling", "none")
    route = _route(participation, **event_kwargs)
    if route.kind == "monte-carlo":
        if samples is None or seed is None:
            raise ValueError("the balls-in-bins Monte Carlo estimate needs samples=<int> and seed=<int>")
        from mfnoise.training import balls_in_bins

        assert route.strategy is not None and route.participation is not None
        est = balls_in_bins.epsilon_estimate(route.strategy, route.participation, noise_multiplier, delta,
                                             samples=samples, seed=seed, confidence=confidence)
        detail = dataclasses.asdict(est) if dataclasses.is_dataclass(est) else {"estimate": repr(est)}
        return Accounting(epsilon=float(est.value), delta=delta, noise_multiplier=float(noise_multiplier),
                          sampling=sampling, theorem=route.theorem, paper=PAPERS[route.theorem], provable=False,
                          seconds=time.perf_counter() - t0, detail=detail)
    eps, detail = _route_epsilon(route, noise_multiplier, delta, accountant=accountant,
                                 pld_discretization=pld_discretization, mmcc_options=mmcc_options)
    return Accounting(epsilon=float(eps), delta=delta, noise_multiplier=float(noise_multiplier), sampling=sampling,
                      theorem=route.theorem, paper=PAPERS[route.theorem], provable=True,
                      seconds=time.perf_counter() - t0, detail=detail)


def _calibrate_routed(target: float, delta: float, participation: Participation | None, *,
                      accountant: AccountantName, pld_discretization: float, tol: float,
                      mmcc_options: dict | None, event_kwargs: dict) -> float:
    """calibrate for the routed samplings: dp-accounting's search for an event, else (MMCC) a
    search in log z (``mmcc_search``), one-sided: the z returned is priced <= target by the same
    accountant."""
    route = _route(participation, **event_kwargs)
    if route.kind == "monte-carlo":
        raise ValueError(f"calibrate returns provable noise multipliers only: {_refusal('balls-in-bins')}")
    if route.kind == "amplified":
        assert route.amp is not None
        p = check_participation(participation)  # type: ignore[arg-type]
        p1 = Participation(p.n, p.n, 1) if event_kwargs.get("sampling") == "poisson" else p
        kwargs = {k: v for k, v in event_kwargs.items() if k != "sampling"}
        kwargs["sampling"] = "cyclic-poisson" if event_kwargs.get("sampling") == "poisson" else kwargs.get(
            "sampling", "cyclic-poisson")
        return calibrate(target, delta, p1, accountant=accountant, pld_discretization=pld_discretization,
                         tol=tol, **kwargs)

    options = dict(mmcc_options or {})
    if route.kind == "mmcc":
        from mfnoise.training import mmcc

        assert route.strategy is not None
        options.setdefault("pld_discretization", mmcc.calibration_discretization(route.strategy.n, target))

    def eps_of(z: float) -> float:
        return _route_epsilon(route, z, delta, accountant=accountant, pld_discretization=pld_discretization,
                              mmcc_options=options)[0]

    # Without amplification the same C needs z_none (one Gaussian of sensitivity ||C 1||, the
    # scale MMCC's sigma is given in): Poisson subsampling never hurts the true release (the mixture
    # over sampling outcomes is jointly convex in the hockey-stick divergence), so the needed z is
    # below z_none, but MMCC's bound is not the true epsilon: z_none is verified (and grown) first.
    hi = calibrate(target, delta, accountant=accountant, pld_discretization=pld_discretization)
    return mmcc_search(eps_of, target, hi, max(tol, 1e-3))


def mmcc_search(eps_of: Callable[[float], float], target: float, hi: float, rel: float,
                max_evaluations: int = 60) -> float:
    """The noise multiplier z = hi_final with eps_of(z) <= target, evaluated (one-sided), and a
    z' < z with eps_of(z') > target, z / z' <= 1 + rel: calibrated to ``rel`` (relative).

    For an epsilon that costs minutes per evaluation (MMCC), the search works on f(u) = log
    eps_of(e^u) - log target, nearly linear in u = log z: (1) ``hi`` is grown by 1.5 until f <= 0;
    (2) a lower end by the slope-1 extrapolation z (eps / target) (epsilon falls at least like 1 / z
    as z grows, for a Gaussian and a subsampled Gaussian alike, so one step usually lands below the
    root), at most 1/8 (a far smaller z has a huge epsilon, whose PLD is large) and at least 1/1.5
    of hi per step; (3) Brent's method (scipy's brentq: inverse quadratic interpolation, secant and
    bisection steps) on [log lo, log hi] to 0.9 log(1 + rel) in u, f clipped to +-1000 (its sign is
    what counts), and the tightest bracket it evaluated kept; (4) should that bracket still be
    wider than rel: regula falsi in (u, f), each point half the tolerance past the secant root
    toward the end that did not move last (so that the next two points close the bracket from both
    sides), the Illinois rule, and a bisection whenever three evaluations did not halve the
    bracket. f is not assumed monotone (MMCC's discretisation depends on z): only evaluated signs
    are used. Each z is evaluated at most once. Measured with MMCC: 7-8 evaluations a calibration
    at n = 117 and 1170 where the former bisection from z_none takes 16-18 (benchmarks/mmcc_cost.py,
    benchmarks/amplification.py); 5-7 where it took 13-21 on curves of MMCC's shapes
    (tests/training/test_mmcc.py)."""
    if not (hi > 0 and math.isfinite(hi)):
        raise ValueError(f"the upper start must be a positive finite noise multiplier, got {hi}")
    if not rel > 0:
        raise ValueError(f"rel must be positive, got {rel}")
    seen: dict[float, float] = {}

    def f(z: float) -> float:
        if z not in seen:
            if len(seen) >= max_evaluations:
                raise RuntimeError(f"no calibrated z after {max_evaluations} evaluations (a bug): "
                                   f"{sorted(seen.items())}")
            e = float(eps_of(z))
            if math.isnan(e):
                raise ValueError(f"epsilon({z}) is NaN")
            seen[z] = math.inf if e == math.inf else (-math.inf if e <= 0 else math.log(e / target))
        return seen[z]

    fh = f(hi)
    for _ in range(40):
        if fh <= 0:
            break
        hi *= 1.5
        fh = f(hi)
    else:
        raise ValueError(f"no noise multiplier found with epsilon <= {target}")
    while True:
        step = min(1.0 / 1.5, max(1.0 / 8.0, math.exp(fh) if fh > -math.inf else 0.0))
        z = hi * step
        if z < _MIN_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier >= {_MIN_NOISE_MULTIPLIER} reaches epsilon={target}")
        fz = f(z)
        if fz > 0:
            lo, fl = z, fz
            break
        hi, fh = z, fz
    # Brent's method in u = log z (inverse quadratic interpolation, secant and bisection steps,
    # robust where a huge epsilon at lo distorts a secant) to within the tolerance in u ...
    from scipy.optimize import brentq

    ends = {math.log(lo): lo, math.log(hi): hi}

    def fu(u: float) -> float:
        return min(max(f(ends.get(u, math.exp(u))), -1e3), 1e3)  # the sign is what matters at +-inf

    brentq(fu, math.log(lo), math.log(hi), xtol=0.9 * math.log1p(rel), maxiter=200)
    # ... then the tightest bracket it evaluated (f is not assumed monotone: lo < hi is kept).
    for z, v in sorted(seen.items()):
        if v > 0 and lo < z < hi:
            lo, fl = z, v
    for z, v in sorted(seen.items(), reverse=True):
        if v <= 0 and lo < z < hi:
            hi, fh = z, v
    half = math.log1p(rel) / 2.0
    last = -1  # the end the last evaluation moved: -1 lo, +1 hi
    fl_eff, fh_eff = fl, fh  # Illinois: a stale end's f is halved each time the other end moves again
    widths = [math.log(hi / lo)]
    while hi - lo > rel * lo:
        ul, uh = math.log(lo), math.log(hi)
        width = uh - ul
        stalled = len(widths) >= 4 and widths[-1] > widths[-4] / 2.0
        if stalled or not (math.isfinite(fl_eff) and math.isfinite(fh_eff)) or fl_eff == fh_eff:
            u = 0.5 * (ul + uh)
            widths = [width]  # a fresh start for the stall test
        else:
            u = uh - fh_eff * (uh - ul) / (fh_eff - fl_eff)
            u += half if last < 0 else -half  # toward the end that did not move
            u = min(max(u, ul + 1e-3 * width), uh - 1e-3 * width)
        z = math.exp(u)
        if not lo < z < hi:  # the bracket is below float resolution
            break
        fz = f(z)
        if fz > 0:
            if last < 0:
                fh_eff *= 0.5
            lo, fl, fl_eff, last = z, fz, fz, -1
        else:
            if last > 0:
                fl_eff *= 0.5
            hi, fh, fh_eff, last = z, fz, fz, +1
        widths.append(math.log(hi / lo))
    return float(hi)
