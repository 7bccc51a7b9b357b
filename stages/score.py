"""DVC stage `score`: batch scoring with the champion model (Ray Data; small jobs in-process)."""

from common import load_params, run_stage

from pipeline.data.datasets import get_dataset
from pipeline.handoffs import RegisterHandoff, read_handoff


def main(registered: str, prepared: str, output: str) -> None:
    params = load_params()
    # the library is imported once the params are read (common.py)
    from pipeline.serving.score import score

    model_uri = params.score.model_uri or read_handoff(RegisterHandoff, registered).alias_uri()
    spec = get_dataset(params.dataset)
    result = score(params.score, model_uri, output, prepared=prepared,
                   group_of=spec.group_of if spec.has_patients else None, patients=True)
    print(f"{result.n_images} images scored with {result.model_uri} ({result.n_rejected} rejected, "
          f"{result.n_errors} errors, "
          f"{result.images_per_s:.1f} img/s) -> {result.output}")


if __name__ == "__main__":
    run_stage(main, __doc__)
