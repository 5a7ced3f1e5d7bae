"""MMCC (mfnoise.training.mmcc) against independent computations: a brute-force lower bound for
tiny n (the exact hockey-stick divergence of a 1-D projection of the release, a mixture over the
2^n sampling outcomes), dp-accounting's Poisson DP-SGD for C = I, and dp-accounting's own
mixture-of-Gaussians PLD for the row mechanism."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mfnoise.training import mmcc


def _projected_delta(c: np.ndarray, q: float, sigma: float, v: np.ndarray, eps: float) -> float:
    """max of both hockey-stick divergences at e^eps between t = v.y with and without the example:
    a mixture over x in {0,1}^n of N(v.Cx, sigma^2 |v|^2) against N(0, sigma^2 |v|^2), by
    quadrature on a fine grid (post-processing: a lower bound on the release's delta(eps))."""
    n = c.shape[0]
    s = sigma * np.linalg.norm(v)
    means, weights = [], []
    for x in itertools.product([0, 1], repeat=n):
        xa = np.asarray(x, float)
        means.append(float(v @ (c @ xa)))
        weights.append(float(np.prod(np.where(xa == 1, q, 1 - q))))
    means, weights = np.asarray(means), np.asarray(weights)
    t = np.linspace(-12 * s, means.max() + 12 * s, 40_001)
    dt = t[1] - t[0]
    p0 = stats.norm.pdf(t, scale=s)
    p1 = (weights[None, :] * stats.norm.pdf(t[:, None], loc=means[None, :], scale=s)).sum(axis=1)
    a = np.e**eps
    return float(max(np.maximum(p1 - a * p0, 0).sum() * dt, np.maximum(p0 - a * p1, 0).sum() * dt))


def _lower_bound_epsilon(c, q, sigma, delta) -> float:
    """The largest eps with projected delta(eps) > delta, over a few directions (each valid)."""
    n = c.shape[0]
    best = 0.0
    for v in (c @ np.ones(n), np.ones(n), c[:, 0], np.eye(n)[-1]):
        lo, hi = 0.0, 20.0
        if _projected_delta(c, q, sigma, v, 0.0) <= delta:
            continue
        for _ in range(22):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _projected_delta(c, q, sigma, v, mid) > delta else (lo, mid)
        best = max(best, lo)
    return best


C4 = np.tril(np.ones((4, 4))) * np.array([1.0, 0.8, 0.6, 0.5])[None, :]  # non-negative, lower triangular


@pytest.fixture(scope="module")
def lower_bound() -> float:
    return _lower_bound_epsilon(C4, 0.3, 1.0, 1e-3)


def test_never_below_brute_force_lower_bound_and_tightens_with_the_grid(lower_bound):
    assert lower_bound > 0.3  # the test statistic sees real privacy loss
    coarse = mmcc.epsilon(C4, 1.0, 1e-3, 0.3, pld_discretization=1e-2, sensitivity_grid=0.05).epsilon
    fine = mmcc.epsilon(C4, 1.0, 1e-3, 0.3, pld_discretization=1e-3, sensitivity_grid=0.005).epsilon
    assert fine >= lower_bound
    assert coarse >= lower_bound
    assert fine < coarse  # refining the (pessimistic) discretisation moves the bound down, toward the lower one


def test_toeplitz_path_never_below_lower_bound():
    c = np.array([1.0, 0.5, 0.375])
    dense = np.array([[c[0], 0, 0], [c[1], c[0], 0], [c[2], c[1], c[0]]])
    lb = _lower_bound_epsilon(dense, 0.3, 1.0, 1e-3)


    from mfnoise.strategies.toeplitz import Toeplitz

    s = Toeplitz(c, 3)
    r = mmcc.epsilon(s, 1.0, 1e-3, 0.3)
    assert r.toeplitz
    assert r.epsilon >= lb
    assert mmcc.epsilon(dense, 1.0, 1e-3, 0.3).epsilon >= lb


def test_identity_is_close_above_dp_sgd():
    n, q, sigma, delta = 30, 0.02, 1.2, 1e-5
    r = mmcc.epsilon(np.eye(n), sigma, delta, q)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    exact = acc.get_epsilon(delta - r.tail_delta)  # C = I: MMCC's rows are exactly the DP-SGD rounds
    assert exact <= r.epsilon <= exact * 1.1


def test_row_pld_is_pessimistic_against_dp_accounting():
    sens, w = np.array([0.0, 0.5, 1.0, 2.0]), np.array([0.9, 0.06, 0.03, 0.01])
    # dp-accounting's own mixture PLD is slow to build: its grid is 3x coarser here (its optimistic
    # estimate is then lower still, its pessimistic one higher: the sandwich stays valid)
    ours = mmcc.mixture_pld(1.0, sens, w, 1e-3)
    optimistic = pld_lib.from_mixture_gaussian_mechanism(1.0, list(sens), list(w), pessimistic_estimate=False,
                                                         value_discretization_interval=3e-3)
    pessimistic = pld_lib.from_mixture_gaussian_mechanism(1.0, list(sens), list(w), value_discretization_interval=3e-3)
    for eps in (0.0, 0.5, 1.0, 2.0):
        d = ours.get_delta_for_epsilon(eps)
        assert d >= optimistic.get_delta_for_epsilon(eps)
        assert d <= pessimistic.get_delta_for_epsilon(eps) * 1.02 + 1e-15


def test_refuses_negative_entries_and_upper_triangular():
    c = np.array([[1.0, 0.0], [-0.2, 1.0]])
    with pytest.raises(ValueError, match=r"non-negative.*C\[1, 0\] = -0.2"):
        mmcc.epsilon(c, 1.0, 1e-5, 0.1)
    with pytest.raises(ValueError, match="lower triangular"):
        mmcc.epsilon(np.array([[1.0, 0.1], [0.0, 1.0]]), 1.0, 1e-5, 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        mmcc.epsilon(np.eye(2), 0.0, 1e-5, 0.1)


def test_more_noise_less_epsilon():
    eps = [mmcc.epsilon(C4, s, 1e-5, 0.1).epsilon for s in (0.8, 1.6, 3.2)]
    assert eps[0] > eps[1] > eps[2] > 0
    assert math.isfinite(eps[0])


# -- independent checks of each step of the derivation (module doc of mmcc) ----------------------
# Notation: P = E_x N(C x, sigma^2 I) (x_j ~ Bernoulli(q) independently), Q = N(0, sigma^2 I).


def _outcomes(n: int, q: float) -> tuple[np.ndarray, np.ndarray]:
    """All x in {0,1}^n and their log-probabilities under independent Bernoulli(q)."""
    xs = np.array(list(itertools.product([0, 1], repeat=n)), float)
    return xs, (xs * math.log(q) + (1 - xs) * math.log1p(-q)).sum(axis=1)


def _exact_deltas(c: np.ndarray, q: float, sigma: float, eps: float, points: int) -> tuple[float, float]:
    """(H_{e^eps}(P || Q), H_{e^eps}(Q || P)) of the whole n-dimensional release (n = 2, 3) by a tensor
    quadrature of the exact likelihood ratio of the 2^n-component mixture against N(0, sigma^2 I)."""
    from scipy.special import logsumexp

    n = c.shape[0]
    xs, logw = _outcomes(n, q)
    means = xs @ c.T
    axes = [np.linspace(min(means[:, r].min(), 0) - 9 * sigma, means[:, r].max() + 9 * sigma, points)
            for r in range(n)]
    dv = float(np.prod([a[1] - a[0] for a in axes]))
    y = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, n)
    q0 = np.exp(-0.5 * (y**2).sum(1) / sigma**2) / (2 * math.pi * sigma**2) ** (n / 2)
    log_lr = np.asarray(logsumexp(logw[None, :] + (y @ means.T - 0.5 * (means**2).sum(1)[None, :]) / sigma**2,
                                  axis=1))
    p1 = q0 * np.exp(log_lr)
    a = math.exp(eps)
    return float(np.maximum(p1 - a * q0, 0).sum() * dv), float(np.maximum(q0 - a * p1, 0).sum() * dv)


@pytest.mark.parametrize("c, q, sigma, delta, points", [
    (np.array([[1.0, 0.0], [1.0, 1.0]]), 0.3, 1.0, 1e-3, 801),
    (np.array([[1.0, 0.0], [0.9, 1.0]]), 0.05, 0.7, 1e-4, 801),
    (np.array([[1.0, 0.0], [0.4, 0.6]]), 0.5, 0.5, 1e-2, 801),
    (np.array([[1.0, 0.0, 0.0], [0.7, 1.0, 0.0], [0.5, 0.7, 1.0]]), 0.2, 1.0, 1e-3, 121),
])
def test_epsilon_holds_for_the_exact_release(c, q, sigma, delta, points):
    """The true delta of the n-dimensional release at MMCC's epsilon is <= delta, in both directions."""
    r = mmcc.epsilon(c, sigma, delta, q)
    remove, add = _exact_deltas(c, q, sigma, r.epsilon, points)
    assert max(remove, add) <= delta
    # not vacuous: below the unamplified Gaussian's epsilon (sensitivity max_x ||C x|| = ||C 1||, C >= 0)
    unamplified = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        dp_accounting.GaussianDpEvent(sigma / float(np.linalg.norm(c.sum(axis=1))))).get_epsilon(delta)
    assert r.epsilon < unamplified


