"""Command line: ``pipeline demo`` (every stage on synthetic cells), ``pipeline metrics``
(headline figures and experiments in 120 columns), ``pipeline score`` (batch scoring
outside DVC), ``pipeline rollback`` (move the champion alias back), ``pipeline report
regimes`` (the transfer-learning table), ``pipeline crossval`` / ``pipeline sweep``
(patient-grouped cross-validation of the params or of a grid of them), ``pipeline
benchmark`` (throughput), ``pipeline plots-template`` (offline ``dvc plots show``)."""

from __future__ import annotations

import argparse
import functools
import hashlib
import time
from pathlib import Path

from pipeline.utils import DEBUG_ENV, run_cli, set_quiet_env, setup_logging


def demo(args: argparse.Namespace) -> None:
    """Scaffold a demo project (its own git repository) on synthetic images, ``dvc repro``
    it and commit the result, so ``dvc exp run -S …`` has a baseline to compare with."""
    from pipeline.project import git_commit, repro, scaffold
    from pipeline.synthetic import DEMO_NOTE, make_archive

    root = Path(args.dir).resolve()
    archive = make_archive(root / "synthetic_cells.zip", n_patients=args.patients,
                           cells_per_patient=args.cells, seed=0, corrupt=1)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    overrides = {
        "download": {"sources": {"malaria": {"url": str(archive), "sha256": sha256}}},
        "prepare": {"image_size": args.image_size},
        "train": {"epochs": args.epochs, "lr": 0.003},
        "register": {"model_name": "malaria-demo"},
    }
    scaffold(root, overrides, git=True)
    print(f"*** {DEMO_NOTE} ***\nproject: {root} (a git repository)", flush=True)
    t0 = time.perf_counter()
    repro(root, "--quiet")
    git_commit(root, "Demo run: dvc.lock, metrics and plots")
    print(f"\n*** demo finished in {time.perf_counter() - t0:.0f} s on {DEMO_NOTE.lower()} ***\n"
          f"cd {args.dir}, then:\n"
          f"  headline metrics:  python -m pipeline metrics\n"
          f"  plots (offline):   dvc plots show        -> dvc_plots/index.html\n"
          f"  report:            reports/evaluate.md\n"
          f"  MLflow UI:         mlflow ui             (experiment 'malaria', model 'malaria-demo')\n"
          f"  an experiment:     dvc exp run -S train.epochs=4 && dvc exp show --md\n"
          f"  predictions:       data/scores/predictions.parquet")


def metrics_cmd(args: argparse.Namespace) -> None:
    """Print the headline test figures and the experiments, at most 120 columns wide."""
    from pipeline.summary import show

    print(show(Path(args.project)))


def plots_template_cmd(args: argparse.Namespace) -> None:
    """Write the page template that makes ``dvc plots show`` draw offline."""
    from pipeline.plots import write_offline_template

    print(f"offline dvc plots template: {write_offline_template(args.output)}")


def synth(args: argparse.Namespace) -> None:
    """Write a synthetic archive in the official layout."""
    from pipeline.synthetic import make_archive

    path = make_archive(args.output, n_patients=args.patients, cells_per_patient=args.cells,
                        seed=args.seed, corrupt=args.corrupt)
    print(path)


def score_cmd(args: argparse.Namespace) -> None:
    """Score a folder, zip, glob or list of images with a registered model."""
    from pipeline.config import ScoreConfig
    from pipeline.score import score

    cfg = ScoreConfig(input=args.input, batch_size=args.batch_size, concurrency=args.concurrency,
                      cpus_per_actor=args.cpus_per_actor, use_gpu=args.gpu, tta=args.tta)
    result = score(cfg, args.model, args.output)
    print(f"scored {result.n_images - result.n_errors} / {result.n_images} images "
          f"({result.n_errors} failed, {result.n_skipped} non-image files skipped) with "
          f"{result.model_uri} at {result.images_per_s:.1f} img/s -> {result.output}")


def rollback_cmd(args: argparse.Namespace) -> None:
    """Move the alias back to the previous champion (or a named version)."""
    from pipeline.registry import rollback
    from pipeline.tracking import setup_mlflow

    setup_mlflow()
    left, now = rollback(args.name, args.alias, args.to)
    print(f"{args.name}: alias '{args.alias}' moved from v{left} to v{now}")


