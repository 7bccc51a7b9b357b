"""docs: every test the reliability table names exists, so the table cannot point at nothing."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_every_test_named_in_the_reliability_table_exists():
    table = (REPO / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)(?:\[[\w-]+\])?`", table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 25 and len(named) >= len(rows)
    for path, name in named:
        source = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is named but not defined"
        assert "pytest.mark.skip" not in source.split(f"def {name}(")[0].rsplit("\n\n\n", 1)[-1]
