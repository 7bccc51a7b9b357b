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


def test_readme_is_a_front_door_whose_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 170
    for page in ("cluster", "datasets", "regimes", "performance", "reliability", "development"):
        assert f"docs/{page}.md" in readme, page
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_every_module_is_in_the_module_map():
    table = (REPO / "docs" / "development.md").read_text()
    for module in sorted((REPO / "pipeline").glob("*.py")):
        if module.name != "__init__.py":
            assert f"`{module.name}`" in table, f"{module.name} is missing from docs/development.md"
