"""Layer 1, the strategies: the ``Strategy`` base class (``base``), one module per family, the closed
forms, the errors of a strategy for a workload (``error``) and the strategy file format (``io``).

Every family is imported here, so the family registry ``base.FAMILIES`` is complete whenever any
strategy module is in use (loading a file needs it). A strategy tells its consumers how it streams
and what it is; no module outside this package branches on a family name (docs/design.md).
"""

from mfnoise.strategies.base import FAMILIES, Strategy, StreamTable
from mfnoise.strategies.identity import Identity
from mfnoise.strategies.dense import Dense
from mfnoise.strategies.banded import Banded
from mfnoise.strategies.toeplitz import Toeplitz
from mfnoise.strategies.blt import BLT, InverseBLT
from mfnoise.strategies.inverse_toeplitz import InverseToeplitz

__all__ = ["BLT", "FAMILIES", "Banded", "Dense", "Identity", "InverseBLT", "InverseToeplitz", "Strategy",
           "StreamTable", "Toeplitz"]
