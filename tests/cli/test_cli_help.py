"""Every command the help texts name exists: read off the help output itself, not a list kept here.

The commands are those of the top-level help's "commands:" table; a command's actions (``library
list``, ...) are those its own --help lists under its ACTION positional; every ``mfnoise WORD [WORD]``
written in any of these texts must be a command (and, for a command with actions, one of them).
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from mfnoise.cli import main


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0, argv
    return out.getvalue()


def _command_table(text: str) -> dict[str, str]:
    """name -> its help line (wrapped lines joined) from the top-level "commands:" table."""
    lines = text.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    table: dict[str, str] = {}
    name = None
    for line in lines:
        m = re.match(r"^  ([a-z][a-z-]*)\s{2,}(.*)$", line)
        if m:
            name = m.group(1)
            table[name] = m.group(2)
        else:
            assert name is not None and line.startswith("    "), line
            table[name] += " " + line.strip()
    return table


def _actions(text: str) -> list[str]:
    """The sub-commands argparse lists under an upper-case positional (``ACTION``), if any."""
    lines = text.split("positional arguments:\n", 1)[1].split("\n\n", 1)[0].splitlines() \
        if "positional arguments:\n" in text else []
    out: list[str] = []
    under = False
    for line in lines:
        if re.match(r"^  [A-Z][A-Z_]*$", line):
            under = True
            continue
        m = re.match(r"^    ([a-z][a-z-]*)(\s{2,}|$)", line)
        if under and m:
            out.append(m.group(1))
        elif not line.startswith("     "):
            under = False
    return out


def _tree() -> tuple[dict[str, str], dict[str, list[str]], dict[tuple[str, ...], str]]:
    top = _help()
    table = _command_table(top)
    actions: dict[str, list[str]] = {}
    texts: dict[tuple[str, ...], str] = {(): top}
    for command in table:
        texts[(command,)] = _help(command)
        actions[command] = _actions(texts[(command,)])
        for action in actions[command]:
            texts[(command, action)] = _help(command, action)
    return table, actions, texts


@pytest.fixture(scope="module")
def tree():
    return _tree()


def test_the_help_is_parsed(tree):
    table, actions, _ = tree
    # The parse found something to check (a silent parser failure must not pass the tests below).
    assert len(table) >= 5 and any(actions.values())


def test_every_command_named_in_any_help_exists(tree):
    table, actions, texts = tree
    named = 0
    for where, text in texts.items():
        for m in re.finditer(r"\bmfnoise((?: [a-z][a-z0-9.-]*)+)", text):
            words = m.group(1).split()
            assert words[0] in table, f"'mfnoise {' '.join(words)}' in the help of {where or 'mfnoise'}"
            if actions[words[0]] and len(words) > 1:  # (a bare `mfnoise library` names the command)
                assert words[1] in actions[words[0]], \
                    f"'mfnoise {' '.join(words)}' in the help of {where or 'mfnoise'}: actions {actions[words[0]]}"
            named += 1
    assert named >= 5  # the examples are found


def test_a_command_with_actions_names_each_of_them_in_the_command_table(tree):
    table, actions, _ = tree
    for command, names in actions.items():
        words = set(re.findall(r"[a-z][a-z-]*", table[command]))
        missing = [a for a in names if a not in words]
        assert not missing, f"the top-level line of {command} ({table[command]!r}) does not name {missing}"


def test_an_unknown_command_is_refused_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["rebuild"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "'rebuild'" in err and "library" in err