def test_aligned_contributions_are_the_worst_and_larger_entries_dominate():
    """The Gaussian comparison in mmcc's module doc: with C >= 0, contributions of opposite signs
    (C diag(+-1): one example's gradients pointing opposite ways) and an entrywise smaller C
    (a realisation C' <= C-bar) never have larger hockey-stick divergences than C itself, in either
    direction and for e^eps below and above 1 (exact 2-dimensional quadrature)."""
    c, q, sigma = np.array([[1.0, 0.0], [0.8, 1.0]]), 0.3, 1.0
    for eps in (-0.3, 0.0, 0.5, 1.0, 2.0):
        ref = _exact_deltas(c, q, sigma, eps, 601)
        for other in (c @ np.diag([1.0, -1.0]), c @ np.diag([-1.0, 1.0]), c * np.array([[0.9, 0], [0.5, 1.0]])):
            got = _exact_deltas(other, q, sigma, eps, 601)
            assert got[0] <= ref[0] + 1e-9 and got[1] <= ref[1] + 1e-9, (eps, other, got, ref)
        assert ref[0] > 1e-3  # a real divergence is being compared


def test_identity_is_tight_against_the_exact_release():
    """C = I: MMCC's rows are exactly the n subsampled Gaussians, priced at delta - tail_delta; the
    true delta at its epsilon is within the PLD grid of delta - tail_delta (never above)."""
    q, sigma, delta = 0.3, 1.0, 1e-3
    r = mmcc.epsilon(np.eye(2), sigma, delta, q)
    remove, add = _exact_deltas(np.eye(2), q, sigma, r.epsilon, 801)
    assert 0.95 * (delta - r.tail_delta) <= max(remove, add) <= delta - r.tail_delta


