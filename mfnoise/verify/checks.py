"""Independent checks of a strategy file: ``mfnoise verify FILE``.

A strategy file is a privacy claim: "this C has sensitivity s under schema p, and rmse r for
workload A". ``verify`` re-derives every part of that claim by a route other than the one that
wrote it:

* integrity: the sha256 digest over arrays and metadata (``mfnoise.strategies.io.read``), and, for a library
  file, the index's sha256 of the file bytes;
* schema: the metadata has every field with the right type, the schema and workload parse, and the
  arrays rebuild a strategy with the recorded parameters;
* sensitivity: the stored value equals the structured routine's, the dense routine's on C^T C
  (n <= ``dense_limit``), for Toeplitz C where theory names the worst pattern {0, b, 2b, ...}
  the Gram matrix of those explicit columns, and for banded C with bands <= b the column-norm
  formula max_P sum_{t in P} ||C[:, t]||^2 (whatever route ``sensitivity`` took); it is never
  below sum_{i,j in P} X[i, j] of that pattern or of random allowed patterns P (a lower bound on
  the true sensitivity, "Multi-Epoch Matrix Factorization Mechanisms for Private Machine
  Learning", Choquette-Choo et al. 2023, arXiv:2211.06530);
* factorization: A = B C for the decoder B = A C^{-1} the error uses (Toeplitz: the convolution
  b * c equals a; banded: a banded solve and a sparse product; otherwise dense, n <=
  ``dense_limit``);
* noise: C^{-1} W from ``strategy.inverse_apply`` equals a dense triangular solve on the first
  ``steps`` rows, and the streaming generator (``mfnoise.training.noise``) yields the same rows;
* losses: the stored rmse and max_error equal the structured recomputation and the one from the
  verified decoder and sensitivity.

The checks ask the strategy what it is (``toeplitz_coeffs``, ``bands``, ``band_columns``,
``columns_at``, ``squared_column_norms``); none names a family. The best pattern sum is core's
``best_pattern_sum`` (itself tested against brute force over every pattern).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.signal
import scipy.sparse

from mfnoise.core import sensitivity as sens_lib
from mfnoise.core import workloads
from mfnoise.core.participation import Participation
from mfnoise.library import index as library_index
from mfnoise.optim.objectives import OBJECTIVES
from mfnoise.strategies import band_storage, error, io
from mfnoise.strategies.base import Strategy
from mfnoise.strategies.registry import FAMILIES
from mfnoise.training import noise

DENSE_LIMIT = 1000
"""Largest n for the dense cross-checks (C^T C and B = A C^{-1} as n×n matrices)."""

SENS_RTOL = 1e-9
LOSS_RTOL = 1e-8
FACTOR_TOL = 1e-8
NOISE_TOL = 1e-9

_REQUIRED = {
    "format": str, "format_version": int, "family": str, "params": dict, "participation": dict,
    "workload": dict, "rmse": float, "max_error": float, "sensitivity": float,
    "mfnoise_version": str, "sha256": str,
}


@dataclasses.dataclass
class Report:
    """The outcome of ``verify``: ok is False when any check failed (pending checks do not fail)."""

    path: str
    checks: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c["status"] != "fail" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "path": self.path, "checks": self.checks}


def _check(name: str, ok: bool | None, detail: str, **numbers: Any) -> dict[str, Any]:
    status = "pending" if ok is None else ("pass" if ok else "fail")
    return {"name": name, "status": status, "ok": ok, "detail": detail, **numbers}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# -- reconstructing the claim -------------------------------------------------------------------


def _schema(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[Strategy, Participation, workloads.Workload]:
    """(strategy, participation, workload) from a file's metadata, or ValueError naming the fault."""
    for key, typ in _REQUIRED.items():
        if key not in meta:
            raise ValueError(f"metadata lacks {key!r}")
        value = meta[key]
        if typ is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"metadata {key}={value!r} is not a positive finite number")
        elif not isinstance(value, typ) or isinstance(value, bool):
            raise ValueError(f"metadata {key}={value!r} is not a {typ.__name__}")
    family = meta["family"]
    if family not in FAMILIES:
        raise ValueError(f"unknown strategy family {family!r}")
    n = meta["params"].get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"metadata params.n={n!r} is not a positive integer")
    strategy = FAMILIES[family].from_arrays(arrays, meta["params"])
    if strategy.params() != meta["params"]:
        raise ValueError(f"arrays give parameters {strategy.params()}, metadata says {meta['params']}")
    p = Participation.from_dict(meta["participation"])
    if p.n != n:
        raise ValueError(f"participation has n={p.n}, strategy has n={n}")
    w = _workload(meta["workload"], n)
    if meta.get("objective", "rmse") not in (*OBJECTIVES, "weighted"):
        raise ValueError(f"metadata objective={meta['objective']!r} is not one of {(*OBJECTIVES, 'weighted')}")
    return strategy, p, w