def report_cmd(args: argparse.Namespace) -> None:
    """Train every transfer-learning regime and write the markdown table."""
    from pipeline.regime_table import write_regime_table

    print(write_regime_table(args.prepared, args.epochs, args.out, args.work_dir))


def crossval_cmd(args: argparse.Namespace) -> None:
    """Cross-validate the params of params.yaml by patient; write the report and metrics."""
    from dataclasses import replace

    from pipeline.config import read_params
    from pipeline.crossval_report import crossval_params

    params = read_params(Path(args.params))
    params = replace(params, crossval=replace(params.crossval, **{k: v for k, v in
                                                                  (("folds", args.folds), ("seed", args.seed))
                                                                  if v is not None}))
    result, report = crossval_params(params, args.prepared, args.out, args.metrics)
    p = result.pooled
    print(f"{params.crossval.folds}-fold cross-validation over {p['patients']} patients: OOF accuracy "
          f"{p['accuracy']:.4f}, AUC {p['roc_auc']:.4f} -> {report}")


def sweep_cmd(args: argparse.Namespace) -> None:
    """Cross-validate every configuration of a grid file; write the sweep table."""
    from dataclasses import replace

    import yaml

    from pipeline.config import read_params
    from pipeline.crossval_report import sweep

    params = read_params(Path(args.params))
    if args.seed is not None:
        params = replace(params, crossval=replace(params.crossval, seed=args.seed))
    grid = yaml.safe_load(Path(args.grid).read_text())
    results = sweep(params, {n: ov or {} for n, ov in grid.items()}, args.prepared, args.raw, args.out,
                    name=args.name)
    print((Path(args.out) / "sweep.md").read_text())
    failed = [f for r in results for f in r.failed]
    if failed:
        print(f"{len(failed)} trial(s) failed: " + "; ".join(failed))


def benchmark_cmd(args: argparse.Namespace) -> None:
    """Run every throughput comparison; write docs/performance.md and .json; print the ratios."""
    import sys
    import tempfile

    from pipeline.config import read_params
    from pipeline.perf_report import SMOKE, BenchSize, ratios, run_all, write
    from pipeline.tracking import setup_mlflow

    params = read_params(Path(args.params))
    setup_mlflow()
    archive = Path(args.archive)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    size = SMOKE if args.smoke else BenchSize(score_images=args.images)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=args.work) as work:
        results = run_all(Path(args.prepared), args.model, archive, sha256, Path(work), size,
                          params.train, params.augment)
    write(results, Path(args.out), "python -m pipeline benchmark " + " ".join(sys.argv[2:]))
    print("\n".join(ratios(results)) + f"\n-> {args.out}")


def _add_report(sub) -> None:
    from pipeline.config import TrainConfig

    p = sub.add_parser("report", help="train every transfer-learning regime; write the table")
    p.add_argument("table", choices=["regimes"], help="which table")
    p.add_argument("--prepared", default="data/prepared", help="output of the prepare stage")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="epochs per regime")
    p.add_argument("--out", default="docs/regimes.md", help="the markdown table")
    p.add_argument("--work-dir", default="data/regimes", help="where each regime's model goes")
    p.set_defaults(func=report_cmd)


