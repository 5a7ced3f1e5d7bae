"""Checkpoints of a private training run (orbax-checkpoint): kill it, resume it, get the same bits.

A checkpoint at step s holds what the run needs to go on as if it had never stopped:

* ``params`` and ``opt_state`` after s updates: the optimizer state includes the correlated-noise
  state (``mfnoise.training.transforms.DPAggregateState``: the generator's ``NoiseState``, its step
  counter and its (m, *param.shape) buffers, and the dropped-example count), so the noise of step s
  onwards is the noise the uninterrupted run adds: z_t is a pure function of (key, t, state)
  (docs/design.md, "Noise as it runs"; the key is not saved, the caller rebuilds the transform with it);
* the batch position: s (the next batch to run is batch s of the plan) and the batch seed;
* JSON metadata: the plan's fingerprint (and, if given, the plan's description), the format and
  the mfnoise version.

``Checkpointer(directory, fingerprint=plan.fingerprint)`` saves with ``save(step, params, opt_state,
batch_seed=...)`` and resumes with ``restore(params_like, opt_state_like)``; a checkpoint written
under another fingerprint (another strategy, participation schema, sampling, dataset size or seed)
is refused, naming what differs when both sides gave a description: the second half of the run
would put examples into steps the first half's sensitivity never allowed for. ``save`` also refuses
a step that is not the noise generator's own step counter (a batch position and a noise row that
disagree break the participation pattern the sensitivity was computed for), and ``restore`` checks
it again.

Atomicity is orbax's: a step is written into a temporary folder and renamed once complete (with a
``commit_success`` marker on file systems without atomic rename); a crash mid-save leaves the
previous checkpoints intact, and the unfinished folder is never offered for restore. Saving is
synchronous (``save`` returns once the step is on disk).

Public and private: a checkpoint holds the optimizer state, which holds private counts
(``DPAggregateState.nonfinite``) and the noise state (releasing the noise state with the params
would let anyone subtract the noise). Keep checkpoints as private as the data.

orbax-checkpoint is an optional dependency (``pip install 'mfnoise[checkpoint]'``): it is imported
when a ``Checkpointer`` is made, never by ``import mfnoise``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mfnoise._version import __version__
from mfnoise.training import noise as noise_lib

FORMAT = "mfnoise-checkpoint"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint.

    Attributes:
      step: s, the number of updates done: the next batch to run is batch s of the plan.
      params: the params after s updates, with the structure, shapes and dtypes of ``params_like``.
      opt_state: the optimizer state after s updates (noise state included), like ``opt_state_like``.
      batch_seed: the seed of the plan's batches.
      metadata: the JSON metadata (fingerprint, description, format, version, step, batch_seed).
    """

    step: int
    params: Any
    opt_state: Any
    batch_seed: int
    metadata: dict[str, Any]


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "mfnoise checkpoints need orbax-checkpoint: pip install 'mfnoise[checkpoint]' (or orbax-checkpoint)"
        ) from e
    return ocp


def _nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _noise_steps(opt_state: Any) -> list[int]:
    """The step counter of every noise generator state inside ``opt_state``."""
    return [int(jax.device_get(s.step)) for s in noise_lib._noise_states(opt_state)]


