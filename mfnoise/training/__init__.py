"""Layer 2, private training: the streaming ``noise`` generator, ``clipping`` (ghost norms) and
``per_example`` gradients, the optax ``transforms``, ``batching`` that honours a participation schema,
and ``accounting`` (docs/design.md, "Noise as it runs", "Batching", "Accounting").

Submodules load on first use: importing this package costs nothing."""
