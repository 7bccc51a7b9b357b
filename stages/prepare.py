"""DVC stage `prepare`: extract, validate, split and resize the archive."""

import sys

from common import load_params

from pipeline.prepare import prepare


def main(archive: str, out_dir: str) -> None:
    params = load_params()
    result = prepare(archive, out_dir, params.prepare, params.dataset)
    counts = result.manifest.groupby("split").agg(images=("path", "size"),
                                                  patients=("patient_id", "nunique"))
    print(counts.to_string())
    print(f"skipped {len(result.skipped)} non-image files, quarantined {len(result.quarantined)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
