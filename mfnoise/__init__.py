"""mfnoise: correlated-noise (DP-FTRL / matrix factorization) mechanisms for private training in JAX.

The package is layered (docs/design.md, "Architecture"): ``core`` (participation, workloads,
sensitivity) < ``strategies`` (the families, their errors and files) < ``optim`` (the offline
optimizer) and ``training`` (noise, clipping, transforms, batching, accounting) < ``library``,
``verify`` < ``demo``, ``auditing`` < ``cli``. The public names below are re-exported from where they live.

Importing mfnoise never changes global JAX flags: float64 work is scoped (numpy float64, or
``jax.enable_x64`` inside the optimizer), and noise runs in the parameters' dtype (or ``noise_dtype``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mfnoise._version import __version__ as __version__
from mfnoise.core import workloads
from mfnoise.core.participation import Participation
from mfnoise.core.sensitivity import Sensitivity
from mfnoise.core.workloads import Workload
from mfnoise.strategies import BLT, Banded, Dense, Identity, InverseBLT, InverseToeplitz, Strategy, Toeplitz
from mfnoise.strategies.closed_forms import bisr, bsr, sqrt_toeplitz
from mfnoise.strategies.error import evaluate, max_error, rmse
from mfnoise.strategies.io import load

# (__all__ below lists these names too, spelled out for type checkers.)
# Heavier parts load on first use, so `import mfnoise` stays quick and each part stays optional:
# name -> (module, attribute or None for the module itself).
_LAZY: dict[str, tuple[str, str | None]] = {
    "optimize": ("mfnoise.optim.solver", "optimize"),
    "OptimizeResult": ("mfnoise.optim.result", "OptimizeResult"),
    "dp_aggregate": ("mfnoise.training.transforms", "dp_aggregate"),
    "correlated_noise": ("mfnoise.training.transforms", "correlated_noise"),
    "mf_sgd": ("mfnoise.training.transforms", "mf_sgd"),
    "clipped_grad": ("mfnoise.training.clipping", "clipped_grad"),
    "ClippedSum": ("mfnoise.training.clipping", "ClippedSum"),
    "per_example_grads": ("mfnoise.training.per_example", "per_example_grads"),
    "calibrate": ("mfnoise.training.accounting", "calibrate"),
    "epsilon": ("mfnoise.training.accounting", "epsilon"),
    "NoiseGenerator": ("mfnoise.training.noise", "NoiseGenerator"),
    "batching": ("mfnoise.training.batching", None),
    "noise": ("mfnoise.training.noise", None),
    "accounting": ("mfnoise.training.accounting", None),
    "library": ("mfnoise.library", None),
    "verify": ("mfnoise.verify", None),
    "plan": ("mfnoise.planning.choose", "plan"),
    "planning": ("mfnoise.planning", None),
    "audit": ("mfnoise.auditing.api", "audit"),
    "auditing": ("mfnoise.auditing", None),
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from mfnoise import auditing, library, planning, verify  # noqa: F401
    from mfnoise.auditing.api import audit  # noqa: F401
    from mfnoise.optim.result import OptimizeResult  # noqa: F401
    from mfnoise.optim.solver import optimize  # noqa: F401
    from mfnoise.planning.choose import plan  # noqa: F401
    from mfnoise.training import accounting, batching, noise  # noqa: F401
    from mfnoise.training.accounting import calibrate, epsilon  # noqa: F401
    from mfnoise.training.clipping import ClippedSum, clipped_grad  # noqa: F401
    from mfnoise.training.noise import NoiseGenerator  # noqa: F401
    from mfnoise.training.per_example import per_example_grads  # noqa: F401
    from mfnoise.training.transforms import correlated_noise, dp_aggregate, mf_sgd  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'mfnoise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BLT",
    "Banded",
    "Dense",
    "Identity",
    "InverseBLT",
    "InverseToeplitz",
    "Participation",
    "Sensitivity",
    "Strategy",
    "Toeplitz",
    "Workload",
    "bisr",
    "bsr",
    "evaluate",
    "load",
    "max_error",
    "rmse",
    "sqrt_toeplitz",
    "workloads",
    "optimize",
    "OptimizeResult",
    "dp_aggregate",
    "correlated_noise",
    "mf_sgd",
    "clipped_grad",
    "ClippedSum",
    "per_example_grads",
    "calibrate",
    "epsilon",
    "NoiseGenerator",
    "batching",
    "noise",
    "accounting",
    "library",
    "verify",
    "plan",
    "planning",
    "audit",
    "auditing",
]
