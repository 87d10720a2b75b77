"""The layering rules, checked on the source: no import cycles among the project's modules
(imports inside functions count; type-only imports under `if TYPE_CHECKING:` do not), the
model layer never imports the storage layer, and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pvl_search", "indexer", "migrations", "pvl_web")
TOP_MODULES = ("cli", "cli_common", "cli_data", "cli_help", "cli_reranker", "cli_research", "cli_views", "server")
MAX_MODULE_LINES = 400


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module the project installs."""
    found = {name: root / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_only(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module name an import statement in `tree` may refer to (relative ones resolved)."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_only(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*parent, base] if base else parent)
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            stack.append(child)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project's modules it imports."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {resolve(n) for n in _imported_names(ast.parse(path.read_text()), package)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    found = cycles(import_graph(project_modules()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    # The check must fail when a cycle is added, including one made by an import inside a
    # function, and must not count a type-only import.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import thing\n")
    (tmp_path / "pkg" / "b.py").write_text("def thing():\n    from . import a\n")
    (tmp_path / "pkg" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    (tmp_path / "pkg" / "d.py").write_text("import pkg.c\n")
    modules = {f"pkg.{n}": tmp_path / "pkg" / f"{n}.py" for n in "abcd"} | {"pkg": tmp_path / "pkg" / "__init__.py"}
    assert cycles(import_graph(modules)) == [["pkg.a", "pkg.b"]]
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    assert cycles(import_graph(modules)) == []


def test_the_model_never_imports_the_indexer() -> None:
    graph = import_graph(project_modules())
    leaks = {m: sorted(t for t in targets if t.split(".")[0] != "pvl_search")
             for m, targets in graph.items() if m.split(".")[0] == "pvl_search"}
    assert not {m: t for m, t in leaks.items() if t}


def test_modules_stay_small() -> None:
    # A migration is history: it is never edited to fit a size.
    too_long = {name: path.read_text().count("\n") for name, path in project_modules().items()
                if path.parts[-3:-1] != ("migrations", "versions")}
    assert not {name: n for name, n in too_long.items() if n > MAX_MODULE_LINES}
