"""mfnoise: correlated-noise (DP-FTRL / matrix factorization) mechanisms for private training in JAX.

Importing mfnoise never changes global JAX flags: float64 work is scoped (numpy float64, or
``jax.enable_x64`` inside the optimizer), and noise runs in the parameters' dtype.
"""

__version__ = "0.1.0"

from mfnoise import workloads
from mfnoise.participation import Participation
from mfnoise.sensitivity import Sensitivity
from mfnoise.strategy import Strategy
from mfnoise.identity import Identity
from mfnoise.dense import Dense
from mfnoise.banded import Banded
from mfnoise.toeplitz import Toeplitz
from mfnoise.blt import BLT
from mfnoise.inverse_toeplitz import InverseToeplitz
from mfnoise.closed_forms import bisr, bsr, sqrt_toeplitz
from mfnoise.error import evaluate, max_error, rmse
from mfnoise.io import load
# Imported eagerly: a lazily imported submodule named like the function would shadow it.
from mfnoise.optimize import optimize

# Heavier parts load on first use, so `import mfnoise` stays quick and each part stays optional.
_LAZY = {
    "dp_aggregate": ("mfnoise.transforms", "dp_aggregate"),
    "correlated_noise": ("mfnoise.transforms", "correlated_noise"),
    "mf_sgd": ("mfnoise.transforms", "mf_sgd"),
    "clipped_grad": ("mfnoise.clipping", "clipped_grad"),
    "per_example_grads": ("mfnoise.per_example", "per_example_grads"),
    "calibrate": ("mfnoise.accounting", "calibrate"),
    "epsilon": ("mfnoise.accounting", "epsilon"),
    "batching": ("mfnoise.batching", None),
    "noise": ("mfnoise.noise", None),
    "library": ("mfnoise.library", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'mfnoise' has no attribute {name!r}")


__all__ = [
    "BLT",
    "Banded",
    "Dense",
    "Identity",
    "InverseToeplitz",
    "Participation",
    "Sensitivity",
    "Strategy",
    "Toeplitz",
    "bisr",
    "bsr",
    "evaluate",
    "load",
    "optimize",
    "max_error",
    "rmse",
    "sqrt_toeplitz",
    "workloads",
    *_LAZY,
]
