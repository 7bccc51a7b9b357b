"""DVC stage `crossval` (crossval/dvc.yaml, outside the default pipeline): k-fold
cross-validation by patient of the params; OOF table, report, label issues and metrics out."""

from common import load_params, run_stage

from pipeline.selection.report import crossval_params


def main(prepared: str, out_dir: str, metrics: str) -> None:
    params = load_params()
    result, report = crossval_params(params, prepared, out_dir, metrics)
    p = result.pooled
    print(f"{params.crossval.folds}-fold cross-validation over {p['patients']} patients, {p['cells']} "
          f"cells: OOF accuracy {p['accuracy']:.4f} ({p['accuracy_ci_low']:.3f}-{p['accuracy_ci_high']:.3f}), "
          f"AUC {p['roc_auc']:.4f} -> {report}, {metrics}")


if __name__ == "__main__":
    run_stage(main, __doc__)
