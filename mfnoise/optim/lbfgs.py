"""L-BFGS with a strong-Wolfe line search, in numpy, for problems with few parameters.

For a loss of a few dozen parameters (the BLT family: 2d = 16 at 8 buffers) scipy's L-BFGS-B
costs more around the loss than the loss itself: importing scipy.optimize (about 0.3 s of a
1.1 s optimization, BLT n = 10^7, 8 buffers, max error) and its Python wrapper on every
iteration. Here the direction is a handful of numpy calls on the m-vectors (m the parameter count)
of the last MEMORY correction pairs, and nothing but numpy is imported.

Mathematics ("Numerical Optimization", Nocedal & Wright, 2nd ed. 2006, Algorithms 6.1, 3.5, 3.6):
* direction p_k = -H_k g_k, H_k the L-BFGS inverse Hessian (N&W Algorithm 7.4) of the last
  MEMORY pairs s = x_{k+1} - x_k, y = g_{k+1} - g_k with H_0 = gamma_k I, gamma_k = s^T y / y^T y
  of the newest pair (N&W (7.20)), evaluated in compact form (``_direction``); the first step
  (no pairs) is steepest descent of length 1 / ||g_0|| (as L-BFGS-B's first step);
* a pair is kept only when s^T y > EPS (-g^T s) (L-BFGS-B's test: H stays positive definite);
* step length alpha satisfying the strong Wolfe conditions f(x + alpha p) <= f(x) + c1 alpha g^T p
  and |g(x + alpha p)^T p| <= c2 |g^T p| (c1 = 1e-3, c2 = 0.9: L-BFGS-B's dcsrch constants),
  bracketing (Algorithm 3.5) then zoom (Algorithm 3.6) with safeguarded cubic interpolation. A
  non-finite value or gradient at a trial point (outside the loss's domain) is a wall: the step
  is shortened.

Stops: ``"converged"`` when max |g| <= gtol or the relative decrease of one iteration
(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= ftol (L-BFGS-B's two tests), ``"line search"``
when no step of ``max_linesearch`` trials decreases f (float64 resolution reached: converged in
the sense of L-BFGS-B's ABNORMAL), or what ``on_iteration`` returns (the caller's tolerance window,
callback and budgets), or ``"max_iterations"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

C1 = 1e-3
C2 = 0.9
EPS = 2.2e-16
MAX_LINESEARCH = 40


def _cubic_min(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float | None:
    """Minimiser of the cubic interpolating f and f' at a and b (N&W (3.59)), None if it has none."""
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    if not (disc >= 0.0 and math.isfinite(disc)):
        return None
    d2 = math.copysign(math.sqrt(disc), b - a)
    denom = db - da + 2.0 * d2
    if denom == 0.0:
        return None
    t = b - (b - a) * (db + d2 - d1) / denom
    return t if math.isfinite(t) else None


def line_search(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x: np.ndarray, f0: float, d0: float,
                p: np.ndarray, alpha: float, see: Callable[[np.ndarray, float], None],
                max_trials: int = MAX_LINESEARCH) -> tuple[float, float, np.ndarray] | None:
    """A step alpha along p satisfying the strong Wolfe conditions (N&W Algorithms 3.5 and 3.6):
    (alpha, f, g) at x + alpha p, or the best decreasing trial when ``max_trials`` run out, or None
    when no trial decreased f. d0 = g(x)^T p < 0. ``see(x, f)`` is called on every trial."""
    best: tuple[float, float, np.ndarray] | None = None
    trials = 0

    def evaluate(a: float) -> tuple[float, float, np.ndarray]:
        nonlocal trials, best
        trials += 1
        xa = x + a * p
        fa, ga = fun(xa)
        see(xa, fa)
        if not (math.isfinite(fa) and np.all(np.isfinite(ga))):
            return math.inf, math.nan, ga
        if fa < f0 and (best is None or fa < best[1]):
            best = (a, fa, ga)
        return fa, float(ga @ p), ga

    def wolfe(fa: float, da: float, a: float) -> bool:
        return fa <= f0 + C1 * a * d0 and abs(da) <= -C2 * d0

    def zoom(lo: float, f_lo: float, d_lo: float, hi: float, f_hi: float, d_hi: float):
        # Invariant (N&W 3.6): lo satisfies sufficient decrease with the lowest f so far, and
        # d_lo (hi - lo) < 0: a minimiser satisfying the strong Wolfe conditions lies between them.
        while trials < max_trials:
            width = hi - lo
            t = _cubic_min(lo, f_lo, d_lo, hi, f_hi, d_hi) if math.isfinite(f_hi) else None
            if t is None or not (min(lo, hi) + 0.1 * abs(width) <= t <= max(lo, hi) - 0.1 * abs(width)):
                t = lo + 0.5 * width  # bisection when the cubic is unusable or too close to an end
            ft, dt, gt = evaluate(t)
            if not math.isfinite(ft) or ft > f0 + C1 * t * d0 or ft >= f_lo:
                hi, f_hi, d_hi = t, ft, dt
            else:
                if abs(dt) <= -C2 * d0:
                    return t, ft, gt
                if dt * (hi - lo) >= 0:
                    hi, f_hi, d_hi = lo, f_lo, d_lo
                lo, f_lo, d_lo = t, ft, dt
            if abs(hi - lo) <= EPS * max(abs(lo), abs(hi)):
                break
        return best

    a_prev, f_prev, d_prev = 0.0, f0, d0
    a = alpha
    while trials < max_trials:
        fa, da, ga = evaluate(a)
        if not math.isfinite(fa) or fa > f0 + C1 * a * d0 or (a_prev > 0 and fa >= f_prev):
            return zoom(a_prev, f_prev, d_prev, a, fa, da)
        if wolfe(fa, da, a):
            return a, fa, ga
        if da >= 0:
            return zoom(a, fa, da, a_prev, f_prev, d_prev)
        # Still descending at a: extrapolate (cubic, kept within [2a, 10a] so that the bracket grows).
        t = _cubic_min(a_prev, f_prev, d_prev, a, fa, da)
        a_prev, f_prev, d_prev = a, fa, da
        a = min(max(t if t is not None else 4.0 * a, 2.0 * a), 10.0 * a)
    return best


