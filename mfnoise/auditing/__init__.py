"""Empirical privacy auditing (layer 4): canaries, attacks and the statistics that turn an attack's
success into an epsilon lower bound with a stated confidence, to check a mechanism's claimed epsilon.

Modules: ``estimators`` (scores -> epsilon lower bounds), ``tradeoff`` (trade-off curves and the
Gaussian-mechanism conversions), ``whitebox`` and ``mechanisms`` (the white-box Dirac-canary audit of
the correlated-noise mechanism, honest and broken), ``blackbox`` (input-space canaries around a
user's training run), ``api`` (``mfnoise.audit``), ``plot`` (the ROC against the claimed curve).
"""
