"""The ``mfnoise`` command line: one module per command in this package.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> dict``.
``run`` returns the JSON-serialisable result and may print progress on stderr; ``--json`` prints
exactly that dict on stdout as one JSON object, otherwise ``format_text(result)`` (or a generic
table) is printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
from collections.abc import Sequence

COMMANDS = ["optimize", "evaluate", "calibrate", "library", "verify", "recommend", "plan", "demo", "audit"]


def _available(names: Sequence[str] = COMMANDS) -> dict:
    mods = {}
    for name in names:
        try:
            mods[name] = importlib.import_module(f"mfnoise.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"mfnoise.cli.{name}":
                raise
    return mods


def _command_table(mods: dict) -> str:
    """One line per command (its HELP, wrapped under itself): argparse's own list of subcommands
    misaligns names longer than its narrowest column."""
    width = max(len(name) for name in mods)
    lines = ["commands:"]
    for name, mod in mods.items():
        lines += textwrap.wrap(mod.HELP, 79, initial_indent=f"  {name:<{width}}  ",
                               subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


def build_parser(only: str | None = None, *, arguments: bool = True) -> tuple[argparse.ArgumentParser, dict]:
    """The ``mfnoise`` parser and the command modules it was built from.

    By default every command with its options (what tests and documentation tools inspect).
    ``only``: just that command's module is imported and its options added, so that a command pays
    for what it uses and nothing else (issue 16, "lean start"). ``arguments=False``: every command
    named with its HELP but none of its options added (the top-level help, an unknown command):
    a command module keeps its heavy imports (scipy, dp-accounting, optax, ...) inside
    ``add_arguments`` and ``run``.
    """
    if only is not None and only not in COMMANDS:
        raise ValueError(f"only must be one of {COMMANDS}, got {only!r}")
    mods = _available([only] if only is not None else COMMANDS)
    parser = argparse.ArgumentParser(
        prog="mfnoise",
        usage="%(prog)s [-h] [--version] COMMAND ...",
        description="Correlated-noise (matrix factorization / DP-FTRL) mechanisms for private training:\n"
        "optimize strategies, evaluate their error and sensitivity, calibrate noise, train.\n\n"
        + _command_table(mods),
        epilog="Run 'mfnoise COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from mfnoise._version import __version__

    parser.add_argument("--version", action="version", version=f"mfnoise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        if arguments:
            mod.add_arguments(p)
    return parser, mods


def format_table(result: dict) -> str:
    """A two-column table of the scalar entries of a result."""
    rows = [(k, v) for k, v in result.items() if not isinstance(v, (dict, list))]
    width = max((len(k) for k, _ in rows), default=0)
    lines = []
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.6g}"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top-level options (-h, --version) end the run, so a command, when there is one, is argv[0]:
    # only its module is imported. Otherwise (help, a mistyped command) every command is named but
    # none of their options built.
    if argv and argv[0] in COMMANDS:
        parser, mods = build_parser(argv[0])
    else:
        parser, mods = build_parser(arguments=False)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    mod = mods[args.command]
    try:
        result = mod.run(args)
    except (ValueError, OSError) as e:
        # Bad input (a value, a missing or unwritable file or folder): a clear one-line message
        # (and a JSON error object under --json), exit 2.
        if args.json:
            print(json.dumps({"error": str(e)}))
        print(f"mfnoise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mfnoise {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        fmt = getattr(mod, "format_text", None)
        print(fmt(result) if fmt else format_table(result))
    return 1 if result.get("ok") is False else 0


if __name__ == "__main__":
    sys.exit(main())
