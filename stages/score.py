"""DVC stage `score`: Ray Data batch scoring with the champion model."""

import json
import sys
from pathlib import Path

from common import load_params

from pipeline.datasets import file_stem, get_dataset
from pipeline.score import score


def no_patient(path: str) -> str:
    raise ValueError(f"no patient id for {path}")


def main(registered: str, prepared: str, output: str) -> None:
    params = load_params()
    reg = json.loads(Path(registered).read_text())
    model_uri = params.score.model_uri or f"models:/{reg['name']}@{params.register.alias}"
    spec = get_dataset(params.dataset)
    # Datasets without patient ids in their file names get an empty patient table.
    group_of = spec.group_of if spec.group_of is not file_stem else no_patient
    result = score(params.score, model_uri, output, prepared=prepared, group_of=group_of)
    print(f"{result.n_images} images scored with {result.model_uri} ({result.n_errors} errors, "
          f"{result.images_per_s:.1f} img/s) -> {result.output}")


if __name__ == "__main__":
    main(*sys.argv[1:])
