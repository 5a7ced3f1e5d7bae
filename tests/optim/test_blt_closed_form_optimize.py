"""``optimize`` of a BLT at n = 10^9 (closed forms end to end) and the buffers it reports."""

from __future__ import annotations

import math

import pytest

import mfnoise
from mfnoise import Participation
from mfnoise.core import workloads
from tests.strategies.test_blt_closed_form import _mp_sums


def test_optimize_at_n_1e9_returns_a_valid_blt_whose_numbers_agree_with_the_closed_forms():
    n = 10**9
    w = workloads.prefix_sum(n)
    s, r = mfnoise.optimize(w, Participation(n, 1, n), "blt", buffers=3, objective="max", progress=False)
    assize = s.buffers
    assert 1 <= assize <= 3 and s.n == n
    assert all(0 < t < 1 for t in s.theta) and all(o > 0 for o in s.omega)
    assert all(math.isfinite(x) for x in (r.rmse, r.max_error, r.sensitivity)) and r.sensitivity_exact
    fro, last, sens2 = _mp_sums(s, 1.0, [1.0])  # 50-digit sums of the returned strategy
    assert r.sensitivity == pytest.approx(math.sqrt(float(sens2)), rel=1e-12)
    assert r.max_error == pytest.approx(math.sqrt(float(sens2 * last)), rel=1e-9)
    assert r.rmse == pytest.approx(math.sqrt(float(sens2 * fro) / n), rel=1e-9)
    assert r.max_error == pytest.approx(math.exp(r.loss), rel=1e-9)  # the loss is the same closed form
    assert w.__dict__.get("_coeffs") is None  # no coefficient of the workload was built


def test_fewer_buffers_kept_than_requested_are_reported():
    n = 16
    s, r = mfnoise.optimize("prefix", Participation(n, 1, n), "blt", buffers=8, objective="rmse", progress=False)
    assert r.buffers_requested == 8 and r.buffers_kept == s.buffers == s.params()["buffers"]
    assert s.buffers < 8  # at n = 16 the optimum holds fewer buffers (cancelled pairs)
    assert r.buffers_dropped == "cancelled"
    message = f"{s.buffers} of 8 requested buffers kept: the others cancelled"
    assert r.buffers_message == message and message in r.summary()
    d = r.to_dict()
    assert d["buffers_requested"] == 8 and d["buffers_kept"] == s.buffers and d["buffers_message"] == message


def test_all_buffers_kept_gives_no_message_and_other_families_no_buffer_fields():
    n = 64
    s, r = mfnoise.optimize("prefix", Participation(n, 1, n), "blt", buffers=1, progress=False)
    assert r.buffers_requested == r.buffers_kept == s.buffers == 1 and r.buffers_message is None
    _, t = mfnoise.optimize("prefix", Participation(n, 1, n), "toeplitz", bands=4, progress=False)
    assert t.buffers_requested is None and t.buffers_message is None
    _, default = mfnoise.optimize("prefix", Participation(n, 1, n), "blt", progress=False)
    assert default.buffers_requested == 4  # the family default when buffers is None
