"""The package's architecture, checked from its source (docs/design.md, "Architecture: layers").

Every ``import`` of an mfnoise module, at module level or inside a function, goes to the same
package or to a lower layer; packages of one layer do not import each other; there are no import
cycles between modules; and pyproject.toml lists every package of the tree.
"""

from __future__ import annotations

import ast
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mfnoise"

# Package (first component below mfnoise) -> layer. A module may import its own package and lower
# layers only. mfnoise/__init__.py re-exports the public names and is above everything.
LAYERS = {
    "_version": 0,
    "core": 0,
    "strategies": 1,
    "optim": 2,
    "training": 2,
    "library": 3,
    "verify": 4,
    "planning": 4,
    "auditing": 5,
    "demo": 5,
    "lm_demo": 5,
    "keras": 5,
    "cli": 6,
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The mfnoise modules that ``name`` imports (``from a import b`` counts a.b when it is a module)."""
    modules = _modules()
    out: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mfnoise"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mfnoise"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
    out.discard(name)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_lower_layers_never_import_upper_ones():
    modules = _modules()
    unknown = sorted({_package(m) for m in modules} - set(LAYERS) - {""})
    assert not unknown, f"packages without a layer in this test: {unknown}"
    bad = []
    for name, path in sorted(modules.items()):
        if name == "mfnoise":
            continue
        mine = _package(name)
        for target in sorted(_imports(name, path)):
            theirs = _package(target)
            if target == "mfnoise":
                bad.append(f"{name} imports the top-level package mfnoise (import what it needs from its home)")
            elif theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{name} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t for t in _imports(name, path) if t in modules and t != "mfnoise"}
             for name, path in modules.items() if name != "mfnoise"}
    # A package's __init__ importing its own submodules is how Python packages work, not a cycle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and modules[t].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_violations(tmp_path):
    """The import parser is not vacuous: it finds a known import, a relative one and a function-level one."""
    probe = PACKAGE / "strategies" / "base.py"
    assert "mfnoise.core.participation" in _imports("mfnoise.strategies.base", probe)
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from mfnoise.training import noise\n")
    assert "mfnoise.training.noise" in _imports("mfnoise.strategies.fake", fake)


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {_module_name(p) for p in PACKAGE.rglob("__init__.py")} | {"mfnoise.library.data"}
    assert listed == on_disk
    assert config["tool"]["setuptools"]["package-dir"]["mfnoise.library.data"] == "strategies"
    assert (ROOT / "strategies" / "index.json").is_file()
    assert not (PACKAGE / "strategies").is_symlink()


def test_public_names_are_listed_and_importable():
    import mfnoise

    for name in mfnoise.__all__:
        assert getattr(mfnoise, name) is not None, name
        assert name in dir(mfnoise), name


def test_all_lists_every_lazy_name():
    import mfnoise

    assert set(mfnoise._LAZY) <= set(mfnoise.__all__)
