"""A small, fast run of the demo's code path (``mfnoise demo``), end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo needs the 'demo' extra (scikit-learn)")
pytest.importorskip("matplotlib", reason="the demo needs the 'demo' extra (matplotlib)")

import dp_accounting  # noqa: E402

import mfnoise  # noqa: E402
from mfnoise import demo  # noqa: E402
from mfnoise.cli import main as cli_main  # noqa: E402

SMALL = ["--epochs", "2", "--batch-size", "200", "--seeds", "2", "--learning-rates", "0.2", "--buffers", "2"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CLI run of every method, small: 2 epochs of batch 200 (12 steps), 2 seeds, 1 learning rate."""
    png = tmp_path_factory.mktemp("demo") / "demo.png"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["demo", "--json", *SMALL, "--plot", str(png)])
    return code, json.loads(out.getvalue()), png


def test_demo_json(smoke):
    code, result, png = smoke
    assert code == 0
    methods = [r["method"] for r in result["results"]]
    assert methods == list(demo.METHODS)
    for r in result["results"]:
        assert {"method", "epsilon", "delta", "noise_multiplier", "accuracy"} <= r.keys()
        assert r["epsilon"] == 8.0 and r["delta"] == 1e-5
        assert len(r["accuracies"]) == 2 and len(r["curve"]) == 2
        assert 0.2 < r["accuracy"] <= 1.0  # it learns (chance is 0.1)
        assert math.isfinite(r["noise_rmse"]) and r["noise_rmse"] > 0
    assert result["n"] == 2 * result["min_sep"] and result["participation"] == "cyclic"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.2 < result["non_private"]["accuracy"] <= 1.0


def test_demo_noise_multipliers_are_dp_accountings(smoke):
    """Cyclic methods share the Gaussian mechanism's z; the Poisson one is DP-SGD's amplified z."""
    _, result, _ = smoke
    # the demo's PLD grid (1e-3: coarser than dp-accounting's default, still an upper bound)
    pld = lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=demo.Config().pld_discretization)  # noqa: E731
    z = dp_accounting.calibrate_dp_mechanism(pld, dp_accounting.GaussianDpEvent, 8.0, 1e-5)
    by = {r["method"]: r for r in result["results"]}
    for m in ("dp-sgd", "bandmf", "blt"):
        assert by[m]["noise_multiplier"] == pytest.approx(z, abs=2e-6)
        assert by[m]["accountant"] == "pld"
    n, train = result["n"], result["train_size"]
    sigma = dp_accounting.calibrate_dp_mechanism(pld, lambda s: dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(200 / train, dp_accounting.GaussianDpEvent(s)), n), 8.0, 1e-5)
    # DP-SGD with Poisson sampling: per-step noise sigma * clip = z * clip * sens(I, b = 1) = z sqrt(n)
    assert by["dp-sgd-poisson"]["noise_std"] == pytest.approx(sigma, abs=1e-5)
    # correlated noise has less trajectory error than independent noise on the same batches
    assert by["bandmf"]["noise_rmse"] < by["dp-sgd"]["noise_rmse"]
    assert by["blt"]["noise_rmse"] < by["dp-sgd"]["noise_rmse"]


def test_demo_text_table(smoke):
    from mfnoise.cli import demo as cli_demo

    _, result, _ = smoke
    text = cli_demo.format_text(result)
    for label in demo.LABELS.values():
        assert label in text
    assert "test accuracy" in text and "epsilon=8" in text


def test_demo_training_uses_mfnoise_noise():
    """Same data, batches and initialisation, different noise keys: different models, so the
    noise really reaches the parameters through mfnoise.dp_aggregate."""
    import jax
    import jax.numpy as jnp

    cfg = demo.Config(epochs=1, batch_size=100, seeds=1, learning_rates=(0.2,), max_train=400)
    data = demo.load_digits(max_train=400)
    p = mfnoise.batching.schedule(400, 100, 1)
    plan = mfnoise.batching.cyclic_batches(400, p, 0)
    jd = demo.Data(*(jnp.asarray(a) for a in data))
    trainer = demo.make_trainer(mfnoise.Identity(p.n), p, 5.0, cfg, input_dim=64)
    k = jax.random.key(0)
    val = [np.asarray(trainer(jd, jnp.float32(0.2), k, jax.random.key(s), plan.indices, plan.mask)[0])
           for s in (1, 1, 2)]
    assert np.array_equal(val[0], val[1])  # deterministic from the keys
    assert not np.array_equal(val[0], val[2])


def test_demo_refuses_bad_settings(capsys):
    assert cli_main(["demo", "--methods", "dp-sgd,adam", "--plot", "none"]) == 2
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seeds"):
        demo.Config(seeds=0)
