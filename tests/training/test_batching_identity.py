"""Resuming a run: a batch plan's identity is saved, and a plan that differs from it is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

import mfnoise
from mfnoise.training import batching

from batching_reference import epochs, steps_by_example, violations

P = epochs(40, 4)  # b = 10


def plans() -> dict[str, batching.BatchPlan]:
    return {
        "cyclic": batching.cyclic_batches(1000, P, seed=3),
        "cyclic-poisson": batching.cyclic_poisson_batches(1000, P, 20, seed=3),
    }


@pytest.mark.parametrize("sampler", ["cyclic", "cyclic-poisson"])
def test_identity_names_the_inputs_and_round_trips_through_json(sampler, tmp_path):
    plan = plans()[sampler]
    ident = plan.identity
    assert (ident.sampler, ident.seed, ident.dataset_size, ident.participation) == (sampler, 3, 1000, P)
    if sampler == "cyclic":
        assert ident.batch_size is None and ident.sampling_probability == 1.0
    else:
        assert ident.batch_size == 20 and ident.sampling_probability == pytest.approx(20 * 10 / 1000)
    # the digest: sha256 of n, the dataset size, the batch sizes, then each batch's sorted examples
    batches: list[list[int]] = [[] for _ in range(P.n)]
    for e, steps in steps_by_example(plan.indices, plan.mask).items():
        for t in steps:
            batches[t].append(e)
    words = [P.n, 1000] + [len(x) for x in batches] + [e for x in batches for e in sorted(x)]
    h = hashlib.sha256(b"".join(int(w).to_bytes(8, "little", signed=True) for w in words))
    assert ident.digest == h.hexdigest() == plan.digest()
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(ident.to_dict()))
    saved = json.loads(path.read_text())
    assert batching.PlanIdentity.from_dict(saved) == ident
    rebuilt = plans()[sampler]
    rebuilt.check_resume(saved)  # the same inputs: passes
    rebuilt.check_resume(ident)
    again = batching.from_identity(saved)
    assert np.array_equal(again.indices, plan.indices) and np.array_equal(again.mask, plan.mask)


def test_a_changed_dataset_size_regroups_the_examples_and_is_refused():
    """Issue 10, item 10: the first half of the run with 1000 examples, the second with 1001. The
    examples are regrouped, so the union of the two halves breaks the schema; resumption names it."""
    first = batching.cyclic_batches(1000, P, seed=3)
    second = batching.cyclic_batches(1001, P, seed=3)
    half = P.n // 2
    first_wide = batching.pack(first, capacity=second.capacity)  # the same participations, padded
    indices = np.concatenate([first_wide.indices[:half], second.indices[half:]])
    mask = np.concatenate([first_wide.mask[:half], second.mask[half:]])
    both = violations(indices.tolist(), mask.tolist(), 1001, P)
    assert both.get("residue", 0) > 100, both  # most examples change residue class mid-run
    saved = json.loads(json.dumps(first.identity.to_dict()))
    with pytest.raises(ValueError) as info:
        second.check_resume(saved)
    message = str(info.value)
    assert "dataset_size: saved 1000, now 1001" in message and "digest" in message
    assert "seed:" not in message and "participation:" not in message


@pytest.mark.parametrize("sampler", ["cyclic", "cyclic-poisson"])
def test_every_changed_field_is_named(sampler):
    saved = plans()[sampler].identity.to_dict()
    other_seed = {"cyclic": batching.cyclic_batches(1000, P, seed=4),
                  "cyclic-poisson": batching.cyclic_poisson_batches(1000, P, 20, seed=4)}[sampler]
    with pytest.raises(ValueError, match="seed: saved 3, now 4") as info:
        other_seed.check_resume(saved)
    assert "dataset_size:" not in str(info.value)
    other_schema = {"cyclic": batching.cyclic_batches(1000, epochs(40, 2), seed=3),
                    "cyclic-poisson": batching.cyclic_poisson_batches(1000, epochs(40, 2), 20, seed=3)}[sampler]
    with pytest.raises(ValueError, match="participation: saved cyclic.n=40, epochs=4, min_sep=10."):
        other_schema.check_resume(saved)
    if sampler == "cyclic-poisson":
        other_batch = batching.cyclic_poisson_batches(1000, P, 25, seed=3)
        with pytest.raises(ValueError, match="batch_size: saved 20, now 25") as info:
            other_batch.check_resume(saved)
        assert "sampling_probability: saved 0.2, now 0.25" in str(info.value)
    other_sampler = plans()["cyclic" if sampler == "cyclic-poisson" else "cyclic-poisson"]
    with pytest.raises(ValueError, match=f"sampler: saved {sampler}, now"):
        other_sampler.check_resume(saved)


def test_same_inputs_with_a_different_plan_are_refused():
    """Equal sampler inputs but other participations (a sampler changed between versions)."""
    plan = plans()["cyclic"]
    saved = {**plan.identity.to_dict(), "digest": "0" * 64}
    with pytest.raises(ValueError, match="digest: saved 0+, now .*different mfnoise version"):
        plan.check_resume(saved)
    with pytest.raises(ValueError, match="digest"):
        batching.from_identity(saved)


def test_digest_ignores_padding_and_slot_order_but_not_a_change():
    plan = plans()["cyclic-poisson"]
    packed = batching.pack(plan)
    wide = batching.pack(plan, capacity=plan.capacity + 5)
    assert packed.digest() == wide.digest() == plan.identity.digest
    packed.check_resume(plan.identity.to_dict())
    mask = plan.mask.copy()
    t, j = np.argwhere(mask)[0]
    mask[t, j] = False  # one participation removed
    tampered = dataclasses.replace(plan, mask=mask)
    assert tampered.digest() != plan.digest()
    with pytest.raises(ValueError, match="no longer match its identity"):
        tampered.check_resume(plan.identity.to_dict())


def test_refusals_of_saved_identities():
    plan = plans()["cyclic"]
    saved = plan.identity.to_dict()
    with pytest.raises(ValueError, match=r"missing fields \['seed'\]"):
        batching.PlanIdentity.from_dict({k: v for k, v in saved.items() if k != "seed"})
    with pytest.raises(ValueError, match=r"unknown fields \['extra'\]"):
        batching.PlanIdentity.from_dict({**saved, "extra": 1})
    with pytest.raises(ValueError, match="unknown sampler 'shuffle'"):
        batching.PlanIdentity.from_dict({**saved, "sampler": "shuffle"})
    with pytest.raises(ValueError, match="dataset_size must be a positive integer, got 0"):
        batching.PlanIdentity.from_dict({**saved, "dataset_size": 0})
    with pytest.raises(TypeError, match="must be a dict"):
        batching.PlanIdentity.from_dict([1, 2])
    hand = batching.BatchPlan(indices=plan.indices, mask=plan.mask, dataset_size=1000, min_sep=10,
                              sampling="cyclic", sampling_probability=1.0, groups=plan.groups)
    with pytest.raises(ValueError, match="has no identity"):
        hand.check_resume(saved)
    with pytest.raises(ValueError, match="needs its batch_size"):
        batching.from_identity({**plans()["cyclic-poisson"].identity.to_dict(), "batch_size": None})


def test_min_sep_schema_identity():
    p = mfnoise.Participation(30, 2, 10)
    plan = batching.cyclic_poisson_batches(500, p, 10, seed=1)
    saved = json.loads(json.dumps(plan.identity.to_dict()))
    assert saved["participation"] == {"n": 30, "max_participations": 2, "min_sep": 10, "kind": "min-sep"}
    batching.from_identity(saved).check_resume(saved)
    with pytest.raises(ValueError, match="participation: saved min-sep.n=30, max_participations=2"):
        batching.cyclic_poisson_batches(500, mfnoise.Participation(30, 3, 10), 10, seed=1).check_resume(saved)
