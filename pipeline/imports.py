"""Static import closure of this package's modules.

Used to package exactly the code the served model needs and, in the tests,
to check that each ``dvc.yaml`` stage lists the modules it really runs.
Imports inside functions count: they run too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable

PACKAGE = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent


def imported_modules(source: Path, package: str = PACKAGE) -> set[str]:
    """Dotted names of ``package`` modules that ``source`` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != package:
                continue
            found.add(node.module)
            # ``from pipeline import clinical`` imports the module pipeline.clinical.
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if module_file(f"{node.module}.{a.name}").is_file())
    return {m for m in found if module_file(m).is_file()}


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """The file of dotted module name ``module`` (``pipeline.x`` → ``pipeline/x.py``)."""
    parts = module.split(".")[1:]
    if not parts:
        return package_dir / "__init__.py"
    return package_dir.joinpath(*parts[:-1], f"{parts[-1]}.py")


def module_closure(roots: Iterable[str | Path]) -> set[str]:
    """Every package module reached from ``roots`` (module names or source files),
    the package's ``__init__`` included."""
    todo = [imported_modules(Path(r)) if isinstance(r, Path) else {r} for r in roots]
    pending = set().union(*todo) if todo else set()
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        pending |= imported_modules(module_file(module)) - seen
    return seen | {PACKAGE} if seen else seen
