"""The package's shape: no import circles among megalith's modules, no oversized files.

Read with `ast` (nothing is imported, so no torch): every import statement counts, at module
level or inside a function, relative ones resolved against the importing module.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megalith"
MAX_LINES = 600


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (a package's name -> its __init__)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name an import statement of this module brings in (anywhere in the file)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package holding this module, level - 1 packages up
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            # `from package import name` imports package.name when that is a module
            names.update(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the megalith modules it imports (names that are not modules, e.g. classes, drop out)."""
    return {name: {other for other in imported_names(name, path) if other in modules and other != name}
            for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for other in edges:
                if other not in index:
                    index[other] = low[other] = len(index)
                    stack.append(other)
                    on_stack.add(other)
                    work.append((other, iter(sorted(graph[other]))))
                    break
                if other in on_stack:
                    low[node] = min(low[node], index[other])
            else:
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


def a_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One closed path through a component, for the failure message: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        following = sorted(graph[path[-1]] & members)
        if start in following and len(path) > 1:
            return path + [start]
        # walk on to a module not yet on the path; in a strongly connected component one always leads back
        step = next((m for m in following if m not in seen), None)
        if step is None:  # the path cut itself off: restart from where it closes on itself
            closing = next(m for m in following if m in seen)
            return path[path.index(closing):] + [closing]
        path.append(step)
        seen.add(step)


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "a.py").write_text("def f():\n    from .sub.b import g\n")  # inside a function, relative
    (package / "sub" / "b.py").write_text("from ..a import f\n")  # two levels up; f is no module
    (package / "c.py").write_text("from pkg.sub import b\n")  # a package and its module
    graph = import_graph(module_files(package))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.c": {"pkg.sub", "pkg.sub.b"},
                     "pkg.sub": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert a_cycle(["pkg.a", "pkg.sub.b"], graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_no_import_circles_among_megalith_modules():
    modules = module_files()
    assert "megalith.parallel.pipeline.simulate" in modules  # the walk found the package
    graph = import_graph(modules)
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(
        f"  {' -> '.join(a_cycle(component, graph))}   (component: {', '.join(component)})" for component in found)


def test_no_megalith_file_exceeds_the_line_limit():
    too_long = {str(path.relative_to(PACKAGE.parent)): lines for path in module_files().values()
                if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"
