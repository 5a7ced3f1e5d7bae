"""The README's training example (mfnoise.plan) runs as written and trains: the documented usage cannot rot."""

from __future__ import annotations

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)\n```", section, flags=re.S)
    assert match is not None, f"no python block under {heading!r}"
    return match.group(1)


def test_plan_example_runs_and_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves plan.json in the working folder
    namespace: dict = {}
    exec(compile(_block("### Training: from a privacy budget to a run"), str(README), "exec"), namespace)
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
