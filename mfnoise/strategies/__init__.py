"""Layer 1, the strategies: the ``Strategy`` base class (``base``), the family registry
(``registry``), one module per family, the closed forms and their registry (``closed_forms``), the
errors of a strategy for a workload (``error``), banded storage (``band_storage``) and the strategy
file format (``files``, ``io``).

Every family is imported here, so the family registry ``registry.FAMILIES`` is complete whenever
any strategy module is in use (loading a file needs it). A strategy tells its consumers how it
streams and what it is; no module outside this package branches on a family name (docs/design.md).
"""

from mfnoise.strategies.banded import Banded
from mfnoise.strategies.base import Strategy, StreamTable
from mfnoise.strategies.blt import BLT, InverseBLT
from mfnoise.strategies.dense import Dense
from mfnoise.strategies.identity import Identity
from mfnoise.strategies.inverse_toeplitz import InverseToeplitz
from mfnoise.strategies.registry import FAMILIES
from mfnoise.strategies.toeplitz import Toeplitz

__all__ = ["BLT", "FAMILIES", "Banded", "Dense", "Identity", "InverseBLT", "InverseToeplitz", "Strategy",
           "StreamTable", "Toeplitz"]
