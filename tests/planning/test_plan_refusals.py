"""Everything a plan hands out carries its fingerprint, and what does not match is refused, saying
what differs (docs/design.md, "Plan"); amplified accounting cannot be paired with fixed batches."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
import pytest

import mfnoise
from mfnoise.planning import Plan
from mfnoise.training import accounting


@pytest.fixture(scope="module")
def amplified() -> Plan:
    return mfnoise.plan(2.0, 1e-5, dataset_size=1221, batch_size=64, epochs=8, mechanism="bandmf",
                        sampling="cyclic-poisson")


@pytest.fixture(scope="module")
def fixed() -> Plan:
    return mfnoise.plan(2.0, 1e-5, dataset_size=1221, batch_size=64, epochs=8, mechanism="bandmf", sampling="cyclic")


def test_amplified_noise_with_fixed_cyclic_batches_cannot_be_made(amplified, fixed):
    """The issue's example: at epsilon 2 fixed cyclic batches need z = 1.99; amplified accounting
    gives far less, which is private only with Poisson batches."""
    z_fixed = accounting.calibrate(2.0, 1e-5, fixed.participation, pld_discretization=fixed.pld_discretization)
    assert fixed.noise_multiplier == pytest.approx(z_fixed, rel=1e-6)
    assert z_fixed == pytest.approx(1.99, abs=0.01)
    assert amplified.noise_multiplier < 0.8 * z_fixed
    assert amplified.batches(0).identity.sampler == "cyclic-poisson"
    # every way of pairing the amplified z with fixed cyclic batches is refused
    with pytest.raises(ValueError, match="does not match its batches|above its target"):
        dataclasses.replace(amplified, sampling="cyclic")
    with pytest.raises(ValueError, match="does not match its batches|above its target"):
        dataclasses.replace(fixed, noise_multiplier=amplified.noise_multiplier)
    with pytest.raises(ValueError, match="above its target"):
        dataclasses.replace(fixed, noise_multiplier=amplified.noise_multiplier,
                            epsilon=accounting.epsilon(amplified.noise_multiplier, 1e-5, fixed.participation,
                                                       pld_discretization=fixed.pld_discretization))
    saved = json.loads(amplified.to_json())
    saved["sampling"] = "cyclic"
    with pytest.raises(ValueError, match="does not match its batches|above its target"):
        Plan.from_dict(saved)


def test_a_json_round_trip_is_the_same_plan_and_an_edit_is_refused(amplified, tmp_path):
    again = Plan.from_json(amplified.to_json())
    assert again.fingerprint == amplified.fingerprint
    assert jnp.array_equal(again.strategy.dense(), amplified.strategy.dense())
    path = amplified.save(tmp_path / "plan.json")
    assert mfnoise.planning.load(path).fingerprint == amplified.fingerprint
    saved = json.loads(amplified.to_json())
    saved["l2_clip_norm"] = 2.0  # accounting unchanged, but the fingerprint no longer matches
    with pytest.raises(ValueError, match="l2_clip_norm: plan 2.0, the saved plan 1.0"):
        Plan.from_dict(saved)
    saved = json.loads(amplified.to_json())
    saved["strategy"]["arrays"]["columns"]["float64_base64"] = \
        json.loads(amplified.to_json())["strategy"]["arrays"]["columns"]["float64_base64"][::-1]
    with pytest.raises(ValueError):
        Plan.from_dict(saved)


def test_a_batch_or_batches_of_another_plan_are_refused(amplified):
    other = dataclasses.replace(amplified, dataset_size=1222,
                                epsilon=accounting.epsilon(amplified.noise_multiplier, 1e-5, amplified.participation,
                                                           pld_discretization=amplified.pld_discretization,
                                                           sampling="cyclic-poisson", dataset_size=1222,
                                                           batch_size=64, strategy=amplified.strategy))
    batch = next(iter(other.batches(0)))
    with pytest.raises(ValueError, match="dataset_size: plan 1221, the batch 1222"):
        amplified.check_batch(batch)
    with pytest.raises(ValueError, match="dataset_size: plan 1221, the batches 1222"):
        amplified.check_batches(other.batches(0))
    amplified.check_batches(amplified.batches(5))
    amplified.check_batch(next(iter(amplified.batches(5))))
    # the right fingerprint on batches that are not the plan's for their seed
    mine = amplified.batches(5)
    forged = dataclasses.replace(mine, batch_plan=amplified.batches(6).batch_plan)
    with pytest.raises(ValueError, match="seed: saved 5, now 6"):
        amplified.check_batches(forged)


def test_a_state_of_another_plan_is_refused(amplified, fixed):
    params = {"w": jnp.zeros(3)}
    tx_a = amplified.transform(optax.sgd(0.1), key=jax.random.key(0))
    tx_f = fixed.transform(optax.sgd(0.1), key=jax.random.key(0))
    state_f = tx_f.init(params)
    grads = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="the optimizer state comes from a different plan: .*sampling: plan "
                                         "'cyclic-poisson', the optimizer state 'cyclic'"):
        tx_a.update(grads, state_f, params)
    with pytest.raises(ValueError, match="sampling: plan 'cyclic-poisson'"):
        amplified.check_state(state_f)
    amplified.check_state(tx_a.init(params))
    fixed.check_resume(state_f, fixed.batches(1))
    with pytest.raises(ValueError, match="no PlanState"):
        amplified.check_state(optax.sgd(0.1).init(params))


def test_a_strategy_of_another_plan_is_refused(amplified, fixed):
    amplified.check_strategy(Plan.from_json(amplified.to_json()).strategy)
    with pytest.raises(ValueError, match="params: plan"):
        amplified.check_strategy(fixed.strategy)
    with pytest.raises(ValueError, match="family: plan banded, given identity"):
        amplified.check_strategy(mfnoise.Identity(amplified.steps))


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        mfnoise.plan(1.0, 1e-5, dataset_size=100, batch_size=10)
    with pytest.raises(ValueError, match="mechanism must be 'auto' or one of .* got 'dpsgd'"):
        mfnoise.plan(1.0, 1e-5, dataset_size=100, batch_size=10, epochs=1, mechanism="dpsgd")
    with pytest.raises(ValueError, match="batch_size=200 is larger than dataset_size=100"):
        mfnoise.plan(1.0, 1e-5, dataset_size=100, batch_size=200, epochs=1)
    with pytest.raises(ValueError, match="memory_budget=1000.0 needs params"):
        mfnoise.plan(1.0, 1e-5, dataset_size=100, batch_size=10, epochs=1, memory_budget=1e3)
    with pytest.raises(ValueError, match="delta must be in"):
        mfnoise.plan(1.0, 1.5, dataset_size=100, batch_size=10, epochs=1)
