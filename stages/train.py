"""DVC stage `train`: fine-tune with Ray Train; the kept checkpoint, history, curves and run id out."""

from pathlib import Path

import yaml
from common import load_params, run_stage

from pipeline.handoffs import TrainHandoff, write_handoff


def main(prepared: str, policy: str, model_dir: str, metrics: str, history: str,
         curves: str) -> None:
    params = load_params()
    # the library is imported once the params are read (common.py)
    from pipeline.files import atomic_path, write_json
    from pipeline.plots import training_curves
    from pipeline.tracking import log_artifact
    from pipeline.training.driver import RunOptions, train

    # The data's own record (report.json) and the policy file describe what prepare and augment
    # did; their params are not read here, so an output-neutral one (prepare.workers) re-runs nothing.
    result = train(params.train, yaml.safe_load(Path(policy).read_text()), prepared, model_dir,
                   params.dataset, RunOptions(extra_params={"dataset": params.dataset}))
    write_handoff(TrainHandoff(result.run_id, result.model_uri), Path(model_dir) / "train.json")
    last = result.history.iloc[-1]
    write_json(metrics, {"best_epoch": result.best_epoch, "train_loss": last["train_loss"],
                         "val_loss": last["val_loss"], "val_acc": last["val_acc"]})
    with atomic_path(history) as tmp:
        result.history.to_csv(tmp, index=False)
    log_artifact(result.run_id, training_curves(result.history, curves), "plots/train")
    log_artifact(result.run_id, "params.yaml")  # every param, as a file rather than a wall of tags
    kept = result.history.set_index("epoch").loc[result.best_epoch]
    print(f"kept epoch {result.best_epoch} of {len(result.history)} (train.keep: {params.train.keep}): "
          f"val loss {kept['val_loss']:.4f}, val acc {kept['val_acc']:.4f} -> {result.model_path}, "
          f"curves {curves}; MLflow run {result.run_id}")


if __name__ == "__main__":
    run_stage(main, __doc__)
