"""Static import closure of this package's modules.

Used to package exactly the code the served model needs and, in the tests,
to check that each ``dvc.yaml`` stage lists the modules it really runs and that
sub-packages import only downwards. Imports inside functions count: they run too.
Importing ``pipeline.data.images`` runs ``pipeline/__init__.py`` and
``pipeline/data/__init__.py`` first, so a closure holds every parent package.
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
            # ``from pipeline.data import images`` imports the module pipeline.data.images.
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if module_file(f"{node.module}.{a.name}").is_file())
    return {m for m in found if module_file(m).is_file()}


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """The file of dotted name ``module``: ``pipeline.data.images`` → ``pipeline/data/images.py``,
    a package → its ``__init__.py``."""
    parts = module.split(".")[1:]
    folder = package_dir.joinpath(*parts)
    if not parts or folder.is_dir():
        return folder / "__init__.py"
    return package_dir.joinpath(*parts[:-1], f"{parts[-1]}.py")


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """The dotted name of a package file (the inverse of :func:`module_file`)."""
    parts = list(path.resolve().relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def parents(module: str) -> set[str]:
    """The packages Python imports before ``module`` (``pipeline``, ``pipeline.data``)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def module_closure(roots: Iterable[str | Path]) -> set[str]:
    """Every package module reached from ``roots`` (module names or source files), the
    parent packages' ``__init__`` modules included."""
    todo = [imported_modules(Path(r)) if isinstance(r, Path) else {r} for r in roots]
    pending = set().union(*todo) if todo else set()
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        pending |= (imported_modules(module_file(module)) | parents(module)) - seen
    return seen
