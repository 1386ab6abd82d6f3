"""The package's import structure, by test rather than by convention.

- No import circle among simulref's modules, counting imports inside functions too (a
  lazy import still ties two modules together: ``cli`` and ``train_cli`` once imported
  each other that way).
- The library never imports the command line: ``simulref.cli`` sits on top.
- The pure core works where MLX cannot be imported: every module whose imports (lazy ones
  included, followed through simulref) reach no MLX is imported in a subprocess where
  importing ``mlx`` raises, and the core's functions are run there. A new pure module is
  covered automatically, and the core must stay in the pure set.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import simulref

PACKAGE = Path(simulref.__file__).parent
HEAVY = ("mlx", "mlx_lm")  # what the pure core must do without
# Named in the docs as MLX-free; each must stay in the computed pure set.
CORE = ("prompt", "policy", "config", "trace", "metrics", "verify", "checks", "limits",
        "quality")


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST, *, lazy: bool):
    """The import statements of a module: all of them, or (``lazy=False``) only those
    run when it is imported (not inside a function, not under ``if TYPE_CHECKING``)."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if not lazy and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, is_package: bool, node, modules) -> tuple[set[str], set[str]]:
    """(simulref modules, top-level external packages) that one import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level:  # relative: from the module's package, `level - 1` packages up
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                 for alias in node.names]
    else:
        names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                 else node.module for alias in node.names]
    inside = {name for name in names if name in modules}
    outside = {name.split(".")[0] for name in names if name.split(".")[0] != "simulref"}
    return inside, outside


def import_graph(*, lazy: bool, files: dict[str, Path] | None = None):
    """module -> (simulref modules it imports, external top-level packages it imports)."""
    files = module_files() if files is None else files
    graph = {}
    for module, path in files.items():
        inside, outside = set(), set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), lazy=lazy):
            a, b = _targets(module, path.name == "__init__.py", node, files)
            inside |= a
            outside |= b
        inside.discard(module)
        graph[module] = (inside, outside)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def pure_modules(graph=None) -> set[str]:
    """Modules whose imports (followed through simulref) reach no MLX."""
    graph = import_graph(lazy=True) if graph is None else graph
    heavy = {m for m, (_, outside) in graph.items() if outside & set(HEAVY)}
    changed = True
    while changed:
        changed = False
        for module, (inside, _) in graph.items():
            if module not in heavy and inside & heavy:
                heavy.add(module)
                changed = True
    return set(graph) - heavy


# --- the tests ------------------------------------------------------------------------


def test_no_import_circle_lazy_imports_included():
    edges = {m: inside for m, (inside, _) in import_graph(lazy=True).items()}
    # The package __init__ is lazy (PEP 562 __getattr__), so `from simulref import x`
    # names x, not the package: an edge to "simulref" itself is no circle.
    edges = {m: {t for t in ts if t != "simulref"} for m, ts in edges.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_library_never_imports_the_command_line():
    upward = sorted(
        (module, target) for module, (inside, _) in import_graph(lazy=True).items()
        if not (module in ("simulref.cli", "simulref.__main__")  # `python -m simulref`
                or module.startswith("simulref.cli."))
        for target in inside if target == "simulref.cli" or target.startswith("simulref.cli.")
    )
    assert upward == []


def test_the_core_modules_are_pure():
    pure = pure_modules()
    assert {f"simulref.{name}" for name in CORE} <= pure
    assert "simulref.decoder" not in pure


def test_the_checks_see_a_circle_an_upward_import_and_an_mlx_import(tmp_path):
    """The helpers above on a package made to break each rule."""
    package = tmp_path / "simulref"
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from simulref import b\n")
    (package / "b.py").write_text("from . import a\n")
    (package / "c.py").write_text("import mlx.core as mx\n")
    (package / "d.py").write_text("from simulref.c import x\n")
    (package / "e.py").write_text("def f():\n    import mlx.core\n")  # lazy: still heavy
    (package / "cli" / "__init__.py").write_text("")
    (package / "f.py").write_text("def f():\n    from simulref.cli import main\n")
    files = module_files(package)
    lazy = import_graph(lazy=True, files=files)
    assert find_cycle({m: inside for m, (inside, _) in lazy.items()}) in (
        ["simulref.a", "simulref.b", "simulref.a"], ["simulref.b", "simulref.a", "simulref.b"])
    assert "simulref.cli" in lazy["simulref.f"][0]
    pure = pure_modules(import_graph(lazy=True, files=files))
    assert {"simulref.c", "simulref.d", "simulref.e"}.isdisjoint(pure)
    assert {"simulref.a", "simulref.b"} <= pure


# Run where `import mlx` (and mlx_lm) raises: import every pure module, then use the core.
NO_MLX = textwrap.dedent("""
    import importlib, sys
    import importlib.abc

    class NoMlx(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {heavy!r}:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoMlx())
    for name in {modules!r}:
        importlib.import_module(name)
    assert not any(m.split(".")[0] in {heavy!r} for m in sys.modules), "mlx got imported"

    import os, tempfile
    from simulref.checks import check_int
    from simulref.config import DecodeConfig
    from simulref.limits import parse_target_start
    from simulref.metrics import latency_scores
    from simulref.policy import WaitK, schedule
    from simulref.prompt import DEFAULT_SYSTEM
    from simulref.quality import quality_scores
    from simulref.trace import Finish, Read, Trace, Write, read_traces, write_traces
    from simulref.verify import check_schedule, check_trace

    assert check_int("k", 3, minimum=1) == 3
    config = DecodeConfig(k=2)
    settings = config.settings("m")
    assert settings.k == 2 and settings.system == DEFAULT_SYSTEM
    assert schedule(WaitK(2), 3, 2) == (2, 3)
    assert parse_target_start("auto") == "auto"
    events = (Read(0, "a", (1,)), Read(1, "b", (2,)), Write(0, " x", (5,)),
              Read(2, "c", (3,)), Write(1, " y", (6,)), Finish("eos"))
    trace = Trace(settings, ("a", "b", "c"), events)
    path = os.path.join(tempfile.mkdtemp(), "t.jsonl")
    write_traces(path, [trace])
    assert read_traces(path) == [trace]
    assert check_schedule(trace.delays, 3, 2) == [] and check_trace(trace) == [], check_trace(trace)
    assert latency_scores(trace)["AL"] > 0
    assert quality_scores(["le chat noir dort"], ["le chat noir dort"])["chrF"] == 100
    print("ok")
""")


def test_the_pure_modules_import_and_work_without_mlx():
    modules = sorted(pure_modules())
    script = NO_MLX.format(heavy=set(HEAVY), modules=modules)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", CORE)
def test_each_core_module_is_named_in_the_pure_set(name):
    assert f"simulref.{name}" in module_files()
