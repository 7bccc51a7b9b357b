"""The prepared dataset described: ``report.json`` for programs, the data card for people."""

from __future__ import annotations

import pandas as pd

from pipeline.config import PrepareConfig
from pipeline.data.archive import nested_archives
from pipeline.data.datasets import DatasetSpec
from pipeline.data.prepared import SPLITS


def report(manifest: pd.DataFrame, class_names: list[str], skipped: list[str],
           quarantined: pd.DataFrame, duplicates: pd.DataFrame, cfg: PrepareConfig) -> dict:
    """Counts of kept, skipped, quarantined and duplicated images: ``report.json``."""
    counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    return {
        "class_names": class_names,
        "image_size": cfg.image_size,
        "n_images": len(manifest),
        "n_skipped_non_images": len(skipped),
        "skipped": skipped,
        "nested_archives_skipped": nested_archives(skipped),
        "n_quarantined": len(quarantined),
        "quarantined": quarantined.to_dict(orient="records"),
        "per_split": {s: {c: int(counts.at[s, c]) if s in counts.index and c in counts.columns else 0
                          for c in class_names} for s in SPLITS},
        "patients_per_split": manifest.groupby("split")["patient_id"].nunique().to_dict(),
        "n_cross_split_duplicates": int(duplicates["sha256"].nunique()),
        "duplicates_dropped": cfg.drop_duplicates,
        "size_quantiles": manifest[["width", "height"]].quantile([0, 0.25, 0.5, 0.75, 1]).to_dict(),
    }


def data_card(spec: DatasetSpec, manifest: pd.DataFrame, report: dict, duplicates: pd.DataFrame) -> str:
    """A human-readable card of the prepared dataset (markdown)."""
    counts = manifest.groupby(["label", "split"]).size().unstack(fill_value=0).reindex(columns=list(SPLITS), fill_value=0)
    groups = manifest.groupby("split")["patient_id"].nunique().reindex(list(SPLITS), fill_value=0)
    sizes = manifest[["width", "height"]].describe(percentiles=[0.05, 0.5, 0.95]).T.round(1)
    origin = ("**Synthetic** demo images drawn by pipeline.data.synthetic, not real cells; no "
              "licence applies" if report.get("synthetic") else
              f"Licence: {spec.licence or 'see the source'}")
    lines = [f"# Data card: {spec.name}", "",
             f"{origin}. Images: {len(manifest)}; resized to {report['image_size']} px for training.",
             "",
             "## Images per class and split", "", counts.to_markdown(), "",
             "## Patients / groups per split", "", groups.to_frame("groups").to_markdown(), "",
             "Groups never cross splits." if spec.kind == "archive" else
             "The dataset's official split is kept as it is.", "",
             "## Original image size (pixels)", "", sizes.to_markdown(), "",
             f"## Skipped non-image files ({report['n_skipped_non_images']})", ""]
    lines += [f"- `{s}`" for s in report["skipped"][:50]] + [""]
    if report.get("nested_archives_skipped"):
        lines += ["Archives inside the archive are not read (extract them to use their images): "
                  + ", ".join(f"`{n}`" for n in report["nested_archives_skipped"]), ""]
    lines += [f"## Quarantined unreadable images ({report['n_quarantined']})", ""]
    lines += [f"- `{q['path']}`: {q['reason']}" for q in report["quarantined"][:50]] + [""]
    lines += [f"## Identical images in more than one split ({report['n_cross_split_duplicates']})", "",
              "Dropped from the later split." if report["duplicates_dropped"] else
              "Kept (set `prepare.drop_duplicates: true` to drop them from the later split).", ""]
    lines += [f"- `{r.path}` ({r.split})" for r in duplicates.head(50).itertuples()] + [""]
    return "\n".join(lines)