MEMORY = 30
"""Correction pairs kept (L-BFGS-B's maxcor as mfnoise.optim.solver calls it)."""


def _direction(g: np.ndarray, s: np.ndarray, y: np.ndarray, r_inv: np.ndarray, gamma: float) -> np.ndarray:
    """-H g for the L-BFGS inverse Hessian of the pairs s, y (rows, oldest first) and H_0 = gamma I,
    in compact form (Byrd, Nocedal & Schnabel 1994, "Representations of quasi-Newton matrices and
    their use in limited memory methods", Math. Programming 63, Theorem 2.2):
    H = gamma I + [S  gamma Y] [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]] [S^T; gamma Y^T],
    R = upper triangle of S^T Y, D its diagonal (S, Y: columns s_i, y_i). So, with q = R^-1 S^T g,
    H g = gamma g + S R^-T ((D + gamma Y^T Y) q - gamma Y^T g) - gamma Y q: a few small matrix-vector
    products (``r_inv`` = R^-1, kept by ``_push``) instead of the two-loop recursion's 4k vector
    operations."""
    if s.shape[0] == 0:
        return -g
    q = r_inv @ (s @ g)
    yq = y.T @ q
    w = np.diagonal(r_inv) ** -1 * q + gamma * (y @ (yq - g))  # D q + gamma Y^T (Y q - g)
    return -(gamma * g + s.T @ (r_inv.T @ w) - gamma * yq)


def _push(s: np.ndarray, y: np.ndarray, r_inv: np.ndarray, s_new: np.ndarray, y_new: np.ndarray,
          memory: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs with (s_new, y_new) appended (the oldest dropped beyond ``memory``) and R^-1 for them.

    R gains the column (s_i . y_new)_i over the diagonal s_new . y_new = sy: for R' = [[R, r], [0, sy]],
    R'^-1 = [[R^-1, -R^-1 r / sy], [0, 1 / sy]]; dropping the oldest pair drops R's first row and
    column, and the inverse of a trailing block of a triangular matrix is that block of its inverse."""
    k = s.shape[0]
    sy = float(s_new @ y_new)
    grown = np.zeros((k + 1, k + 1))
    grown[:k, :k] = r_inv
    grown[:k, k] = -(r_inv @ (s @ y_new)) / sy
    grown[k, k] = 1.0 / sy
    s, y = np.vstack([s, s_new]), np.vstack([y, y_new])
    if k + 1 > memory:
        return s[1:], y[1:], grown[1:, 1:]
    return s, y, grown


def minimize(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, *,
             on_iteration: Callable[[np.ndarray, float], str | None], ftol: float, gtol: float,
             max_iterations: int, see: Callable[[np.ndarray, float], None] = lambda x, f: None,
             memory: int = MEMORY) -> str:
    """Minimises fun (x -> (f, gradient), numpy float64) from x0 by L-BFGS (module docstring); returns
    why it stopped. ``on_iteration(x, f)`` is called after every iteration and stops the run by
    returning a reason; ``see(x, f)`` after every evaluation (the caller's best-point tracker)."""
    x = np.array(x0, np.float64, copy=True)
    f, g = fun(x)
    see(x, f)
    if not (math.isfinite(f) and np.all(np.isfinite(g))):
        return "non-finite loss at the start"
    m = x.size
    s_mem = np.zeros((0, m))
    y_mem = np.zeros((0, m))
    r_inv = np.zeros((0, 0))
    gamma = 1.0
    for _ in range(max_iterations):
        if float(np.max(np.abs(g), initial=0.0)) <= gtol:
            return "converged"
        p = _direction(g, s_mem, y_mem, r_inv, gamma)
        d0 = float(g @ p)
        if not (d0 < 0 and math.isfinite(d0)):  # rounding made H g useless: forget the memory
            s_mem, y_mem, r_inv = s_mem[:0], y_mem[:0], r_inv[:0, :0]
            p = -g
            d0 = float(g @ p)
        # The first step (no memory) has length 1 / ||g|| (L-BFGS-B's first step), later ones 1.
        alpha = 1.0 if s_mem.shape[0] else min(1.0, 1.0 / max(float(np.linalg.norm(p)), 1e-300))
        step = line_search(fun, x, f, d0, p, alpha, see)
        if step is None:
            return "line search"
        a, f_new, g_new = step
        s, y = a * p, g_new - g
        sy = float(s @ y)
        # L-BFGS-B's skip test: the curvature s^T y must exceed machine epsilon times -g^T s.
        if sy > EPS * (-a * d0):
            s_mem, y_mem, r_inv = _push(s_mem, y_mem, r_inv, s, y, memory)
            gamma = sy / float(y @ y)
        f_prev = f
        x, f, g = x + s, f_new, g_new
        why = on_iteration(x, f)
        if why is not None:
            return why
        if f_prev - f <= ftol * max(abs(f_prev), abs(f), 1.0):
            return "converged"
    return "max_iterations"
