"""Participation schemas: validation, epochs, and patterns against an enumeration from the definition."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfnoise import Participation
from mfnoise.cli import main as cli_main
from mfnoise.core.participation import EpochsWarning, check_participation

from conftest import FEW, all_patterns


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 1, 1), "n must be a positive integer, got 0"),
        ((-3, 1, 1), "got -3"),
        ((5, 0, 1), "max_participations must be a positive integer, got 0"),
        ((5, -2, 1), "got -2"),
        ((5, 1, 0), "min_sep must be a positive integer, got 0"),
        ((5, 1, -1), "got -1"),
        ((5, 1, 6), "min_sep=6"),
    ],
)
def test_refuses_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        Participation(*args)


@pytest.mark.parametrize("args", [(5.5, 1, 1), (5, 1.5, 1), (5, 1, "2"), (True, 1, 1), (5, None, 1)])
def test_refuses_non_integers(args):
    with pytest.raises(TypeError, match="integer"):
        Participation(*args)


def test_refuses_inconsistent_cyclic():
    with pytest.raises(ValueError, match="max_participations=2"):
        Participation(10, 2, 3, cyclic=True)  # ceil(10 / 3) = 4
    with pytest.raises(ValueError, match="epochs=11"):
        Participation.epochs(10, 11)
    with pytest.raises(ValueError, match="got 0"):
        Participation.epochs(10, 0)
    with pytest.raises(ValueError, match="got 0"):
        Participation.single(0)


def test_unreachable_max_participations_is_legal():
    p = Participation(10, 7, 3)
    assert p.max_participations == 7
    assert p.reachable_participations == 4


@pytest.mark.parametrize("n,k", [(10, 1), (10, 2), (10, 3), (10, 4), (7, 2), (12, 5), (9, 9), (100, 7), (5, 5)])
def test_epochs(n, k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EpochsWarning)  # tested below
        p = Participation.epochs(n, k)
    b = n // k
    assert p.cyclic and p.kind == "cyclic"
    assert p.min_sep == b
    assert p.max_participations == -(-n // b)
    if n % k == 0:
        assert p.max_participations == k
    # Fixed cyclic batches: step t uses batch t mod b; the batch of step t is used at these steps.
    uses = {c: [t for t in range(n) if t % b == c] for c in range(b)}
    assert max(len(v) for v in uses.values()) == p.max_participations
    assert sorted(p.cyclic_patterns()) == sorted(tuple(v) for v in uses.values())


def test_single():
    p = Participation.single(6)
    assert (p.n, p.max_participations, p.min_sep) == (6, 1, 6)
    assert sorted(p.patterns()) == [(t,) for t in range(6)]


@FEW
@given(n=st.integers(1, 10), data=st.data())
def test_contains_and_patterns_match_definition(n, data):
    cyclic = data.draw(st.booleans())
    if cyclic:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EpochsWarning)
            p = Participation.epochs(n, data.draw(st.integers(1, n)))
    else:
        b = data.draw(st.integers(1, n))
        p = Participation(n, data.draw(st.integers(1, -(-n // b) + 1)), b)
    k, b = p.max_participations, p.min_sep
    want = set(all_patterns(n, k, b, p.cyclic))
    # contains() agrees with the definition on every subset of the steps.
    for size in range(1, n + 1):
        for combo in itertools.combinations(range(n), size):
            assert p.contains(combo) == (combo in want), combo
            assert p.contains(list(reversed(combo))) == (combo in want)
    assert not p.contains([n])
    assert not p.contains([-1])
    assert not p.contains([0, 0])
    # patterns(): every one valid, and every pattern is a subset of one of them.
    maximal = list(p.patterns())
    assert all(P in want for P in maximal)
    assert all(any(set(P) <= set(M) for M in maximal) for P in want)
    assert max(len(P) for P in want) == p.reachable_participations


@pytest.mark.parametrize("p", [Participation(10, 3, 2), Participation.epochs(9, 3), Participation(10, 4, 3, True),
                               Participation.single(4)])
def test_dict_round_trip(p):
    d = p.to_dict()
    assert d["kind"] == p.kind
    assert Participation.from_dict(d) == p
    with pytest.raises(ValueError, match="'weird'"):
        Participation.from_dict({**d, "kind": "weird"})


def test_str_and_frozen():
    p = Participation(10, 3, 2)
    assert "min_sep=2" in str(p)
    assert "epochs=" in str(Participation.epochs(9, 3))
    with pytest.raises(Exception):  # noqa: B017 (any refusal: the schema is frozen)
        p.n = 3  # type: ignore[misc]


# -- Participation.epochs(n, k) with k not dividing n -------------------------------------------
def most_uses(n: int, b: int) -> int:
    """How often the most used of b fixed batches is used in n steps (step t uses batch t mod b)."""
    return max(sum(1 for t in range(n) if t % b == c) for c in range(b))


@pytest.mark.parametrize("n,k", [(10, 3), (10, 4), (7, 2), (12, 5), (100, 7), (14, 5), (1000, 64)])
def test_epochs_warns_when_k_does_not_divide_n(n, k):
    b = n // k
    uses = most_uses(n, b)
    assert uses > k  # the reason for the warning, counted step by step
    with pytest.warns(EpochsWarning) as record:
        p = Participation.epochs(n, k)
    assert len(record) == 1
    message = str(record[0].message)
    assert f"max_participations={uses}, not {k}" in message
    assert p.max_participations == uses
    # the two suggestions are real schemas with exactly k participations
    assert f"Participation({n}, max_participations={k}, min_sep={b})" in message
    exact = Participation(n, max_participations=k, min_sep=b)
    assert exact.reachable_participations == k
    assert f"Participation.epochs({k * b}, {k})" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Participation.epochs(k * b, k).max_participations == most_uses(k * b, b) == k
    assert record[0].filename == __file__  # points at the caller, not at mfnoise


@given(n=st.integers(1, 300), data=st.data())
def test_epochs_warns_exactly_when_participations_exceed_k(n, data):
    k = data.draw(st.integers(1, n))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p = Participation.epochs(n, k)
    assert p.max_participations == most_uses(n, n // k) == math.ceil(n / (n // k))
    assert bool(record) == (p.max_participations != k)
    assert all(issubclass(w.category, EpochsWarning) for w in record)


def test_cli_prints_the_epochs_warning_on_stderr(capsys):
    assert cli_main(["evaluate", "--family", "identity", "--n", "10", "--epochs", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout stays exactly one JSON object
    assert result["max_participations"] == 4
    assert "mfnoise: warning:" in err and "max_participations=4, not 3" in err
    assert "--min-sep 3 --max-participations 3" in err
    assert cli_main(["evaluate", "--family", "identity", "--n", "9", "--epochs", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["max_participations"] == 3 and "warning" not in err


def test_check_participation():
    """The one validator of a schema argument: the schema itself, or an error naming the value."""
    p = Participation(10, 3, 2)
    assert check_participation(p) is p and check_participation(p, 10) is p
    with pytest.raises(TypeError, match="expected a Participation, got dict"):
        check_participation(p.to_dict())
    with pytest.raises(ValueError, match="participation has n=10 but the banded strategy has n=12"):
        check_participation(p, 12, "the banded strategy")
