"""The attack's ROC against the claimed guarantee: ``roc_plot(result, path)``.

A claimed (epsilon, delta)-DP guarantee bounds every attack's ROC: with the trade-off function f
(the least false negative rate at false positive rate alpha, "Gaussian Differential Privacy", Dong,
Roth, Su 2019), any test has TPR <= 1 - f(FPR). The plot shows the attack's empirical ROC (from the
audit's in / out scores, ``estimators.roc``) under two claimed curves: the mu-GDP curve
1 - G_mu(alpha) at the mu whose Gaussian mechanism is exactly (claimed epsilon, delta)-DP
(``tradeoff.epsilon_to_gdp_mu``; for mfnoise's unamplified mechanism, one Gaussian mechanism, this
is the mechanism's own curve, mu = 1 / z), and the (epsilon, delta) curve 1 - f_{eps,delta}(alpha)
(the weakest curve the claim allows); and the curve of the empirical lower bound (its mu for the
GDP estimator, its (epsilon, delta) curve otherwise). An empirical ROC above a claimed curve is
visible evidence against the claim (the estimators decide it with a confidence; the plot shows it).

matplotlib (the ``demo`` extra) is imported inside the function, with the Agg backend.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import numpy as np


def roc_plot(result: Any, path: str | os.PathLike, *, scale: Literal["log", "linear"] = "log",
             title: str | None = None) -> str:
    """Writes the ROC figure of an audit result to ``path`` (the format from its extension, png
    without one; written atomically, the folder must exist); returns the path.

    ``result``: an ``AuditResult`` (white-box) or a ``BlackBoxResult``: anything with
    ``scores_in``, ``scores_out``, ``claimed_epsilon`` (None: no claimed curves), ``lower_bound``
    (an ``EpsilonLowerBound``: its ``epsilon``, ``delta``, ``method``, ``details``) and
    ``mechanism``. ``scale="log"``: both axes logarithmic (the low-FPR corner, where tight audits
    are decided); ``"linear"``: the usual ROC square.
    """
    from mfnoise.auditing import estimators, tradeoff
    from mfnoise.strategies.files import figure_format, save_figure

    if scale not in ("log", "linear"):
        raise ValueError(f"scale must be 'log' or 'linear', got {scale!r}")
    path = os.fspath(path)
    fmt = figure_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scores_in = np.asarray(result.scores_in, dtype=np.float64)
    scores_out = np.asarray(result.scores_out, dtype=np.float64)
    fpr, tpr = (np.asarray(a, dtype=np.float64) for a in estimators.roc(scores_in, scores_out))
    bound = result.lower_bound
    delta = float(bound.delta)
    claimed = result.claimed_epsilon
    lo = 1.0 / max(1, scores_out.size) if scale == "log" else 0.0
    alpha = np.geomspace(max(lo, 1e-12), 1.0, 400) if scale == "log" else np.linspace(0.0, 1.0, 400)

    fig, ax = plt.subplots(figsize=(5.6, 5.0), dpi=120)
    if scale == "log":
        keep = (fpr > 0) & (tpr > 0)  # log axes cannot show a zero rate
        ax.loglog(fpr[keep], tpr[keep], color="C0", lw=1.6, label=f"attack ROC ({scores_in.size} in, "
                  f"{scores_out.size} out)")
    else:
        ax.plot(fpr, tpr, color="C0", lw=1.6, label=f"attack ROC ({scores_in.size} in, {scores_out.size} out)")
    if claimed is not None and math.isfinite(claimed) and delta > 0:
        mu = tradeoff.epsilon_to_gdp_mu(claimed, delta)
        ax.plot(alpha, 1.0 - tradeoff.gaussian_tradeoff(alpha, mu), color="C2", lw=1.2,
                label=f"claimed: Gaussian, mu={mu:.3g} (exactly (ε={claimed:.3g}, δ={delta:.0e}))")
        ax.plot(alpha, 1.0 - tradeoff.eps_delta_tradeoff(alpha, claimed, delta), color="C2", ls="--", lw=1.0,
                label=f"claimed: (ε={claimed:.3g}, δ={delta:.0e}) curve")
    lb = float(bound.epsilon)
    if lb > 0:
        mu_lb = (bound.details or {}).get("mu_lo") if bound.method == "gdp" else None
        if mu_lb is not None and float(mu_lb) > 0:
            curve = 1.0 - tradeoff.gaussian_tradeoff(alpha, float(mu_lb))
            label = f"empirical lower bound: mu={float(mu_lb):.3g} (ε≥{lb:.3g})"
        else:
            curve = 1.0 - tradeoff.eps_delta_tradeoff(alpha, lb, delta)
            label = f"empirical lower bound: (ε={lb:.3g}, δ={delta:.0e}) curve"
        ax.plot(alpha, curve, color="C3", ls=":", lw=1.4, label=label + f", {bound.method}, "
                f"{100 * float(bound.confidence):g}% conf.")
    ax.plot(alpha, alpha, color="gray", lw=0.8, ls="-.", label="chance (TPR = FPR)")
    if scale == "log":
        ax.set_xlim(alpha[0], 1.0)
        ax.set_ylim(alpha[0], 1.05)
    else:
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("false positive rate (out canaries called in)")
    ax.set_ylabel("true positive rate (in canaries called in)")
    ax.set_title(title or f"audit of {result.mechanism}: ε ≥ {lb:.3g}"
                 + (f" vs claimed {claimed:.3g}" if claimed is not None else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, fmt)
