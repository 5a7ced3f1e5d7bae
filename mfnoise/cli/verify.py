"""``mfnoise verify``: independent checks of strategy files (see ``mfnoise.verify``)."""

from __future__ import annotations

import argparse
import fnmatch
import os

from mfnoise import library

HELP = "check a strategy file: integrity, sensitivity, A = B C, streamed noise, stored losses"
DESCRIPTION = """Check strategy files independently of the code that wrote them.

  mfnoise verify strategy.npz
  mfnoise verify prefix-n1000-e4-blt4-rmse        (a library entry, also checked against the index)
  mfnoise verify --library [--match 'prefix-n1000-*'] [--no-streaming]

Checks: integrity (sha256), metadata schema, sensitivity recomputed (structured, dense for small n,
explicit worst-pattern Gram matrix) for the stored schema, A = B C for the decoder, C^-1 W and the
streaming generator against a dense solve on the first steps, stored rmse / max_error. Exit status
1 when any check fails."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE", help="strategy files or library entry names")
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
    for f in args.files:
        if os.path.exists(f) or f.endswith(".npz"):
            out.append((f, _index_entry(f)))
        else:  # a library entry's name
            out.append((os.fspath(library.path(f)), library.entry(f)))
    if not out:
        raise ValueError("give strategy FILEs, library names, or --library")
    return out


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
