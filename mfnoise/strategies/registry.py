"""The family registry: family name -> strategy class, the one vocabulary of files, CLI, library and JSON.

Each family's module registers its class with the ``family`` decorator, so every family is
registered once ``mfnoise.strategies`` is imported (its ``__init__`` imports them all). Strategy
files (``mfnoise.strategies.io.load``), ``mfnoise verify`` and the command line look families up
here; nothing outside ``mfnoise/strategies/`` names a family (docs/design.md).
"""

from __future__ import annotations

from typing import TypeVar

from mfnoise.strategies.base import Strategy

FAMILIES: dict[str, type[Strategy]] = {}
"""Family name -> class, in registration order."""

_S = TypeVar("_S", bound=type[Strategy])


def family(cls: _S) -> _S:
    """Class decorator: registers ``cls`` under ``cls.family`` (a name registered twice is refused)."""
    name = cls.family
    if name in FAMILIES and FAMILIES[name] is not cls:
        raise ValueError(f"strategy family {name!r} is already registered by {FAMILIES[name].__name__}")
    FAMILIES[name] = cls
    return cls


def lookup(name: str) -> type[Strategy]:
    """The class of family ``name``, or a ValueError naming it and the known families."""
    if name not in FAMILIES:
        raise ValueError(f"unknown strategy family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
