"""Benchmarks: throughput of the real stages against plain baselines, and their pages. Measures
everything below it; nothing imports it but the command line.

Each benchmark writes its page under ``reports/`` unless told otherwise (``--out docs``
publishes it); the JSON of the figures always goes beside the page."""

from __future__ import annotations

from pathlib import Path

REPORTS = Path("reports")


def page_path(out: str | Path, name: str) -> Path:
    """The page's path from ``--out``: a ``.md`` path as it is, anything else a folder that
    gets the page ``name`` (``docs`` -> ``docs/<name>``)."""
    out = Path(out)
    return out if out.suffix == ".md" and not out.is_dir() else out / name
