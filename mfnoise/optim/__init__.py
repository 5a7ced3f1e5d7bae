"""Layer 2, the offline strategy optimizer (docs/design.md, "Data flow" and "Architecture: layers").

``problem``: the optimization ``Problem`` and the registry of problem builders by family;
one loss module per family (``banded``, ``toeplitz``, ``blt``, ``dense``,
``inverse_toeplitz``), each registering its
builder when imported (here, so that importing any part of the package registers every family);
``solver``: the quasi-Newton driver, ``mfnoise.optimize``; ``result``: its ``OptimizeResult``.
"""

from mfnoise.optim import banded, blt, dense, inverse_toeplitz, toeplitz  # noqa: F401  (each registers its problem)
