"""The layout holds: every registered stage is complete and light to import, no import cycles inside
automr/ (between modules and between packages, lazy imports included), and the library never
imports the commands."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

from automr.config import StageConfig
from automr.stages import BY_NAME, STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "automr"
LIBRARY = ("data", "llm", "memory", "methods", "eval", "serve", "utils")
COMMANDS = ("automr.stages", "automr.cli", "automr.pipeline")


# -- the stage registry ------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_every_registered_stage_is_complete(stage) -> None:
    cfg_cls = stage.config_class()
    assert isinstance(cfg_cls, type) and issubclass(cfg_cls, StageConfig), f"{stage.name}: {stage.config} is no StageConfig"
    assert callable(stage.runner()), f"{stage.name}: {stage.run} is not callable"
    assert stage.output_field is None or stage.output_field in cfg_cls.model_fields, (
        f"{stage.name}: output_field {stage.output_field!r} is not a field of {stage.config}"
    )
    assert stage.help and BY_NAME[stage.name] is stage


def test_stage_names_are_unique() -> None:
    assert len({s.name for s in STAGES}) == len(STAGES)


def test_importing_stages_and_the_cli_does_not_import_torch() -> None:
    """One fresh interpreter imports each stage module in turn (then builds the CLI) and names the first that
    pulls in torch: `automr --help` must stay fast."""
    modules = [f"automr.stages.{s.module}" for s in STAGES]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    if 'torch' in sys.modules: sys.exit('torch imported by ' + m)\n"
        "import automr.cli as cli\n"
        "cli._register_all()\n"
        "if 'torch' in sys.modules: sys.exit('torch imported by automr.cli')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=False)
    assert proc.returncode == 0, proc.stderr


# -- import cycles -----------------------------------------------------------------------------
def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder `root` (packages by their __init__)."""
    out = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from .. import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m in known and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = module_names(root)
    return {name: imports_of(name, f, set(mods)) for name, f in mods.items()}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between packages automr.X (top-level modules such as automr.cli stand alone)."""
    def pkg(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(pkg(m), set()).update(pkg(d) for d in deps if pkg(d) != pkg(m))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (graphlib's CycleError names it), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_no_import_cycles_between_modules() -> None:
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "module import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycles_between_packages() -> None:
    cycle = find_cycle(package_graph(import_graph(PACKAGE)))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


def test_the_library_never_imports_the_commands() -> None:
    graph = import_graph(PACKAGE)
    bad = sorted(
        f"{m} imports {d}"
        for m, deps in graph.items()
        if m.split(".")[1:2] and m.split(".")[1] in LIBRARY
        for d in deps
        if any(d == c or d.startswith(c + ".") for c in COMMANDS)
    )
    assert not bad, "the library imports a command module:\n" + "\n".join(bad)


def test_the_cycle_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checks above can fail: a planted cycle through a function-level import and a relative one is found."""
    pkg = tmp_path / "toy"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    for f in ("__init__.py", "a/__init__.py", "b/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from toy.b import y\n")
    (pkg / "b" / "y.py").write_text("from ..a import x\n")
    (pkg / "b" / "z.py").write_text("import toy.b.y\n")
    graph = import_graph(pkg)
    assert graph["toy.a.x"] == {"toy.b", "toy.b.y"} and "toy.a.x" in graph["toy.b.y"]
    assert set(find_cycle(graph) or []) >= {"toy.a.x", "toy.b.y"}
    assert set(find_cycle(package_graph(graph)) or []) == {"toy.a", "toy.b"}
    (pkg / "a" / "x.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(pkg)) is None
