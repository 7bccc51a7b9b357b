"""DVC stage `prepare`: extract, validate, split and resize the archive; write the data card."""

import shutil
from pathlib import Path

from common import load_params, run_stage


def main(archive: str, out_dir: str, card: str) -> None:
    params = load_params()
    # the library is imported once the params are read (common.py)
    from pipeline.data.prepare import prepare
    from pipeline.data.prepared import DATA_CARD

    result = prepare(archive, out_dir, params.prepare, params.dataset)
    Path(card).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(out_dir) / DATA_CARD, card)
    counts = result.manifest.groupby("split").agg(images=("path", "size"),
                                                  patients=("patient_id", "nunique"))
    splits = ", ".join(f"{split} {int(row.images)} ({int(row.patients)} patients)"
                       for split, row in counts.reindex(["train", "val", "test"]).dropna().iterrows())
    print(f"prepared {len(result.manifest)} images: {splits}; skipped {len(result.skipped)} "
          f"non-image files, quarantined {len(result.quarantined)} -> {out_dir}, data card {card}")


if __name__ == "__main__":
    run_stage(main, __doc__)
