"""A small private training run for tests/training/test_checkpoint.py, run in fresh processes.

``python checkpoint_worker.py FAMILY DIR OUT.npz [--kill-at S | --kill-in-save S] [--resume]``
trains a linear regression on fixed cyclic batches with correlated noise (a banded or BLT strategy,
momentum SGD) and saves a checkpoint every ``EVERY`` steps. ``--kill-at S`` kills the process
(SIGKILL, no cleanup) right after update S - 1, before any save of that step; ``--kill-in-save S``
kills it while it writes the checkpoint of step S (when orbax starts on the JSON metadata item);
``--resume`` starts from the newest checkpoint in DIR instead of step 0. The final params and
optimizer state leaves go to OUT.npz.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mfnoise
from mfnoise.training.checkpoint import Checkpointer

DATASET, BATCH, EPOCHS, EVERY, SEED = 200, 20, 2, 4, 3


def setup(family: str) -> dict[str, Any]:
    p = mfnoise.batching.schedule(dataset_size=DATASET, batch_size=BATCH, epochs=EPOCHS)  # n = 20, min_sep 10
    strategy = {"banded": lambda: mfnoise.bsr(p.n, bands=4),
                "blt": lambda: mfnoise.BLT(np.array([0.9, 0.4]), np.array([0.3, 0.1]), p.n)}[family]()
    batches = mfnoise.batching.cyclic_batches(DATASET, p, seed=SEED)
    assert batches.identity is not None
    description = {"batches": batches.identity.to_dict(), "strategy": family,
                   "strategy_sha256": hashlib.sha256(np.ascontiguousarray(strategy.dense()).tobytes()).hexdigest()}
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(DATASET, 5)), jnp.float32)
    y = x @ jnp.arange(5.0, dtype=jnp.float32)
    tx = optax.chain(
        mfnoise.dp_aggregate(strategy, l2_clip_norm=1.0, noise_multiplier=0.7, key=jax.random.key(11),
                             participation=p, expected_batch_size=BATCH),
        optax.sgd(0.05, momentum=0.9),
    )

    def loss_fn(params, example):
        xb, yb, weight = example
        return weight * (xb @ params["w"] + params["b"] - yb) ** 2

    clipped = mfnoise.clipped_grad(loss_fn, l2_clip_norm=1.0)

    @jax.jit
    def step(params, state, indices, mask):
        updates, state = tx.update(clipped(params, (x[indices], y[indices], mask.astype(x.dtype))), state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.zeros(5, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return {"tx": tx, "step": step, "params": params, "batches": batches, "fingerprint": fingerprint,
            "description": description, "n": p.n}


def train(run: dict[str, Any], directory: str | None, kill_at: int | None = None, resume: bool = False):
    """(params, opt_state) at the end of the run, saving every EVERY steps when ``directory`` is given."""
    params, state, start = run["params"], run["tx"].init(run["params"]), 0
    ckpt = None if directory is None else Checkpointer(directory, fingerprint=run["fingerprint"],
                                                       description=run["description"], max_to_keep=2)
    if resume:
        assert ckpt is not None
        restored = ckpt.restore(params, state)
        assert restored.batch_seed == SEED
        params, state, start = restored.params, restored.opt_state, restored.step
    for t in range(start, run["n"]):
        indices, mask = run["batches"].batch(t)
        params, state = run["step"](params, state, indices, mask)
        if kill_at is not None and t + 1 == kill_at:
            jax.block_until_ready(params)
            os.kill(os.getpid(), signal.SIGKILL)
        if ckpt is not None and (t + 1) % EVERY == 0:
            ckpt.save(t + 1, params, state, batch_seed=SEED)
    if ckpt is not None:
        ckpt.close()
    mfnoise.noise.check(state)
    return params, state


def kill_in_save(step: int) -> None:
    """SIGKILL the process when orbax writes the JSON metadata of checkpoint ``step`` (after its arrays)."""
    import orbax.checkpoint as ocp

    handler = ocp.handlers.JsonCheckpointHandler
    original = handler.async_save

    async def save(self, directory, *args, **kwargs):
        if str(step) in os.path.basename(os.path.dirname(str(directory))).split("."):
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, directory, *args, **kwargs)

    handler.async_save = save


def leaves(params: Any, state: Any) -> dict[str, np.ndarray]:
    return {f"leaf{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves((params, state)))}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("family")
    ap.add_argument("directory")
    ap.add_argument("out")
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--kill-in-save", type=int)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    if a.kill_in_save is not None:
        kill_in_save(a.kill_in_save)
    params, state = train(setup(a.family), a.directory, a.kill_at, a.resume)
    np.savez(a.out, **leaves(params, state))


if __name__ == "__main__":
    main(sys.argv[1:])
