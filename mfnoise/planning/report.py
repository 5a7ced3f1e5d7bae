"""What a plan says about itself: the summary (JSON), the text report and the candidates table.

The report states the privacy claim (epsilon achieved, delta, the adjacency), the mechanism, what
it assumes public (docs/design.md, "Threat model") and the paper each accounting step comes from.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# A Plan and its Candidate rows (mfnoise.planning.plans, which imports this module to report itself).
Plan = Any
Candidate = Any

PAPERS = {
    "mf": ("Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning", "Choquette-Choo et al. 2023",
           "arXiv:2211.06530"),
    "amplified": ("(Amplified) Banded Matrix Factorization: A unified approach to private training",
                  "Choquette-Choo et al. 2023", "arXiv:2306.08153"),
    "dp-sgd": ("Deep Learning with Differential Privacy", "Abadi et al. 2016", "arXiv:1607.00133"),
    "pld": ("Connect the Dots: Tighter Discrete Approximations of Privacy Loss Distributions",
            "Doroshenko et al. 2022", "arXiv:2207.04380"),
    "rdp": ("Rényi Differential Privacy", "Mironov 2017", "arXiv:1702.07476"),
    "mmcc": ("Privacy Amplification for Matrix Mechanisms", "Choquette-Choo, Ganesh, Steinke, Thakurta, ICLR 2024",
             "arXiv:2310.15526"),
}


def _cite(key: str) -> str:
    title, who, arxiv = PAPERS[key]
    return f'"{title}", {who}, {arxiv}'


def accounting_steps(plan: Plan) -> list[dict[str, str]]:
    """The steps from the mechanism to (epsilon, delta), each with its paper."""
    p = plan.participation
    steps = []
    if plan.sampling == "poisson":
        q = plan.batch_size / plan.dataset_size
        if plan.accounting.theorem == "mmcc":
            steps.append({"step": f"lower-triangular C >= 0 under Poisson sampling (every step, q={q:.6g}, schema "
                                  f"{p}): MMCC bounds row i given the rows before it by a mixture of Gaussians and "
                                  f"composes the {p.n} rows (conditional composition), noise std z * ||C 1||, "
                                  f"pessimistic PLD discretisation throughout", "paper": _cite("mmcc")})
            steps.append({"step": "priced by mfnoise.training.mmcc on dp-accounting's PLD (mixture-of-Gaussians "
                                  "privacy losses), add or remove one example", "paper": _cite("pld")})
            return steps
        steps.append({"step": f"diagonal C under Poisson sampling (every step, q={q:.6g}): {p.n} independent "
                              "Poisson-subsampled Gaussians", "paper": _cite("dp-sgd")})
    elif plan.sampling == "cyclic":
        steps.append({"step": f"C normalised to sensitivity 1 under {p}: releasing C G + z Z over all {p.n} steps "
                              f"is one Gaussian mechanism with noise multiplier z", "paper": _cite("mf")})
    else:
        rounds = -(-p.n // p.min_sep)
        q = plan.batch_size * p.min_sep / plan.dataset_size
        steps.append({"step": f"banded C with bands <= min_sep={p.min_sep} under cyclic Poisson sampling: "
                              f"{rounds} rounds of a Poisson-subsampled Gaussian, q={q:.6g}, per-round noise "
                              f"multiplier z * sens(C, p) / max column norm", "paper": _cite("amplified")})
        if plan.strategy.is_identity:
            steps.append({"step": "with one band (C = I) this is DP-SGD's Poisson-subsampled Gaussian",
                          "paper": _cite("dp-sgd")})
    steps.append({"step": f"priced by dp-accounting's {plan.accountant.upper()} accountant (add or remove one "
                          "example)", "paper": _cite(plan.accountant)})
    return steps


def assumptions(plan: Plan) -> list[str]:
    """What the guarantee takes as public or given (docs/design.md, "Threat model")."""
    out = [
        "adjacency: adding or removing one example",
        f"public: the strategy ({plan.strategy.family}, n={plan.steps}), the participation schema "
        f"({plan.participation}), the sampler ({plan.sampling}), the clip norm {plan.l2_clip_norm:g}, the noise "
        f"multiplier, and the divisor expected_batch_size={plan.expected_batch_size:g}",
        f"public: the dataset size {plan.dataset_size} (the sampler builds its plan from it; nothing released "
        "is divided by it)",
        "training uses exactly plan.batches(seed) (another sampler voids the accounting) and plan.transform "
        "(the noise scaled by the strategy's proven sensitivity bound)",
        "not accounted: hyperparameter tuning, floating-point attacks on the Gaussian sampler, timing side channels",
    ]
    if plan.sampling in ("cyclic-poisson", "poisson"):
        out.append("the Poisson coins are secret and fresh at every step (mfnoise's sampler draws them from the seed: "
                   "keep the seed secret)")
    return out


def summary(plan: Plan) -> dict[str, Any]:
    """The plan's scalar fields and claims, JSON-ready (no strategy arrays)."""
    s = plan.strategy
    return {
        "epsilon": plan.epsilon,
        "target_epsilon": plan.target_epsilon,
        "delta": plan.delta,
        "mechanism": plan.mechanism,
        "sampling": plan.sampling,
        "family": s.family,
        "bands": s.bands,
        "state_arrays": s.state_arrays(),
        "noise_multiplier": plan.noise_multiplier,
        "l2_clip_norm": plan.l2_clip_norm,
        "accountant": plan.accountant,
        "pld_discretization": plan.pld_discretization,
        "dataset_size": plan.dataset_size,
        "batch_size": plan.batch_size,
        "expected_batch_size": plan.expected_batch_size,
        "steps": plan.steps,
        "min_sep": plan.participation.min_sep,
        "max_participations": plan.participation.max_participations,
        "source": plan.source,
        "theorem": plan.accounting.theorem,
        "paper": plan.accounting.paper,
        "mmcc_options": dict(plan.mmcc_options),
        "assumptions": assumptions(plan),
        "accounting": accounting_steps(plan),
    }


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def candidates_table(candidates: Iterable[Candidate]) -> str:
    """One aligned row per candidate, the chosen one marked with '*'."""
    head: tuple[str, ...] = ("", "mechanism", "sampling", "size", "min_sep", "z", "priced", "traj. rmse", "state B",
                             "note")
    rows: list[tuple[str, ...]] = [head]
    for c in candidates:
        size = f"{c.bands} bands" if c.bands is not None else f"{c.buffers} buffers" if c.buffers is not None else "-"
        note = f"dropped: {c.dropped}" if c.dropped else c.source
        rows.append(("*" if c.chosen else "", c.mechanism, c.sampling, size, str(c.min_sep),
                     _num(c.noise_multiplier, ".5g"), c.accountant or "-", _num(c.trajectory_rmse, ".5g"),
                     "-" if c.state_bytes is None else f"{c.state_bytes:.3g}", note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def text(plan: Plan) -> str:
    """The human-readable report: the claim, the mechanism, the accounting, the assumptions, the candidates."""
    s = summary(plan)
    lines = [
        f"mfnoise plan {plan.fingerprint[:16]}",
        f"  ({plan.epsilon:.6g}, {plan.delta:g})-DP (target epsilon {plan.target_epsilon:g}), {plan.accountant}",
        f"  mechanism {plan.mechanism}: {plan.strategy.family} strategy"
        + (f", {s['bands']} bands" if s["bands"] is not None else "")
        + f", {s['state_arrays']} state arrays; {plan.source}",
        f"  sampling {plan.sampling}: {plan.steps} steps, min_sep {plan.participation.min_sep}, batch "
        f"{plan.batch_size} of {plan.dataset_size} examples",
        f"  noise multiplier {plan.noise_multiplier:.6g}, clip norm {plan.l2_clip_norm:g}, divisor "
        f"{plan.expected_batch_size:g}",
        f"accounting: theorem {plan.accounting.theorem}: {plan.accounting.paper}",
        *(f"  - {a['step']} ({a['paper']})" for a in s["accounting"]),
        "assumptions:",
        *(f"  - {a}" for a in s["assumptions"]),
    ]
    if plan.candidates:
        lines += ["candidates (traj. rmse: root-mean-square noise in the training trajectory, clip units):",
                  candidates_table(plan.candidates)]
    return "\n".join(lines)