def _pair_eps(b: mmcc.RowBounds, q: float, i: int, j: int) -> float:
    """eps_ij the code bounded L_ij by (inverted from pt = q e^eps / (q e^eps + 1 - q))."""
    pt = float(b.pt[i - j] if b.toeplitz else b.pt[j])
    return math.log(pt / (1 - pt)) - math.log(q / (1 - q))


def _toeplitz_dense(c: np.ndarray) -> np.ndarray:
    n = c.size
    return np.array([[c[i - j] if i >= j else 0.0 for j in range(n)] for i in range(n)])


CASES = {
    "dense": (np.tril(np.random.default_rng(3).uniform(0.2, 1.0, (5, 5))), None),
    "toeplitz": (None, np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])),
    "blocks": (None, np.array([1.0, 0.5, 0.375, 0.3125, 0.2734, 0.2461])),
}


def _case(name: str):
    from mfnoise.strategies.toeplitz import Toeplitz

    dense, coeffs = CASES[name]
    if coeffs is not None:
        return Toeplitz(coeffs, coeffs.size), _toeplitz_dense(coeffs)
    return dense, dense


@pytest.mark.parametrize("name", sorted(CASES))
def test_tail_bounds_hold_exactly(name):
    """Step 4: for every pair j < i, P(L_ij > eps_ij) <= delta_1 = tail_delta / pairs, computed
    exactly (L_ij given x is Gaussian: a 2^i-term sum), under P and under Q."""
    from scipy.special import ndtr

    strategy, c = _case(name)
    n, q, sigma, delta = c.shape[0], 0.3, 1.0, 1e-3
    b = mmcc.row_bounds(strategy, sigma, delta, q)
    assert b.toeplitz == (name != "dense")
    delta_1 = b.tail_delta / (n * (n - 1) / 2)
    worst = 0.0
    for i in range(1, n):
        xs, logw = _outcomes(i, q)
        gram = c[:i, :i].T @ c[:i, :i]  # rows < i; columns >= i are zero there
        for j in range(i):
            eps = _pair_eps(b, q, i, j)
            s = math.sqrt(gram[j, j]) / sigma
            mean = xs @ gram[j] / sigma**2 - s**2 / 2
            tail_p = float(np.exp(logw) @ ndtr((mean - eps) / s))
            tail_q = float(ndtr((-s**2 / 2 - eps) / s))
            worst = max(worst, tail_p / delta_1)
            assert tail_p <= delta_1 and tail_q <= delta_1, (i, j, eps, tail_p, delta_1)
    assert worst > 1e-3  # the bounds are not absurdly loose (a real tail is being bounded)


