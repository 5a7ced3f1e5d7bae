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
Factorization Mechanisms for Private Machine Learning", Choquette-Choo et al. 2023). So
z(epsilon = 8, delta = 1e-5) = 0.60023 for every k.

Amplified (cyclic Poisson sampling; "(Amplified) Banded Matrix Factorization: A unified approach
to private training", Choquette-Choo et al. 2023): the data is split into b = min_sep groups,
step t samples each example of group t mod b with probability q = batch / (dataset / b). For a
banded C with bands <= b the columns of one example's steps {c, c + b, ...} have disjoint
supports, so the release is ceil(n / b) adaptively composed rounds, round i a Poisson-subsampled
Gaussian with sensitivity ||C[:, c + i b]|| <= m = max column norm. In mfnoise's convention the
per-round noise multiplier is z * sens(C, p) / m (sqrt(k) for a column-normalised C). With
bands > b, or a strategy that is not banded, the rounds are coupled and the theorem says nothing:
``dp_event`` refuses.

Neighbouring datasets differ by adding or removing one example (dp-accounting's default
``ADD_OR_REMOVE_ONE``), whose clipped gradients change by at most ``l2_clip_norm`` per step; so
divide the noisy sum by a data-independent batch size (as ``dp_aggregate`` does). Under
replace-one adjacency the sensitivity doubles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import dp_accounting

from mfnoise.participation import Participation
from mfnoise.strategy import Strategy

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("none", "cyclic-poisson")
# dp-accounting's default PLD grid; a coarser grid is faster and still an upper bound on epsilon.
PLD_DISCRETIZATION = 1e-4

AccountantName = Literal["pld", "rdp"]
SamplingName = Literal["none", "cyclic-poisson"]


# -- accountants ---------------------------------------------------------------------------------
def make_accountant(
    accountant: AccountantName = "pld", *, pld_discretization: float = PLD_DISCRETIZATION
) -> Callable[[], dp_accounting.PrivacyAccountant]:
    """A factory of fresh dp-accounting accountants (add-or-remove-one neighbouring relation).

    ``pld``: ``dp_accounting.pld.PLDAccountant`` (tight; the default). ``rdp``:
    ``dp_accounting.rdp.RdpAccountant`` (looser, much faster).
    """
    if accountant == "pld":
        if not pld_discretization > 0:
            raise ValueError(f"pld_discretization must be positive, got {pld_discretization}")
        return lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=pld_discretization)
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant
    raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")


# -- events --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Amplification:
    """What cyclic Poisson sampling makes of the mechanism: ``rounds`` Poisson-subsampled
    Gaussians with sampling probability ``q`` and per-round noise multiplier
    ``noise_multiplier * scale`` (scale = sens(C, p) / max column norm)."""

    rounds: int
    q: float
    scale: float
    bands: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def strategy_bands(strategy: Strategy) -> int | None:
    """The number of bands of a banded strategy (identity: 1), or None when C is not banded."""
    if strategy.family == "identity":
        return 1
    if strategy.family in ("banded", "toeplitz"):
        return int(strategy.bands)  # type: ignore[attr-defined]
    return None


def sampling_probability(dataset_size: int, batch_size: int, min_sep: int) -> float:
    """q = batch_size / (dataset_size / min_sep): each of the b = min_sep groups has about
    dataset_size / b examples and a step samples an expected ``batch_size`` of them."""
    from mfnoise.batching import sampling_probability as q

    return q(dataset_size, batch_size, min_sep)


