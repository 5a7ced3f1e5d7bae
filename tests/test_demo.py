"""A small, fast run of the demo's code path (``mfnoise demo``), end to end."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo needs the 'demo' extra (scikit-learn)")
pytest.importorskip("matplotlib", reason="the demo needs the 'demo' extra (matplotlib)")

import dp_accounting  # noqa: E402

import mfnoise  # noqa: E402
from mfnoise import demo  # noqa: E402
from mfnoise.cli import main as cli_main  # noqa: E402


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def _refused(capsys, argv, folder) -> None:
    """The command exits 2 naming the missing output folder, and creates nothing."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"'{folder}'" in err and "does not exist" in err, err
    assert not os.path.exists(folder)


def _never(*args, **kwargs):
    raise AssertionError("the command started working before checking its output folder")

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


def test_demo_reports_mfnoise_plans_choice(smoke):
    """The demo's batches and z come from mfnoise.plan, and it reports the plan's candidates."""
    _, result, _ = smoke
    plan = result["plan"]
    by = {r["method"]: r for r in result["results"]}
    rows = plan["candidates"]
    chosen = [c for c in rows if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["mechanism"] == plan["mechanism"]
    priced = [c for c in rows if c["dropped"] is None and c["accountant"] == "pld"]
    assert chosen[0]["trajectory_rmse"] == min(c["trajectory_rmse"] for c in priced)
    assert plan["epsilon"] <= 8.0 and plan["dataset_size"] == result["train_size"]
    fixed = [c for c in rows if c["sampling"] == "cyclic" and c["noise_multiplier"] is not None]
    assert all(c["noise_multiplier"] == by["dp-sgd"]["noise_multiplier"] for c in fixed)
    from mfnoise.cli import demo as cli_demo

    text = cli_demo.format_text(result)
    assert "mfnoise.plan's choice" in text and plan["candidates_table"] in text


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


# -- padded slots (issue 10: "the demo ignoring the mask passes") ---------------------------------
def _flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _clipped_sum_loop(params, xs, ys, clip: float) -> np.ndarray:
    """Reference: sum over the given examples of clip(grad), one jax.grad per example, in float64."""
    import jax

    total = 0.0
    for x, y in zip(xs, ys, strict=True):
        g = _flat(jax.grad(demo.example_loss)(params, x, y))
        total = total + g * min(1.0, clip / np.linalg.norm(g))
    return total


def test_masked_slots_add_exactly_zero():
    """The demo's clipped batch gradient (the one its training step uses) counts only real slots:
    padded slots pointing at an example with a large gradient add exactly 0, bit for bit the same
    as padded slots pointing elsewhere, and the sum matches a per-example loop over real slots."""
    import jax
    import jax.numpy as jnp

    cfg = demo.Config(clip=0.5, hidden=16)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (12, 64)).astype(np.float32)
    y = rng.integers(0, 10, 12).astype(np.int32)
    x[11] *= 40.0  # example 11: a large gradient, far above the clip norm
    params = demo.init_mlp(jax.random.key(1), (64, cfg.hidden, 10))
    big = np.linalg.norm(_flat(jax.grad(demo.example_loss)(params, x[11], y[11])))
    assert big > 5 * cfg.clip  # clipped: scaled by less than 1/5
    grad = jax.jit(demo.batch_gradient(cfg))
    real = np.arange(7)
    mask = np.r_[np.ones(7, bool), np.zeros(5, bool)]

    def run(pad_index: int):
        idx = np.r_[real, np.full(5, pad_index)]
        out = grad(params, jnp.asarray(x[idx]), jnp.asarray(y[idx]), jnp.asarray(mask))
        assert int(out.nonfinite) == 0
        return _flat(out.grads)

    to_big, to_first = run(11), run(0)
    np.testing.assert_array_equal(to_big, to_first)  # masked slots contribute exactly 0
    reference = _clipped_sum_loop(params, x[real], y[real], cfg.clip)
    np.testing.assert_allclose(to_big, reference, rtol=1e-5, atol=1e-6)
    # the same slots unmasked would add 5 clipped gradients of norm clip: far outside the tolerance
    unmasked = _flat(grad(params, jnp.asarray(x[np.r_[real, [11] * 5]]), jnp.asarray(y[np.r_[real, [11] * 5]]),
                          jnp.ones(12, bool)).grads)
    assert np.linalg.norm(unmasked - reference) > 4.9 * cfg.clip
    # a step with no real example has exactly zero gradient
    none = grad(params, jnp.asarray(x[[11] * 4]), jnp.asarray(y[[11] * 4]), jnp.zeros(4, bool))
    assert not np.any(_flat(none.grads))


