"""``mfnoise library``: list, show, locate and (re)build the shipped precomputed strategies."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from mfnoise import library
from mfnoise.strategies import io

HELP = "the precomputed strategies in strategies/: list, show, path (locate a file), build (regenerate and check)"
DESCRIPTION = """List, show, locate (path) and build (regenerate and check) the library of precomputed strategies.

  mfnoise library list [--n N] [--epochs K] [--workload W] [--family F]
  mfnoise library show prefix-n1000-e4-blt4-rmse
  mfnoise library path prefix-n1000-e4-blt4-rmse
  mfnoise library build [--only PATTERN ...] [--missing] [--out DIR | --in-place]

`build` regenerates entries (default: every shipped one) with `mfnoise.optimize` into --out (a
temporary folder unless given) and checks their rmse and max_error against the shipped files;
--missing --in-place adds the grid entries the library does not hold yet. The library folder is
$MFNOISE_LIBRARY, the installed package data, or the checkout's strategies/."""

LIST_KEYS = ("name", "family", "optimizer_family", "workload", "objective", "n", "epochs",
             "max_participations", "min_sep", "bands", "buffers", "state_arrays", "rmse", "max_error",
             "sensitivity", "path")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        # Also accepted after the action; SUPPRESS keeps the value given before it.
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print exactly one JSON object on stdout")
        p.add_argument("--library", help="library folder (default: $MFNOISE_LIBRARY, package data, checkout)")
        return p

    p = action("list", "list the shipped strategies (filters combine)")
    p.add_argument("--n", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--workload", help="prefix | momentum:0.9")
    p.add_argument("--family", choices=(*library.OPTIMIZER_FAMILIES, *library.FAMILY_ALIASES),
                   help="optimizer family (" + "; ".join(f"{a}: an alias of {f}" for a, f in
                                                         library.FAMILY_ALIASES.items()) + ")")
    p.add_argument("--objective", choices=["rmse", "max"])
    p.add_argument("--match", help="shell pattern on the name, e.g. 'prefix-n1000-*'")
    p = action("show", "show one strategy's index entry and file metadata")
    p.add_argument("name")
    p = action("path", "print the file of one strategy")
    p.add_argument("name")
    p = action("build", "regenerate strategies and check them against the shipped ones")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="grid entries whose name matches (shell patterns)")
    p.add_argument("--missing", action="store_true", help="the grid entries the library does not hold yet")
    p.add_argument("--all", action="store_true", help="the whole grid (default: the shipped entries)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help="folder for the regenerated files, created if missing inside an existing "
                       "folder (default: a temporary folder)")
    where.add_argument("--in-place", action="store_true", help="write into the library folder and its index")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="largest relative difference from the shipped rmse / max_error (default 1e-3)")
    p.add_argument("--shard", metavar="I/N", help="build every N-th entry starting at I (parallel builds)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be built")


def _folder(args: argparse.Namespace):
    return args.library if args.library else library.directory()


def _with_path(e: dict, folder) -> dict:
    return {**e, "path": os.fspath(os.path.join(folder, e["file"]))}


def run(args: argparse.Namespace) -> dict:
    return {"list": _list, "show": _show, "path": _path, "build": _build}[args.action](args)


def _list(args: argparse.Namespace) -> dict:
    folder = _folder(args)
    found = library.entries(folder, n=args.n, epochs=args.epochs, workload=args.workload,
                            optimizer_family=args.family, objective=args.objective, name=args.match)
    return {"action": "list", "directory": os.fspath(folder), "strategies": [_with_path(e, folder) for e in found]}


def _show(args: argparse.Namespace) -> dict:
    folder = _folder(args)
    e = _with_path(library.entry(args.name, folder), folder)
    _, meta = io.read(e["path"])
    return {"action": "show", **e, "metadata": meta}


def _path(args: argparse.Namespace) -> dict:
    return {"action": "path", "path": os.fspath(library.path(args.name, _folder(args)))}


def _build(args: argparse.Namespace) -> dict:
    folder = args.library or library.default_directory()
    if args.missing:
        specs = library.missing(folder)
    elif args.all or args.only:
        specs = library.grid()
    else:
        specs = library.shipped_specs(folder)
    if args.only:
        specs = library.select(args.only, specs)
    if args.shard:
        try:
            i, count = (int(x) for x in args.shard.split("/"))
            if not 0 <= i < count:
                raise ValueError
        except ValueError:
            raise ValueError(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}") from None
        specs = specs[i::count]
    if args.out:
        io.output_folder(args.out, "--out", folder_output=True)  # before the first optimization, not after it
    if args.dry_run:
        return {"action": "build", "ok": True, "dry_run": True, "names": [s.name for s in specs]}
    if args.in_place:
        out, tmp = folder, None
    elif args.out:
        out, tmp = args.out, None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mfnoise-library-")
        out = tmp.name
    try:
        start = time.perf_counter()
        result = library.build(specs, out, shipped=folder, update_index=True, rtol=args.rtol,
                               progress=lambda line: print(line, file=sys.stderr, flush=True))
        result["seconds"] = time.perf_counter() - start
    finally:
        if tmp is not None:
            tmp.cleanup()
    if tmp is not None:
        result["directory"] = None  # discarded: this run only checked reproducibility
    return {"action": "build", "count": len(specs), **result}


def format_text(result: dict) -> str:
    action = result["action"]
    if action == "path":
        return result["path"]
    if action == "list":
        rows = result["strategies"]
        if not rows:
            return "no strategies match"
        lines = [f"{'name':<44} {'family':<9} {'n':>6} {'k':>3} {'b':>6} {'state':>5} {'rmse':>10} {'max_error':>10}"]
        for e in rows:
            lines.append(f"{e['name']:<44} {e['family']:<9} {e['n']:>6} {e['max_participations']:>3} "
                         f"{e['min_sep']:>6} {e['state_arrays']:>5} {e['rmse']:>10.5g} {e['max_error']:>10.5g}")
        lines.append(f"{len(rows)} strategies in {result['directory']} (state: parameter-sized arrays of noise state)")
        return "\n".join(lines)
    if action == "show":
        keys = [k for k in result if k not in ("metadata", "action")]
        width = max(len(k) for k in keys)
        return "\n".join(f"{k:<{width}}  {result[k]}" for k in keys)
    if result.get("dry_run"):
        return "\n".join(result["names"]) + f"\n{len(result['names'])} entries would be built"
    bad = [r for r in result["built"] if not r["ok"]]
    lines = [f"built {result['count']} strategies in {result['seconds']:.1f} s"
             + (f" into {result['directory']}" if result["directory"] else " (temporary folder, discarded)")]
    for r in bad:
        if "error" in r:
            lines.append(f"  {r['name']}: {r['error']}")
            continue
        lines.append(f"  {r['name']}: rmse {r['rmse']:.6g} vs shipped {r['shipped_rmse']:.6g}, "
                     f"max_error {r['max_error']:.6g} vs shipped {r['shipped_max_error']:.6g}")
    diffs = [abs(r[k]) for r in result["built"] if r.get("shipped") for k in ("rel_diff_rmse", "rel_diff_max_error")]
    if diffs:
        lines.append(f"largest relative difference from the shipped rmse / max_error: {max(diffs):.3g}")
    lines.append("all match the shipped losses" if not bad else f"{len(bad)} differ from the shipped losses")
    return "\n".join(lines)