def _add_crossval(sub) -> None:
    p = sub.add_parser("crossval", help="patient-grouped k-fold cross-validation of params.yaml")
    p.add_argument("--params", default="params.yaml", help="the params to cross-validate")
    p.add_argument("--prepared", default="data/prepared", help="output of the prepare stage")
    p.add_argument("--folds", type=int, help="folds (default: crossval.folds)")
    p.add_argument("--seed", type=int, help="fold assignment seed (default: crossval.seed)")
    p.add_argument("--out", default="reports/crossval", help="report, OOF table, label issues")
    p.add_argument("--metrics", default="metrics/crossval.json", help="pooled OOF metrics")
    p.set_defaults(func=crossval_cmd)
    p = sub.add_parser("sweep", help="cross-validate a grid of configurations as parallel trials")
    p.add_argument("grid", help="YAML: configuration name -> {dotted.param: value} overrides")
    p.add_argument("--params", default="params.yaml", help="the params the overrides change")
    p.add_argument("--prepared", default="data/prepared", help="output of the prepare stage")
    p.add_argument("--raw", help="the raw archive, for configurations at another image size")
    p.add_argument("--seed", type=int, help="fold assignment seed (default: crossval.seed)")
    p.add_argument("--out", default="reports/sweep", help="sweep.md, sweep.json, one report each")
    p.add_argument("--name", default="", help="the MLflow parent run (default: sweep-seed<seed>)")
    p.set_defaults(func=sweep_cmd)


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="every throughput comparison -> docs/performance.md")
    p.add_argument("--prepared", default="data/prepared", help="output of the prepare stage")
    p.add_argument("--model", default="models:/malaria@champion", help="the model to score with")
    p.add_argument("--archive", default="data/raw/malaria.zip", help="archive for prepare and dvc repro")
    p.add_argument("--params", default="params.yaml", help="training params of the training comparison")
    p.add_argument("--images", type=int, default=20000, help="images in the scoring comparison")
    p.add_argument("--out", default="docs/performance.md", help="the page; the JSON goes beside it")
    p.add_argument("--work", default=None, help="scratch folder (default: the system's temp)")
    p.add_argument("--smoke", action="store_true", help="every part, small (proves it runs)")
    p.set_defaults(func=benchmark_cmd)


def _add_demo_and_synth(sub) -> None:
    p = sub.add_parser("demo", help="run every stage on synthetic cell images (offline)")
    p.add_argument("--dir", default="demo", help="demo project folder")
    p.add_argument("--patients", type=int, default=24, help="synthetic patients")
    p.add_argument("--cells", type=int, default=40, help="cells per patient")
    p.add_argument("--image-size", type=int, default=48, help="pixels a side for training")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.set_defaults(func=demo)
    p = sub.add_parser("synth", help="write a synthetic cell-image zip")
    p.add_argument("output", help="the zip to write")
    p.add_argument("--patients", type=int, default=12, help="synthetic patients")
    p.add_argument("--cells", type=int, default=20, help="cells per patient")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--corrupt", type=int, default=0, help="corrupt PNGs to include")
    p.set_defaults(func=synth)


def _add_views(sub) -> None:
    p = sub.add_parser("metrics", help="headline test figures and DVC experiments in 120 columns")
    p.add_argument("--project", default=".", help="the DVC project folder")
    p.set_defaults(func=metrics_cmd)
    p = sub.add_parser("plots-template",
                       help="write the offline dvc plots page (make install runs it)")
    p.add_argument("--output", default=".dvc/offline_plots.html",
                   help="where .dvc/config's plots.html_template points")
    p.set_defaults(func=plots_template_cmd)


def _add_score_and_rollback(sub) -> None:
    p = sub.add_parser("score", help="batch-score images with a registered model (Ray Data)")
    p.add_argument("--model", required=True, help="e.g. models:/malaria@champion")
    p.add_argument("--input", required=True,
                   help="folder, .zip, glob ('cells/*.png') or .csv/.parquet with a 'path' column")
    p.add_argument("--output", required=True, help="predictions .parquet")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--concurrency", type=int, default=0,
                   help="predictor actors (0: one per GPU, or one per CPU, at most 8)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--tta", action="store_true", help="average over 8 flips/rotations")
    p.set_defaults(func=score_cmd)
    p = sub.add_parser("rollback", help="move the champion alias back")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default="champion", help="the alias to move")
    p.add_argument("--to", default=None, help="version (default: the previous champion)")
    p.set_defaults(func=rollback_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The ``pipeline`` command and its subcommands (defaults shown in every ``--help``)."""
    from importlib.metadata import version

    parser = argparse.ArgumentParser(
        prog="pipeline", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"{DEBUG_ENV}=1 shows the traceback of an error.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {version('malaria-pipeline')}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser,
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_demo_and_synth(sub)
    _add_views(sub)
    _add_score_and_rollback(sub)
    _add_report(sub)
    _add_crossval(sub)
    _add_benchmark(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    set_quiet_env()
    setup_logging()
    args = build_parser().parse_args(argv)
    run_cli(lambda: args.func(args))


if __name__ == "__main__":
    main()
