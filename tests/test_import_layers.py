"""Layer hygiene: no two k2jax modules import each other (directly, at any depth of the file:
a function-level import counts too). Reads the sources with `ast`; imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "k2jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The k2jax modules a file imports: `import a.b`, `from a import b` (b a module or a name
    in a), relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, known) for f in files}


def mutual_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, imports in graph.items() for b in imports
                  if a < b and a in graph.get(b, ()))


def test_the_scanner_sees_a_pair_that_imports_each_other():
    graph = {"k2jax.a": {"k2jax.b"}, "k2jax.b": {"k2jax.a"}, "k2jax.c": {"k2jax.a"}}
    assert mutual_imports(graph) == [("k2jax.a", "k2jax.b")]
    graph = import_graph()
    assert "k2jax.kernels.flash_tiles" in graph["k2jax.kernels.flash_attention"]
    assert "k2jax.hf.name_map" in graph["k2jax.convert.orbax_writer"]


def test_no_two_modules_import_each_other():
    assert mutual_imports(import_graph()) == []
