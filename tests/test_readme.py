"""The README's training example (mfnoise.plan) runs as written and trains: the documented usage cannot rot."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)\n```", section, flags=re.S)
    assert match is not None, f"no python block under {heading!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, pathlib.Path]:
    """The training example's namespace after it ran, and the folder it ran in (once for this file)."""
    folder = tmp_path_factory.mktemp("readme")
    here = os.getcwd()
    os.chdir(folder)  # the example saves plan.json in the working folder
    try:
        namespace: dict = {}
        exec(compile(_block("### Training: from a privacy budget to a run"), str(README), "exec"), namespace)
    finally:
        os.chdir(here)
    return namespace, folder


def test_plan_example_runs_and_trains(trained):
    namespace, tmp_path = trained
    params, x, y, plan = namespace["params"], namespace["x"], namespace["y"], namespace["plan"]
    w = np.asarray(params["w"])
    assert np.all(np.isfinite(w))
    before = float(jnp.mean(y ** 2))
    after = float(jnp.mean((x @ params["w"] - y) ** 2))
    assert after < 0.5 * before, (before, after)
    assert int(namespace["state"].inner[0].noise.step) == plan.steps  # one noise step per batch
    assert plan.epsilon <= 8.0
    import mfnoise

    assert mfnoise.planning.load(tmp_path / "plan.json").fingerprint == plan.fingerprint


def test_ci_runs_the_readme_test_command():
    """The Quickstart's second command is what CI runs (.ci/run), so the README cannot drift from CI."""
    text = README.read_text()
    quickstart = text[text.index("## Quickstart"):text.index("## Using it")]
    commands = [line for line in quickstart.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, commands
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


def _blocks_after(heading: str) -> list[str]:
    text = README.read_text()
    section = text[text.index(heading):]
    section = section[:section.index("\n### ", 1)] if "\n### " in section[1:] else section
    return re.findall(r"```python\n(.*?)\n```", section, flags=re.S)


def test_checkpoint_and_keras_blocks_run_after_the_training_example(trained, tmp_path, monkeypatch):
    """The extras section's blocks continue the training example: a checkpoint saved and restored is
    the state it saved, and Keras' fit trains the plan's classifier."""
    import jax

    pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is not installed (the checkpoint extra)")
    pytest.importorskip("flax", reason="flax is not installed")  # keras' NNX support imports it lazily
    import mfnoise.keras  # noqa: F401  (sets KERAS_BACKEND=jax before keras loads)

    keras = pytest.importorskip("keras", reason="keras is not installed (the keras extra)")
    monkeypatch.chdir(tmp_path)
    namespace = dict(trained[0])
    params, state = namespace["params"], namespace["state"]
    checkpoint, fit = _blocks_after("### Checkpoints, Keras and Flax NNX")
    exec(compile(checkpoint, str(README), "exec"), namespace)
    assert namespace["restored"].step == namespace["plan"].steps
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((namespace["params"], namespace["state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exec(compile(fit, str(README), "exec"), namespace)
    x, labels = np.asarray(namespace["x"]), np.asarray(namespace["labels"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert float(loss(labels, namespace["model"](x))) < 0.5  # a trained classifier (chance: log 2 = 0.69)
    assert namespace["private"].noise_step() == namespace["plan"].steps


def test_the_flax_example_runs_as_the_readme_says():
    pytest.importorskip("flax", reason="flax is not installed (the flax extra)")
    text = README.read_text()
    command = re.search(r"`\.venv/bin/python (examples/\S+\.py)`", text)
    assert command is not None and (README.parent / command.group(1)).exists()
    proc = subprocess.run([sys.executable, command.group(1)], cwd=README.parent, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training accuracy" in proc.stdout


def _commands() -> list[str]:
    """Every `mfnoise ...` command line in the README: bash block lines, and inline code with options
    (a bare `mfnoise calibrate` in the prose names the command: ``test_every_command_named_exists``)."""
    text = README.read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)\n```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0].endswith("mfnoise") and not words[0].endswith("/pip"):
                    found.append(" ".join(words))
    found += [m for m in re.findall(r"`(mfnoise [^`]+)`", text) if " --" in m]
    return found


def test_every_command_named_exists():
    from mfnoise.cli import COMMANDS

    named = {m.split()[1] for m in re.findall(r"`(mfnoise [a-z]+)[ `]", README.read_text())}
    assert "plan" in named and named <= set(COMMANDS), named - set(COMMANDS)


def test_every_mfnoise_command_in_the_readme_parses():
    from mfnoise.cli import build_parser

    commands = _commands()
    assert any(c.startswith("mfnoise plan ") for c in commands) and len(commands) >= 10, commands
    parser, _ = build_parser()
    for command in commands:
        words = shlex.split(command)[1:]
        try:
            parser.parse_args(words)
        except SystemExit as e:  # argparse's refusal
            raise AssertionError(f"the README's {command!r} does not parse") from e


def test_every_file_the_readme_names_exists():
    text = README.read_text()
    paths = set(re.findall(r"(?<![\w/.])((?:docs|examples|benchmarks|tests|strategies|\.ci)/[\w./-]*\w)", text))
    assert {"docs/design.md", "examples/flax_nnx_train.py", "tests/test_readme.py"} <= paths, paths
    missing = sorted(p for p in paths if not (README.parent / p).exists())
    assert not missing, missing


def test_the_amplification_block_runs_and_names_each_theorem():
    """The Amplification block's explain calls: C = I is Poisson DP-SGD, epsilon = dp-accounting's own
    composition; BISR is MMCC, provable and never below the Poisson-subsampled Gaussian that its first
    row alone releases (any subset of the outputs is post-processing)."""
    import dp_accounting

    namespace: dict = {}
    exec(compile(_block("### Amplification"), str(README), "exec"), namespace)
    dpsgd, bisr, n = namespace["dpsgd"], namespace["bisr"], namespace["n"]
    event = dp_accounting.SelfComposedDpEvent(
        # mfnoise's z is that of C / sens(C, p): per step, C = I adds noise z * sens = z * sqrt(n)
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0 * np.sqrt(n))), n)
    direct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(1e-5)
    assert dpsgd.theorem == "poisson-dpsgd" and dpsgd.provable and abs(dpsgd.epsilon - direct) <= 1e-9 * direct
    c = namespace["mfnoise"].bisr(n, 4).toeplitz_coeffs()
    sigma = 1.0 * float(np.linalg.norm(np.cumsum(c[:n])))  # z * ||C 1||, the noise MMCC prices
    first_row = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(sigma / c[0]))
    lower = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(first_row).get_epsilon(1e-5)
    assert bisr.theorem == "mmcc" and bisr.provable and bisr.epsilon >= lower
