"""Shared by the front-end tests: one small plan (BandMF on fixed cyclic batches), built once."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

# Keras reads its backend once, at its first import: the Keras tests need JAX's.
if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "jax"
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402

import mfnoise  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATASET, BATCH, EPOCHS = 512, 32, 2  # 16 steps an epoch, 32 in all


@pytest.fixture(scope="session")
def small_plan():
    return mfnoise.plan(8.0, 1e-5, dataset_size=DATASET, batch_size=BATCH, epochs=EPOCHS, mechanism="bandmf",
                        sampling="cyclic", optimizer=("momentum", 0.9))


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as a module (the examples folder is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
