"""``mfnoise verify``: independent checks of strategy files (see ``mfnoise.verify``)."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys

from mfnoise import library

HELP = "check a strategy file: integrity, sensitivity, A = B C, streamed noise, stored losses"
DESCRIPTION = """Check strategy files independently of the code that wrote them.

  mfnoise verify strategy.npz
  mfnoise verify prefix-n1000-e4-blt4-rmse        (a library entry, also checked against the index)
  mfnoise verify strategies/prefix-n1000-e4-blt4-rmse.npz   (outside the checkout: the library's file)
  mfnoise verify --library [--match 'prefix-n1000-*'] [--no-streaming]

Checks: integrity (sha256), metadata schema, sensitivity recomputed (structured, dense for small n,
explicit worst-pattern Gram matrix) for the stored schema, A = B C for the decoder, C^-1 W and the
streaming generator against a dense solve on the first steps, stored rmse / max_error. Exit status
1 when any check fails."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="strategy files or library entry names (a relative path not found here is looked up "
                             "in the library by its file name)")
    parser.add_argument("--library", action="store_true", help="verify every shipped strategy")
    parser.add_argument("--match", help="with --library: only names matching this shell pattern")
    parser.add_argument("--no-streaming", action="store_true",
                        help="skip the streaming-generator check (it compiles a JAX program per file)")
    parser.add_argument("--steps", type=int, default=32, help="leading noise steps compared (default 32)")


def _targets(args: argparse.Namespace) -> list[tuple[str, dict | None]]:
    out: list[tuple[str, dict | None]] = []
    if args.library:
        folder = library.directory()
        out += [(os.fspath(p), e) for e, p in library.iter_files(folder)
                if args.match is None or fnmatch.fnmatchcase(e["name"], args.match)]
    out += [_resolve(f) for f in args.files]
    if not out:
        raise ValueError("give strategy FILEs, library names, or --library")
    return out


def _resolve(f: str) -> tuple[str, dict | None]:
    """(the file to verify, its library index entry or None) for a FILE argument.

    An existing file is itself. Otherwise, a library entry's name (``prefix-n1000-e4-blt4-rmse``)
    or a relative path whose file name is a library entry's file (``strategies/<name>.npz`` given
    outside the checkout) is that entry's file in the library folder; the substitution is said on
    stderr. Anything else is refused, saying where it was looked up.
    """
    if os.path.exists(f):
        return f, _index_entry(f)
    here = os.path.abspath(f)
    try:
        folder = library.directory()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"strategy file {f!r} not found (looked up as {here}) and no library to look it up "
                                f"in: {e}") from None
    base = os.path.basename(f)
    e = None
    if not os.path.isabs(f):
        for candidate in library.read_index(folder)["strategies"]:
            if base in (candidate["name"], candidate["file"]):
                e = candidate
                break
    if e is None:
        where = "an absolute path, not looked up in the library" if os.path.isabs(f) else \
            f"nor a library entry's name or file in {folder} (`mfnoise library list` shows them)"
        raise FileNotFoundError(f"strategy {f!r} not found: not a file (looked up as {here}), {where}")
    path = os.fspath(folder / e["file"])
    if base != e["name"]:  # a path that did not exist here: say which file stands for it
        print(f"mfnoise verify: {f!r} not found (looked up as {here}); verifying the library entry {e['name']} "
              f"({path})", file=sys.stderr)
    return path, e


def _index_entry(path: str) -> dict | None:
    """The index entry of a file that sits in a library folder, if any."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(folder, library.INDEX_NAME)):
        return None
    try:
        for e in library.read_index(folder)["strategies"]:
            if e["file"] == os.path.basename(path):
                return e
    except ValueError:
        return None
    return None


def run(args: argparse.Namespace) -> dict:
    from mfnoise.verify import checks as verify  # scipy: loaded by this command only, not by `mfnoise --help`

    reports = [verify.verify(path, index_entry=entry, steps=args.steps, streaming=not args.no_streaming)
               for path, entry in _targets(args)]
    if len(reports) == 1:
        return reports[0].to_dict()
    checks = [dict(c, path=r.path) for r in reports for c in r.checks]
    return {"ok": all(r.ok for r in reports), "files": len(reports),
            "failed": [r.path for r in reports if not r.ok], "checks": checks}


def format_text(result: dict) -> str:
    lines = []
    for c in result["checks"]:
        prefix = f"{os.path.basename(c['path'])}: " if "path" in c else ""
        lines.append(f"{c['status'].upper():<7} {prefix}{c['name']}: {c['detail']}")
    what = result.get("path") or f"{result['files']} files"
    lines.append(f"{what}: {'OK' if result['ok'] else 'FAILED'}")
    return "\n".join(lines)
