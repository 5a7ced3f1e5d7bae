"""Lean start (issue 16): ``import mfnoise`` and the CLI load a heavy dependency only where it is used.

Each check runs a fresh interpreter (the test process itself has everything imported already) and
reads ``sys.modules`` afterwards: what is asserted is which modules were loaded, not a timing
(benchmarks/startup.py measures the time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mfnoise.cli import COMMANDS

# Dependencies that `import mfnoise` and `mfnoise --help` must not load: each costs from ~0.1 s to
# seconds of start-up and most are optional extras.
HEAVY = ("scipy", "dp_accounting", "optax", "tqdm", "matplotlib", "orbax", "flax", "keras", "sklearn")


def _loaded_after(code: str) -> set[str]:
    """The top-level packages loaded (from HEAVY) by a fresh interpreter running ``code``."""
    probe = (
        f"{code}\n"
        "import json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _cli(argv: list[str]) -> str:
    """Run ``mfnoise ARGV`` in-process of the probe, swallowing its output and its SystemExit."""
    return (
        "import contextlib, io\n"
        "from mfnoise.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
    )


def test_import_mfnoise_loads_no_heavy_dependency():
    assert _loaded_after("import mfnoise") == set()


def test_public_names_stay_importable_without_loading_heavy_dependencies():
    # The eager public names (strategies, closed forms, errors, files) are plain attributes; only
    # the lazy ones (optimize, calibrate, dp_aggregate, ...) may load what they need.
    code = "import mfnoise\nfor name in ('BLT', 'Toeplitz', 'sqrt_toeplitz', 'evaluate', 'load', 'Participation'):\n" \
           "    getattr(mfnoise, name)\n"
    assert _loaded_after(code) == set()


@pytest.mark.parametrize("argv", [["--help"], [], ["--version"], ["no-such-command"]])
def test_cli_top_level_loads_no_heavy_dependency(argv):
    assert _loaded_after(_cli(argv)) == set()


# What a command's --help may load: its options are built from these modules (calibrate: the
# accounting module's choices, dp-accounting; demo: mfnoise.demo, which trains with optax).
# Every other command, and any new one, describes itself with none of them.
NEEDS = {"calibrate": {"dp_accounting", "scipy"}, "demo": {"dp_accounting", "optax", "scipy"}}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_loads_only_what_the_command_needs(command):
    allowed = NEEDS.get(command, set())
    assert _loaded_after(_cli([command, "--help"])) <= allowed


def test_evaluate_of_a_closed_form_loads_neither_accounting_nor_optax():
    # scipy.fft is what the closed form's series arithmetic uses; dp-accounting, optax, tqdm and
    # matplotlib belong to other commands.
    loaded = _loaded_after(_cli(["evaluate", "--family", "sqrt-toeplitz", "--n", "100", "--json"]))
    assert loaded <= {"scipy"}
