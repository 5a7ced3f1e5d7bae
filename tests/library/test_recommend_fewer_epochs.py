"""A strategy built for more participations serves fewer: ``Participation.covers`` and ``recommend``
for epochs the library does not hold.

References are independent: pattern inclusion by enumerating patterns; sensitivities by brute force
over the patterns on the dense C (sens^2 = max_P sum_{i,j in P} X_ij, X = C^T C, exact when the
blocks are non-negative, which is asserted); rmse = sens ||A C^-1||_F / sqrt(n) by a dense solve.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfnoise import cli
from mfnoise.core.participation import EpochsWarning, Participation
from mfnoise.library import recommend
from mfnoise.strategies import io


def _epochs(n: int, k: int) -> Participation:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EpochsWarning)
        return Participation.epochs(n, k)


@st.composite
def schemas(draw, n: int) -> Participation:
    if draw(st.booleans()):
        return _epochs(n, draw(st.integers(1, n)))
    return Participation(n, draw(st.integers(1, n)), draw(st.integers(1, n)))


def _all_patterns(p: Participation) -> list[tuple[int, ...]]:
    """Every non-empty pattern, by brute force over all subsets (small n), via the schema's definition."""
    out = []
    for size in range(1, p.n + 1):
        for pat in itertools.combinations(range(p.n), size):
            if p.cyclic:
                ok = len({t % p.min_sep for t in pat}) == 1
            else:
                ok = size <= p.max_participations and all(j - i >= p.min_sep for i, j in zip(pat, pat[1:]))
            if ok:
                out.append(pat)
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 7).flatmap(lambda n: st.tuples(schemas(n), schemas(n))))
def test_covers_is_pattern_inclusion(pair):
    big, small = pair
    theirs = set(_all_patterns(small))
    mine = set(_all_patterns(big))
    assert big.covers(small) == (theirs <= mine)


def test_covers_needs_the_same_n():
    assert not Participation(10, 2, 3).covers(Participation(9, 1, 9))


def test_more_participations_with_the_same_min_sep_cover_fewer():
    for k in range(1, 6):
        for extra in range(3):
            assert Participation(20, k + extra, 4).covers(Participation(20, k, 4))
            assert Participation(20, k + extra, 4).covers(Participation(20, k, 5))  # farther apart too
    # cyclic epochs: k' covers k exactly when n // k' divides n // k
    assert _epochs(1000, 8).covers(_epochs(1000, 4)) and _epochs(1000, 4).covers(_epochs(1000, 2))
    assert not _epochs(1000, 4).covers(_epochs(1000, 3))  # 250 does not divide 333


def _sens_brute(c: np.ndarray, p: Participation) -> float:
    x = c.T @ c
    best = 0.0
    for pat in p.patterns():  # cyclic: the maximal patterns; min-sep: all
        block = x[np.ix_(pat, pat)]
        assert block.min() >= -1e-12 * max(1.0, block.max())  # |X| sum = the sensitivity
        best = max(best, float(block.sum()))
    return math.sqrt(best)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 7).flatmap(lambda n: st.tuples(schemas(n), schemas(n), st.integers(0, 2**31 - 1))))
def test_a_covering_schema_bounds_the_sensitivity(args):
    big, small, seed = args
    if not big.covers(small):
        return
    c = np.tril(np.random.default_rng(seed).uniform(0.0, 1.0, (big.n, big.n)))
    np.fill_diagonal(c, 1.0)
    assert _sens_brute(c, small) <= _sens_brute(c, big) * (1 + 1e-12)


# --- recommend for epochs off the library grid -------------------------------------------------------

N, EPOCHS, NEAREST = 1000, 3, 4  # the library holds e1, e2, e4, ...: 3 epochs takes the e4 entries


def _reference(path: str, p: Participation) -> dict[str, float]:
    strategy = io.load(path)
    c = strategy.dense()
    sens = _sens_brute(c, p)
    a = np.tril(np.ones((N, N)))
    b = np.linalg.solve(c.T, a.T).T  # B C = A
    return {"sensitivity": sens, "rmse": sens * float(np.linalg.norm(b)) / math.sqrt(N),
            "max_error": sens * float(np.max(np.linalg.norm(b, axis=1)))}


@pytest.fixture(scope="module")
def offered():
    return recommend.candidates(N, EPOCHS, "prefix")


def test_entries_built_for_more_epochs_are_offered_recomputed(offered):
    p = _epochs(N, EPOCHS)
    library = offered[:-1]
    assert offered[-1]["name"] == "dp-sgd" and library
    for c in library:
        assert c["built_for"]["epochs"] == NEAREST and f"-e{NEAREST}-" in c["name"]
        assert (c["epochs"], c["max_participations"], c["min_sep"]) == (EPOCHS, p.max_participations, p.min_sep)
        assert c["stored_schema_covers"] == _epochs(N, NEAREST).covers(p)
    # The recomputed values against brute force, for one of each family.
    for family in sorted({c["family"] for c in library}):
        c = next(c for c in library if c["family"] == family)
        want = _reference(c["path"], p)
        for key in ("sensitivity", "rmse", "max_error"):
            assert c[key] == pytest.approx(want[key], rel=1e-8), (c["name"], key)
        assert c["sensitivity_exact"]


@pytest.mark.parametrize("objective,key", [("rmse", "rmse"), ("max", "max_error")])
def test_recommend_picks_the_best_recomputed_entry(offered, objective, key):
    r = recommend.recommend(N, EPOCHS, 10**6, None, objective=objective)
    assert r["built_for_epochs"] == NEAREST and r["epochs"] == EPOCHS
    assert r["error"] == min(c[key] for c in offered)
    chosen = next(c for c in offered if c["name"] == r["name"])
    assert r[key] == chosen[key] != chosen["built_for"][key]  # recomputed, not the stored value
    # Fewer participations than built for: never a larger sensitivity than stored here.
    assert r["sensitivity"] <= chosen["built_for"]["sensitivity"] * (1 + 1e-12)


def test_epochs_beyond_the_library_are_refused_saying_what_it_holds():
    with pytest.raises(ValueError, match=r"epochs=65 or more.*it has epochs \[1, 2, 4, .*64\].*serves fewer"):
        recommend.recommend(N, 65, 10)


def test_cli_says_what_the_entry_was_built_for(capsys):
    assert cli.main(["recommend", "--n", str(N), "--epochs", str(EPOCHS), "--params", "1000"]) == 0
    out = capsys.readouterr().out
    assert f"built for {NEAREST} epochs" in out and f"recomputed for {EPOCHS} epochs" in out
