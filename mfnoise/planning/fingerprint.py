"""A plan's fingerprint: what the mechanism is made of, hashed, so that parts of different plans are refused.

The fingerprint is sha256 (hex) of the canonical JSON of ``Fingerprint.fields()``: the strategy's
own digest (``strategy_digest``: sha256 over its arrays, family and parameters, as
``mfnoise.strategies.files.digest`` computes for files), the participation schema, the sampler,
the dataset size, the batch size, the noise multiplier, the clip norm, the divisor
(``expected_batch_size``), delta, the accountant and, when not empty, the options the accountant
was run with (``accounting_options``: MMCC's for a Poisson plan; left out of the hash when empty, so
the fingerprints of plans without them are unchanged). A batch stream adds its seed and its
``PlanIdentity`` (``mfnoise.training.batching``), which already names every field of a batch plan.

Refusals say what differs: every fingerprint made in this process is remembered with its fields
(``known``), so a stranger's hex can be expanded into "dataset_size: plan 60000, state 59999"
whenever it came from a plan built here (the usual case: a resumed run rebuilds its plan).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from mfnoise.strategies.base import Strategy
from mfnoise.strategies.files import digest

FINGERPRINT_WORDS = 8  # 256 bits as uint32 words, the form a training state carries


def strategy_digest(strategy: Strategy) -> str:
    """sha256 (hex) of the strategy itself: ``files.digest`` of its float64 arrays with
    {"family", "params"} as metadata (no participation or workload: the same C, the same digest)."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in strategy.arrays().items()}
    meta = json.loads(json.dumps({"family": strategy.family, "params": strategy.params()}, default=_plain))
    return digest(arrays, meta)


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot fingerprint a {type(x).__name__}")


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The fields a plan's fingerprint hashes (see the module doc); ``hex`` is the fingerprint."""

    strategy_sha256: str
    family: str
    participation: dict
    sampling: str
    dataset_size: int
    batch_size: int
    noise_multiplier: float
    l2_clip_norm: float
    expected_batch_size: float
    delta: float
    accountant: str
    accounting_options: dict = dataclasses.field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not out["accounting_options"]:
            del out["accounting_options"]
        return out

    @property
    def hex(self) -> str:
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        out = hashlib.sha256(text.encode()).hexdigest()
        _KNOWN.setdefault(out, self)
        return out

    def differences(self, other: Fingerprint, mine: str = "plan", theirs: str = "other") -> list[str]:
        """One line per field that differs: "field: plan X, other Y"."""
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{k}: {mine} {a[k]!r}, {theirs} {b[k]!r}" for k in a if a[k] != b[k]]


_KNOWN: dict[str, Fingerprint] = {}


def known(hex_digest: str) -> Fingerprint | None:
    """The fields of a fingerprint made in this process, or None."""
    return _KNOWN.get(hex_digest)


def explain(expected: Fingerprint, found_hex: str, what: str) -> str:
    """Why ``what`` (fingerprint ``found_hex``) is not from the plan ``expected``: the fields that
    differ when that fingerprint is known here, else both hexes."""
    mine = expected.hex
    other = known(found_hex)
    if other is not None:
        diffs = expected.differences(other, "plan", what)
        if diffs:
            return f"{what} comes from a different plan: " + "; ".join(diffs)
    return (f"{what} comes from a different plan (fingerprint {found_hex[:16]}..., this plan's {mine[:16]}...); "
            "rebuild it from this plan")


def to_words(hex_digest: str) -> np.ndarray:
    """The 256-bit fingerprint as (8,) uint32, big-endian words (what a training state holds)."""
    if len(hex_digest) != 64:
        raise ValueError(f"a fingerprint is 64 hex digits, got {hex_digest!r}")
    return np.frombuffer(bytes.fromhex(hex_digest), dtype=">u4").astype(np.uint32)


def from_words(words: Any) -> str:
    """The hex fingerprint of ``to_words``' (8,) uint32 array."""
    w = np.asarray(words)
    if w.shape != (FINGERPRINT_WORDS,):
        raise ValueError(f"a state's fingerprint is ({FINGERPRINT_WORDS},) uint32 words, got shape {w.shape}")
    return w.astype(">u4").tobytes().hex()
