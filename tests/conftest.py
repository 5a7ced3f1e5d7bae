"""Shared test helpers: independent reference computations and random strategies.

Everything here is written from the definitions in docs/design.md with plain numpy/scipy, without
calling the mfnoise code it is used to check (only the constructors of the strategies under test).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
import pathlib
import sys
from types import ModuleType

# Multi-threaded BLAS is far slower than one thread on the small matrices here when the cores are
# shared (as by pytest-xdist or parallel jobs); the user's explicit setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Keras reads its backend once, at its first import: the front-end tests (tests/frontends) need JAX's.
if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "jax"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import mfnoise  # noqa: E402

try:  # numpy may have been imported (and its BLAS started) before this file
    import threadpoolctl

    threadpoolctl.threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")
except ImportError:  # pragma: no cover - only a speed matter
    pass

# No per-example deadline (shared cores make timings noisy). Example counts are set on
# each test (FEW below for most of them), so other test files keep hypothesis' defaults.
settings.register_profile("mfnoise", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mfnoise")
FEW = settings(max_examples=40)


# ---------------------------------------------------------------------------------------------
# Dense references.
# ---------------------------------------------------------------------------------------------
def toeplitz_matrix(col, n: int) -> np.ndarray:
    """Lower-triangular n×n Toeplitz matrix with first column ``col`` (zero-padded / truncated)."""
    c = np.zeros(n)
    col = np.asarray(col, dtype=np.float64)[:n]
    c[: col.size] = col
    return scipy.linalg.toeplitz(c, np.zeros(n))


def prefix_matrix(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n)))


def momentum_matrix(n: int, beta: float, eta) -> np.ndarray:
    """A[i, j] = sum_{s=j..i} eta_s beta^(s-j), by explicit summation."""
    eta = np.broadcast_to(np.asarray(eta, dtype=np.float64), (n,))
    a = np.zeros((n, n))
    for j in range(n):
        acc = 0.0
        for i in range(j, n):
            acc += eta[i] * beta ** (i - j)
            a[i, j] = acc
    return a


def sqrt_series(a, m: int) -> np.ndarray:
    """First m coefficients of a(x)^{1/2} by the O(m^2) recurrence 2 s_0 s_k = a_k - sum s_i s_{k-i}."""
    a = np.zeros(m) + np.pad(np.asarray(a, np.float64)[:m], (0, max(0, m - len(a))))
    s = np.zeros(m)
    s[0] = math.sqrt(a[0])
    for k in range(1, m):
        s[k] = (a[k] - np.dot(s[1:k], s[k - 1 : 0 : -1])) / (2 * s[0])
    return s


def reciprocal_series(t, m: int) -> np.ndarray:
    """First m coefficients of 1 / t(x) by the O(m^2) recurrence."""
    t = np.pad(np.asarray(t, np.float64)[:m], (0, max(0, m - len(t))))
    g = np.zeros(m)
    g[0] = 1.0 / t[0]
    for k in range(1, m):
        g[k] = -np.dot(t[1 : k + 1], g[k - 1 :: -1]) / t[0]
    return g


def binom_sqrt_coeffs(m: int) -> np.ndarray:
    """binom(2j, j) / 4^j, j < m: correctly rounded from exact integers for j < 1024, then by
    lgamma (relative error below 1e-11 for j < 10^5)."""
    exact = [math.comb(2 * j, j) / 4**j for j in range(min(m, 1024))]
    rest = [math.exp(math.lgamma(2 * j + 1) - 2 * math.lgamma(j + 1) - j * math.log(4)) for j in range(1024, m)]
    return np.array(exact + rest)


def decoder(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """B = A C^{-1} by np.linalg.solve (B C = A  <=>  C^T B^T = A^T)."""
    return np.linalg.solve(c.T, a.T).T


# ---------------------------------------------------------------------------------------------
# Participation patterns, enumerated from the definitions.
# ---------------------------------------------------------------------------------------------
@functools.cache
def all_patterns(n: int, k: int, b: int, cyclic: bool) -> tuple[tuple[int, ...], ...]:
    """Every non-empty pattern (maximal or not) of the schema."""
    out: set[tuple[int, ...]] = set()
    if cyclic:
        for c in range(b):
            members = list(range(c, n, b))
            for size in range(1, len(members) + 1):
                out.update(itertools.combinations(members, size))
    else:

        def rec(start: int, left: int, cur: tuple[int, ...]) -> None:
            for t in range(start, n):
                pat = cur + (t,)
                out.add(pat)
                if left > 1:
                    rec(t + b, left - 1, pat)

        rec(0, k, ())
    return tuple(sorted(out))


@functools.cache
def _sign_vectors(n: int) -> np.ndarray:
    """All of {-1, 0, 1}^n with first non-zero entry +1 (s and -s give the same form)."""
    v = np.array(list(itertools.product((-1, 0, 1), repeat=n)), dtype=np.int8)
    nz = v != 0
    first = np.argmax(nz, axis=1)
    keep = nz.any(axis=1) & (v[np.arange(len(v)), first] == 1)
    return v[keep]


def _valid_support(mask: np.ndarray, n: int, k: int, b: int, cyclic: bool) -> np.ndarray:
    if cyclic:
        ok = np.zeros(len(mask), dtype=bool)
        for r in range(b):
            outside = np.array([t % b != r for t in range(n)])
            ok |= ~mask[:, outside].any(axis=1)
        return ok
    ok = mask.sum(axis=1) <= k
    for d in range(1, min(b, n)):
        ok &= ~(mask[:, :-d] & mask[:, d:]).any(axis=1)
    return ok


def sensitivity_bounds(c: np.ndarray, p: mfnoise.Participation) -> dict:
    """Brute-force bounds on sens(C, p)^2 over every pattern of p.

    ``lower``: max over patterns P and sign vectors s on P of s^T X_P s (u_t = s_t u, a valid
    choice of unit vectors, so a true lower bound). ``upper``: max_P sum |X_P| (a true upper bound).
    ``nonneg``: X >= 0, in which case lower == upper == sens^2 exactly.
    """
    n, k, b = p.n, p.max_participations, p.min_sep
    x = c.T @ c
    pats = all_patterns(n, k, b, p.cyclic)
    upper = max(np.abs(x[np.ix_(P, P)]).sum() for P in pats)
    plain = max(x[np.ix_(P, P)].sum() for P in pats)
    nonneg = bool(np.all(x >= 0))
    if nonneg:
        lower = plain
    else:
        v = _sign_vectors(n)
        v = v[_valid_support(v != 0, n, k, b, p.cyclic)].astype(np.float64)
        lower = float(np.max(np.einsum("pi,ij,pj->p", v, x, v)))
    return {"lower": float(lower), "upper": float(upper), "plain": float(plain), "nonneg": nonneg,
            "patterns": pats}


# ---------------------------------------------------------------------------------------------
# Random strategies of every family, with an independently built dense C.
# ---------------------------------------------------------------------------------------------
FAMILIES = [
    "identity",
    "dense-nonneg",
    "dense-mixed",
    "banded",
    "banded-normalized",
    "toeplitz-decreasing",
    "toeplitz-nearly-decreasing",
    "toeplitz-arbitrary",
    "blt-positive",
    "blt-mixed",
    "inverse-toeplitz",
    "sqrt-toeplitz",
    "sqrt-toeplitz-momentum",
    "bsr",
    "bisr",
]


def make_strategy(family: str, n: int, rng: np.random.Generator, bands: int | None = None,
                  conditioned: bool = False):
    """(strategy, C) with C the dense matrix built here from the strategy's defining parameters.

    ``conditioned``: keep C^{-1} of moderate size (for comparisons at n up to 512).
    """
    bands = n if bands is None else max(1, min(bands, n))
    if family == "identity":
        return mfnoise.Identity(n), np.eye(n)
    if family in ("dense-nonneg", "dense-mixed"):
        if family == "dense-nonneg":
            c = np.tril(rng.uniform(0.0, 1.0, (n, n)))
            np.fill_diagonal(c, rng.uniform(0.5, 1.5, n))
            if conditioned:
                c = np.tril(c, -1) / n + np.diag(np.diag(c))
        else:
            c = np.tril(rng.normal(size=(n, n)))
            np.fill_diagonal(c, rng.choice([-1, 1], n) * rng.uniform(0.5, 1.5, n))
            if conditioned:
                c = np.tril(c, -1) / n + np.diag(np.diag(c))
        return mfnoise.Dense(c), c
    if family in ("banded", "banded-normalized"):
        cols = rng.normal(size=(n, bands))
        cols[:, 0] = rng.choice([-1, 1], n) * rng.uniform(0.5, 1.5, n)
        if conditioned:
            cols[:, 1:] *= 0.5 / bands
        for t in range(n):
            cols[t, max(0, n - t):] = 0.0  # entries past row n - 1
        if family == "banded-normalized":
            s = mfnoise.Banded.normalized_columns(cols)
            cols = cols / np.linalg.norm(cols, axis=1, keepdims=True)
        else:
            s = mfnoise.Banded(cols)
        c = np.zeros((n, n))
        for t in range(n):
            for j in range(bands):
                if t + j < n:
                    c[t + j, t] = cols[t, j]
        return s, c
    if family == "toeplitz-decreasing":
        coeffs = np.sort(rng.uniform(0.0, 1.0, bands))[::-1]
        if rng.random() < 0.3:
            coeffs = np.round(coeffs, 1)  # ties and zeros
        coeffs[0] = max(coeffs[0], 0.1)
        coeffs = np.minimum(coeffs, coeffs[0])
        return mfnoise.Toeplitz(coeffs, n), toeplitz_matrix(coeffs, n)
    if family == "toeplitz-nearly-decreasing":
        # Non-increasing up to rounding-sized noise, as a series reciprocal computed by FFT can be.
        coeffs = np.sort(rng.uniform(0.0, 1.0, bands))[::-1]
        coeffs[0] = max(coeffs[0], 0.1)
        coeffs[1:] += rng.normal(size=bands - 1) * 1e-14
        return mfnoise.Toeplitz(coeffs, n), toeplitz_matrix(coeffs, n)
    if family == "toeplitz-arbitrary":
        coeffs = rng.normal(size=bands)
        coeffs[0] = rng.choice([-1, 1]) * rng.uniform(0.5, 1.5)
        if conditioned:
            coeffs[1:] *= 0.9 * abs(coeffs[0]) / max(1.0, np.abs(coeffs[1:]).sum())
        return mfnoise.Toeplitz(coeffs, n), toeplitz_matrix(coeffs, n)
    if family in ("blt-positive", "blt-mixed"):
        d = int(rng.integers(1, 4))
        theta = rng.uniform(0.05, 0.95, d)
        if family == "blt-positive":
            # sum omega / (1 + theta) < 1 keeps every decay of C^{-1} inside (-1, 1).
            omega = rng.uniform(0.01, 1.0, d) * (1 + theta) / d * (0.9 if conditioned else 2.0)
        else:
            omega = rng.normal(size=d)
            if conditioned:
                omega *= 0.9 / max(1.0, np.sum(np.abs(omega) / (1 - theta)))
        coeffs = np.zeros(n)
        coeffs[0] = 1.0
        for j in range(1, n):
            coeffs[j] = sum(om * th ** (j - 1) for th, om in zip(theta, omega))
        return mfnoise.BLT(theta, omega, n), toeplitz_matrix(coeffs, n)
    if family == "inverse-toeplitz":
        r = rng.normal(size=bands)
        r[0] = rng.choice([-1, 1]) * rng.uniform(0.5, 1.5)
        if conditioned:
            r[1:] *= 0.9 * abs(r[0]) / max(1.0, np.abs(r[1:]).sum())
        return mfnoise.InverseToeplitz(r, n), np.tril(np.linalg.inv(toeplitz_matrix(r, n)))
    if family == "sqrt-toeplitz":
        return mfnoise.sqrt_toeplitz(n), toeplitz_matrix(binom_sqrt_coeffs(n), n)
    if family == "sqrt-toeplitz-momentum":
        beta = float(rng.uniform(0.0, 0.95))
        w = mfnoise.workloads.momentum(n, beta)
        a_col = (1 - beta ** (np.arange(n) + 1)) / (1 - beta)
        return mfnoise.sqrt_toeplitz(n, w), toeplitz_matrix(sqrt_series(a_col, n), n)
    if family == "bsr":
        s_col = binom_sqrt_coeffs(bands)
        c = np.zeros((n, n))
        for t in range(n):
            m = min(bands, n - t)
            c[t : t + m, t] = s_col[:m] / np.linalg.norm(s_col[:m])
        return mfnoise.bsr(n, bands), c
    if family == "bisr":
        r = reciprocal_series(binom_sqrt_coeffs(bands), bands)
        return mfnoise.bisr(n, bands), np.tril(np.linalg.inv(toeplitz_matrix(r, n)))
    raise ValueError(family)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# -- the front-end tests (tests/frontends): one small plan, and the examples/ scripts ------------------
# (Here, not in a tests/frontends/conftest.py: a second module named conftest would shadow this one for
# every `from conftest import ...` in the suite.)
ROOT = pathlib.Path(__file__).resolve().parents[1]
DATASET, BATCH, EPOCHS = 512, 32, 2  # 16 steps an epoch, 32 in all


@pytest.fixture(scope="session")
def small_plan():
    """BandMF on fixed cyclic batches, built once per session."""
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
