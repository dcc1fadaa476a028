"""The import structure: no cycles between first-party modules, and no function-level import that dodges one.

Built statically from the source (ast), so it needs nothing installed. An edge A -> B is "module A imports B" (a
`from qvla_quant.x import y` is an edge to qvla_quant.x, or to qvla_quant.x.y when that is a module). Imports
under `if TYPE_CHECKING:` are left out (never executed). Function-level imports exist here only to keep heavy
dependencies (torch, transformers, rclpy) off light paths; the second test proves that none of them hides a cycle:
moving every one of them to module level would still give an acyclic graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("qvla_quant", "qvla_ros")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (SRC / pkg).rglob("*.py"):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, current: str, modules: dict[str, Path]) -> list[str]:
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against the current package
            pkg = current.split(".")
            if not modules[current].name == "__init__.py":
                pkg = pkg[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return [n for n in names if n in modules and n != current]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _edges() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges) per module."""
    modules = _modules()
    top, inner = {m: set() for m in modules}, {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node, in_function, module=name):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    continue
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    (inner if in_function else top)[module].update(_targets(child, module, modules))
                visit(child, nested, module)

        visit(tree, False)
    return top, inner


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_module_level_imports_have_no_cycle():
    top, _ = _edges()
    assert len(top) > 50  # the walk found the packages
    cycle = _cycle(top)
    assert cycle is None, " -> ".join(cycle)


def test_no_function_level_import_hides_a_cycle():
    top, inner = _edges()
    merged = {m: top[m] | inner[m] for m in top}
    cycle = _cycle(merged)
    assert cycle is None, "moving function-level imports up would create " + " -> ".join(cycle)


def test_the_quantization_library_has_no_function_level_first_party_imports():
    _, inner = _edges()
    lazy = {m: sorted(t) for m, t in inner.items() if m.startswith("qvla_quant") and t}
    assert not lazy, f"qvla_quant imports its own modules inside functions: {lazy}"
