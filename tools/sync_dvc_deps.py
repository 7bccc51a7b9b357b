"""Rewrite the code deps of every stage in dvc.yaml, crossval/dvc.yaml and validate/dvc.yaml to the stage script's
import closure (what tests/test_imports.py checks), keeping comments and every other dep.

    python tools/sync_dvc_deps.py          # rewrite in place
    python tools/sync_dvc_deps.py --check  # exit 1 if a file would change
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.imports import module_closure, module_file  # noqa: E402

DVC_FILES = (REPO / "dvc.yaml", REPO / "crossval" / "dvc.yaml", REPO / "validate" / "dvc.yaml")
COMMON = REPO / "stages" / "common.py"


def code_deps(stage: str) -> list[str]:
    """The stage script, ``stages/common.py`` and every package file they reach, sorted."""
    script = REPO / "stages" / f"{stage}.py"
    closure = module_closure([script, COMMON])
    return sorted({str(script.relative_to(REPO)), str(COMMON.relative_to(REPO))}
                  | {str(module_file(m).relative_to(REPO)) for m in closure})


def synced(text: str) -> str:
    """``text`` with each stage's ``pipeline/`` and ``stages/`` deps replaced by its closure."""
    out: list[str] = []
    stage = None
    in_deps = False
    for line in text.splitlines(keepends=True):
        if m := re.match(r"^  (\w+):\s*$", line):
            stage, in_deps = m.group(1), False
        elif re.match(r"^    deps:\s*$", line) and stage:
            out.append(line)
            indent = "      - "
            out.extend(f"{indent}{dep}\n" for dep in code_deps(stage))
            in_deps = True
            continue
        elif in_deps and re.match(r"^      - (pipeline|stages)/", line):
            continue
        elif in_deps and not line.startswith("      - "):
            in_deps = False
        out.append(line)
    return "".join(out)


def main() -> int:
    changed = []
    for path in DVC_FILES:
        text = path.read_text()
        new = synced(text)
        if new != text:
            changed.append(path.relative_to(REPO))
            if "--check" not in sys.argv:
                path.write_text(new)
    if changed:
        print(("would change: " if "--check" in sys.argv else "rewrote: ") + ", ".join(map(str, changed)))
    return 1 if changed and "--check" in sys.argv else 0


if __name__ == "__main__":
    raise SystemExit(main())
