"""Lower-triangular Toeplitz algebra as truncated power series, in float64 numpy.

A lower-triangular n×n Toeplitz matrix T[i, j] = t_{i-j} is the power series t(x) = sum_j t_j x^j
modulo x^n: products of such matrices are products of series, inverses are series reciprocals.
So products cost O(n log n) (FFT) and inverses O(n log n) (Newton iteration
g <- g (2 - t g), doubling the number of correct coefficients each step).
"""

from __future__ import annotations

from typing import cast

import numpy as np

# scipy is imported inside the functions that use it: `import mfnoise` loads this module, and
# scipy.signal alone costs about 0.5 s of start-up (issue 16, "lean start").


def _fft_len(m: int) -> int:
    import scipy.fft

    return cast(int, scipy.fft.next_fast_len(m, real=True))


def _rfft(x: np.ndarray, size: int, axis: int = -1) -> np.ndarray:
    import scipy.fft

    return np.asarray(scipy.fft.rfft(x, size, axis=axis))


def _irfft(x: np.ndarray, size: int, axis: int = -1) -> np.ndarray:
    import scipy.fft

    return np.asarray(scipy.fft.irfft(x, size, axis=axis))


def multiply(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Coefficients of a(x) b(x) mod x^n (the Toeplitz product A B), shape (n,)."""
    a = np.asarray(a, dtype=np.float64)[:n]
    b = np.asarray(b, dtype=np.float64)[:n]
    if a.size == 0 or b.size == 0:
        return np.zeros(n)
    if min(a.size, b.size) <= 64:
        out = np.convolve(a, b)[:n]
    else:
        m = a.size + b.size - 1
        size = _fft_len(m)
        out = _irfft(_rfft(a, size) * _rfft(b, size), size)[: min(m, n)]
    return np.pad(out, (0, n - out.size))


def reciprocal(t: np.ndarray, n: int) -> np.ndarray:
    """Coefficients of 1 / t(x) mod x^n (the inverse Toeplitz matrix), shape (n,).

    Raises ValueError when t_0 = 0 (a singular lower-triangular matrix).
    """
    t = np.asarray(t, dtype=np.float64)
    if t.size == 0 or t[0] == 0 or not np.isfinite(t[0]):
        raise ValueError(f"Toeplitz diagonal t_0={t[0] if t.size else None} is not invertible")
    if t.size <= 64:
        # Short (banded) series: the O(n * bands) recurrence is exact and cheap.
        return _reciprocal_recurrence(t, n)
    g = np.array([1.0 / t[0]])
    m = 1
    while m < n:
        m = min(2 * m, n)
        tg = multiply(t, g, m)
        tg = -tg
        tg[0] += 2.0
        g = multiply(g, tg, m)
    return g[:n]


def _reciprocal_recurrence(t: np.ndarray, n: int) -> np.ndarray:
    """g_j = (delta_j - sum_{i=1..p-1} t_i g_{j-i}) / t_0: the impulse response of 1 / t(x)."""
    import scipy.signal

    impulse = np.zeros(n)
    impulse[0] = 1.0
    return np.asarray(scipy.signal.lfilter([1.0], t, impulse))


def divide(a: np.ndarray, t: np.ndarray, n: int) -> np.ndarray:
    """Coefficients of a(x) / t(x) mod x^n (the Toeplitz matrix A T^{-1}), shape (n,)."""
    return multiply(a, reciprocal(t, n), n)


def to_dense(t: np.ndarray, n: int) -> np.ndarray:
    """The n×n lower-triangular Toeplitz matrix with first column t (zero-padded)."""
    col = np.zeros(n)
    t = np.asarray(t, dtype=np.float64)[:n]
    col[: t.size] = t
    idx = np.arange(n)
    diff = idx[:, None] - idx[None, :]
    return np.where(diff >= 0, col[np.clip(diff, 0, n - 1)], 0.0)


def apply(t: np.ndarray, z: np.ndarray) -> np.ndarray:
    """T z for the lower-triangular Toeplitz T with first column t, z of shape (n, ...)."""
    z = np.asarray(z)
    n = z.shape[0]
    flat = z.reshape(n, -1).astype(np.float64)
    t = np.asarray(t, dtype=np.float64)[:n]
    size = _fft_len(n + t.size - 1)
    out = _irfft(_rfft(t, size)[:, None] * _rfft(flat, size, axis=0), size, axis=0)[:n]
    return out.reshape(z.shape)


def solve(t: np.ndarray, z: np.ndarray) -> np.ndarray:
    """T^{-1} z for the lower-triangular Toeplitz T with first column t, z of shape (n, ...)."""
    z = np.asarray(z)
    return apply(reciprocal(t, z.shape[0]), z)


def sqrt(a: np.ndarray, n: int) -> np.ndarray:
    """Coefficients of a(x)^{1/2} mod x^n with a_0 > 0 (the Toeplitz square root of A), shape (n,).

    Newton iteration s <- (s + a / s) / 2 doubles the number of correct coefficients each step.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0 or not a[0] > 0:
        raise ValueError(f"series square root needs a_0 > 0, got {a[0] if a.size else None}")
    s = np.array([np.sqrt(a[0])])
    m = 1
    while m < n:
        m = min(2 * m, n)
        s = 0.5 * (np.pad(s, (0, m - s.size)) + divide(a, s, m))
    return s[:n]
