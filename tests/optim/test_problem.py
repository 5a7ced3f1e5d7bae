"""The problem registry and the solver's contract with a Problem (mfnoise.optim.problem, .solver).

The solver knows no family: every family's loss module registers its builder, and everything the
solver does differently per problem comes from the Problem's fields (stages, next_stage,
objective_from_loss, extra_report, compiler options, BLAS threading). A toy family registered
here checks that the solver honours each field; the deprecated family alias is checked to give
the same run with a warning.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

import mfnoise
from mfnoise import Participation
from mfnoise.cli import build_parser
from mfnoise.cli import main as cli_main
from mfnoise.core import workloads
from mfnoise.optim import problem
from mfnoise.optim import toeplitz as toeplitz_loss
from mfnoise.optim.solver import optimize

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_family_registers_its_builder_and_the_alias_names_one():
    assert problem.families() == ("banded", "blt", "dense", "inverse-toeplitz", "toeplitz")
    assert problem.deprecated_aliases() == {"banded-toeplitz": "toeplitz"}
    assert problem.builder("toeplitz") is toeplitz_loss.problem
    with pytest.warns(DeprecationWarning, match="'banded-toeplitz' is deprecated: use 'toeplitz'"):
        assert problem.builder("banded-toeplitz") is toeplitz_loss.problem
    with pytest.raises(ValueError, match=r"unknown family 'nope': expected one of \['banded', 'blt', 'dense'"):
        problem.builder("nope")
    with pytest.raises(ValueError, match="already registered"):
        problem.register("blt", toeplitz_loss.problem)
    with pytest.raises(ValueError, match="already registered"):
        problem.register("other", toeplitz_loss.problem, deprecated_aliases=("banded-toeplitz",))
    assert "other" not in problem.families()


def test_the_solver_names_no_family_and_probes_no_attribute():
    tree = ast.parse((ROOT / "mfnoise" / "optim" / "solver.py").read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)}
    strings = [node.value for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"getattr", "hasattr"}
    # the default argument of optimize is the one family name in the solver's code
    assert [s for s in strings if s in (*problem.families(), *problem.deprecated_aliases())] == ["toeplitz"]


def test_problem_defaults_are_a_plain_one_stage_problem():
    prob = problem.Problem(x0=np.zeros(2), value_and_grad=lambda x: (x @ x, 2 * x), to_strategy=mfnoise.Identity)
    assert (prob.stages, prob.objective_from_loss, prob.cpu_compiler_options, prob.single_threaded_blas,
            prob.formulation, prob.bounds) == (1, None, None, False, None, None)
    assert prob.extra_report(prob.x0, None) == {}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one stage"):
        prob.next_stage(prob.x0, 2)
    with pytest.raises(ValueError, match="stages must be a positive integer"):
        dataclasses.replace(prob, stages=0)


def test_the_solver_runs_any_registered_problem_through_its_fields(monkeypatch):
    """A toy family: the Toeplitz loss with three stages, a loss-to-objective map and details."""
    p, w = Participation.epochs(64, 2), workloads.prefix_sum(64)
    stages_asked = []

    def build(workload, participation, *, objective="rmse", bands=None, buffers=None, init=None):
        base = toeplitz_loss.problem(workload, participation, objective=objective, bands=4)

        def next_stage(x, stage):
            stages_asked.append(stage)
            return [x + 0.05, x - 0.05]

        return dataclasses.replace(base, name="toy", stages=3, next_stage=next_stage,
                                   objective_from_loss=lambda v: 2.0 * v,
                                   extra_report=lambda x, result: {"toy_loss": result.loss, "toy_x": x.tolist()})

    monkeypatch.setitem(problem._BUILDERS, "toy", build)
    strategy, result = optimize(w, p, "toy", progress=False)
    assert stages_asked == [2, 3]
    assert result.family == "toy" and result.problem == "toy" and result.converged
    assert result.objective_history == tuple(2.0 * v for v in result.history)
    assert result.details["toy_loss"] == result.loss and result["toy_loss"] == result.loss
    assert math.exp(result.loss) == pytest.approx(mfnoise.rmse(strategy, w, p), rel=1e-12)
    # the best point over every start of every stage: never worse than the one-stage run
    _, single = optimize(w, p, "toeplitz", bands=4, progress=False)
    assert result.loss <= single.loss + 1e-15
    assert result.evaluations > single.evaluations


def test_the_deprecated_alias_runs_the_same_problem_with_a_warning():
    p, w = Participation.epochs(48, 2), workloads.prefix_sum(48)
    with pytest.warns(DeprecationWarning, match="banded-toeplitz"):
        old_strategy, old = optimize(w, p, "banded-toeplitz", bands=6, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new_strategy, new = optimize(w, p, "toeplitz", bands=6, progress=False)
    assert old.family == new.family == "toeplitz"
    assert old.rmse == new.rmse and old.history == new.history
    np.testing.assert_array_equal(old_strategy.dense(), new_strategy.dense())


def _cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(argv)
    return rc, out.getvalue()


def test_cli_family_choices_come_from_the_registry():
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["optimize"]  # type: ignore[union-attr]
    family = next(a for a in sub._actions if a.dest == "family")
    assert tuple(family.choices) == (*problem.families(), *problem.deprecated_aliases())
    assert family.metavar == "{" + ",".join(problem.families()) + "}"  # the help lists the families
    assert "banded-toeplitz is a deprecated alias of toeplitz" in " ".join(sub.format_help().split())


def test_cli_deprecated_family_warns_on_stderr_and_records_the_family(tmp_path, capsys):
    path = str(tmp_path / "s.npz")
    rc, out = _cli(["optimize", "--json", "--family", "banded-toeplitz", "--bands", "4", "--n", "32",
                    "--out", path, "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: --family banded-toeplitz is deprecated; use --family toeplitz" in err
    result = json.loads(out)
    assert result["family"] == "toeplitz" and result["bands"] == 4
    _, meta = mfnoise.strategies.io.read(path)
    assert meta["command"].startswith("mfnoise optimize --family toeplitz ")
    assert meta["family"] == "toeplitz"
    rc, _ = _cli(["optimize", "--json", "--family", "toeplitz", "--bands", "4", "--n", "32",
                  "--out", str(tmp_path / "t.npz"), "--no-progress"])
    assert rc == 0 and "deprecated" not in capsys.readouterr().err


def test_single_threaded_blas_limits_scipys_own_blas_too():
    """threadpoolctl limits only the libraries loaded when it is entered; scipy's wheels bundle their
    own OpenBLAS, which the optimizer loads lazily: every BLAS loaded inside the block runs one thread.
    In a fresh process (this one loaded scipy long ago), with the BLAS free to use every core."""
    pytest.importorskip("threadpoolctl", reason="threadpoolctl is not installed")
    code = (
        "import threadpoolctl\n"
        "from mfnoise.optim import problem\n"
        "with problem.single_threaded_blas():\n"
        "    import scipy.optimize\n"
        "    infos = [i for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']\n"
        "    assert infos and all(i['num_threads'] == 1 for i in infos), infos\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
