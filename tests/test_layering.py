"""The import graph of the package, imports inside functions included: no cycle, no upward import.

Layers, bottom up: ``kernels`` (math) and ``formats`` (reading and writing, no math) import neither each other nor
anything above; ``converters`` imports only those two; the core (``qwha_export.*``: pipeline, verify, serving, CLI...)
may import everything below it. Among all modules there is no cycle, not even through an import inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "kernels": "qwha_export.kernels",
    "formats": "qwha_export.formats",
    "converters": "qwha_export.converters",
    "qwha_export": "qwha_export",
}
# what each layer may import from the project
ALLOWED = {
    "kernels": {"kernels"},
    "formats": {"formats"},
    "converters": {"converters", "kernels", "formats"},
    "qwha_export": {"qwha_export", "converters", "kernels", "formats"},
}


def _modules() -> dict[str, tuple[str, Path]]:
    """``{module name: (layer, file)}`` of every project module, subpackages (``tuner``, ``ortops``) included."""
    out = {}
    for folder, prefix in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((prefix, *parts))] = (folder, path)
    return out


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "qwha_export":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ("kernels", "formats", "converters") else "qwha_export"


def _imports(name: str, path: Path, modules: dict) -> list[tuple[int, str]]:
    """``(line, project module)`` of every import in the file, wherever it stands."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("qwha_export")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("qwha_export"):
                continue
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found += [(node.lineno, t) for t in submodules or [target]]
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    upward = []
    for name, (layer, path) in modules.items():
        for line, target in _imports(name, path, modules):
            target_layer = _layer_of(target)
            if target_layer is not None and target_layer not in ALLOWED[layer]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {target} ({target_layer})")
            if target in modules and target != name:
                edges[name].add(target)
    return edges, upward


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_upward_import():
    _, upward = _graph()
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycle():
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(map(str, cycles))


def test_the_checker_sees_function_level_and_relative_imports():
    """The walk must find what it is meant to forbid: a function-level relative import and a package-level one."""
    modules = _modules()
    name = "qwha_export.verify"
    found = {t for _, t in _imports(name, modules[name][1], modules)}
    assert "qwha_export.onnx_runtime" in found  # imported inside load_export
    assert "qwha_export.formats.manifest" in found  # top-level relative import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