def _check_noise_step(opt_state: Any, step: int, what: str) -> None:
    steps = _noise_steps(opt_state)
    if not steps:
        raise ValueError(f"{what}: opt_state holds no correlated-noise state (no dp_aggregate / correlated_noise "
                         "transform): this checkpointer is for private training runs")
    wrong = sorted({t for t in steps if t != step})
    if wrong:
        raise ValueError(
            f"{what}: step={step} but the noise generator's own step counter is {wrong[0]}: the batch position and "
            "the noise row would disagree, which breaks the participation pattern the sensitivity was computed "
            "for (step counts the updates done, i.e. the next batch to run)"
        )


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'field: saved X, now Y' for every field (nested dicts flattened with dots) that differs."""
    out = []
    for name in sorted(set(saved) | set(now)):
        a, b = saved.get(name, "<absent>"), now.get(name, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name}: saved {a!r}, now {b!r}")
    return out


class Checkpointer:
    """Saves and restores (params, opt_state, batch position) under a plan fingerprint, with orbax.

    Args:
      directory: the folder of the run's checkpoints (one sub-folder per step; created if missing).
      fingerprint: the plan's fingerprint (``plan.fingerprint``, a non-empty string): a checkpoint
        written under another one is refused by ``restore``.
      description: optional JSON-ready dict of what the fingerprint digests (e.g. the plan's
        strategy digest, participation, sampling, dataset size, seed), saved with each step so that
        a refused restore can say which fields differ.
      max_to_keep: the newest checkpoints kept (older ones are deleted after a successful save).
    """

    def __init__(self, directory: str | os.PathLike[str], *, fingerprint: str,
                 description: Mapping[str, Any] | None = None, max_to_keep: int = 2) -> None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError(f"fingerprint must be a non-empty string (plan.fingerprint), got {fingerprint!r}")
        if description is not None and not isinstance(description, Mapping):
            raise TypeError(f"description must be a JSON-ready dict or None, got {type(description).__name__}")
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be a positive int, got {max_to_keep!r}")
        ocp = _orbax()
        self.directory = os.path.abspath(os.fspath(directory))
        self.fingerprint = fingerprint
        self.description = None if description is None else dict(description)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._manager.close()

    def steps(self) -> list[int]:
        """The steps with a complete checkpoint, oldest first."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, params: Any, opt_state: Any, *, batch_seed: int) -> None:
        """Write a checkpoint of the state after ``step`` updates (returns once it is on disk).

        ``step`` is the number of updates done, which must equal the noise generator's step counter
        in ``opt_state``; ``batch_seed`` is the seed of the plan's batches.
        """
        step = _nonneg_int("step", step)
        seed = _nonneg_int("batch_seed", batch_seed)
        _check_noise_step(opt_state, step, "save")
        noise_lib.check(opt_state)  # an exhausted generator's state is NaN noise: nothing to resume
        ocp = _orbax()
        meta = {"format": FORMAT, "version": VERSION, "mfnoise_version": __version__,
                "fingerprint": self.fingerprint, "description": self.description,
                "step": step, "batch_seed": seed}
        state = {"params": params, "opt_state": opt_state}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``step`` (default: the newest), read without the arrays."""
        step = self._step(step)
        ocp = _orbax()
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{self.directory}/{step} is not an mfnoise checkpoint (metadata {meta!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{self.directory}/{step} is an mfnoise checkpoint of format version "
                             f"{meta.get('version')!r}; this mfnoise reads version {VERSION}")
        return meta

    def restore(self, params_like: Any, opt_state_like: Any, step: int | None = None) -> Restored:
        """The checkpoint ``step`` (default: the newest), its arrays shaped like the ``*_like`` trees.

        ``params_like`` and ``opt_state_like`` give the structure, shapes and dtypes (e.g. fresh
        ``params`` and ``tx.init(params)`` of the same plan and optimizer); their values are not used.
        Raises ValueError when there is no checkpoint, when it was written under another fingerprint
        (naming the fields of the description that differ), or when its step and noise state disagree.
        """
        step = self._step(step)
        meta = self.metadata(step)
        if meta["fingerprint"] != self.fingerprint:
            saved = meta.get("description")
            diffs = _differences(saved, self.description) if saved and self.description else []
            detail = ("; it differs in " + "; ".join(diffs)) if diffs else \
                " (give both runs a description to see which fields differ)"
            raise ValueError(
                f"cannot resume from {self.directory}/{step}: it was written by a plan with fingerprint "
                f"{meta['fingerprint']}, this run's plan has fingerprint {self.fingerprint}{detail}. Resuming "
                "with another strategy, schema, sampling, dataset size or seed would break the privacy accounting"
            )
        ocp = _orbax()
        like = {"params": params_like, "opt_state": opt_state_like}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        _check_noise_step(state["opt_state"], meta["step"], f"restore of {self.directory}/{step}")
        return Restored(int(meta["step"]), state["params"], state["opt_state"], int(meta["batch_seed"]), meta)

    def _step(self, step: int | None) -> int:
        steps = self.steps()
        if step is None:
            if not steps:
                raise ValueError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        step = _nonneg_int("step", step)
        if step not in steps:
            raise ValueError(f"no complete checkpoint of step {step} in {self.directory} (it has steps {steps})")
        return step
