"""DVC stage `register`: register the model; move the alias only to a better one."""

import json
import sys
from pathlib import Path

from common import load_params, model_name

from pipeline.config import to_dict
from pipeline.registry import register
from pipeline.utils import write_json


def main(model_dir: str, metrics: str, prepared: str, output: str) -> None:
    params = load_params()
    model_uri = json.loads((Path(model_dir) / "train.json").read_text())["model_uri"]
    test_metrics = json.loads(Path(metrics).read_text())
    result = register(params.register, model_name(params), model_uri, test_metrics, prepared,
                      params.evaluate.positive_class, experiment=params.dataset,
                      params=to_dict(params))
    write_json(output, {**vars(result), "summary": result.summary()})
    print(result.summary())


if __name__ == "__main__":
    main(*sys.argv[1:])