def amplification(
    participation: Participation,
    *,
    dataset_size: int,
    batch_size: int,
    strategy: Strategy | None = None,
    bands: int | None = None,
) -> Amplification:
    """Checks the assumptions of amplified BandMF and returns its ``Amplification``.

    Give the ``strategy`` (its bands, sens(C, p) and max column norm are computed) or just
    ``bands`` (a column-normalised banded strategy is assumed: scale = sqrt(ceil(n / b))).
    Raises ValueError, saying why, when amplification does not apply.
    """
    p = _check_participation(participation)
    n, b = p.n, p.min_sep
    rounds = -(-n // b)
    if strategy is not None:
        if strategy.n != n:
            raise ValueError(f"the {strategy.family} strategy has n={strategy.n} but the participation has n={n}")
        sb = strategy_bands(strategy)
        if sb is None:
            raise ValueError(
                f"privacy amplification by cyclic Poisson sampling is only proved for banded strategies; "
                f"a {strategy.family} strategy is not banded, so one example's steps share rows of C "
                f"and its rounds are not independent (use sampling='none')"
            )
        if bands is not None and bands != sb:
            raise ValueError(f"bands={bands} does not match the strategy's bands={sb}")
        bands = sb
    if bands is None:
        raise ValueError("amplified accounting needs the strategy or its number of bands")
    if isinstance(bands, bool) or int(bands) != bands or bands < 1:
        raise ValueError(f"bands must be a positive integer, got {bands!r}")
    bands = int(bands)
    if bands > b:
        raise ValueError(
            f"cannot amplify: bands={bands} > min_sep={b}. Amplified BandMF needs bands <= min_sep so "
            f"that the columns of one example's steps {{c, c + b, ...}} have disjoint supports and the "
            f"release splits into independent Poisson-sampled rounds; with more bands they overlap "
            f"(use sampling='none', or bands <= {b})"
        )
    if p.reachable_participations < rounds:
        raise ValueError(
            f"cyclic Poisson sampling lets an example take part in up to ceil(n / min_sep)={rounds} steps, "
            f"but the schema allows only max_participations={p.max_participations}"
        )
    q = sampling_probability(dataset_size, batch_size, b)
    if strategy is not None:
        sens = float(strategy.sensitivity(p).value)
        max_col = float(strategy.sensitivity(Participation.single(n)).value)
        scale = sens / max_col
    else:
        scale = math.sqrt(rounds)
    return Amplification(rounds=rounds, q=q, scale=scale, bands=bands)


def dp_event(
    noise_multiplier: float,
    participation: Participation | None = None,
    *,
    sampling: SamplingName = "none",
    dataset_size: int | None = None,
    batch_size: int | None = None,
    strategy: Strategy | None = None,
    bands: int | None = None,
) -> dp_accounting.DpEvent:
    """The dp-accounting event of a sensitivity-normalised MF mechanism with this noise multiplier.

    sampling="none": ``GaussianDpEvent(z)`` (any batches that honour the schema).
    sampling="cyclic-poisson": ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
    GaussianDpEvent(z * scale)), rounds)`` (see ``amplification``).
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier}")
    if sampling == "none":
        extra = {"dataset_size": dataset_size, "batch_size": batch_size}
        given = [k for k, v in extra.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only matter with sampling='cyclic-poisson'")
        if participation is not None:
            p = _check_participation(participation)
            if strategy is not None and strategy.n != p.n:
                raise ValueError(
                    f"the {strategy.family} strategy has n={strategy.n} but the participation has n={p.n}"
                )
        return dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling != "cyclic-poisson":
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
    if participation is None or dataset_size is None or batch_size is None:
        raise ValueError("sampling='cyclic-poisson' needs the participation, dataset_size and batch_size")
    amp = amplification(participation, dataset_size=dataset_size, batch_size=batch_size,
                        strategy=strategy, bands=bands)
    return amplified_event(noise_multiplier, amp)


def amplified_event(noise_multiplier: float, amp: Amplification) -> dp_accounting.DpEvent:
    """``amp.rounds`` compositions of a Poisson-subsampled Gaussian (see ``amplification``)."""
    round_event = dp_accounting.PoissonSampledDpEvent(
        amp.q, dp_accounting.GaussianDpEvent(noise_multiplier * amp.scale)
    )
    return dp_accounting.SelfComposedDpEvent(round_event, amp.rounds)


# -- the two directions ---------------------------------------------------------------------------
def epsilon(
    noise_multiplier: float,
    delta: float,
    participation: Participation | None = None,
    *,
    accountant: AccountantName = "pld",
    pld_discretization: float = PLD_DISCRETIZATION,
    **event_kwargs,
) -> float:
    """epsilon at ``delta`` of the mechanism ``dp_event(noise_multiplier, participation, **event_kwargs)``."""
    _check_delta(delta)
    event = dp_event(noise_multiplier, participation, **event_kwargs)
    acc = make_accountant(accountant, pld_discretization=pld_discretization)()
    return float(acc.compose(event).get_epsilon(delta))


def calibrate(
    epsilon: float,
    delta: float,
    participation: Participation | None = None,
    *,
    accountant: AccountantName = "pld",
    pld_discretization: float = PLD_DISCRETIZATION,
    tol: float = 1e-6,
    **event_kwargs,
) -> float:
    """The smallest noise multiplier (within ``tol``, never below it) whose mechanism is
    (epsilon, delta)-DP, by ``dp_accounting.calibrate_dp_mechanism``.

    Keyword arguments besides the accountant's go to ``dp_event``: ``sampling``,
    ``dataset_size``, ``batch_size``, ``strategy``, ``bands``.
    """
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be positive and finite, got {epsilon}")
    _check_delta(delta)
    # Validate the mechanism once up front, so a refusal is raised as itself, not inside the search.
    dp_event(1.0, participation, **event_kwargs)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            make_accountant(accountant, pld_discretization=pld_discretization),
            lambda z: dp_event(z, participation, **event_kwargs),
            epsilon,
            delta,
            tol=tol,
        )
    )


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_participation(p: Participation) -> Participation:
    if not isinstance(p, Participation):
        raise TypeError(f"expected a Participation, got {type(p).__name__}")
    return p
