"""The white-box canary audit of the correlated-noise mechanism (issue 15).

Threat model of the audit: the adversary knows the strategy C, the schema, the clip norm c and the
noise multiplier z, and sees every noisy release of the mechanism. Canaries are Dirac gradients
("Tight Auditing of Differentially Private Machine Learning", Nasr et al. 2023, arXiv:2302.07956):
with a parameter vector of d coordinates, canary j has per-example gradient u_t a e_j at step t
(a = ``canary_norm``, default c; u in {-1, 0, 1}^n a participation pattern of the schema with
signs, ``canary_pattern``), and is in with probability 1/2, independently. Noise is independent
across coordinates, so one run of n steps gives d independent trials (``mfnoise.auditing.mechanisms``
produces the n x d releases O; several runs when ``trials`` exceeds ``coordinates``).

The test. For an honest mechanism, o = x + sigma_abs C^{-1} w per coordinate (x = a' u the canary's
contributions, a' = min(a, c) after clipping, sigma_abs = z c S, S = sens(C, p) as the transform
scales it, w ~ N(0, I_n)). The adversary whitens with C: C o = a' C u + sigma_abs w, and the
Neyman-Pearson (likelihood-ratio) statistic for "in" (mean a' C u) against "out" (mean 0) is

    s = <C u, C o> / (||C u|| sigma_abs)    ~ N(0, 1) out,  N(mu, 1) in,  mu = a' ||C u|| / sigma_abs,

exactly a Gaussian shift. With u achieving the sensitivity (||C u|| = S, ``canary_pattern``) and
a' = c, mu = 1/z: the mechanism's claimed mu-GDP (an unamplified fixed-batch mechanism is one
Gaussian mechanism with noise multiplier z, docs/design.md "Accounting"), so the GDP / Clopper-
Pearson lower bound approaches the claimed epsilon (``mfnoise.epsilon(z, delta, p)``) as the trials
grow, and never exceeds it beyond the confidence. This is ``attack="whitened"``.

``attack="empirical"`` does not trust the model: half of the first run's coordinates (a fixed
seeded split) fit the covariance of the releases of their OUT canaries (pure noise),
Sigma_hat = mean o o^T + 1e-9 tr(Sigma_hat)/n I, and every other coordinate is scored by the
likelihood-ratio statistic for the shift u under that covariance, s = <v, o> / sqrt(v^T Sigma_hat v),
v = Sigma_hat^{-1} u. It is a fixed function of the scored releases (the fitting half's noise is
independent of them), so any estimator's guarantee holds on them. It finds what the model-based
statistic cannot: noise correlated differently than claimed, or rows that repeat (a singular
covariance: some differences of releases are noiseless). It needs >= 8 n out canaries to fit
(``EMPIRICAL_SAMPLES_PER_STEP``); with fewer coordinates per run it is skipped (noted in
``details["notes"]``).

``attack="both"`` (the default) runs both and reports the larger lower bound, each certified at
failure (1 - confidence) / 2 (a union bound), so the reported bound holds at ``confidence``.
A bound above the claimed epsilon means the mechanism is not as private as claimed (``flagged``).

Thresholds. The two-world estimators (GDP, Clopper-Pearson) test "in iff score >= t". By default
t ranges over a grid fixed by the claim alone (``claimed_thresholds``: around mu/2 = 1/(2z), where
the GDP estimate of a Gaussian shift has the least variance, and a few larger values), with
Bonferroni over the grid; the estimators' own half/half split (``thresholds="split"``) picks t on
half of the scores and loses to a winner's curse: at 2^16 trials its GDP bound on an honest BLT
ranged 1.07 .. 1.83 over seeds at claimed epsilon 2, the fixed grid's 1.80 .. 1.85.

Assumptions the guarantee needs: the trials are independent, i.e. the mechanism's noise is
independent across coordinates and of the membership coins (true of mfnoise's generator, whose
entries of w_t are independent normals); for ``estimator="gdp"``, a Gaussian trade-off between the
in and out scores (true here, honest or broken: the releases are Gaussian with one covariance in
both worlds and the scores are linear in them; ``"clopper-pearson"`` needs no such assumption).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mfnoise.auditing import estimators
from mfnoise.auditing.estimators import EpsilonLowerBound
from mfnoise.auditing.mechanisms import Mechanism, resolve
from mfnoise.core import sensitivity as sens_lib
from mfnoise.core.participation import Participation, check_participation
from mfnoise.strategies.base import Strategy

ESTIMATORS = ("gdp", "clopper-pearson", "one-run", "one-run-fdp")
ATTACKS = ("both", "whitened", "empirical")
MAX_COORDINATES = 1 << 17  # coordinates per run at most
MAX_RELEASE_ENTRIES = 1 << 23  # n x coordinates per run at most (64 MiB of float64 releases)
EMPIRICAL_SAMPLES_PER_STEP = 8  # the empirical attack needs >= 8 n out canaries to fit its n x n covariance
PATTERN_LIMIT = 20_000  # min-sep patterns searched exhaustively by canary_pattern
SIGN_SEARCH_STEPS = 8  # patterns with negative entries of C^T C on them: {-1, 0, 1} searched up to this size
RIDGE = 1e-9  # relative ridge of the empirical covariance (singular when rows repeat)


@dataclasses.dataclass(frozen=True, eq=False)
class AuditResult:
    """The outcome of ``whitebox_audit``.

    ``claimed_epsilon``: the accounting's epsilon at ``delta`` for (z, p) (``mfnoise.epsilon``);
    ``lower_bound``: the empirical ``EpsilonLowerBound`` at ``confidence``; ``tightness`` = lower
    bound / claimed; ``flagged``: lower bound > claimed (the claim is refuted at that confidence);
    ``scores_in`` / ``scores_out``: the scores of the attack whose bound is reported; ``mu_claimed``
    = 1/z and ``mu_model`` = a' ||C u|| / sigma_abs (the honest mechanism's score shift, dense numpy);
    ``pattern``: the canary's u; ``trials``: canaries; ``runs``: mechanism runs of ``coordinates``;
    ``seconds``: wall time; ``details``: per-attack bounds.
    """

    mechanism: str
    strategy: str
    participation: Participation
    noise_multiplier: float
    delta: float
    confidence: float
    estimator: str
    attack: str
    claimed_epsilon: float
    lower_bound: EpsilonLowerBound
    tightness: float
    mu_claimed: float
    mu_model: float
    pattern: np.ndarray
    trials: int
    runs: int
    coordinates: int
    l2_clip_norm: float
    canary_norm: float
    seconds: float
    scores_in: np.ndarray = dataclasses.field(repr=False)
    scores_out: np.ndarray = dataclasses.field(repr=False)
    details: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def flagged(self) -> bool:
        """True when the empirical lower bound is above the claimed epsilon."""
        return self.lower_bound.epsilon > self.claimed_epsilon

    def summary(self) -> str:
        """One line: the mechanism, the empirical lower bound at its confidence against the claim."""
        verdict = "FLAGGED: less private than claimed" if self.flagged else "consistent with the claim"
        return (f"{self.mechanism} {self.strategy} under {self.participation}, z={self.noise_multiplier:.6g}: "
                f"empirical epsilon >= {self.lower_bound.epsilon:.4g} ({self.confidence:.0%} confidence, "
                f"{self.estimator}, {self.details.get('reported_attack', self.attack)} attack, {self.trials} canaries) "
                f"vs claimed {self.claimed_epsilon:.4g} at delta={self.delta:g}: tightness {self.tightness:.3f}, "
                f"{verdict} ({self.seconds:.1f} s)")

    def to_dict(self, scores: bool = False) -> dict:
        """JSON-ready (``scores=True`` adds the score arrays as lists)."""
        out = {
            "mechanism": self.mechanism,
            "strategy": self.strategy,
            "participation": self.participation.to_dict(),
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "confidence": self.confidence,
            "estimator": self.estimator,
            "attack": self.attack,
            "claimed_epsilon": self.claimed_epsilon,
            "lower_bound": self.lower_bound.to_dict(),
            "empirical_epsilon": self.lower_bound.epsilon,
            "tightness": self.tightness,
            "flagged": self.flagged,
            "mu_claimed": self.mu_claimed,
            "mu_model": self.mu_model,
            "pattern": [int(v) for v in self.pattern],
            "trials": self.trials,
            "runs": self.runs,
            "coordinates": self.coordinates,
            "l2_clip_norm": self.l2_clip_norm,
            "canary_norm": self.canary_norm,
            "seconds": self.seconds,
            "scores_summary": {
                "in": _summary(self.scores_in),
                "out": _summary(self.scores_out),
            },
            "details": estimators.jsonable(self.details),
        }
        if scores:
            out["scores_in"] = [float(v) for v in self.scores_in]
            out["scores_out"] = [float(v) for v in self.scores_out]
        return out


def _summary(x: np.ndarray) -> dict:
    return {"count": int(x.size), "mean": float(np.mean(x)) if x.size else math.nan,
            "std": float(np.std(x)) if x.size else math.nan}


def canary_pattern(strategy: Strategy, participation: Participation) -> np.ndarray:
    """u in {-1, 0, 1}^n on a pattern of the schema maximising ||C u|| (the canary's steps and signs).

    ||C u||^2 = u^T X u, X = C^T C. For sign vectors on a pattern P this is at most
    sum_{i,j in P} |X_ij| = the sensitivity routine's value, with equality when X_P >= 0 (then all
    signs +1 and the whole pattern are best); so for C >= 0 families (identity, BSR, BLT, Toeplitz
    with non-negative coefficients) the u found has ||C u|| = sens(C, p). Candidates: the maximal
    cyclic patterns (cyclic schemas); every pattern (min-sep, up to ``PATTERN_LIMIT``), else the
    k-step patterns {c, c + b, ...}. On a pattern where X has negative entries, every u in
    {-1, 0, 1}^P (up to ``SIGN_SEARCH_STEPS`` steps) is tried.
    """
    p = check_participation(participation, strategy.n, f"the {strategy.family} strategy")
    x = strategy.dense().T @ strategy.dense()
    n, b, k = p.n, p.min_sep, p.reachable_participations
    if p.cyclic:
        candidates: list[tuple[int, ...]] = list(p.cyclic_patterns())
    elif sens_lib.count_patterns(p) <= PATTERN_LIMIT:
        candidates = list(p.patterns())
    else:
        candidates = [tuple(range(c, n, b))[:k] for c in range(b)]
    best_value, best_u = -1.0, np.zeros(n, np.int8)
    for pat in candidates:
        idx = list(pat)
        block = x[np.ix_(idx, idx)]
        if np.all(block >= 0) or len(idx) > SIGN_SEARCH_STEPS:
            signs = [np.ones(len(idx))]
        else:
            signs = [np.array(s) for s in itertools.product((1.0, -1.0, 0.0), repeat=len(idx)) if s[0] == 1.0]
        for s in signs:
            value = float(s @ block @ s)
            if value > best_value:
                best_value = value
                best_u = np.zeros(n, np.int8)
                best_u[idx] = s.astype(np.int8)
    return best_u


def _real(x: Any) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _check_inputs(noise_multiplier: Any, delta: Any, trials: Any, l2_clip_norm: Any, canary_norm: Any,
                  estimator: Any, attack: Any, confidence: Any, coordinates: Any) -> None:
    if not (_real(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier!r}")
    if not (_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 16:
        raise ValueError(f"trials must be an integer >= 16, got {trials!r}")
    if not (_real(l2_clip_norm) and math.isfinite(l2_clip_norm) and l2_clip_norm > 0):
        raise ValueError(f"l2_clip_norm must be a positive finite number, got {l2_clip_norm!r}")
    if not (_real(canary_norm) and math.isfinite(canary_norm) and canary_norm > 0):
        raise ValueError(f"canary_norm must be a positive finite number (or None: the clip norm), got {canary_norm!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    if not (_real(confidence) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(coordinates, bool) or not isinstance(coordinates, (int, np.integer)) or coordinates < 16:
        raise ValueError(f"coordinates must be an integer >= 16, got {coordinates!r}")


def claimed_thresholds(mu_claimed: float) -> np.ndarray:
    """The fixed threshold grid of ``thresholds="claimed"``: mu_c (0.2, 0.35, 0.5, 0.65, 0.8, 1) and
    mu_c + (1, 2, 3, 5), mu_c = 1/z the claim's score shift.

    For N(0, 1) out and N(mu, 1) in scores the GDP estimate Phi^{-1}(1 - FPR) - Phi^{-1}(1 - TPR) has
    the least variance near t = mu / 2 (both rates moderate), so the first six points serve honest
    mechanisms; the last four catch a larger shift (broken ones). The grid depends only on the
    public claim, never on the scores, so Bonferroni over it keeps the confidence.
    """
    mu = float(mu_claimed)
    return np.concatenate([mu * np.array([0.2, 0.35, 0.5, 0.65, 0.8, 1.0]), mu + np.array([1.0, 2.0, 3.0, 5.0])])


def _estimate(estimator: str, scores: np.ndarray, members: np.ndarray, delta: float,
              confidence: float, thresholds: np.ndarray | None) -> EpsilonLowerBound:
    if estimator == "gdp":
        return estimators.gdp(scores[members], scores[~members], delta=delta, confidence=confidence,
                              thresholds=thresholds)
    if estimator == "clopper-pearson":
        return estimators.clopper_pearson(scores[members], scores[~members], delta=delta, confidence=confidence,
                                          thresholds=thresholds)
    if estimator == "one-run":
        return estimators.one_run(scores, members, delta=delta, confidence=confidence)
    return estimators.one_run_fdp(scores, members, delta=delta, confidence=confidence)


def whitened_scores(releases: np.ndarray, c: np.ndarray, u: np.ndarray, sigma_abs: float) -> np.ndarray:
    """s_j = <C u, C o_j> / (||C u|| sigma_abs) for the releases O (n, d) (module docstring)."""
    cu = c @ u.astype(np.float64)
    w = c.T @ cu / (np.linalg.norm(cu) * sigma_abs)
    return w @ np.asarray(releases, np.float64)


def empirical_direction(fit: np.ndarray, u: np.ndarray) -> np.ndarray:
    """v / sqrt(v^T Sigma v), v = Sigma^{-1} u, Sigma = the second moment of ``fit`` (n, m) (the out
    canaries' releases of the fitting half: pure noise) plus RIDGE tr(Sigma)/n I. The empirical score of
    releases o (n, d') is this direction @ o (unit variance under Sigma)."""
    fit = np.asarray(fit, np.float64)
    n = fit.shape[0]
    sigma = fit @ fit.T / fit.shape[1]
    sigma += RIDGE * np.trace(sigma) / n * np.eye(n)
    v = np.linalg.solve(sigma, u.astype(np.float64))
    return v / math.sqrt(float(v @ sigma @ v))


def whitebox_audit(
    strategy: Strategy,
    participation: Participation,
    noise_multiplier: float,
    *,
    delta: float,
    trials: int,
    l2_clip_norm: float = 1.0,
    canary_norm: float | None = None,
    estimator: str = "gdp",
    confidence: float = 0.95,
    seed: int = 0,
    mechanism: Mechanism | str | None = None,
    attack: str = "both",
    coordinates: int | None = None,
    thresholds: str | Any = "claimed",
    claimed_epsilon: float | None = None,
    dtype: Any = jnp.float32,
) -> AuditResult:
    """Audit (strategy, participation, noise_multiplier) with ``trials`` Dirac canaries (module docstring).

    Args:
      strategy, participation, noise_multiplier: the mechanism as claimed (fixed batches, no
        amplification: claimed epsilon = ``mfnoise.epsilon(noise_multiplier, delta, participation)``).
      delta: the delta of the claimed and of the empirical epsilon.
      trials: canaries in all (each in with probability 1/2); split into runs of ``coordinates``.
      l2_clip_norm: c; canary_norm: a (default c; larger exercises clipping).
      estimator: "gdp" | "clopper-pearson" | "one-run" | "one-run-fdp" (``mfnoise.auditing.estimators``).
      confidence: the lower bound holds with at least this probability.
      seed: membership coins, noise keys and the empirical attack's split.
      mechanism: None / "honest" (the real ``mfnoise.dp_aggregate``), a fixture name of
        ``mechanisms.MECHANISMS`` or a ``Mechanism``.
      attack: "both" (default), "whitened" or "empirical".
      coordinates: d per run (default min(trials, 2^17, 2^23 / n): the releases of a run are n x d).
      thresholds: the two-world estimators' threshold rule: "claimed" (default: Bonferroni over
        ``claimed_thresholds(1/z)``, fixed by the claim), "split" (the estimator's half/half split,
        ``thresholds=None`` there) or a sequence of thresholds fixed in advance. (Scores are in units
        of the claimed noise: out ~ N(0, 1) for an honest mechanism.)
      claimed_epsilon: the claim, when the caller has priced it already (a plan's epsilon); default
        ``mfnoise.epsilon(noise_multiplier, delta, participation)`` (PLD, an upper bound on the truth).
      dtype: the parameters' (and noise) dtype of the run (float32 default, as training runs).

    Returns an ``AuditResult``.
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a mfnoise.Strategy, got {type(strategy).__name__}")
    p = check_participation(participation, strategy.n, f"the {strategy.family} strategy")
    a = float(l2_clip_norm) if canary_norm is None else canary_norm
    if coordinates is None:
        d = min(int(trials), MAX_COORDINATES, max(1024, MAX_RELEASE_ENTRIES // strategy.n))
    else:
        d = coordinates
    _check_inputs(noise_multiplier, delta, trials, l2_clip_norm, a, estimator, attack, confidence, d)
    mech = resolve(mechanism)
    if isinstance(thresholds, str):
        if thresholds not in ("claimed", "split"):
            raise ValueError(f'thresholds must be "claimed", "split" or a sequence of numbers, got {thresholds!r}')
        grid = claimed_thresholds(1.0 / float(noise_multiplier)) if thresholds == "claimed" else None
    else:
        grid = np.asarray(thresholds, np.float64).reshape(-1)
    from mfnoise.training import accounting

    start = time.perf_counter()
    z, clip = float(noise_multiplier), float(l2_clip_norm)
    claimed = float(accounting.epsilon(z, float(delta), p)) if claimed_epsilon is None else float(claimed_epsilon)
    if not (math.isfinite(claimed) and claimed > 0):
        raise ValueError(f"claimed_epsilon must be a positive finite number, got {claimed_epsilon!r}")
    u = canary_pattern(strategy, p)
    c = strategy.dense()
    sens = float(strategy.noise_sensitivity(p, dtype).value)
    sigma_abs = z * clip * sens
    mu_model = min(a, clip) * float(np.linalg.norm(c @ u.astype(np.float64))) / sigma_abs

    rng = np.random.default_rng(seed)
    sizes = [d] * (int(trials) // d)
    if int(trials) % d:
        sizes.append(int(trials) % d)
    if sizes[-1] < 16 and len(sizes) > 1:  # a last run of under 16 canaries is not run (``trials`` says what ran)
        sizes = sizes[:-1]
    attacks = ("whitened", "empirical") if attack == "both" else (attack,)
    notes = []
    if "empirical" in attacks and sizes[0] // 4 < EMPIRICAL_SAMPLES_PER_STEP * strategy.n:
        if attack == "empirical":
            raise ValueError(f'attack="empirical" needs coordinates >= {4 * EMPIRICAL_SAMPLES_PER_STEP} n = '
                             f"{4 * EMPIRICAL_SAMPLES_PER_STEP * strategy.n} per run (the covariance is fitted on "
                             f"the first run's out canaries), got {sizes[0]}")
        attacks = ("whitened",)
        notes.append(f"empirical attack skipped: {sizes[0]} coordinates per run are too few to fit an n = "
                     f"{strategy.n} covariance")
    base = jax.random.key(seed)
    scores: dict[str, list[np.ndarray]] = {k: [] for k in attacks}
    members: dict[str, list[np.ndarray]] = {k: [] for k in attacks}
    direction = None
    for r, size in enumerate(sizes):
        m = rng.random(size) < 0.5
        o = mech.releases(strategy, p, z, pattern=u, members=m, l2_clip_norm=clip, canary_norm=a,
                          key=jax.random.fold_in(base, r), dtype=dtype)
        if o.shape != (strategy.n, size):
            raise ValueError(f"mechanism {mech.name} returned releases of shape {o.shape}, "
                             f"expected {(strategy.n, size)}")
        o = np.asarray(o, np.float64)
        if "whitened" in attacks:
            scores["whitened"].append(whitened_scores(o, c, u, sigma_abs))
            members["whitened"].append(m)
        if "empirical" in attacks:
            if direction is None:  # fitted on half of the first run, never scored
                split = np.random.default_rng([seed, 1]).permutation(size)
                fit, rest = split[: size // 2], np.sort(split[size // 2:])
                direction = empirical_direction(o[:, fit][:, ~m[fit]], u)
                o, m = o[:, rest], m[rest]
            scores["empirical"].append(direction @ o)
            members["empirical"].append(m)
        del o

    per_attack: dict[str, tuple[EpsilonLowerBound, np.ndarray, np.ndarray]] = {}
    level = 1.0 - (1.0 - confidence) / len(attacks)
    for k in attacks:
        sk, mk = np.concatenate(scores[k]), np.concatenate(members[k])
        per_attack[k] = (_estimate(estimator, sk, mk, float(delta), level, grid), sk, mk)
    total = int(sum(sizes))
    name = max(per_attack, key=lambda k: per_attack[k][0].epsilon)
    bound, reported, mem = per_attack[name]
    details = {"reported_attack": name, "attacks": {k: v[0].to_dict() for k, v in per_attack.items()},
               "per_attack_confidence": level, "sensitivity": sens, "sigma_abs": sigma_abs, "notes": notes}
    lower = dataclasses.replace(bound, confidence=float(confidence),
                                details={**bound.details, "attack": name, "union_over": list(attacks)})
    seconds = time.perf_counter() - start
    return AuditResult(
        mechanism=mech.name, strategy=repr(strategy), participation=p, noise_multiplier=z, delta=float(delta),
        confidence=float(confidence), estimator=estimator, attack=attack, claimed_epsilon=claimed,
        lower_bound=lower, tightness=float(lower.epsilon / claimed), mu_claimed=1.0 / z, mu_model=mu_model,
        pattern=u, trials=total, runs=len(sizes), coordinates=d, l2_clip_norm=clip, canary_norm=float(a),
        seconds=seconds, scores_in=reported[mem], scores_out=reported[~mem], details=details)