def _padded_plan(n_train: int = 300, batch: int = 100, extra: int = 3):
    """A cyclic plan with ``extra`` more padded slots per step (mask False), pointing at example 0."""
    p = mfnoise.batching.schedule(n_train, batch, 1)
    plan = mfnoise.batching.cyclic_batches(n_train, p, 0)
    indices = np.concatenate([plan.indices, np.zeros((p.n, extra), np.int32)], axis=1)
    mask = np.concatenate([plan.mask, np.zeros((p.n, extra), bool)], axis=1)
    return p, indices, mask


def test_training_ignores_what_padded_slots_point_at():
    """End to end through the jitted trainer (noise included): moving the padded slots to another
    example changes nothing, bit for bit; unmasking them does change the model."""
    import jax
    import jax.numpy as jnp

    cfg = demo.Config(epochs=1, batch_size=100, seeds=1, hidden=16)
    data = demo.load_digits(max_train=300)
    jd = demo.Data(*(jnp.asarray(a) for a in data))
    p, indices, mask = _padded_plan()
    trainer = demo.make_trainer(mfnoise.Identity(p.n), p, 1.0, cfg, input_dim=64)
    moved = indices.copy()
    moved[~mask] = 123
    keys = (jnp.float32(0.5), jax.random.key(0), jax.random.key(1))
    *_, at_first = trainer(jd, *keys, indices, mask)
    *_, at_other = trainer(jd, *keys, moved, mask)
    np.testing.assert_array_equal(_flat(at_first), _flat(at_other))
    *_, unmasked = trainer(jd, *keys, moved, np.ones_like(mask))
    assert not np.array_equal(_flat(at_first), _flat(unmasked))


def test_update_is_the_clipped_sum_over_the_stated_batch_size():
    """One step without noise or momentum at learning rate 1: params change by exactly
    -(sum of clipped gradients of the real slots) / batch_size, whatever the padded capacity is
    (dividing by the capacity, 103 slots here, made the step depend on the padding)."""
    import jax
    import jax.numpy as jnp

    cfg = demo.Config(epochs=1, batch_size=100, seeds=1, momentum=0.0, hidden=16)
    data = demo.load_digits(max_train=300)
    jd = demo.Data(*(jnp.asarray(a) for a in data))
    p, indices, mask = _padded_plan()
    assert indices.shape[1] == 103 and mask[0].sum() == 100
    trainer = demo.make_trainer(mfnoise.Identity(p.n), p, 0.0, cfg, input_dim=64, non_private=True)
    key = jax.random.key(0)
    *_, after = trainer(jd, jnp.float32(1.0), key, key, indices[:1], mask[:1])
    before = demo.init_mlp(key, (64, cfg.hidden, 10))
    real = indices[0][mask[0]]
    step = _clipped_sum_loop(before, data.x_train[real], data.y_train[real], cfg.clip) / cfg.batch_size
    np.testing.assert_allclose(_flat(before) - _flat(after), step, rtol=1e-4, atol=1e-7)


def test_cli_demo_plot(tmp_path, capsys, monkeypatch):
    """--plot into a missing folder or in a format matplotlib cannot write fails before training;
    the plot is written atomically with the usual mode, in the format of its extension."""
    monkeypatch.setattr(demo, "run", _never)
    _refused(capsys, ["demo", "--plot", str(tmp_path / "typo" / "d.png")], str(tmp_path / "typo"))
    assert cli_main(["demo", "--plot", str(tmp_path / "d.xyz")]) == 2
    assert "cannot write .xyz" in capsys.readouterr().err
    result = {"results": [{"curve": [0.5, 0.7], "curve_std": [0.1, 0.1], "label": "DP-SGD", "accuracy": 0.7}],
              "non_private": None, "config": {"epsilon": 8, "delta": 1e-5, "batch_size": 64, "seeds": 2}}
    old = os.umask(0o022)
    try:
        for name, magic in (("d.png", b"\x89PNG"), ("d.pdf", b"%PDF"), ("d", b"\x89PNG")):
            path = demo.plot(result, str(tmp_path / name))
            with open(path, "rb") as f:
                assert f.read(4) == magic and _mode(path) == 0o644
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["d", "d.pdf", "d.png"]
