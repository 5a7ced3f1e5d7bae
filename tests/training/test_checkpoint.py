"""Checkpoints (mfnoise/training/checkpoint.py): a killed run resumed from its last checkpoint is
bit-identical to one that never stopped, a crash mid-save loses nothing, and a checkpoint of
another plan is refused naming what differs (docs/design.md, "Noise as it runs": z_t is a pure
function of (key, t, state)).

The killed runs are real processes killed with SIGKILL (tests/training/checkpoint_worker.py); the
reference is the same training loop run here from scratch objects, without checkpoints.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is not installed (pip install 'mfnoise[checkpoint]')")

import checkpoint_worker as worker  # noqa: E402

from mfnoise.training.checkpoint import Checkpointer  # noqa: E402

WORKER = pathlib.Path(__file__).with_name("checkpoint_worker.py")


def _run_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300)


def _assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def _assert_bit_identical(saved: pathlib.Path, params, state) -> None:
    got = np.load(saved)
    want = worker.leaves(params, state)
    assert sorted(got.files) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name


@pytest.fixture(scope="module")
def uninterrupted():
    """family -> (params, opt_state) of the run that never stopped (no checkpoints, this process)."""
    return {family: worker.train(worker.setup(family), None) for family in ("banded", "blt")}


def test_killed_run_resumes_bit_identical(tmp_path, uninterrupted):
    """Banded (BandMF recurrence, 3 state arrays) killed after update 14, resumed from step 12."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.npz"
    _assert_killed(_run_worker("banded", str(ckpt), str(tmp_path / "unused.npz"), "--kill-at", "14"))
    run = worker.setup("banded")
    with Checkpointer(ckpt, fingerprint=run["fingerprint"]) as c:
        assert c.steps() == [8, 12]  # max_to_keep=2; updates 13 and 14 were lost with the process
        restored = c.restore(run["params"], run["tx"].init(run["params"]))
    assert restored.step == 12 and restored.batch_seed == worker.SEED
    buffers = jax.tree.leaves(restored.opt_state[0].noise.buffers)
    assert buffers and all(np.any(np.asarray(b) != 0) for b in buffers)  # the noise state is live, not zeros
    proc = _run_worker("banded", str(ckpt), str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_bit_identical(out, *uninterrupted["banded"])


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    """BLT killed while writing checkpoint 8: only step 4 is complete, and resuming from it is exact."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.npz"
    _assert_killed(_run_worker("blt", str(ckpt), str(tmp_path / "unused.npz"), "--kill-in-save", "8"))
    assert any(name.startswith("8.") for name in os.listdir(ckpt))  # the unfinished step 8 is on disk
    run = worker.setup("blt")
    with Checkpointer(ckpt, fingerprint=run["fingerprint"]) as c:
        assert c.steps() == [4]
    proc = _run_worker("blt", str(ckpt), str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_bit_identical(out, *uninterrupted["blt"])


def _state_after(run, steps: int):
    params, state = run["params"], run["tx"].init(run["params"])
    for t in range(steps):
        params, state = run["step"](params, state, *run["batches"].batch(t))
    return params, state


@pytest.fixture(scope="module")
def banded_run():
    run = worker.setup("banded")
    return run, _state_after(run, 2)


def test_restore_refuses_another_plan_naming_the_difference(tmp_path, banded_run):
    run, (params, state) = banded_run
    with Checkpointer(tmp_path, fingerprint=run["fingerprint"], description=run["description"]) as c:
        c.save(2, params, state, batch_seed=worker.SEED)
    other = dict(run["description"], batches=dict(run["description"]["batches"], dataset_size=201))
    with Checkpointer(tmp_path, fingerprint="f" * 64, description=other) as c:
        with pytest.raises(ValueError, match=r"fingerprint .*batches\.dataset_size: saved 200, now 201"):
            c.restore(params, state)
    with Checkpointer(tmp_path, fingerprint="e" * 64) as c:  # no description: still refused, says how to see why
        with pytest.raises(ValueError, match="give both runs a description"):
            c.restore(params, state)


def test_restore_gives_the_saved_arrays(tmp_path, banded_run):
    run, (params, state) = banded_run
    with Checkpointer(tmp_path, fingerprint=run["fingerprint"]) as c:
        c.save(2, params, state, batch_seed=5)
        fresh = run["tx"].init(run["params"])
        restored = c.restore(run["params"], fresh)
        assert c.metadata()["fingerprint"] == run["fingerprint"]
    assert restored.step == 2 and restored.batch_seed == 5
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves((restored.params, restored.opt_state)), jax.tree.leaves((params, state))):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_save_refuses_a_step_that_is_not_the_noise_step(tmp_path, banded_run):
    run, (params, state) = banded_run
    with Checkpointer(tmp_path, fingerprint=run["fingerprint"]) as c:
        with pytest.raises(ValueError, match="step=3 but the noise generator's own step counter is 2"):
            c.save(3, params, state, batch_seed=0)
        with pytest.raises(ValueError, match="no correlated-noise state"):
            c.save(2, params, {"not": np.zeros(2)}, batch_seed=0)
        assert c.steps() == []


def test_bad_arguments_are_named(tmp_path, banded_run):
    run, (params, state) = banded_run
    with pytest.raises(TypeError, match="fingerprint must be a non-empty string"):
        Checkpointer(tmp_path, fingerprint="")
    with pytest.raises(ValueError, match="max_to_keep must be a positive int, got 0"):
        Checkpointer(tmp_path, fingerprint="a", max_to_keep=0)
    with Checkpointer(tmp_path, fingerprint="a") as c:
        with pytest.raises(TypeError, match="step must be a non-negative int, got True"):
            c.save(True, params, state, batch_seed=0)
        with pytest.raises(ValueError, match="batch_seed must be a non-negative int, got -1"):
            c.save(2, params, state, batch_seed=-1)
        with pytest.raises(ValueError, match="no complete checkpoint in"):
            c.restore(params, state)
        c.save(2, params, state, batch_seed=0)
        with pytest.raises(ValueError, match=r"no complete checkpoint of step 4 .*\[2\]"):
            c.restore(params, state, step=4)


def test_import_mfnoise_loads_no_optional_dependency():
    code = ("import sys, mfnoise, mfnoise.training.checkpoint; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('orbax', 'flax', 'keras')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
