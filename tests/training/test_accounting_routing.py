"""Routing of epsilon / calibrate / explain from the strategy (mfnoise.training.accounting): the
exact reductions equal dp-accounting's own results computed here directly; refusals say why."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

import mfnoise
from mfnoise.core.participation import Participation
from mfnoise.strategies import closed_forms
from mfnoise.strategies.dense import Dense
from mfnoise.training import accounting


def _pld_eps(event, delta):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(event).get_epsilon(delta)


def test_poisson_identity_is_poisson_dp_sgd():
    n, d, m, z, delta = 40, 1000, 10, 0.9, 1e-5
    p = Participation(n, n, 1)
    got = accounting.explain(z, delta, p, sampling="poisson", dataset_size=d, batch_size=m,
                             strategy=mfnoise.Identity(n))
    # mfnoise scales the noise by sens(I, p) = sqrt(n): each DP-SGD round has noise multiplier z sqrt(n)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(m / d, dp_accounting.GaussianDpEvent(z * math.sqrt(n))), n)
    assert got.epsilon == pytest.approx(_pld_eps(event, delta), rel=1e-12)
    assert (got.theorem, got.provable) == ("poisson-dpsgd", True)
    assert accounting.epsilon(z, delta, p, sampling="poisson", dataset_size=d, batch_size=m,
                              strategy=mfnoise.Identity(n)) == got.epsilon


def test_poisson_identity_calibration_is_dp_accountings():
    n, d, m, delta = 40, 1000, 10, 1e-5
    p = Participation(n, n, 1)
    z = accounting.calibrate(2.0, delta, p, sampling="poisson", dataset_size=d, batch_size=m,
                             strategy=mfnoise.Identity(n))

    def direct(zz):
        return _pld_eps(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(m / d, dp_accounting.GaussianDpEvent(zz * math.sqrt(n))), n), delta)

    assert direct(z) <= 2.0 < direct(z * (1 - 1e-4))


def test_cyclic_poisson_banded_is_amplified_bandmf():
    n, b, d, m, z, delta = 12, 3, 600, 20, 0.7, 1e-5
    p = Participation.epochs(n, n // b) if hasattr(Participation, "epochs") else None
    s = closed_forms.bsr(n, b)  # column-normalised banded, bands = b = min_sep
    got = accounting.explain(z, delta, p, sampling="cyclic-poisson", dataset_size=d, batch_size=m, strategy=s)
    cols = np.linalg.norm(s.dense(), axis=0)
    rounds = n // b
    # column-normalised with bands <= min_sep: one example's columns have disjoint supports, so
    # sens = sqrt(rounds) * column norm and the per-round noise multiplier is z sqrt(rounds) / margin
    margin = 1.0 if s.runs_exactly(np.float32) else accounting.COLUMN_NORM_MARGIN
    assert np.allclose(cols, cols[0])
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        m / (d / b), dp_accounting.GaussianDpEvent(z * math.sqrt(rounds) / margin)), rounds)
    assert got.epsilon == pytest.approx(_pld_eps(event, delta), rel=1e-6)
    assert got.theorem == "amplified-bandmf"


def test_poisson_toeplitz_goes_to_mmcc():
    n = 8
    p = Participation(n, n, 1)
    s = closed_forms.sqrt_toeplitz(n)
    got = accounting.explain(1.0, 1e-5, p, sampling="poisson", dataset_size=100, batch_size=5, strategy=s)
    assert (got.theorem, got.provable) == ("mmcc", True)
    assert "Privacy Amplification for Matrix Mechanisms" in got.paper
    unamplified = accounting.epsilon(1.0, 1e-5, p, strategy=s)
    assert 0 < got.epsilon < unamplified  # q = 0.05 amplifies


def test_refusals_say_why():
    n = 4
    p = Participation(n, n, 1)
    neg = Dense(np.array([[1.0, 0, 0, 0], [-0.3, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    with pytest.raises(ValueError, match="negative"):
        accounting.epsilon(1.0, 1e-5, p, sampling="poisson", dataset_size=100, batch_size=5, strategy=neg)
    with pytest.raises(ValueError, match=r"Participation\(n, n, 1\)"):
        accounting.epsilon(1.0, 1e-5, Participation.single(n), sampling="poisson", dataset_size=100,
                           batch_size=5, strategy=mfnoise.Identity(n))
    with pytest.raises(ValueError, match="2602.09338"):
        accounting.epsilon(1.0, 1e-5, p, sampling="b-min-sep", strategy=mfnoise.Identity(n))
    with pytest.raises(ValueError, match="provable"):
        accounting.calibrate(1.0, 1e-5, p, sampling="balls-in-bins", strategy=mfnoise.Identity(n))
    with pytest.raises(ValueError, match="unknown sampling"):
        accounting.explain(1.0, 1e-5, p, sampling="shuffle")


def _rounded_toeplitz(coeffs, n, realised_coeffs):
    """A Toeplitz strategy whose float32 generator runs other coefficients (as a rounded C' would)."""
    import dataclasses

    from mfnoise.strategies.toeplitz import Toeplitz

    @dataclasses.dataclass(frozen=True)
    class Rounded(Toeplitz):
        def realised(self, dtype):
            if np.dtype(dtype) == np.float32:
                return Toeplitz(np.asarray(realised_coeffs, float), n)
            return self

    return Rounded(np.asarray(coeffs, float), n)


def test_mmcc_prices_what_the_generator_runs():
    """The release is C' G + Z with C' = strategy.realised(dtype): MMCC prices the entrywise maximum
    of C and C' (its pair is monotone in C's entries), not C with a fixed margin."""
    from mfnoise.strategies.toeplitz import Toeplitz
    from mfnoise.training import mmcc

    n, z, delta, d, m = 6, 1.0, 1e-5, 100, 5
    p = Participation(n, n, 1)
    c = np.array([1.0, 0.5, 0.375, 0.3125, 0.2734, 0.2461])
    real = c * np.array([1, 1, 1.3, 1, 0.99, 1])  # one coefficient 30% up, one 1% down
    s = _rounded_toeplitz(c, n, real)
    got = accounting.explain(z, delta, p, sampling="poisson", dataset_size=d, batch_size=m, strategy=s)
    sigma = z * float(s.sensitivity(p).value)
    expect = mmcc.epsilon(Toeplitz(np.maximum(c, real), n), sigma, delta, m / d)
    assert expect.toeplitz and got.epsilon == pytest.approx(expect.epsilon, rel=1e-9)
    assert got.epsilon > mmcc.epsilon(Toeplitz(c, n), sigma, delta, m / d).epsilon
    neg = _rounded_toeplitz(c, n, c * np.array([1, 1, 1, 1, 1, -1e-9]))
    with pytest.raises(ValueError, match=r"float32 realisation.*c_5"):
        accounting.epsilon(z, delta, p, sampling="poisson", dataset_size=d, batch_size=m, strategy=neg)


def test_all_steps_sensitivity_is_the_strategys_from_below():
    """MMCC's noise scale ||C 1|| (C >= 0) equals each family's own sens(C, Participation(n, n, 1))
    to rounding, never above it."""
    from mfnoise.strategies.blt import BLT
    from mfnoise.training import mmcc

    n = 40
    p = Participation(n, n, 1)
    for s in (closed_forms.bsr(n, 6), closed_forms.bisr(n, 4), closed_forms.sqrt_toeplitz(n),
              BLT(theta=np.array([0.99, 0.6]), omega=np.array([0.1, 0.2]), n=n), Dense(np.tril(np.ones((n, n))))):
        own = float(s.sensitivity(p).value)
        got = mmcc.all_steps_sensitivity(s)
        assert own * (1 - 1e-10) <= got <= own, (s.family, got, own)
