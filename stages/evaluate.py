"""DVC stage `evaluate`: test-split metrics and plots, logged to the training run."""

from pathlib import Path

from common import load_params, model_name, run_stage

from pipeline.handoffs import TrainHandoff, read_handoff


def main(model_dir: str, prepared: str, metrics: str, plots_dir: str, report: str) -> None:
    params = load_params()
    # the library is imported once the params are read (common.py)
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.evaluation.summary import headline

    trained = read_handoff(TrainHandoff, Path(model_dir) / "train.json")
    result = evaluate(params.evaluate, Path(model_dir) / "model.pt", prepared, metrics, plots_dir,
                      report, run_id=trained.run_id, model_name=model_name(params),
                      dataset=params.dataset)
    print(f"{headline(result.metrics)} -> {metrics}, report {result.report}")


if __name__ == "__main__":
    run_stage(main, __doc__)
