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


def _layout_rows() -> list[tuple[list[str], list[str]]]:
    """README's Code layout table: each row's packages and the names it gives in backticks."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        packages = [p.strip("/") for p in re.findall(r"`([a-z_]+/)`", cells[0])]
        names = [n.strip("/") for n in re.findall(r"`([a-z_]+/?)`", cells[1])]
        rows.append((packages, names))
    return rows


def test_readme_code_layout_names_modules_that_exist() -> None:
    """Every package the floor plan names exists, every package exists in it, and every module it names in a
    row is a module (or subpackage) of that row's packages."""
    rows = _layout_rows()
    named = {p for packages, _ in rows for p in packages}
    actual = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert named == actual
    wrong = []
    for packages, names in rows:
        for name in names:
            if not any((PACKAGE / p / f"{name}.py").exists() or (PACKAGE / p / name).is_dir() for p in packages):
                wrong.append(f"{name} (row {', '.join(packages)})")
    assert not wrong, "README Code layout names modules that do not exist: " + ", ".join(wrong)