@pytest.mark.parametrize("name", sorted(CASES))
def test_row_law_dominated_on_the_good_event(name):
    """Steps 1-3 and the pricing (grid, ladder, Toeplitz blocks): for outputs y_{<i} in the good event
    G_i = {L_ij <= eps_ij for all j < i}, the exact posterior law of row i's mean C_i x is
    stochastically below the priced law S of the block holding row i: P(C_i x >= u) <= P(S >= u)."""
    strategy, c = _case(name)
    n, q, sigma, delta = c.shape[0], 0.3, 1.0, 1e-3
    b = mmcc.row_bounds(strategy, sigma, delta, q, max_components=8, max_distinct_rows=3)
    if name == "blocks":
        assert any(r.count > 1 for r in b.rows)  # rows priced by a later row
    rng = np.random.default_rng(0)
    checked = 0
    for i in range(1, n):
        row = next(r for r in b.rows if r.first <= i <= r.last)
        xs, logw = _outcomes(i + 1, q)  # x_0..x_i
        a = xs @ c[i, : i + 1]  # row i's mean for each outcome
        cols = c[:i, :i]
        eps = np.array([_pair_eps(b, q, i, j) for j in range(i)])
        for _ in range(150):
            # y_{<i} from P with a random inflation: the claim is for every y in G_i
            x_true = rng.random(i) < rng.uniform(q, 1.0)
            y = cols @ x_true * rng.uniform(0.5, 2.0) + sigma * rng.normal(size=i) * rng.uniform(0.5, 2.0)
            lij = (cols.T @ y - 0.5 * (cols**2).sum(0)) / sigma**2
            if np.any(lij > eps):
                continue
            log_post = logw - ((y[None, :] - xs[:, :i] @ cols.T) ** 2).sum(1) / (2 * sigma**2)
            post = np.exp(log_post - log_post.max())
            post /= post.sum()
            for u in np.unique(a):
                lhs = float(post[a >= u - 1e-12].sum())
                rhs = float(row.probabilities[row.sensitivities >= u - 1e-12].sum())
                assert lhs <= rhs + 1e-9, (i, u, lhs, rhs)
            checked += 1
    assert checked > 100