def _workload(d: dict[str, Any], n: int) -> workloads.Workload:
    return workloads.from_dict(d, n)  # learning rates and weight decay read back exactly


# -- explicit columns and leading blocks of C ----------------------------------------------------


def _coeffs(strategy: Strategy) -> np.ndarray | None:
    c = strategy.toeplitz_coeffs()
    if c is None:
        return None
    out = np.zeros(strategy.n)
    c = np.asarray(c, np.float64)[: strategy.n]
    out[: c.size] = c
    return out


def _toeplitz_gram(c: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """X[steps][:, steps] for X = C^T C, C Toeplitz with first column c (zero-padded to n).

    From the definition: column t holds c_0, c_1, ... from row t down, so for t_i <= t_j and
    d = t_j - t_i, X[t_i, t_j] = sum_{l=0}^{n-1-t_j} c_l c_{l+d}: one running sum per distinct d.
    """
    n = c.size
    steps = np.asarray(steps)
    lo = np.minimum.outer(steps, steps)
    hi = np.maximum.outer(steps, steps)
    d = hi - lo
    g = np.zeros(d.shape)
    for dv in np.unique(d):
        running = np.cumsum(c[: n - dv] * c[dv:])  # running[m] = sum_{l <= m} c_l c_{l+d}
        mask = d == dv
        g[mask] = running[n - 1 - hi[mask]]
    return g


def _gram(strategy: Strategy, steps: np.ndarray) -> np.ndarray:
    """The Gram matrix of the columns C[:, steps]."""
    c = _coeffs(strategy)
    if c is not None:
        return _toeplitz_gram(c, steps)
    cols = strategy.columns_at(steps)
    return cols.T @ cols


def _leading_block(strategy: Strategy, size: int, dense: np.ndarray | None) -> np.ndarray:
    """C[:size, :size]."""
    if dense is not None:
        return dense[:size, :size]
    c = _coeffs(strategy)
    if c is not None:  # C[i, j] = c_{i-j}
        i, j = np.indices((size, size))
        return np.where(i >= j, c[np.maximum(i - j, 0)], 0.0)
    return strategy.columns_at(np.arange(size))[:size]


def _patterns(p: Participation, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """The pattern {0, b, 2b, ...} and ``count`` random maximal patterns the schema allows."""
    n, b, m = p.n, p.min_sep, p.reachable_participations
    out = [np.arange(m) * b]
    for _ in range(count):
        if p.cyclic:
            out.append(np.arange(rng.integers(0, b), n, b))
        else:
            # Random gaps >= b, as many steps as fit (at most m).
            steps, t = [], int(rng.integers(0, max(1, n - (m - 1) * b)))
            while t < n and len(steps) < m:
                steps.append(t)
                t += b + int(rng.integers(0, b + 1))
            out.append(np.asarray(steps))
    for pat in out:
        assert p.contains(tuple(int(t) for t in pat)), pat
    return out


# -- the checks ----------------------------------------------------------------------------------


def _check_sensitivity(strategy: Strategy, p: Participation, meta: dict[str, Any], dense: np.ndarray | None,
                       rng: np.random.Generator) -> dict[str, Any]:
    stored = float(meta["sensitivity"])
    structured = strategy.sensitivity(p)
    problems, notes = [], []
    if _rel(structured.value, stored) > SENS_RTOL:
        problems.append(f"stored {stored!r} != recomputed {structured.value!r} ({structured.method})")
    if dense is not None:
        d = sens_lib.dense(dense, p)
        notes.append(f"dense {d.value:.12g} ({d.method})")
        if d.exact and structured.exact and _rel(d.value, structured.value) > SENS_RTOL:
            problems.append(f"dense routine gives {d.value!r}, structured {structured.value!r}")
        elif not d.exact and structured.value > d.value * (1 + SENS_RTOL):
            problems.append(f"structured {structured.value!r} exceeds the dense upper bound {d.value!r}")
        elif d.exact and stored < d.value * (1 - SENS_RTOL):
            problems.append(f"stored {stored!r} is below the dense exact value {d.value!r}")
    # Lower bounds: u_t all equal gives sum_{i,j in P} X[i, j] <= sens^2 for every allowed P.
    pats = _patterns(p, rng, 3)
    grams = [_gram(strategy, pat) for pat in pats]
    worst_lower = 0.0
    for pat, g in zip(pats, grams):
        lower = float(np.sum(g))
        worst_lower = max(worst_lower, lower)
        if stored**2 < lower * (1 - SENS_RTOL):
            problems.append(f"pattern {pat[:4].tolist()}... alone has sensitivity^2 {lower!r} > stored^2 {stored**2!r}")
    notes.append(f"best lower bound {math.sqrt(worst_lower):.12g} over {len(pats)} patterns")
    # Toeplitz C: the pattern {0, b, 2b, ...} is the worst when bands <= b (its columns are the
    # longest and overlap nowhere) or when c >= 0 is non-increasing (sensitivity.toeplitz).
    c = _coeffs(strategy)
    if c is not None:
        nz = np.flatnonzero(c)
        bands = int(nz[-1]) + 1 if nz.size else 1
        if bands <= p.min_sep or p.reachable_participations == 1 or sens_lib.is_nonneg_nonincreasing(c):
            exact = math.sqrt(float(np.sum(np.abs(grams[0]))))
            notes.append(f"worst-pattern Gram {exact:.12g}")
            if _rel(exact, stored) > SENS_RTOL:
                problems.append(f"the Gram matrix of pattern {{0, b, 2b, ...}} gives {exact!r}, stored {stored!r}")
    # Banded C with bands <= b: one pattern's columns never overlap, so sens^2 is the best
    # pattern sum of squared column norms. An exact stored value must equal it; a bound
    # (exact=False) must not be below it.
    bands = strategy.bands
    if bands is not None and (bands <= p.min_sep or p.reachable_participations == 1):
        exact = math.sqrt(float(sens_lib.best_pattern_sum(strategy.squared_column_norms(), p)))
        notes.append(f"column-norm pattern sum {exact:.12g}")
        if structured.exact and _rel(exact, stored) > SENS_RTOL:
            problems.append(f"the best pattern of squared column norms gives {exact!r}, stored {stored!r}")
        elif not structured.exact and stored < exact * (1 - SENS_RTOL):
            problems.append(f"stored bound {stored!r} is below the column-norm value {exact!r}")
    return _check("sensitivity", not problems, "; ".join(problems or notes),
                  stored=stored, recomputed=structured.value, exact=structured.exact, method=structured.method)


def _decoder(strategy: Strategy, w: workloads.Workload,
             dense_c: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray | None]:
    """The A = B C check; returns (check, squared row norms of B) when B was formed."""
    n = strategy.n
    c = _coeffs(strategy)
    if c is not None and w.coeffs is not None:
        a = np.asarray(w.coeffs, np.float64)
        b = strategy.inverse_apply(a)  # B is Toeplitz with first column b = C^{-1} a
        residual = scipy.signal.fftconvolve(b, c)[:n] - a
        rows = np.cumsum(b * b)  # ||B[i, :]||^2 = sum_{j <= i} b_j^2
        return _factorization(residual, a, float(np.linalg.norm(b) * np.linalg.norm(c)), n, "Toeplitz"), rows
    bands = strategy.bands
    if c is None and bands is not None and (bands < n or dense_c is None) and n <= workloads.DENSE_LIMIT:
        # B^T = C^{-T} A^T by a banded solve (C^T is upper banded), B C by a sparse product:
        # O(n^2 bands), a route apart from the dense one that mfnoise.strategies.error takes.
        cols = strategy.band_columns()
        assert cols is not None  # bands is not None
        u = cols.shape[1] - 1
        # LAPACK storage of the upper-banded C^T: ab[u - d, j] = C^T[j - d, j] = C[j, j - d] = rows[j, d].
        ab = np.ascontiguousarray(band_storage.rows_from_columns(cols)[:, ::-1].T)
        a = w.dense()
        bmat = scipy.linalg.solve_banded((0, u), ab, a.T).T
        # DIA storage: diagonal -d holds C[j + d, j] = cols[j, d] at column j.
        c_sparse = scipy.sparse.dia_matrix((cols.T, -np.arange(u + 1)), shape=(n, n)).tocsc()
        scale = float(np.max(np.asarray((abs(c_sparse).T @ np.abs(bmat).T).T)))
        factor = _factorization((c_sparse.T @ bmat.T).T - a, a, scale, n, "banded solve")
        return factor, np.einsum("ij,ij->i", bmat, bmat)
    if dense_c is None:
        return _check("factorization", True, f"skipped: n={n} > {DENSE_LIMIT} for a non-Toeplitz factorization",
                      residual=None) | {"status": "skip"}, None
    a = w.dense()
    bmat = scipy.linalg.solve_triangular(dense_c.T, a.T, lower=False).T
    scale = float(np.max(np.abs(bmat) @ np.abs(dense_c)))
    return _factorization(bmat @ dense_c - a, a, scale, n, "dense solve"), np.einsum("ij,ij->i", bmat, bmat)


def _factorization(residual: np.ndarray, a: np.ndarray, scale: float, n: int, route: str) -> dict[str, Any]:
    """The A = B C check: max |B C - A| / max |A| <= max(FACTOR_TOL, 8 log2(n + 1) eps scale / max |A|).

    ``scale`` bounds the entries of |B| |C| (Toeplitz: ||b|| ||c||): float64 rounding of B = A C^{-1}
    and of the product grows with it, so an ill-conditioned C (B far larger than A) gets the rounding
    it can have, and no more: a relative error of 1e-6 in B still fails.
    """
    a_max = float(np.max(np.abs(a)))
    err = float(np.max(np.abs(residual))) / a_max
    tol = max(FACTOR_TOL, 8 * math.log2(n + 1) * np.finfo(np.float64).eps * float(scale) / a_max)
    return _check("factorization", err <= tol, f"max |B C - A| / max |A| = {err:.3g} <= {tol:.3g} ({route})",
                  residual=err, tolerance=tol)


def _noise(strategy: Strategy, dense_c: np.ndarray | None, steps: int, rng: np.random.Generator,
           streaming: bool) -> list[dict[str, Any]]:
    n = strategy.n
    t = min(n, steps)
    block = _leading_block(strategy, t, dense_c)
    w = np.zeros((n, 3))
    w[:t] = rng.standard_normal((t, 3))
    got = strategy.inverse_apply(w)[:t]
    out = []
    ref = scipy.linalg.solve_triangular(block, w[:t], lower=True)
    err = float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))
    out.append(_check("inverse", err <= NOISE_TOL,
                      f"C^-1 W from inverse_apply vs dense solve, first {t} steps: max rel diff {err:.3g}",
                      max_diff=err, steps=t))
    if streaming:
        out.append(_streaming(strategy, block, t, rng))
    return out


