"""Command line: ``pipeline demo`` (every stage on synthetic cells), ``pipeline metrics``
(headline figures and experiments in 120 columns), ``pipeline score`` (batch scoring outside
DVC), ``pipeline validate`` (external validation on new patients), ``pipeline compare`` (paired
differences of recipes), ``pipeline sample`` (the sample or pool from the official archive),
``pipeline rollback`` (move the champion alias back), ``pipeline report regimes|reject``,
``pipeline crossval`` / ``pipeline sweep`` (patient-grouped cross-validation), ``pipeline
benchmark`` (throughput), ``pipeline plots-template`` (offline ``dvc plots show``)."""

from __future__ import annotations

import argparse
import functools

from pipeline import commands
from pipeline.cli import DEBUG_ENV, run_cli
from pipeline.console import setup_logging
from pipeline.env import set_quiet_env


def _add_report(sub) -> None:
    from pipeline.config import TrainConfig

    p = sub.add_parser("report", help="regimes: train every transfer-learning regime, write the table; "
                                      "reject: measure the reject option on non-cells and real cells")
    p.add_argument("table", choices=["regimes", "reject"], help="which table")
    p.add_argument("--prepared", default="data/prepared", help="output of the prepare stage")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="regimes: epochs per regime")
    p.add_argument("--work-dir", default="data/regimes", help="regimes: where each regime's model goes")
    p.add_argument("--model", default="models/model.pt",
                   help="reject: a checkpoint, or a registered model URI (e.g. models:/malaria@champion)")
    p.add_argument("--cells", action="append", default=[],
                   help="reject: a zip of further real cells (e.g. the external pool); repeatable")
    p.add_argument("--per-kind", type=int, default=50, help="reject: generated images of each kind")
    p.add_argument("--out", default=None, help="the page (default: reports/<table>.md; the JSON goes beside it)")
    p.set_defaults(func=commands.report_cmd)


def _add_crossval(sub) -> None:
    p = sub.add_parser("crossval", help="patient-grouped k-fold cross-validation of params.yaml")
    p.add_argument("--params", default="params.yaml", help="the params to cross-validate")
    p.add_argument("--prepared", default="data/prepared", help="output of the prepare stage")
    p.add_argument("--folds", type=int, help="folds (default: crossval.folds)")
    p.add_argument("--seed", type=int, help="fold assignment seed (default: crossval.seed)")
    p.add_argument("--out", default="reports/crossval", help="report, OOF table, label issues")
    p.add_argument("--metrics", default="metrics/crossval.json", help="pooled OOF metrics")
    p.set_defaults(func=commands.crossval_cmd)
    p = sub.add_parser("sweep", help="cross-validate a grid of configurations as parallel trials")
    p.add_argument("grid", help="YAML: configuration name -> {dotted.param: value} overrides")
    p.add_argument("--params", default="params.yaml", help="the params the overrides change")
    p.add_argument("--prepared", default="data/prepared", help="output of the prepare stage")
    p.add_argument("--raw", help="the raw archive, for configurations at another image size")
    p.add_argument("--seed", type=int, help="fold assignment seed (default: crossval.seed)")
    p.add_argument("--out", default="reports/sweep", help="sweep.md, sweep.json, one report each")
    p.add_argument("--name", default="", help="the MLflow parent run (default: sweep-seed<seed>)")
    p.set_defaults(func=commands.sweep_cmd)


def _add_validate(sub) -> None:
    from pipeline.config import ValidateConfig

    p = sub.add_parser("validate", help="external validation: score a labelled archive of new patients "
                                        "with a registered model; report, MLflow run, version note")
    p.add_argument("archive", help="zip of <root>/<class>/<image> files (the layout prepare reads)")
    p.add_argument("--model", default=None,
                   help="registered model URI (default: validate.model_uri, else "
                        "models:/<register.model_name or dataset>@<register.alias>)")
    p.add_argument("--out", default="reports/external", help="external.md, external.json, PNGs")
    p.add_argument("--exclude-overlap", action="store_true", default=ValidateConfig.exclude_overlap,
                   help="leave out (and report) patients the model trained on, instead of refusing")
    p.add_argument("--params", default="params.yaml",
                   help="params for the rest (validate, evaluate.positive_class, dataset, register)")
    p.set_defaults(func=commands.validate_cmd)


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="every throughput comparison -> reports/performance.md")
    p.add_argument("--prepared", default="data/prepared", help="output of the prepare stage")
    p.add_argument("--model", default=champion_uri(), help="the model to score with")
    p.add_argument("--archive", default="data/raw/malaria.zip", help="archive for prepare and dvc repro")
    p.add_argument("--params", default="params.yaml", help="training params of the training comparison")
    p.add_argument("--images", type=int, default=20000,
                   help="images in the scoring comparison, the test cells cycled (without --score-input)")
    p.add_argument("--score-input", default=None,
                   help="a zip or folder of real cells to score instead (10,000 or more: the pool zip)")
    p.add_argument("--only", default="", help="comma-separated parts to measure again "
                   "(scoring,small_job,bf16,training,prepare,end_to_end); the others stay as the JSON "
                   "at --out has them")
    p.add_argument("--out", default="reports/performance.md",
                   help="the page, or a folder for performance.md (--out docs publishes it); the JSON goes beside it")
    p.add_argument("--work", default=None, help="scratch folder (default: the system's temp)")
    p.add_argument("--smoke", action="store_true", help="every part, small (proves it runs)")
    p.set_defaults(func=commands.benchmark_cmd)