def test_priced_row_dominates_the_unrounded_product_law():
    """Grid rounding and the component ladder move mass up only: the priced law of a row is
    stochastically above sum_j C_ij B_j, B_j ~ Bernoulli(pt_j) independent, with C unrounded."""
    strategy, c = _case("toeplitz")
    q = 0.3
    b = mmcc.row_bounds(strategy, 1.0, 1e-3, q, max_components=8, sensitivity_grid=0.01)
    last = b.rows[-1]
    assert last.sensitivities.size <= 12 < 2**c.shape[0]  # the ladder was used
    i = c.shape[0] - 1
    probs = np.array([b.pt[i - j] for j in range(i + 1)])
    xs = np.array(list(itertools.product([0, 1], repeat=i + 1)), float)
    w = np.prod(np.where(xs == 1, probs[None, :], 1 - probs[None, :]), axis=1)
    a = xs @ c[i]
    for u in np.unique(a):
        assert w[a >= u].sum() <= last.probabilities[last.sensitivities >= u - 1e-12].sum() + 1e-12


def test_row_pld_is_pessimistic_in_each_direction_against_quadrature():
    """The row PLD's delta(eps) >= the exact hockey-stick divergence in each direction separately
    (remove: mixture || N(0); add: N(0) || mixture), also at eps < 0 (composition needs every
    alpha = e^eps > 0), and close to it."""
    from scipy import integrate

    sigma = 0.8
    sens, w = np.array([0.0, 0.5, 1.0, 2.0]), np.array([0.9, 0.06, 0.03, 0.01])
    pld = mmcc.mixture_pld(sigma, sens, w, 1e-3)

    def mix(t):
        return float(w @ stats.norm.pdf(t, loc=sens, scale=sigma))

    def n0(t):
        return float(stats.norm.pdf(t, scale=sigma))

    for eps in (-0.5, 0.0, 0.2, 0.6, 1.5, 3.0):
        a = math.exp(eps)
        ex_r = integrate.quad(lambda t, a=a: max(mix(t) - a * n0(t), 0.0), -12, 14, limit=400, epsabs=1e-14)[0]
        ex_a = integrate.quad(lambda t, a=a: max(n0(t) - a * mix(t), 0.0), -12, 14, limit=400, epsabs=1e-14)[0]
        got_r = pld._pmf_remove.get_delta_for_epsilon(eps)
        got_a = pld._pmf_add.get_delta_for_epsilon(eps)
        assert ex_r <= got_r <= ex_r * 1.02 + 1e-12, (eps, ex_r, got_r)
        assert ex_a <= got_a <= ex_a * 1.02 + 1e-12, (eps, ex_a, got_a)


def test_row_privacy_loss_is_stochastically_above_the_exact_one():
    """The row PLD's losses are rounded up, cell by cell: for every grid value v, P(L > v) is at
    least the exact P(L > v) in each direction. The loss g(x) = log sum_m w_m exp((c_m x - c_m^2 / 2)
    / sigma^2) is increasing, so the exact tails are normal tails at g^{-1}(v) (found by bisection):
    remove, x ~ mixture, L = g(x); add, x ~ N(0, sigma^2), L = -g(x)."""
    from scipy.special import logsumexp, ndtr

    sigma, d = 0.8, 1e-2
    sens, w = np.array([0.0, 0.5, 1.0, 2.0]), np.array([0.9, 0.06, 0.03, 0.01])
    pld = mmcc.mixture_pld(sigma, sens, w, d)

    def g(x):
        return logsumexp(np.log(w)[None, :] + (np.outer(x, sens) - sens**2 / 2) / sigma**2, axis=1)

    def g_inv(v):
        lo, hi = np.full(v.shape, -40.0 * sigma), np.full(v.shape, 40.0 * sigma + sens.max())
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            up = g(mid) < v
            lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
        return 0.5 * (lo + hi)

    for pmf, remove in ((pld._pmf_remove, True), (pld._pmf_add, False)):
        assert isinstance(pmf, pld_pmf.DensePLDPmf)
        probs = np.asarray(pmf._probs)
        v = (pmf._lower_loss + np.arange(probs.size)) * d
        ours = np.cumsum(probs[::-1])[::-1] - probs + pmf._infinity_mass  # P(L > v_k)
        x = g_inv(v if remove else -v)
        inside = (x > -39.0 * sigma) & (x < 39.0 * sigma + sens.max())
        exact = ndtr((sens[None, :] - x[:, None]) / sigma) @ w if remove else ndtr(x / sigma)
        assert inside.sum() > 100
        assert np.all(ours[inside] >= exact[inside] - 1e-12), float(np.max(exact[inside] - ours[inside]))


