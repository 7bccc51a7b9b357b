"""DVC stage `register`: register the model; move the alias only to a better one."""

import json
from pathlib import Path

from common import load_params, model_name, run_stage

from pipeline.handoffs import RegisterHandoff, TrainHandoff, read_handoff, write_handoff


def main(model_dir: str, metrics: str, prepared: str, output: str) -> None:
    params = load_params()
    # the library is imported once the params are read (common.py)
    from pipeline.serving.registry import register

    trained = read_handoff(TrainHandoff, Path(model_dir) / "train.json")
    test_metrics = json.loads(Path(metrics).read_text())
    result = register(params.register, model_name(params), trained.model_uri, test_metrics, prepared,
                      params.evaluate.positive_class, experiment=params.dataset)
    write_handoff(RegisterHandoff(alias=params.register.alias, summary=result.summary(),
                                  **vars(result)), output)
    print(result.summary())


if __name__ == "__main__":
    run_stage(main, __doc__)
