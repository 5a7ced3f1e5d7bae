"""The chooser's fast path (mfnoise/planning/choose.py): amplified candidates screened by RDP on the
integer orders, the finalists priced by PLD from the screened z, every z checked here against a
bisection of dp-accounting's accountants on the DpEvent built by hand from the dense C; the rmse
of each candidate against the dense formula for its own schema; progress lines."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest

import mfnoise
from mfnoise.planning import choose
from mfnoise.training import accounting

DELTA = 1e-5
EPS = 3.0


def _event(plan: mfnoise.planning.Plan, c: np.ndarray, p: mfnoise.Participation, z: float) -> dp_accounting.DpEvent:
    """Amplified BandMF by its definition (arXiv:2306.08153): ceil(n / b) rounds of a Poisson-subsampled
    Gaussian, q = batch * b / dataset, per-round noise z * sens / (max column norm * margin)."""
    n, b = c.shape[0], p.min_sep
    col_sq = np.einsum("ij,ij->j", c, c)
    sens = math.sqrt(max(col_sq[r::b].sum() for r in range(b)))
    margin = 1.0 if np.array_equal(c, np.eye(n)) else 1.0 + 2.0**-20
    q = plan.batch_size * b / plan.dataset_size
    round_event = dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(z * sens / (math.sqrt(col_sq.max()) * margin)))
    return dp_accounting.SelfComposedDpEvent(round_event, -(-n // b))


def _eps(make_acc, event) -> float:
    return float(make_acc().compose(event).get_epsilon(DELTA))


def _dense_rmse(c: np.ndarray, a: np.ndarray, p: mfnoise.Participation) -> float:
    n = c.shape[0]
    x = c.T @ c
    sens_sq = max(sum(abs(x[i, j]) for i, j in itertools.product(range(r, n, p.min_sep), repeat=2))
                  for r in range(p.min_sep))
    return math.sqrt(sens_sq) * float(np.linalg.norm(a @ np.linalg.inv(c))) / math.sqrt(n)


@pytest.fixture(scope="module")
def made() -> tuple[mfnoise.planning.Plan, list[str]]:
    lines: list[str] = []
    plan = mfnoise.plan(EPS, DELTA, dataset_size=480, batch_size=40, epochs=2, optimize_seconds=2.0,
                        progress=lines.append)
    return plan, lines


def _strategy(row: mfnoise.planning.Candidate, n: int, w) -> np.ndarray:
    if row.mechanism == "dp-sgd":
        return np.eye(n)
    assert row.bands is not None
    return mfnoise.bsr(n, row.bands, w).dense()


def test_screen_orders_are_dp_accountings_integer_orders():
    default = dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    assert set(choose.SCREEN_ORDERS) == {o for o in default if float(o).is_integer()}


def test_screened_and_priced_noise_multipliers_are_the_accountants_own(made):
    plan, _ = made
    n = plan.steps
    w = mfnoise.workloads.prefix_sum(n)
    amplified = [c for c in plan.candidates if c.sampling == "cyclic-poisson" and c.noise_multiplier is not None]
    assert {c.accountant for c in amplified} == {"rdp-screen", "pld"}
    rdp = lambda: dp_accounting.rdp.RdpAccountant(list(choose.SCREEN_ORDERS))  # noqa: E731
    pld = lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=plan.pld_discretization)  # noqa: E731
    for row in amplified:
        p = mfnoise.Participation(n, -(-n // row.min_sep), row.min_sep, cyclic=True)
        c = _strategy(row, n, w)
        z = row.noise_multiplier
        make_acc, rtol = (rdp, 2 * choose.SCREEN_RTOL) if row.accountant == "rdp-screen" else (pld, 1e-4)
        # the smallest z within rtol: its epsilon is at most the target, a slightly smaller z's above it
        assert _eps(make_acc, _event(plan, c, p, z)) <= EPS, row
        assert _eps(make_acc, _event(plan, c, p, z * (1 - rtol))) > EPS, row
        assert row.rmse == pytest.approx(_dense_rmse(c, w.dense(), p), rel=1e-9)
        assert row.trajectory_rmse == pytest.approx(z * row.rmse, rel=1e-12)


def test_the_finalists_are_the_best_screened_and_those_within_the_margin(made):
    plan, _ = made
    amplified = [c for c in plan.candidates if c.sampling == "cyclic-poisson" and c.noise_multiplier is not None]
    priced = [c for c in amplified if c.accountant == "pld"]
    screened = [c for c in amplified if c.accountant == "rdp-screen"]
    assert len(priced) >= min(choose.PRICED, len(amplified))
    # a screened score is never below a priced one's screen: the priced rows were the lowest screens,
    # and PLD prices them lower still (its z is below RDP's)
    rdp_z = {c.bands: choose._screen(EPS, DELTA, mfnoise.Participation(plan.steps, -(-plan.steps // c.min_sep),
                                                                       c.min_sep, cyclic=True),
                                     mfnoise.Identity(plan.steps) if c.mechanism == "dp-sgd"
                                     else mfnoise.bsr(plan.steps, c.bands), plan.dataset_size, plan.batch_size, 1.0)
             for c in priced}
    priced_screens = sorted(rdp_z[c.bands] * c.rmse for c in priced)
    for c in priced:
        assert c.noise_multiplier < rdp_z[c.bands]
    for c in screened:
        assert c.trajectory_rmse > choose.SCREEN_MARGIN * priced_screens[0]
        assert c.trajectory_rmse >= priced_screens[choose.PRICED - 1]


def test_fixed_cyclic_candidates_share_one_gaussian_z_and_their_own_rmse(made):
    plan, _ = made
    n = plan.steps
    w = mfnoise.workloads.prefix_sum(n)
    fixed = [c for c in plan.candidates if c.sampling == "cyclic" and c.noise_multiplier is not None]
    assert len({c.noise_multiplier for c in fixed}) == 1
    z = fixed[0].noise_multiplier
    pld = lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=plan.pld_discretization)  # noqa: E731
    assert _eps(pld, dp_accounting.GaussianDpEvent(z)) <= EPS < _eps(pld, dp_accounting.GaussianDpEvent(z * 0.9999))
    p = mfnoise.Participation(n, -(-n // fixed[0].min_sep), fixed[0].min_sep, cyclic=True)
    # the BSR of the same bands under the fixed schema: the decoder norm computed once serves both
    for c in fixed:
        if c.mechanism == "bandmf":
            assert c.rmse == pytest.approx(_dense_rmse(mfnoise.bsr(n, c.bands, w).dense(), w.dense(), p), rel=1e-9)


def test_calibrate_from_a_guess_is_the_same_search():
    p = mfnoise.Participation(48, 12, 4, cyclic=True)
    kwargs = {"sampling": "cyclic-poisson", "dataset_size": 400, "batch_size": 20, "strategy": mfnoise.bsr(48, 4)}
    plain = accounting.calibrate(2.0, DELTA, p, pld_discretization=1e-2, **kwargs)
    for guess in (0.3 * plain, 5.0 * plain):  # below and above: stepped down, grown
        z = accounting.calibrate(2.0, DELTA, p, pld_discretization=1e-2, guess=guess, **kwargs)
        assert z == pytest.approx(plain, rel=2e-5)
        assert accounting.epsilon(z, DELTA, p, pld_discretization=1e-2, **kwargs) <= 2.0
    with pytest.raises(ValueError, match="guess"):
        accounting.calibrate(2.0, DELTA, p, guess=-1.0, **kwargs)


def test_progress_lines_say_what_the_plan_does(made, capsys, monkeypatch):
    _, lines = made
    assert any(line.startswith("candidate ") and "screening its noise by RDP" in line for line in lines)
    assert any(line.startswith("pricing ") and "by the PLD accountant" in line for line in lines)
    assert lines[-1].startswith("chose ")
    kwargs = {"dataset_size": 200, "batch_size": 50, "epochs": 1, "mechanism": "dp-sgd", "sampling": "cyclic"}
    mfnoise.plan(2.0, DELTA, progress=True, **kwargs)
    assert "mfnoise.plan [" in capsys.readouterr().err
    mfnoise.plan(2.0, DELTA, progress=False, **kwargs)
    monkeypatch.setattr(choose, "PROGRESS_DELAY", 1e9)
    mfnoise.plan(2.0, DELTA, **kwargs)  # the default: silent until the plan has lasted PROGRESS_DELAY
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(choose, "PROGRESS_DELAY", 0.0)
    mfnoise.plan(2.0, DELTA, **kwargs)
    assert "chose dp-sgd (cyclic, 1 bands)" in capsys.readouterr().err