def test_long_rows_are_not_inflated_by_the_grid():
    """A row of n decaying entries: each is rounded up by < h where sampled, so h must be small
    relative to the entries (not only to sigma), and entries far below the grid are bounded by their
    sum. The priced row's mean stays within 10% above the exact E[sum_k c_k B_k], B_k ~ Bernoulli(pt_k)
    (half of it the bounded small entries, half the component ladder; a grid of sigma / 400 alone
    priced it ~100x too high)."""
    from mfnoise.strategies.toeplitz import Toeplitz

    n, q, sigma = 400, 0.01, 20.0
    c = 0.5 ** np.arange(n)
    b = mmcc.row_bounds(Toeplitz(c, n), sigma, 1e-5, q)
    last = b.rows[-1]
    exact = float(c @ b.pt)
    priced = float(last.sensitivities @ last.probabilities)
    assert exact <= priced <= 1.1 * exact, (exact, priced)


def test_many_rows_are_not_inflated_by_the_pld_grid():
    """Composing n rows whose losses are rounded up by up to d costs about n d / 2 in epsilon: the
    default grid shrinks with n, so C = I at n = 400 stays within 3% of dp-accounting's Poisson DP-SGD
    (priced at the same delta - tail_delta); d = 1e-3 would add ~0.2."""
    n, q, sigma, delta = 400, 0.01, 1.0, 1e-5
    r = mmcc.epsilon(np.eye(n), sigma, delta, q)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    exact = acc.get_epsilon(delta - r.tail_delta)
    assert exact <= r.epsilon <= exact * 1.03


# -- speed: the same numbers faster (mixture PLD pieces, composition order, calibration search) --


def _cells_two_sided(x, sens, w, sigma):
    """The former cell masses: CDF and survival function at every point, the CDF's differences
    where the cell's right end has CDF <= 1/2, the survival function's elsewhere."""
    u = (x[:, None] - sens[None, :]) / sigma
    cdf = stats.norm.cdf(u) @ w
    sf = stats.norm.sf(u) @ w
    return np.maximum(np.where(cdf[1:] <= 0.5, np.diff(cdf), -np.diff(sf)), 0.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.floats(0.2, 5.0), st.integers(0, 10_000), st.integers(2, 20_000))
def test_mixture_cells_and_log_ratio_match_the_direct_formulas(m, sigma, seed, points):
    from scipy.special import logsumexp

    rng = np.random.default_rng(seed)
    sens = np.sort(rng.uniform(0.0, 4.0 * sigma, m))
    w = rng.dirichlet(np.ones(m))
    x = np.sort(rng.uniform(-12 * sigma, sens.max() + 12 * sigma, points))
    cells = mmcc._mixture_cells(x, sens, w, sigma)
    direct = _cells_two_sided(x, sens, w, sigma)
    assert cells.shape == direct.shape
    np.testing.assert_allclose(cells, direct, rtol=1e-9, atol=1e-300)
    g = mmcc._mixture_log_ratio(x, sens, np.log(w), sigma)
    g_ref = np.asarray(logsumexp(np.log(w)[None, :] + (np.outer(x, sens) - sens[None, :] ** 2 / 2) / sigma**2, axis=1))
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def test_tree_composition_is_the_chains():
    """compose_all (balanced) against one PLD after the other: the same composition up to
    dp-accounting's pessimistic tail truncation (<= 1e-15 of mass per compose): epsilon to 1e-7."""
    rng = np.random.default_rng(3)
    plds = [mmcc.mixture_pld(1.5, np.array([0.0, a, 2 * a]), np.array([0.9, 0.08, 0.02]), 1e-3)
            for a in rng.uniform(0.1, 1.0, 7)]
    tree = mmcc.compose_all(plds)
    chain = plds[0]
    for p in plds[1:]:
        chain = chain.compose(p)
    for delta in (1e-3, 1e-5, 1e-7):
        assert tree.get_epsilon_for_delta(delta) == pytest.approx(chain.get_epsilon_for_delta(delta), rel=1e-7)
    r_tree = mmcc.epsilon(C4, 1.0, 1e-5, 0.1, compose="tree").epsilon
    assert r_tree == pytest.approx(mmcc.epsilon(C4, 1.0, 1e-5, 0.1).epsilon, rel=1e-7)
    with pytest.raises(ValueError, match="compose"):
        mmcc.epsilon(C4, 1.0, 1e-5, 0.1, compose="fft")


