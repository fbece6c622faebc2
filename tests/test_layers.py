"""The architecture's one direction of imports (docs/architecture.md, "Modules"), checked on the
source: a module imports only from its own layer or the layers below it, so an auditor reading a
layer never has to read the ones above. Also: no module over 500 lines (generated code aside),
and no module reaches into another's private names (``from x import _y``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ecu_sidecar"

#: Top-level modules and packages of ecu_sidecar, by layer: each may import from its own layer
#: and below. ``api`` is the generated gRPC code.
LAYERS: list[set[str]] = [
    {"api", "model", "jobs", "settings", "errors", "logs", "eventloop"},
    {"validation", "metrics"},
    {"store", "ledger", "pricing"},
    {"engine", "flusher"},
    {"convert", "status", "service", "reflection", "server"},
    {"client"},
    {"cli", "__main__"},
]
#: Allowed exceptions, each with its reason (an import for type annotations only is not one:
#: those under ``if TYPE_CHECKING:`` are skipped).
EXCEPTIONS: dict[tuple[str, str], str] = {}


def layer_of(name: str) -> int:
    for index, members in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"ecu_sidecar.{name} has no layer in tests/test_layers.py")


def top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "ecu_sidecar" and len(parts) > 1 else None


def runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement that runs (those under ``if TYPE_CHECKING:`` do not)."""
    out: list[ast.ImportFrom | ast.Import] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(child)
            visit(child)

    visit(tree)
    return out


def sources() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "api" not in p.relative_to(PACKAGE).parts]


def test_imports_point_one_way() -> None:
    wrong = []
    for path in sources():
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        tree = ast.parse(path.read_text())
        for node in runtime_imports(tree):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
            )
            for name in names:
                other = top(name)
                if other is None or other == own or (own, other) in EXCEPTIONS:
                    continue
                if layer_of(other) > layer_of(own):
                    wrong.append(f"{path.relative_to(PACKAGE)}: imports ecu_sidecar.{other}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_module_over_500_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in sources()
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, f"modules over 500 lines: {long}"


def test_no_private_name_is_imported_from_another_module() -> None:
    found = []
    for path in sources():
        for node in runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ecu_sidecar"):
                found += [
                    f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found, "private names imported:\n" + "\n".join(found)