def _add_demo_and_synth(sub) -> None:
    p = sub.add_parser("demo", help="run every stage on synthetic cell images (offline)")
    p.add_argument("--dir", default="demo", help="demo project folder")
    p.add_argument("--patients", type=int, default=24, help="synthetic patients")
    p.add_argument("--cells", type=int, default=40, help="cells per patient")
    p.add_argument("--image-size", type=int, default=48, help="pixels a side for training")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.set_defaults(func=commands.demo)
    p = sub.add_parser("synth", help="write a synthetic cell-image zip")
    p.add_argument("output", help="the zip to write")
    p.add_argument("--patients", type=int, default=12, help="synthetic patients")
    p.add_argument("--cells", type=int, default=20, help="cells per patient")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--corrupt", type=int, default=0, help="corrupt PNGs to include")
    p.set_defaults(func=commands.synth)


def _add_sample(sub) -> None:
    from pipeline.data.subsets import RULES

    p = sub.add_parser("sample", help="rebuild the 32-patient sample (or the pool, its halves, the "
                                      "test fixture) from the official cell_images.zip")
    p.add_argument("archive", help="the official cell_images.zip (or a zip that holds the patients)")
    p.add_argument("output", help="the zip to write")
    p.add_argument("--subset", choices=list(RULES), default="sample",
                   help="which committed patient list (pipeline/data/subsets/)")
    p.add_argument("--pool", action="store_true", help="the 84-patient external pool (--subset pool)")
    p.set_defaults(func=commands.sample_cmd)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="paired differences of candidate recipes against the default, "
                                       "on the cells `pipeline validate` scored for each")
    p.add_argument("default", help="the default recipe's validation folder (holds cells.parquet); "
                                   "FOLDER,FOLDER,...: one per training seed")
    p.add_argument("candidates", nargs="+", help="NAME=FOLDER of each candidate's validation (NAME=FOLDER,FOLDER,... "
                                                 "for its seeds, in the default's seed order)")
    p.add_argument("--bootstrap", type=int, default=1000, help="patient-bootstrap draws")
    p.add_argument("--seeds", action="store_true",
                   help="the folders are one recipe's training seeds: report each, the mean and the spread")
    p.add_argument("--default-name", default="default", help="--seeds: the first folder's name (its seed)")
    p.add_argument("--out", default="reports/compare.md", help="the table; the JSON goes beside it")
    p.set_defaults(func=commands.compare_cmd)


def _add_views(sub) -> None:
    p = sub.add_parser("metrics", help="headline test figures and DVC experiments in 120 columns")
    p.add_argument("--project", default=".", help="the DVC project folder")
    p.set_defaults(func=commands.metrics_cmd)
    p = sub.add_parser("plots-template",
                       help="write the offline dvc plots page (make install runs it)")
    p.add_argument("--output", default=".dvc/offline_plots.html",
                   help="where .dvc/config's plots.html_template points")
    p.set_defaults(func=commands.plots_template_cmd)


def _add_score_and_rollback(sub) -> None:
    from pipeline.config import RegisterConfig, ScoreConfig

    p = sub.add_parser("score", help="batch-score images with a registered model (in this process up "
                                     "to score.local_max_images, else Ray Data)")
    p.add_argument("--model", required=True, help=f"e.g. {champion_uri()}")
    p.add_argument("--input", required=True,
                   help="folder, .zip, glob ('cells/*.png') or .csv/.parquet with a 'path' column")
    p.add_argument("--output", required=True, help="predictions .parquet")
    p.add_argument("--batch-size", type=int, default=ScoreConfig.batch_size, help="images per batch")
    p.add_argument("--concurrency", type=int, default=ScoreConfig.concurrency,
                   help="predictor actors (0: one per GPU, or one per CPU, at most 8)")
    p.add_argument("--cpus-per-actor", type=float, default=ScoreConfig.cpus_per_actor,
                   help="CPUs each actor reserves")
    p.add_argument("--gpu", action="store_true", default=ScoreConfig.use_gpu, help="one GPU per actor")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=ScoreConfig.tta,
                   help="average over 8 flips/rotations, as evaluate.tta (--no-tta: one view, 8x faster)")
    p.set_defaults(func=commands.score_cmd)
    p = sub.add_parser("rollback", help="move the champion alias back")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default=RegisterConfig.alias, help="the alias to move")
    p.add_argument("--to", default=None, help="version (default: the previous champion)")
    p.set_defaults(func=commands.rollback_cmd)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not when there is none, nor when the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def champion_uri() -> str:
    """``models:/<dataset>@<alias>`` with the defaults of ``params.yaml``'s sections."""
    from pipeline.config import RegisterConfig
    from pipeline.params import Params

    return f"models:/{RegisterConfig.model_name or Params.dataset}@{RegisterConfig.alias}"


def build_parser() -> argparse.ArgumentParser:
    """The ``pipeline`` command and its subcommands (defaults shown in every ``--help``)."""
    from importlib.metadata import version

    parser = argparse.ArgumentParser(
        prog="pipeline", description=__doc__, formatter_class=_HelpFormatter,
        epilog=f"{DEBUG_ENV}=1 shows the traceback of an error.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {version('malaria-pipeline')}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser,
                                       formatter_class=_HelpFormatter)
    _add_demo_and_synth(sub)
    _add_views(sub)
    _add_compare(sub)
    _add_sample(sub)
    _add_score_and_rollback(sub)
    _add_report(sub)
    _add_crossval(sub)
    _add_validate(sub)
    _add_benchmark(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    set_quiet_env()
    setup_logging()
    args = build_parser().parse_args(argv)
    run_cli(lambda: args.func(args))


if __name__ == "__main__":
    main()
