"""The house as README's "Code layout" says: layers that import one way (import-linter's contract in
pyproject.toml), no private name imported across modules, and no torch when the CLI starts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "linfusion_cli"
ROOT = PACKAGE.parent


def test_layers_import_one_way() -> None:
    """A module that imports a layer above its own (type-only imports included) breaks the contract."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def _imports(tree: ast.AST) -> list[ast.ImportFrom]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _imports(ast.parse(path.read_text())):
            ours = node.level > 0 or (node.module or "").startswith("linfusion_cli")
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if ours and private:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(private)}")
    assert not offenders, "\n".join(offenders)


def test_cli_start_up_imports_neither_torch_nor_diffusers() -> None:
    code = "import sys, linfusion_cli.cli; print(sorted({'torch', 'diffusers', 'pyvips'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