def _bisection_evaluations(eps_of, target, hi, rel):
    """The former MMCC calibration (bracket by halving from z_none, bisection in log z): its count."""
    seen = {}

    def e(z):
        seen.setdefault(z, eps_of(z))
        return seen[z]

    while e(hi) > target:
        hi *= 1.5
    lo = hi / 2
    while e(lo) <= target:
        hi, lo = lo, lo / 2
    while hi - lo > rel * hi:
        mid = math.sqrt(lo * hi)
        hi, lo = (mid, lo) if e(mid) <= target else (hi, mid)
    return len(seen)


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-3, 3.0), st.floats(0.7, 3.0), st.floats(0.0, 0.02), st.sampled_from(["power", "exp"]),
       st.floats(0.3, 8.0), st.floats(0.5, 5.0))
def test_mmcc_search_is_calibrated_in_few_evaluations(root, slope, floor, kind, target, start):
    """On strictly decreasing epsilon curves shaped like MMCC's (a power of 1 / z with a PLD-bias
    floor; exp(1 / z^2) growth at small z), the z returned has eps(z) <= target < eps(z / (1 + rel)),
    and the search needs at most 10 evaluations and never more than the bisection it replaced."""
    from mfnoise.training.accounting import mmcc_search

    rel = 1e-3
    if kind == "power":
        def eps(z):
            return (target - floor) * (root / z) ** slope + floor
    else:
        def eps(z):
            return (target - floor) * math.expm1(min((root / z) ** slope, 700.0)) / math.expm1(1.0) + floor
    calls = []

    def counted(z):
        calls.append(z)
        return eps(z)

    hi0 = start * max(root, 1e-3) * 20
    z = mmcc_search(counted, target, hi0, rel)
    assert eps(z) <= target < eps(z / (1 + rel))
    assert len(set(calls)) == len(calls)  # each z once
    assert len(calls) <= 10, calls
    assert len(calls) <= _bisection_evaluations(eps, target, hi0, rel)


@settings(max_examples=30, deadline=None)
@given(st.floats(1e-2, 1.0), st.integers(0, 1000), st.floats(1e-4, 1e-1))
def test_mmcc_search_verifies_its_answer_on_non_monotone_curves(root, seed, wiggle):
    """A curve that is not monotone (MMCC's discretisation moves with z): whatever the search
    visits, the z it returns was evaluated and is <= target, with an evaluated z' > z / (1 + rel)
    above target."""
    from mfnoise.training.accounting import mmcc_search

    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi)
    seen = {}

    def eps(z):
        seen[z] = 2.0 * (root / z) ** 1.5 * (1.0 + wiggle * math.sin(phase + 300.0 * z))
        return seen[z]

    z = mmcc_search(eps, 2.0, 5.0, 1e-3)
    assert z in seen and seen[z] <= 2.0
    assert any(z / (1 + 1e-3) <= zz < z and e > 2.0 for zz, e in seen.items())


