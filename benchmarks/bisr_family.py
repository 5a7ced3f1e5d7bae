"""Optimized BISR against BSR where BSR is better: the family, not the optimizer (issue 16).

For each schema (many epochs, bands >= min_sep), in one run:

* closed-form BISR, BSR (``mfnoise.strategies.closed_forms``) and optimized BISR
  (``mfnoise.optimize(..., "inverse-toeplitz")``, from the closed form and from BSR's inverse
  truncated to ``bands``), each scored by ``mfnoise.evaluate`` (exact sensitivity or a proven bound);
* a LOWER bound on the family's objective, minimised over r from the closed form: the rmse with
  sens(C, p)^2 replaced by max_s max_y y^T X_{P_s} y, X = C^T C, P_s the cyclic patterns and y
  ranging over sign vectors (u_t = y_t u is a valid choice of unit vectors, so this is at most
  sens^2 for every r). With m participations there are 2^(m-1) sign vectors; above
  ``MAX_SIGN_PARTICIPATIONS`` only y = 1 (||C 1_P||^2) is used. The max is smoothed by a
  log-sum-exp (an upper bound of the max) whose temperature goes to 0; the value printed is the
  lower bound itself at the point reached.

If that minimum is above BSR, no r reachable by local search from the closed form beats BSR even
with the optimistic sensitivity: L-BFGS-B is a local method, so this is evidence, not a proof.

    .venv/bin/python benchmarks/bisr_family.py     # writes benchmarks/results/bisr_family.json
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import mfnoise
from mfnoise import Participation
from mfnoise.core import series
from mfnoise.optim import objectives
from mfnoise.optim.inverse_toeplitz import STEP_SCALE
from mfnoise.optim.toeplitz import decoder_coeffs, series_multiply, workload_coeffs
from mfnoise.strategies import closed_forms
from mfnoise.strategies.inverse_toeplitz import cyclic_pattern_sums

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "bisr_family.json")
MAX_SIGN_PARTICIPATIONS = 12
SCHEMAS = [("momentum:0.9", 512, 32, 16), ("prefix", 256, 8, 32), ("momentum:0.9", 256, 8, 32)]


def _pattern_blocks(c: jax.Array, n: int, b: int, m: int) -> jax.Array:
    """M[s, a, a'] = X[s + a b, s + a' b], X = C^T C, X[i, j] = S_{j-i}[n-1-j] (j >= i), n = m b."""
    sums = jnp.stack([jnp.pad(jnp.cumsum(c[: n - q * b] * c[q * b:]), (0, q * b)) for q in range(m)])
    a = np.arange(m)
    lag = np.abs(a[:, None] - a[None, :])
    row = n - 1 - np.arange(b)[:, None, None] - np.maximum(a[:, None], a[None, :])[None] * b
    return sums[np.broadcast_to(lag, row.shape), row]


def lower_bound_minimum(workload, n: int, k: int, bands: int) -> tuple[float, str]:
    p = Participation.epochs(n, k)
    b, m = p.min_sep, p.reachable_participations
    assert n == m * b
    a = workload_coeffs(workload)
    weights = objectives.toeplitz_weights("rmse", n)
    e0 = np.zeros(n)
    e0[0] = 1.0
    if m <= MAX_SIGN_PARTICIPATIONS:
        signs = np.array([(1.0, *t) for t in itertools.product([1.0, -1.0], repeat=m - 1)])
        kind = f"max over {len(signs)} sign vectors"
    else:
        signs = None
        kind = "y = 1 (||C 1_P||)"
    with jax.enable_x64(True):
        def parts(x):
            r = jnp.concatenate([jnp.ones(1), STEP_SCALE * x])
            beta = series_multiply(jnp.asarray(a), r, n)
            c = decoder_coeffs(jnp.asarray(e0), r, n)
            if signs is None:  # y = 1 only: sum_{P_s} X (cyclic_pattern_sums), O(m n)
                q = cyclic_pattern_sums(c, p, jnp)
            else:
                q = jnp.einsum("sij,yi,yj->sy", _pattern_blocks(c, n, b, m), signs, signs)
            return jnp.sum(jnp.asarray(weights) * beta * beta), q

        def loss(x, tau):
            err2, q = parts(x)
            top = jnp.max(q)
            s2 = top if tau == 0 else top + tau * jnp.log(jnp.sum(jnp.exp((q - top) / tau)))
            return 0.5 * (jnp.log(s2) + jnp.log(err2))

        x = closed_forms.bisr(n, bands, workload).inverse_coeffs[1:] / STEP_SCALE
        for tau in (1e-2, 1e-3, 1e-4, 0.0):
            vg = jax.jit(jax.value_and_grad(lambda x, tau=tau: loss(x, tau)))

            def f(x, vg=vg):
                v, g = vg(jnp.asarray(x))
                return (float(v), np.asarray(g)) if math.isfinite(float(v)) else (1e300, np.zeros_like(x))

            x = scipy.optimize.minimize(f, x, jac=True, method="L-BFGS-B",
                                        options={"maxiter": 3000, "ftol": 1e-13, "gtol": 1e-10, "maxcor": 30}).x
        value = math.exp(float(jax.jit(lambda x: loss(x, 0.0))(x)))
    return value, kind


def _check_blocks() -> None:
    """The pattern blocks against a dense C^T C (n = 24, b = 4, any signs)."""
    n, b, m = 24, 4, 6
    c = np.random.default_rng(0).normal(size=n)
    dense = np.array([[c[i - j] if i >= j else 0.0 for j in range(n)] for i in range(n)])
    x = dense.T @ dense
    want = np.stack([x[np.ix_(range(s, n, b), range(s, n, b))] for s in range(b)])
    with jax.enable_x64(True):
        got = np.asarray(_pattern_blocks(jnp.asarray(c), n, b, m))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def main() -> int:
    _check_blocks()
    rows = []
    for spec, n, k, bands in SCHEMAS:
        w = mfnoise.workloads.parse(spec, n)
        p = Participation.epochs(n, k)
        start = time.perf_counter()
        bsr = closed_forms.bsr(n, bands, w)
        row = {"workload": spec, "n": n, "epochs": k, "min_sep": p.min_sep, "bands": bands,
               "closed_bisr": mfnoise.evaluate(closed_forms.bisr(n, bands, w), w, p)["rmse"],
               "bsr": mfnoise.evaluate(bsr, w, p)["rmse"]}
        for name, init in (("optimized", None),
                           ("optimized_from_bsr_inverse",
                            series.reciprocal(np.asarray(bsr.columns_at(np.array([0])))[:bands, 0], bands))):
            s, res = mfnoise.optimize(w, p, "inverse-toeplitz", bands=bands, init=init, progress=False)
            row[name] = res.rmse
            row[name + "_sensitivity_exact"] = res.sensitivity_exact
        row["lower_bound_minimum"], row["lower_bound"] = lower_bound_minimum(w, n, k, bands)
        row["optimized_over_bsr"] = row["optimized"] / row["bsr"]
        row["lower_bound_over_bsr"] = row["lower_bound_minimum"] / row["bsr"]
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| workload | n | epochs | bands | closed BISR | optimized BISR (from BSR^-1) | BSR "
          "| lower-bound min | opt / BSR | lower / BSR | lower bound |")
    print("|" + "---|" * 11)
    for r in rows:
        print(f"| {r['workload']} | {r['n']} | {r['epochs']} | {r['bands']} | {r['closed_bisr']:.4f} "
              f"| {r['optimized']:.4f} ({r['optimized_from_bsr_inverse']:.4f}) | {r['bsr']:.4f} "
              f"| {r['lower_bound_minimum']:.4f} | {r['optimized_over_bsr']:.4f} | {r['lower_bound_over_bsr']:.4f} "
              f"| {r['lower_bound']} |")
    load = os.getloadavg()
    print(f"\nload average at end {load}; wrote {RESULTS}")
    with open(RESULTS, "w") as f:
        json.dump({"load_average_at_end": load, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
