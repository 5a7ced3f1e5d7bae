"""The LM demo (``mfnoise demo --task lm``): the corpus split, and a tiny run end to end through the
CLI, checked against independent computations: the noise multiplier against dp-accounting's own
calibration of one Gaussian mechanism, the noise scale against a float64 numpy brute force of each
strategy's sensitivity over the cyclic participation patterns, and the batches against a direct
count of every example's steps."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

pytest.importorskip("flax", reason="the LM demo needs flax (pip install 'mfnoise[flax]')")

import dp_accounting  # noqa: E402

from mfnoise import lm_demo  # noqa: E402
from mfnoise.cli import main as cli_main  # noqa: E402

TINY = dict(epochs=2, batch_size=32, width=16, layers=1, heads=2, mlp_ratio=2, seq_len=16, pretrain_steps=30,
            pretrain_batch=16, max_private=160, max_validation=48, learning_rate=0.05)


def test_distinct_topics_drops_copies():
    """A topic copied inside a longer one goes; text shared below 30% stays (brute force below)."""
    rng = np.random.default_rng(0)
    words = lambda n: " ".join("".join(rng.choice(list("abcdefgh"), 5)) for _ in range(n))  # noqa: E731
    a, b, c = words(400), words(200), words(300)
    topics = {"long": a + b, "copy": b, "other": c, "part": c[:200] + words(600)}
    kept = lm_demo.distinct_topics(topics)
    assert kept == ["long", "other", "part"]
    # independent: share of 120-char pieces (step 60) of each dropped/kept topic found in the others
    for k in kept:
        text = topics[k]
        pieces = [text[i:i + 120] for i in range(0, len(text) - 119, 60)]
        others = "\0".join(topics[o] for o in kept if o != k and len(topics[o]) >= len(text))
        assert sum(p in others for p in pieces) < 0.3 * len(pieces)


def test_corpus_split_is_disjoint_and_deterministic():
    corpus = lm_demo.load_corpus(seq_len=64)
    again = lm_demo.load_corpus(seq_len=64)
    for x, y in zip(corpus, again):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert set(corpus.public_topics).isdisjoint(corpus.private_topics)
    assert all(lm_demo.is_private(k) for k in corpus.private_topics)
    assert not any(lm_demo.is_private(k) for k in corpus.public_topics)
    for part in (corpus.public, corpus.private, corpus.validation):
        assert part.dtype == np.int32 and part.shape[1] == 65 and part.shape[0] > 100
        assert part.min() >= 0 and part.max() < lm_demo.VOCAB
    # no validation window occurs in the text the model trains on (public or private)
    seen = b"\0".join(bytes(w.astype(np.uint8)) for part in (corpus.public, corpus.private) for w in part)
    val = [bytes(w.astype(np.uint8)) for w in corpus.validation]
    assert sum(v in seen for v in val) <= 0.02 * len(val)


def _sensitivity_bruteforce(c: np.ndarray, n: int, b: int) -> float:
    """max over cyclic patterns {s, s + b, ...} of ||sum_t C[:, t] u_t|| with X = C^T C >= 0 (then
    the max is sqrt(sum_{i,j in P} X_ij)), in float64."""
    x = c.T @ c
    assert (x >= -1e-12).all(), "brute force assumes X >= 0"
    return max(math.sqrt(x[np.ix_(p, p)].sum()) for p in (list(range(s, n, b)) for s in range(b)))


@pytest.fixture(scope="module")
def tiny(monkeypatch_module):
    """One CLI run of the LM demo on a tiny model (``--quick`` patched down to TINY), capturing the
    batch plan and the transform each fine-tuning run was given."""
    seen = []
    original = lm_demo.fine_tune

    def recording(params, example_loss, data, validation, batch_plan, epochs, grad, tx, perplexity):
        seen.append((batch_plan, epochs, tx))
        return original(params, example_loss, data, validation, batch_plan, epochs, grad, tx, perplexity)

    monkeypatch_module.setattr(lm_demo, "fine_tune", recording)
    monkeypatch_module.setattr(lm_demo, "QUICK", TINY)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["demo", "--task", "lm", "--quick", "--json", "--learning-rates", "0.05"])
    return code, json.loads(out.getvalue()), seen


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_tiny_run_plumbing(tiny):
    code, result, seen = tiny
    assert code == 0
    assert [r["method"] for r in result["results"]] == list(lm_demo.METHODS)
    assert result["train_size"] == TINY["max_private"] and result["validation_size"] == TINY["max_validation"]
    pre = result["pretrained"]
    assert math.isfinite(pre["perplexity"]) and 1 < pre["perplexity"] < pre["initial_perplexity"]
    for r in [*result["results"], result["non_private"]]:
        assert all(math.isfinite(p) and p > 1 for p in r["curve"]) and len(r["curve"]) == TINY["epochs"]
        assert r["perplexity"] == r["curve"][-1]
    families = {r["method"]: r["family"] for r in result["results"]}
    assert families["dp-sgd"] == "identity" and families["blt"] == "blt"
    assert len({r["fingerprint"] for r in result["results"]}) == 3
    assert len(seen) == 4  # three private runs, then the non-private reference


def test_private_runs_use_the_calibrated_noise(tiny):
    """z is dp-accounting's for one Gaussian mechanism at (epsilon, delta) (every strategy is
    normalised to sensitivity 1), the same for all; each transform adds z * clip * sens(C, p)."""
    _, result, seen = tiny
    pld = lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)  # noqa: E731  the plan's grid
    z = dp_accounting.calibrate_dp_mechanism(pld, dp_accounting.GaussianDpEvent, 8.0, 1e-5)
    n, b = result["n"], result["min_sep"]
    for r, (_, _, tx) in zip(result["results"], seen):
        assert r["noise_multiplier"] == pytest.approx(z, rel=1e-4)
        assert r["epsilon"] <= 8.0 + 1e-9 and r["delta"] == 1e-5
        info = tx.info
        assert info.private and info.noise_multiplier == r["noise_multiplier"] and info.l2_clip_norm == 1.0
        assert info.expected_batch_size == TINY["batch_size"]
        sens = _sensitivity_bruteforce(np.asarray(info.strategy.dense(), np.float64), n, b)
        # the noise is scaled by S >= sens(C, p): never below what the accounting assumed, and tight
        assert sens <= r["noise_stddev"] / r["noise_multiplier"] <= sens * (1 + 1e-5)
    assert result["results"][0]["noise_stddev"] == pytest.approx(z * math.sqrt(result["max_participations"]),
                                                                 rel=1e-6)  # DP-SGD: sqrt(k)


def test_batches_honour_the_schema(tiny):
    """Every fine-tuning run (private and not) uses the same fixed cyclic batches: each example in
    exactly one slot of one step per epoch, at steps t = c, c + b, ... (k participations, b apart)."""
    _, result, seen = tiny
    n, b, k, size = result["n"], result["min_sep"], result["max_participations"], result["train_size"]
    first = np.asarray(seen[0][0].indices)
    for plan, epochs, _ in seen:
        idx, mask = np.asarray(plan.indices), np.asarray(plan.mask, bool)
        assert epochs == TINY["epochs"] and idx.shape[0] == n and np.array_equal(idx, first)
        steps: dict[int, list[int]] = {}
        for t in range(n):
            for i in idx[t][mask[t]]:
                steps.setdefault(int(i), []).append(t)
        assert sorted(steps) == list(range(size))  # every private example is used, no other index
        for ts in steps.values():
            assert len(ts) == k and all(t2 - t1 == b for t1, t2 in zip(ts, ts[1:]))
        assert mask.sum(axis=1).min() >= TINY["batch_size"]  # cyclic batches hold at least the stated size


def test_cli_refusals(capsys):
    assert cli_main(["demo", "--task", "lm", "--bands", "3"]) == 2
    assert "--bands" in capsys.readouterr().err
    assert cli_main(["demo", "--task", "lm", "--buffers", "2"]) == 2
    assert "--bands" in capsys.readouterr().err
    assert cli_main(["demo", "--quick"]) == 2
    assert "--quick" in capsys.readouterr().err
    assert cli_main(["demo", "--task", "lm", "--methods", "dp-sgd,nope"]) == 2
    assert "nope" in capsys.readouterr().err
