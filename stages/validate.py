"""DVC stage `validate`: a labelled archive of new patients scored by the registered model.

In validate/dvc.yaml, outside the default pipeline: the report (figures with patient-bootstrap
CIs), an MLflow run in the model's experiment and a line on the model version."""

from common import load_params, run_stage

from pipeline.data.datasets import get_dataset
from pipeline.evaluation.external import validate
from pipeline.handoffs import RegisterHandoff, read_handoff


def main(registered: str, out_dir: str) -> None:
    params = load_params()
    model_uri = params.validate.model_uri or read_handoff(RegisterHandoff, registered).alias_uri()
    result = validate(params.validate, model_uri, out_dir, get_dataset(params.dataset),
                      params.evaluate.positive_class, params.evaluate.patient_threshold, params.prepare)
    print(result.summary())


if __name__ == "__main__":
    run_stage(main, __doc__)