def _streaming(strategy: Strategy, block: np.ndarray, t: int, rng: np.random.Generator) -> dict[str, Any]:
    """Rows of the streaming generator against dense C^{-1} W on the first t steps."""
    rows, w = noise_rows(noise, strategy, t, rng)
    ref = scipy.linalg.solve_triangular(block, w, lower=True)
    err = float(np.max(np.abs(rows - ref)) / max(1.0, float(np.max(np.abs(ref)))))
    return _check("streaming", err <= NOISE_TOL,
                  f"streamed rows vs dense C^-1 W, first {t} steps: max rel diff {err:.3g}", max_diff=err, steps=t)


def noise_rows(noise_module: Any, strategy: Strategy, t: int, rng: np.random.Generator,
               width: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(streamed rows z_0..z_{t-1}, the W they came from), each of shape (t, width), in float64.

    ``noise_module`` is ``mfnoise.training.noise`` (or a stand-in with its ``generator``). W is
    rebuilt from the generator's documented contract: w_t of leaf 0 is
    ``jax.random.normal(fold_in(fold_in(key, 0), t), shape, dtype)``.
    """
    seed = int(rng.integers(0, 2**31 - 1))
    with jax.enable_x64(True):
        key = jax.random.key(seed)
        gen = noise_module.generator(strategy, key)
        params = jnp.zeros((width,), jnp.float64)

        def body(state, _):
            z, state = gen.next(state, params)
            return state, z

        _, rows = jax.jit(lambda st: jax.lax.scan(body, st, None, length=t))(gen.init(params))
        w = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 0), s),
                                                 (width,), jnp.float64))(jnp.arange(t))
        return np.asarray(rows, np.float64), np.asarray(w, np.float64)


def _losses(strategy: Strategy, w: workloads.Workload, p: Participation, meta: dict[str, Any],
            rows_sq: np.ndarray | None, dense_limit: int) -> dict[str, Any]:
    problems = []
    cheap = (strategy.is_toeplitz and w.is_toeplitz) or strategy.n <= dense_limit
    if cheap or rows_sq is None:  # mfnoise.strategies.error's own route (dense for non-Toeplitz C)
        result = error.evaluate(strategy, w, p)
        for key in ("rmse", "max_error"):
            if _rel(result[key], float(meta[key])) > LOSS_RTOL:
                problems.append(f"stored {key} {meta[key]!r} != recomputed {result[key]!r}")
        detail = f"rmse {result['rmse']:.10g}, max_error {result['max_error']:.10g}"
    else:
        result = {"rmse": None, "max_error": None}
        detail = "recomputed"
    if rows_sq is not None:
        s = float(meta["sensitivity"])
        indep = {"rmse": s * math.sqrt(float(rows_sq.sum()) / strategy.n),
                 "max_error": s * math.sqrt(float(rows_sq.max()))}
        for key, value in indep.items():
            if _rel(value, float(meta[key])) > LOSS_RTOL:
                problems.append(f"stored {key} {meta[key]!r} != {value!r} from the checked decoder")
        result = {k: result[k] if result[k] is not None else v for k, v in indep.items()}
        detail = (f"rmse {result['rmse']:.10g}, max_error {result['max_error']:.10g}"
                  + (" (also from the checked decoder)" if detail != "recomputed" else " (from the checked decoder)"))
    return _check("losses", not problems, "; ".join(problems) or detail,
                  rmse=result["rmse"], max_error=result["max_error"])


def _index(path: str, meta: dict[str, Any], index_entry: dict[str, Any]) -> dict[str, Any]:
    problems = []
    sha = library_index.file_sha256(path)
    if sha != index_entry.get("sha256"):
        problems.append(f"file sha256 {sha} != index {index_entry.get('sha256')}")
    if meta["sha256"] != index_entry.get("digest"):
        problems.append(f"digest {meta['sha256']} != index {index_entry.get('digest')}")
    for key in ("rmse", "max_error", "sensitivity"):
        if meta[key] != index_entry.get(key):
            problems.append(f"{key} {meta[key]!r} != index {index_entry.get(key)!r}")
    for key in ("n", "max_participations", "min_sep"):
        if meta["participation"].get(key) != index_entry.get(key):
            problems.append(f"{key} {meta['participation'].get(key)!r} != index {index_entry.get(key)!r}")
    if meta.get("name", index_entry["name"]) != index_entry["name"]:
        problems.append(f"name {meta.get('name')!r} != index {index_entry['name']!r}")
    return _check("index", not problems, "; ".join(problems) or f"matches index entry {index_entry['name']}")


def verify(path: str | os.PathLike, *, index_entry: dict[str, Any] | None = None, dense_limit: int = DENSE_LIMIT,
           steps: int = 32, streaming: bool = True, seed: int = 0) -> Report:
    """Checks the strategy file at ``path`` (see the module docstring); never raises on a bad file.

    Args:
      index_entry: the library index entry the file should match (checked when given).
      dense_limit: largest n for the dense cross-checks.
      steps: number of leading noise steps compared with a dense solve.
      streaming: also run the streaming generator (a JAX compilation, about a second per file).
    """
    path = os.fspath(path)
    checks: list[dict[str, Any]] = []
    report = Report(path, checks)
    try:
        arrays, meta = io.read(path)
    except (ValueError, FileNotFoundError) as e:
        checks.append(_check("integrity", False, str(e)))
        return report
    checks.append(_check("integrity", True, f"sha256 digest {meta['sha256'][:16]}... matches"))
    if index_entry is not None:
        checks.append(_index(path, meta, index_entry))
    try:
        strategy, p, w = _schema(meta, arrays)
    except (ValueError, TypeError, KeyError) as e:
        checks.append(_check("schema", False, f"{type(e).__name__}: {e}"))
        return report
    checks.append(_check("schema", True, f"{strategy!r}, {p}, workload {w.name}"))
    rng = np.random.default_rng(seed)
    dense_c = strategy.dense() if strategy.n <= dense_limit else None
    for name, fn in (("sensitivity", lambda: _check_sensitivity(strategy, p, meta, dense_c, rng)),):
        checks.append(_guard(name, fn))
    rows_sq = None
    try:
        factor, rows_sq = _decoder(strategy, w, dense_c)
        checks.append(factor)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError) as e:
        checks.append(_check("factorization", False, f"{type(e).__name__}: {e}"))
    try:
        checks.extend(_noise(strategy, dense_c, steps, rng, streaming))
    except (ValueError, np.linalg.LinAlgError) as e:
        checks.append(_check("inverse", False, f"{type(e).__name__}: {e}"))
    checks.append(_guard("losses", lambda: _losses(strategy, w, p, meta, rows_sq, dense_limit)))
    return report


def _guard(name: str, fn) -> dict[str, Any]:
    try:
        return fn()
    except (ValueError, np.linalg.LinAlgError, FloatingPointError) as e:
        return _check(name, False, f"{type(e).__name__}: {e}")
