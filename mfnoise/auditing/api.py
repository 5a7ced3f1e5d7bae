"""``mfnoise.audit``: the empirical privacy audit of a plan, of a (strategy, participation, noise
multiplier) triple, or of a training run the user supplies.

White-box (``audit(plan)`` or ``audit(strategy, participation, noise_multiplier, delta=...)``):
``mfnoise.auditing.whitebox.whitebox_audit`` inserts Dirac gradient canaries at the steps the
participation schema gives them, runs the real noise of the mechanism, and scores each canary with
the likelihood-ratio test against the correlated noise (the releases whitened with C: the adversary
sees C x + sigma Z). For the honest mechanism this is exactly a Gaussian shift of mu = 1 / z
(``z`` the noise multiplier), so the estimators' lower bound approaches the claimed epsilon
("Tight Auditing of Differentially Private Machine Learning", Nasr et al., USENIX Security 2023).

Black-box (``audit(train_fn=f, data=(x, y), trials=m, ...)``, or ``audit(plan, train_fn=f, ...)``
to take the claim from a plan): ``mfnoise.auditing.blackbox.audit_blackbox`` with m input-space
canaries, one training run, the one-run bound ("Privacy Auditing with One (1) Training Run",
Steinke, Nasr, Jagielski 2023).

Both return a result whose ``claimed_epsilon``, ``lower_bound.epsilon`` and ``tightness`` =
lower bound / claimed say how much of the claim the attack proved; ``report(result)`` is the text
the command line prints. A lower bound above the claim, at the stated confidence, is a privacy bug
(``flagged``); a lower bound far below it says only that this attack did not reach the claim.

Amplified plans (``sampling`` "cyclic-poisson" or "poisson") are refused by the white-box audit:
its canary is present at every step its schema allows, the adversary's choice, which is the
unamplified mechanism; the amplified claim would be wrongly accused. Audit the plan's strategy,
schema and noise multiplier as a triple (the unamplified claim, ``mfnoise.epsilon``), or audit the
training run black-box with the plan's own sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mfnoise.core.participation import Participation
from mfnoise.strategies.base import Strategy


def audit(plan_or_strategy: Any = None, participation: Participation | None = None,
          noise_multiplier: float | None = None, *, delta: float | None = None, trials: int | None = None,
          train_fn: Callable[..., Any] | None = None, data: tuple[Any, Any] | None = None,
          claimed_epsilon: float | None = None, estimator: str | None = None, confidence: float = 0.95,
          seed: int = 0, mechanism: Any = None, l2_clip_norm: float | None = None,
          canary_norm: float | None = None, canary_kind: str = "mislabelled", num_classes: int | None = None,
          guesses: Any = None, verbose: bool = False, **whitebox_kwargs: Any) -> Any:
    """Audit a mechanism and return the epsilon lower bound next to the claim (see the module doc).

    White-box: ``audit(plan, trials=T)`` (delta, clip norm and schema from the plan; its sampling must
    be "cyclic") or ``audit(strategy, participation, noise_multiplier, delta=D, trials=T)``; the claim
    is ``mfnoise.epsilon(noise_multiplier, delta, participation)`` (for a plan, the plan's own
    ``epsilon``, recomputed by its accountant; ``claimed_epsilon=`` overrides it for a triple).
    ``trials``: canaries, one coordinate each (each gives one in or out score); ``estimator``:
    "gdp" (default) or "clopper-pearson"; ``mechanism``: None / "honest" (the real mfnoise
    mechanism) or a broken fixture of ``mfnoise.auditing.mechanisms`` (a name: "sensitivity-k1",
    "wrong-strategy", "reused-last-row", "no-clipping", or a ``Mechanism`` object); ``canary_norm``
    > clip exercises clipping; further keywords (``attack``, ``coordinates``, ``thresholds``,
    ``dtype``) go to ``whitebox.whitebox_audit``. Returns ``whitebox.AuditResult``.

    Black-box: ``audit(train_fn=f, data=(x, y), trials=m, delta=D, claimed_epsilon=E)`` (or a plan
    first, for E and D): ``blackbox.audit_blackbox`` with m canaries of ``canary_kind``; ``estimator``
    "one-run" (default) or "one-run-fdp". Returns ``blackbox.BlackBoxResult``.

    ``verbose=True`` also prints ``report(result)``.
    """
    from mfnoise.planning.plans import Plan

    plan = plan_or_strategy if isinstance(plan_or_strategy, Plan) else None
    if train_fn is not None:
        result = _blackbox(plan, plan_or_strategy, train_fn=train_fn, data=data, trials=trials, delta=delta,
                           claimed_epsilon=claimed_epsilon, estimator=estimator, confidence=confidence, seed=seed,
                           canary_kind=canary_kind, num_classes=num_classes, guesses=guesses,
                           unused={"participation": participation, "noise_multiplier": noise_multiplier,
                                   "mechanism": mechanism, "l2_clip_norm": l2_clip_norm, "canary_norm": canary_norm,
                                   **whitebox_kwargs})
    else:
        if data is not None:
            raise ValueError("data= is the black-box audit's dataset: pass train_fn= with it")
        result = _whitebox(plan, plan_or_strategy, participation, noise_multiplier, delta=delta, trials=trials,
                           claimed_epsilon=claimed_epsilon, estimator=estimator, confidence=confidence, seed=seed,
                           mechanism=mechanism, l2_clip_norm=l2_clip_norm, canary_norm=canary_norm,
                           **whitebox_kwargs)
    if verbose:
        print(report(result))
    return result


def _check_trials(trials: Any, what: str) -> int:
    if trials is None:
        raise ValueError(f"trials= is required ({what})")
    if isinstance(trials, bool) or int(trials) != trials or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    return int(trials)


def _whitebox(plan: Any, first: Any, participation: Participation | None, noise_multiplier: float | None, *,
              delta: float | None, trials: int | None, claimed_epsilon: float | None, estimator: str | None,
              confidence: float, seed: int, mechanism: Any, l2_clip_norm: float | None,
              canary_norm: float | None, **kwargs: Any) -> Any:
    from mfnoise.auditing.whitebox import whitebox_audit

    trials = _check_trials(trials, "the number of canary coordinates of the white-box audit")
    if plan is not None:
        if participation is not None or noise_multiplier is not None:
            raise ValueError("a plan carries its participation and noise multiplier: pass the plan alone")
        if plan.sampling != "cyclic":
            raise ValueError(
                f"the plan's epsilon={plan.epsilon:.6g} is amplified by {plan.sampling!r} sampling, which the "
                "white-box audit does not model (its canary is present at every step its schema allows: the "
                "unamplified mechanism), so it would wrongly accuse the plan. Audit the triple "
                "audit(plan.strategy, plan.participation, plan.noise_multiplier, delta=plan.delta, trials=...) "
                "against the unamplified claim, or audit the training run black-box (train_fn=...)")
        if delta is not None and delta != plan.delta:
            raise ValueError(f"delta={delta!r} differs from the plan's delta={plan.delta!r}")
        strategy, participation, noise_multiplier = plan.strategy, plan.participation, plan.noise_multiplier
        delta = plan.delta
        l2_clip_norm = plan.l2_clip_norm if l2_clip_norm is None else l2_clip_norm
        # the plan's own epsilon (its accountant and grid; recomputed when the plan was built or loaded)
        if claimed_epsilon is not None and claimed_epsilon != plan.epsilon:
            raise ValueError(f"claimed_epsilon={claimed_epsilon!r} differs from the plan's epsilon={plan.epsilon!r}")
        claimed_epsilon = plan.epsilon
    else:
        strategy = first
        if not isinstance(strategy, Strategy):
            raise ValueError(f"the first argument must be a mfnoise Plan or Strategy, got {type(first).__name__}")
        if participation is None or noise_multiplier is None:
            raise ValueError("a strategy needs its participation and noise_multiplier: "
                             "audit(strategy, participation, noise_multiplier, delta=..., trials=...)")
        if delta is None:
            raise ValueError("delta= is required")
    if not isinstance(participation, Participation):
        raise ValueError(f"participation must be a mfnoise.Participation, got {type(participation).__name__}")
    z = float(noise_multiplier)  # type: ignore[arg-type]
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier!r}")
    assert delta is not None  # a plan's, or checked above
    return whitebox_audit(strategy, participation, z, delta=float(delta), trials=trials,
                          l2_clip_norm=1.0 if l2_clip_norm is None else float(l2_clip_norm), canary_norm=canary_norm,
                          estimator=estimator or "gdp", confidence=confidence, seed=seed,
                          mechanism=resolve_mechanism(mechanism), claimed_epsilon=claimed_epsilon, **kwargs)


def resolve_mechanism(mechanism: Any) -> Any:
    """None / "honest" -> None (the real mechanism); a fixture's name, with dashes or underscores
    ("sensitivity-k1") -> its key in ``mfnoise.auditing.mechanisms.MECHANISMS``; an object as given."""
    if mechanism is None or not isinstance(mechanism, str):
        return mechanism
    from mfnoise.auditing.mechanisms import MECHANISMS

    name = mechanism.replace("-", "_")
    if name not in MECHANISMS:
        names = ", ".join(k.replace("_", "-") for k in MECHANISMS)
        raise ValueError(f"unknown mechanism {mechanism!r}; expected one of {names}")
    return None if name == "honest" else name


def _blackbox(plan: Any, first: Any, *, train_fn: Callable[..., Any], data: Any, trials: int | None,
              delta: float | None, claimed_epsilon: float | None, estimator: str | None, confidence: float,
              seed: int, canary_kind: str, num_classes: int | None, guesses: Any,
              unused: dict[str, Any]) -> Any:
    from mfnoise.auditing.blackbox import audit_blackbox

    given = sorted(k for k, v in unused.items() if v is not None)
    if given:
        raise ValueError(f"{', '.join(given)} belong to the white-box audit, not to the black-box one (train_fn=)")
    if first is not None and plan is None:
        raise ValueError(f"the black-box audit takes a Plan (for its claim) or nothing first, "
                         f"got {type(first).__name__}")
    m = _check_trials(trials, "the number of canaries of the black-box audit")
    if data is None or not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("the black-box audit needs data=(x, y): the examples the canaries are made from")
    if plan is not None:
        if claimed_epsilon is not None and claimed_epsilon != plan.epsilon:
            raise ValueError(f"claimed_epsilon={claimed_epsilon!r} differs from the plan's epsilon={plan.epsilon!r}")
        if delta is not None and delta != plan.delta:
            raise ValueError(f"delta={delta!r} differs from the plan's delta={plan.delta!r}")
        claimed_epsilon, delta = plan.epsilon, plan.delta
    if delta is None:
        raise ValueError("delta= is required")
    return audit_blackbox(train_fn, data[0], data[1], canaries=m, delta=float(delta), claimed_epsilon=claimed_epsilon,
                          kind=canary_kind, num_classes=num_classes, estimator=estimator or "one-run",  # type: ignore[arg-type]
                          confidence=confidence, guesses=guesses, seed=seed,
                          mechanism=getattr(train_fn, "__name__", "train_fn"))


def report(result: Any) -> str:
    """Lines of text: the lower bound next to the claim, the tightness ratio and the verdict."""
    d = result.to_dict()
    lb = result.lower_bound
    claimed = result.claimed_epsilon
    tight = result.tightness
    kind = d.get("audit") or "white-box"
    lines = [
        f"{kind} audit of {result.mechanism}: {lb.trials} trials, estimator {lb.method}, "
        f"{100 * lb.confidence:g}% confidence, delta {lb.delta:g}",
        f"  empirical epsilon lower bound  {lb.epsilon:.4g}",
        f"  claimed epsilon                {'(none)' if claimed is None else f'{claimed:.4g}'}",
        f"  tightness (lower / claimed)    {'-' if tight is None else f'{tight:.3f}'}",
    ]
    seconds = getattr(result, "seconds", None)
    if seconds is not None:
        lines.append(f"  seconds                        {seconds:.2f}")
    if claimed is not None:
        if lb.epsilon > claimed:
            lines.append(f"  FLAGGED: the attack proves epsilon >= {lb.epsilon:.4g} > {claimed:.4g} claimed "
                         f"(at {100 * lb.confidence:g}% confidence): the mechanism as run is less private than claimed")
        else:
            lines.append("  not flagged: the lower bound does not exceed the claim (no evidence against it; a low "
                         "tightness means this attack is weak, not that the claim is loose)")
    return "\n".join(lines)
