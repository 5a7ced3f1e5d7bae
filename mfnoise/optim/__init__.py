"""Layer 2, the offline strategy optimizer: the optimization ``problem``, one loss module per family
(``banded``, ``toeplitz``, ``blt``, ``dense``) and the ``solver`` (docs/design.md, "Data flow")."""