def test_mmcc_calibration_is_one_sided_and_tight():
    """calibrate(sampling="poisson") through the MMCC route at tiny n: epsilon(z) <= target and
    epsilon(z (1 - 2e-3)) > target, both priced by the same route (explain)."""
    import mfnoise
    from mfnoise.core.participation import Participation
    from mfnoise.training import accounting

    n, d, m, target = 4, 200, 40, 2.0
    p = Participation(n, n, 1)
    kw = {"sampling": "poisson", "dataset_size": d, "batch_size": m, "strategy": mfnoise.bisr(n, 2),
          "mmcc_options": {"pld_discretization": 1e-2, "max_components": 16}}
    z = accounting.calibrate(target, 1e-5, p, **kw)
    assert accounting.explain(z, 1e-5, p, **kw).epsilon <= target
    assert accounting.explain(z * (1 - 2e-3), 1e-5, p, **kw).epsilon > target


def test_calibration_grid_scales_with_the_target_and_stays_one_sided(monkeypatch):
    """Without a pld_discretization of the caller's, a calibration to epsilon prices every z on
    calibration_discretization(n, epsilon) = min(1e-3, PLD_BIAS max(1, epsilon) / n) (one grid for the
    whole search); the z it returns keeps epsilon <= target on that grid and on the default, finer
    one, and 0.2% less noise exceeds the target on the grid it was calibrated on."""
    import mfnoise
    from mfnoise.core.participation import Participation
    from mfnoise.training import accounting

    n, d, m, target = 40, 400, 40, 8.0
    p = Participation(n, n, 1)
    kw = {"sampling": "poisson", "dataset_size": d, "batch_size": m, "strategy": mfnoise.bisr(n, 4)}
    grids = []
    real = mmcc.epsilon

    def recording(*args, **kwargs):
        grids.append(kwargs.get("pld_discretization"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mmcc, "epsilon", recording)
    z = accounting.calibrate(target, 1e-5, p, tol=1e-3, **kw)
    want = min(1e-3, mmcc.PLD_BIAS * target / n)
    assert want == 1e-3 > mmcc.PLD_BIAS / n  # 4x coarser than epsilon's default grid here (capped at 1e-3)
    assert grids and set(grids) == {mmcc.calibration_discretization(n, target)} == {want}
    on_grid = {"mmcc_options": {"pld_discretization": want}}
    assert accounting.explain(z, 1e-5, p, **kw, **on_grid).epsilon <= target
    assert accounting.explain(z, 1e-5, p, **kw).epsilon <= target  # the default grid, finer
    assert accounting.explain(z * (1 - 2e-3), 1e-5, p, **kw, **on_grid).epsilon > target
    assert mmcc.calibration_discretization(2000, 0.5) == mmcc.PLD_BIAS / 2000  # below 1: the default
    with pytest.raises(ValueError, match="target_epsilon"):
        mmcc.calibration_discretization(10, math.inf)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 300), st.floats(1e-4, 0.5), st.floats(0.0, 50.0),
       st.floats(1.0, 40.0), st.booleans())
def test_chernoff_search_is_at_most_the_grid_minimum(seed, m, q, s2, log_inv, monotone):
    """The searched Chernoff bound against brute force: never above the minimum over every grid
    lambda (what the bound was before the search), never below the minimum over a 20000-point
    grid of the same range, to 1e-6 (it is a value of the same bound at some lambda in the range)."""
    rng = np.random.default_rng(seed)
    w = rng.exponential(1.0, m) * rng.uniform(0.0, 3.0) * (rng.uniform(size=m) < 0.9)
    p = np.full(m, q)
    lams = mmcc._LAMBDAS_MONOTONE if monotone else mmcc._LAMBDAS

    def f(lam):  # the bound at every lambda of a grid, brute force
        mgf = np.logaddexp(np.log1p(-q), np.log(q) + np.outer(lam, w)).sum(axis=1)
        return (log_inv + (lam**2 - lam) * s2 / 2 + mgf) / lam

    got = mmcc._chernoff_eps(w, p, s2, log_inv, lams)
    assert got <= float(np.min(f(lams))) * (1 + 1e-12) + 1e-12
    assert got >= float(np.min(f(np.geomspace(lams[0], lams[-1], 20_000)))) * (1 - 1e-6) - 1e-9
