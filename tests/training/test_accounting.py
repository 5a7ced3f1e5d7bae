"""mfnoise.accounting against dp-accounting called directly, and its refusals."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfnoise
from mfnoise.cli import main as cli_main
from mfnoise.training import accounting

from conftest import all_patterns, make_strategy

EPS, DELTA = 8.0, 1e-5
Z_8 = 0.60023  # the Gaussian mechanism's noise multiplier at (8, 1e-5)


def direct(event_fn, eps=EPS, delta=DELTA, acc=dp_accounting.pld.PLDAccountant):
    return dp_accounting.calibrate_dp_mechanism(acc, event_fn, eps, delta)


@pytest.fixture(scope="module")
def z_pld():
    """dp-accounting's PLD calibration of one Gaussian mechanism, called directly (once: ~4 s)."""
    return direct(dp_accounting.GaussianDpEvent)


@pytest.fixture(scope="module")
def z_mfnoise_pld():
    return mfnoise.calibrate(EPS, DELTA)


def test_gaussian_value_at_eps8(z_pld, z_mfnoise_pld):
    # one-sided first: the exact (analytic) epsilon and the PLD bound of the z returned are <= target
    assert dp_accounting.get_epsilon_gaussian(z_mfnoise_pld, DELTA) <= EPS
    composed = dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(z_mfnoise_pld))
    assert composed.get_epsilon(DELTA) <= EPS
    assert z_mfnoise_pld == pytest.approx(Z_8, abs=5e-5)
    assert z_mfnoise_pld == pytest.approx(z_pld, abs=2e-6)
    # and the analytic Gaussian mechanism (Balle & Wang), independent of the PLD grid
    assert z_mfnoise_pld == pytest.approx(dp_accounting.get_sigma_gaussian(EPS, DELTA), abs=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
@pytest.mark.parametrize("family", ["identity", "bsr", "sqrt-toeplitz"])
def test_unamplified_is_one_gaussian_for_any_k(k, family, z_mfnoise_pld):
    """Sensitivity-normalised MF is one Gaussian mechanism: the same event, hence z, for every k."""
    n = 32
    p = mfnoise.Participation(n, k, n // k)  # at most k participations, b = n // k apart
    strategy = {"identity": mfnoise.Identity(n), "bsr": mfnoise.bsr(n, p.min_sep),
                "sqrt-toeplitz": mfnoise.sqrt_toeplitz(n)}[family]
    event = accounting.dp_event(Z_8, p, strategy=strategy)
    assert event == dp_accounting.GaussianDpEvent(Z_8)
    # the full PLD search for every (k, family) would cost ~4 s each; RDP is checked instead
    z_rdp = mfnoise.calibrate(EPS, DELTA, p, strategy=strategy, accountant="rdp")
    assert dp_accounting.rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(z_rdp)).get_epsilon(DELTA) <= EPS
    assert z_rdp == pytest.approx(direct(dp_accounting.GaussianDpEvent, acc=dp_accounting.rdp.RdpAccountant),
                                  abs=2e-6)
    assert z_rdp > z_mfnoise_pld  # RDP is looser than PLD


def test_epsilon_round_trip(z_mfnoise_pld):
    eps = mfnoise.epsilon(z_mfnoise_pld, DELTA)
    assert eps <= EPS
    assert eps == pytest.approx(EPS, abs=1e-3)
    acc = dp_accounting.pld.PLDAccountant()
    assert eps == pytest.approx(acc.compose(dp_accounting.GaussianDpEvent(z_mfnoise_pld)).get_epsilon(DELTA))


@settings(max_examples=15)
@given(z=st.floats(0.3, 5.0), delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_epsilon_rdp_matches_direct(z, delta):
    acc = dp_accounting.rdp.RdpAccountant()
    expected = acc.compose(dp_accounting.GaussianDpEvent(z)).get_epsilon(delta)
    assert mfnoise.epsilon(z, delta, accountant="rdp") == pytest.approx(expected, rel=1e-12)


# -- amplified BandMF ----------------------------------------------------------------------------
def amplified(q: float, rounds: int, s: float) -> dp_accounting.DpEvent:
    """``rounds`` Poisson-subsampled Gaussians with noise multiplier s, built here."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), rounds)


def test_amplified_column_normalised_matches_direct(tmp_path):
    """ceil(n / b) rounds of PoissonSampled(q, Gaussian(z sqrt(k))) with q = batch * b / dataset."""
    n, b, dataset, batch = 60, 6, 600, 20
    p = mfnoise.Participation.epochs(n, n // b)
    rounds, q = 10, batch * b / dataset
    rdp = dp_accounting.rdp.RdpAccountant
    s = direct(lambda s: amplified(q, rounds, s), acc=rdp)
    strategy = mfnoise.bsr(n, 4)
    for which in (strategy, strategy.save(str(tmp_path / "bsr.npz"))):  # the object or its file
        z = mfnoise.calibrate(EPS, DELTA, p, sampling="cyclic-poisson", dataset_size=dataset,
                              batch_size=batch, accountant="rdp", strategy=which)
        # bsr columns all have norm 1, so sens = sqrt(rounds): the round multiplier is z sqrt(rounds)
        # (up to the float32 column-norm margin, 2^-20), never less
        assert rdp().compose(amplified(q, rounds, z * math.sqrt(rounds))).get_epsilon(DELTA) <= EPS
        assert z * math.sqrt(rounds) == pytest.approx(s, abs=1e-5)
        assert z * math.sqrt(rounds) >= s
    # amplification helps: less noise than the unamplified Gaussian
    assert z < mfnoise.calibrate(EPS, DELTA, p, accountant="rdp")



def test_amplified_pld_matches_direct():
    n, b, dataset, batch = 12, 4, 400, 25
    p = mfnoise.Participation.epochs(n, n // b)
    q, rounds = batch * b / dataset, 3
    strategy = mfnoise.bsr(n, b)
    z = mfnoise.calibrate(EPS, DELTA, p, sampling="cyclic-poisson", dataset_size=dataset, batch_size=batch,
                          strategy=strategy, pld_discretization=1e-3)
    make = lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    s = dp_accounting.calibrate_dp_mechanism(make, lambda s: dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), rounds), EPS, DELTA)
    assert z * math.sqrt(rounds) == pytest.approx(s, abs=1e-5)
    # one-sided, with dp-accounting on the same grid and the event built here
    assert make().compose(amplified(q, rounds, z * math.sqrt(rounds))).get_epsilon(DELTA) <= EPS
    eps = mfnoise.epsilon(z, DELTA, p, sampling="cyclic-poisson", dataset_size=dataset, batch_size=batch,
                          strategy=strategy, pld_discretization=1e-3)
    assert eps <= EPS


def test_dpsgd_with_poisson_sampling_is_the_classic_accounting():
    """Identity with b = 1 (one group: the whole dataset) is DP-SGD with Poisson sampling."""
    n, dataset, batch, sigma = 50, 1000, 10, 1.1
    p = mfnoise.Participation(n, n, 1)
    z = sigma / math.sqrt(n)  # mfnoise's convention: noise = z * clip * sens, sens(I, p) = sqrt(n)
    event = accounting.dp_event(z, p, sampling="cyclic-poisson", dataset_size=dataset, batch_size=batch,
                                strategy=mfnoise.Identity(n))
    classic = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(batch / dataset, dp_accounting.GaussianDpEvent(sigma)), n)
    acc = dp_accounting.rdp.RdpAccountant
    assert acc().compose(event).get_epsilon(DELTA) == pytest.approx(acc().compose(classic).get_epsilon(DELTA))


@settings(max_examples=30)
@given(n=st.integers(2, 9), b=st.integers(1, 4), seed=st.integers(0, 2**16),
       family=st.sampled_from(["banded", "banded-normalized", "toeplitz-arbitrary", "bsr", "identity",
                               "dense-banded"]))
def test_amplification_scale_against_dense(n, b, seed, family):
    """scale = sens(C, p) / max column norm, both computed here from the dense C by brute force,
    divided by the float32 column-norm margin: never above the brute-force ratio."""
    b = min(b, n)
    rng = np.random.default_rng(seed)
    bands = 1 if family == "identity" else int(rng.integers(1, b + 1))
    if family == "dense-banded":
        _, c = make_strategy("dense-mixed", n, rng)
        c = np.tril(np.triu(c, -(bands - 1)))
        c[n - 1, n - bands] = 1.0  # keep the last band non-empty
        strategy = mfnoise.Dense(c)
    else:
        strategy, c = make_strategy(family, n, rng, bands=bands)
    p = mfnoise.Participation(n, -(-n // b), b, cyclic=True)
    sq = np.sum(c**2, axis=0)
    sens = math.sqrt(max(sq[list(P)].sum() for P in all_patterns(n, p.max_participations, b, True)))
    amp = accounting.amplification(p, dataset_size=100 * b, batch_size=3, strategy=strategy)
    ratio = sens / math.sqrt(sq.max())
    # float32 runs C as it is (no rounding margin) when its off-diagonal entries are float32 numbers
    # and its diagonal powers of two (C'[t, t] = 1 / fl(1 / C[t, t]))
    off = np.tril(c, -1)
    exact32 = np.all(off.astype(np.float32) == off) and np.all(np.isin(np.abs(np.diag(c)), 2.0 ** np.arange(-60, 61)))
    assert amp.scale <= ratio
    assert amp.scale == pytest.approx(ratio if exact32 else ratio / (1 + 2**-20), rel=1e-9)
    assert amp.rounds == -(-n // b) and amp.q == pytest.approx(3 * b / (100 * b)) and amp.bands == bands
    assert amp.column_spread == pytest.approx(1 - math.sqrt(sq.min() / sq.max()), abs=1e-12)


# -- refusals ------------------------------------------------------------------------------------
AMP = {"sampling": "cyclic-poisson", "dataset_size": 1000, "batch_size": 10}


def test_refuses_amplification_with_more_bands_than_min_sep():
    p = mfnoise.Participation.epochs(40, 10)  # min_sep 4
    with pytest.raises(ValueError, match=r"bands=5 > min_sep=4.*disjoint supports"):
        mfnoise.calibrate(EPS, DELTA, p, strategy=mfnoise.bsr(40, 5), **AMP)
    with pytest.raises(ValueError, match=r"bands=8 > min_sep=4"):
        mfnoise.calibrate(EPS, DELTA, p, strategy=mfnoise.bsr(40, 8), **AMP)
    with pytest.raises(ValueError, match=r"bands=40 > min_sep=4"):  # a full (non-banded-enough) Toeplitz
        mfnoise.epsilon(1.0, DELTA, p, strategy=mfnoise.sqrt_toeplitz(40), **AMP)
    with pytest.raises(ValueError, match=r"dense strategy has bands=40 > min_sep=4"):
        mfnoise.epsilon(1.0, DELTA, p, strategy=mfnoise.Dense(np.tril(np.ones((40, 40)))), **AMP)


@pytest.mark.parametrize("strategy", [mfnoise.BLT([0.5], [0.3], 40), mfnoise.bisr(40, 2)])
def test_refuses_amplification_for_non_banded_strategies(strategy):
    p = mfnoise.Participation.epochs(40, 10)
    with pytest.raises(ValueError, match="only proved for banded strategies"):
        mfnoise.calibrate(EPS, DELTA, p, strategy=strategy, **AMP)


def test_other_refusals():
    p = mfnoise.Participation.epochs(40, 10)
    bsr2 = mfnoise.bsr(40, 2)
    with pytest.raises(ValueError, match="q = .* > 1"):
        mfnoise.calibrate(EPS, DELTA, p, strategy=bsr2, sampling="cyclic-poisson", dataset_size=40, batch_size=20)
    with pytest.raises(ValueError, match="needs the strategy: pass strategy="):
        mfnoise.calibrate(EPS, DELTA, p, **AMP)
    with pytest.raises(ValueError, match="needs the participation"):
        mfnoise.calibrate(EPS, DELTA, strategy=bsr2, **AMP)
    with pytest.raises(ValueError, match="only matter with sampling='cyclic-poisson'"):
        mfnoise.calibrate(EPS, DELTA, p, dataset_size=100)
    with pytest.raises(ValueError, match="bands only matter with sampling='cyclic-poisson'"):
        mfnoise.calibrate(EPS, DELTA, p, bands=2)
    with pytest.raises(ValueError, match="allows only max_participations=3"):
        mfnoise.calibrate(EPS, DELTA, mfnoise.Participation(40, 3, 4), strategy=bsr2, **AMP)
    with pytest.raises(ValueError, match="has n=30"):
        mfnoise.calibrate(EPS, DELTA, p, strategy=mfnoise.bsr(30, 2), **AMP)
    with pytest.raises(ValueError, match="unknown accountant"):
        mfnoise.calibrate(EPS, DELTA, accountant="moments")
    with pytest.raises(ValueError, match="delta"):
        mfnoise.calibrate(EPS, 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        mfnoise.calibrate(0.0, DELTA)
    with pytest.raises(ValueError, match="pld_discretization must be positive"):
        mfnoise.calibrate(EPS, DELTA, pld_discretization=0.0)
    with pytest.raises(ValueError, match="tol must be positive"):
        mfnoise.calibrate(EPS, DELTA, tol=0.0)
    with pytest.raises(ValueError, match="noise_multiplier must be non-negative"):
        mfnoise.epsilon(-1.0, DELTA)


# -- command line --------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = cli_main(["calibrate", "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


def test_cli_calibrate(capsys, tmp_path):
    code, out = run_cli(capsys, "--epsilon", "8", "--delta", "1e-5", "--n", "100", "--epochs", "4",
                        "--accountant", "rdp")
    assert code == 0
    assert {"noise_multiplier", "epsilon", "delta", "accountant", "achieved_epsilon"} <= out.keys()
    assert out["noise_multiplier"] == pytest.approx(
        direct(dp_accounting.GaussianDpEvent, acc=dp_accounting.rdp.RdpAccountant), abs=2e-6)
    assert out["max_participations"] == 4 and out["min_sep"] == 25 and out["accountant"] == "rdp"

    path = mfnoise.bsr(100, 5).save(str(tmp_path / "bsr5.npz"))
    code, out = run_cli(capsys, "--epsilon", "8", "--delta", "1e-5", "--strategy", path, "--epochs", "20",
                        "--sampling", "cyclic-poisson", "--dataset-size", "1000",
                        "--batch-size", "50", "--accountant", "rdp")
    assert code == 0
    assert out["n"] == 100 and out["bands"] == 5 and out["family"] == "banded"
    assert out["rounds"] == 20 and out["sampling_probability"] == pytest.approx(0.25)
    assert out["round_noise_multiplier"] == pytest.approx(out["noise_multiplier"] * math.sqrt(20))
    assert out["achieved_epsilon"] <= 8
    direct_rdp = dp_accounting.rdp.RdpAccountant().compose(
        amplified(0.25, 20, out["noise_multiplier"] * math.sqrt(20))).get_epsilon(1e-5)
    assert direct_rdp <= 8


def test_cli_refuses_amplification(capsys, tmp_path):
    path = mfnoise.bsr(100, 6).save(str(tmp_path / "bsr6.npz"))
    code, out = run_cli(capsys, "--epsilon", "8", "--delta", "1e-5", "--n", "100", "--epochs", "20",
                        "--sampling", "cyclic-poisson", "--strategy", path, "--dataset-size", "1000",
                        "--batch-size", "50")
    assert code == 2
    assert "bands=6 > min_sep=5" in out["error"]
    # --bands alone is not enough to account an amplified run, and says what to pass instead
    code, out = run_cli(capsys, "--epsilon", "8", "--delta", "1e-5", "--n", "100", "--epochs", "20",
                        "--sampling", "cyclic-poisson", "--bands", "5", "--dataset-size", "1000",
                        "--batch-size", "50")
    assert code == 2
    assert "--bands 5 is not accepted" in out["error"] and "--strategy FILE" in out["error"]
    code, out = run_cli(capsys, "--epsilon", "8", "--delta", "1e-5", "--n", "100", "--epochs", "20",
                        "--sampling", "cyclic-poisson", "--dataset-size", "1000", "--batch-size", "50")
    assert code == 2
    assert "needs --strategy FILE" in out["error"]
