"""Layer 4, independent checks of a strategy file: ``verify(path)`` recomputes everything the file
claims (sensitivity, errors, the factorization, the streamed noise) by routes of its own."""

from mfnoise.verify.checks import DENSE_LIMIT, FACTOR_TOL, LOSS_RTOL, NOISE_TOL, SENS_RTOL, Report, noise_rows, verify

__all__ = ["DENSE_LIMIT", "FACTOR_TOL", "LOSS_RTOL", "NOISE_TOL", "Report", "SENS_RTOL", "noise_rows", "verify"]
