"""What each ``pipeline`` subcommand does (the parser is :mod:`pipeline.__main__`): parsed
arguments in, a library call, one summary printed. Imports are inside each command, so
``pipeline --help`` starts in a fraction of a second."""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from pipeline.cli import command_line


def demo(args: argparse.Namespace) -> None:
    """Scaffold a demo project (its own git repository) on synthetic images, ``dvc repro``
    it and commit the result, so ``dvc exp run -S …`` has a baseline to compare with."""
    from pipeline.data.synthetic import DEMO_NOTE, make_archive
    from pipeline.project import git_commit, repro, scaffold

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
    from pipeline.evaluation.summary import show

    print(show(Path(args.project)))


def plots_template_cmd(args: argparse.Namespace) -> None:
    """Write the page template that makes ``dvc plots show`` draw offline."""
    from pipeline.plots import write_offline_template

    print(f"offline dvc plots template: {write_offline_template(args.output)}")


def synth(args: argparse.Namespace) -> None:
    """Write a synthetic archive in the official layout."""
    from pipeline.data.synthetic import make_archive

    path = make_archive(args.output, n_patients=args.patients, cells_per_patient=args.cells,
                        seed=args.seed, corrupt=args.corrupt)
    print(path)


def score_cmd(args: argparse.Namespace) -> None:
    """Score a folder, zip, glob or list of images with a registered model."""
    from pipeline.config import ScoreConfig
    from pipeline.serving.score import score

    cfg = ScoreConfig(input=args.input, batch_size=args.batch_size, concurrency=args.concurrency,
                      cpus_per_actor=args.cpus_per_actor, use_gpu=args.gpu, tta=args.tta)
    result = score(cfg, args.model, args.output)
    skipped = (f"; skipped {len(result.skipped)} system files: {', '.join(result.skipped[:5])}"
               f"{' ...' if len(result.skipped) > 5 else ''}" if result.skipped else "")
    answered = result.n_images - result.n_errors - result.n_rejected
    print(f"answered {answered} / {result.n_images} images ({result.n_rejected} rejected, "
          f"{result.n_errors} failed{skipped}) with {result.model_uri} at "
          f"{result.images_per_s:.1f} img/s, first row after {result.first_row_s:.1f} s -> {result.output}")


def rollback_cmd(args: argparse.Namespace) -> None:
    """Move the alias back to the previous champion (or a named version)."""
    from pipeline.serving.registry import rollback
    from pipeline.tracking import setup_mlflow

    setup_mlflow()
    left, now = rollback(args.name, args.alias, args.to)
    print(f"{args.name}: alias '{args.alias}' moved from v{left} to v{now}")


def report_cmd(args: argparse.Namespace) -> None:
    """``regimes``: train every transfer-learning regime and write the table; ``reject``: the
    reject option measured on generated non-cells, degraded cells and real cells."""
    out = Path(args.out or f"reports/{args.table}.md")
    if args.table == "regimes":
        from pipeline.selection.regime_table import write_regime_table

        print(write_regime_table(args.prepared, args.epochs, out, args.work_dir))
        return
    reject_cmd(args, out)


def reject_cmd(args: argparse.Namespace, out: Path) -> None:
    import sys

    from pipeline.data.prepared import PreparedData
    from pipeline.evaluation.reject import benchmark, render, zip_cells
    from pipeline.files import atomic_path, write_json
    from pipeline.serving.inference import Predictor

    checkpoint = args.model
    if "://" in str(checkpoint) or str(checkpoint).startswith("models:/"):
        from pipeline.serving.pyfunc import checkpoint_of
        from pipeline.tracking import setup_mlflow

        setup_mlflow()
        checkpoint = checkpoint_of(str(checkpoint))
    data = PreparedData(args.prepared)
    real = {"test split": [(data.images_dir / p).read_bytes() for p in data.rows("test")["path"]]}
    real.update({Path(z).name: zip_cells(z, 10**9) for z in args.cells})
    result = benchmark(Predictor.from_checkpoint(checkpoint), real, args.per_kind)
    with atomic_path(out) as tmp:
        tmp.write_text(render(result, command_line("pipeline report reject", sys.argv[3:])))
    write_json(out.with_suffix(".json"), result)
    print(f"non-cells rejected {result['non_cells_rejected']:.1%} (worst kind "
          f"{result['worst_non_cell_kind']:.1%}); real cells: " + ", ".join(
              f"{r['kind']} {r['rejected']:.2%}" for r in result["per_kind"] if r["group"] == "real cells")
          + f" -> {out}")


def crossval_cmd(args: argparse.Namespace) -> None:
    """Cross-validate the params of params.yaml by patient; write the report and metrics."""
    from dataclasses import replace

    from pipeline.params import read_params
    from pipeline.selection.report import crossval_params

    params = read_params(Path(args.params))
    params = replace(params, crossval=replace(params.crossval, **{k: v for k, v in
                                                                  (("folds", args.folds), ("seed", args.seed))
                                                                  if v is not None}))
    result, report = crossval_params(params, args.prepared, args.out, args.metrics)
    p = result.pooled
    print(f"{params.crossval.folds}-fold cross-validation over {p['patients']} patients: OOF accuracy "
          f"{p['accuracy']:.4f}, AUC {p['roc_auc']:.4f} -> {report}")


def validate_cmd(args: argparse.Namespace) -> None:
    """Score a labelled archive of new patients with a registered model; report and record it."""
    from dataclasses import replace

    from pipeline.data.datasets import get_dataset
    from pipeline.evaluation.external import validate
    from pipeline.params import read_params

    params = read_params(Path(args.params))
    cfg = replace(params.validate, archive=args.archive,
                  exclude_overlap=args.exclude_overlap or params.validate.exclude_overlap)
    model_uri = (args.model or cfg.model_uri or
                 f"models:/{params.register.model_name or params.dataset}@{params.register.alias}")
    result = validate(cfg, model_uri, args.out, get_dataset(params.dataset), params.evaluate.positive_class,
                      params.evaluate.patient_threshold, params.prepare)
    print(result.summary())


def sweep_cmd(args: argparse.Namespace) -> None:
    """Cross-validate every configuration of a grid file; write the sweep table."""
    from dataclasses import replace

    import yaml

    from pipeline.params import read_params
    from pipeline.selection.report import sweep

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
    """Run every throughput comparison; write reports/performance.md and .json (--out docs
    publishes); print the ratios."""
    import sys
    import tempfile

    from pipeline.bench.page import ratios
    from pipeline.bench.report import (
        PARTS,
        SMOKE,
        BenchSize,
        merge_parts,
        run_all,
        write,
    )
    from pipeline.params import read_params
    from pipeline.tracking import setup_mlflow

    params = read_params(Path(args.params))
    setup_mlflow()
    archive = Path(args.archive)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    size = SMOKE if args.smoke else BenchSize(score_images=args.images)
    parts = tuple(p for p in args.only.split(",") if p) or PARTS
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.work:  # a scratch folder named on the command line: made if missing
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=args.work) as work:
        results = run_all(Path(args.prepared), args.model, archive, sha256, Path(work), size,
                          params.train, params.augment,
                          Path(args.score_input) if args.score_input else None, parts)
    if args.only:
        results = merge_parts(args.out, results, parts)
    page = write(results, args.out, command_line("python -m pipeline benchmark", sys.argv[2:]))
    print("\n".join(ratios(results)) + f"\n-> {page}")


def sample_cmd(args: argparse.Namespace) -> None:
    """Rebuild a committed subset (the sample, the pool, its halves, the test fixture) from the
    official archive, byte for byte."""
    from pipeline.data.subsets import write_subset

    result = write_subset(args.archive, args.output, "pool" if args.pool else args.subset)
    print(f"{args.output}: {result['members']} members, manifest {result['manifest_sha256']} "
          f"({'matches' if result['matches'] else 'no'} committed digest)")


def compare_cmd(args: argparse.Namespace) -> None:
    """Paired differences of candidate recipes against the default on the same external cells."""
    import sys

    from pipeline.files import atomic_path, write_json
    from pipeline.selection.compare import compare, render

    candidates = dict(item.split("=", 1) for item in args.candidates)
    if args.seeds:  # one recipe, several training seeds: the figures of each, not a comparison
        return _seeds(args, {args.default_name: Path(args.default), **{k: Path(v) for k, v in candidates.items()}})
    def folders(text: str) -> list[Path]:  # FOLDER[,FOLDER...]: one per training seed, in seed order
        return [Path(f) for f in text.split(",")]

    table = compare(folders(args.default), {k: folders(v) for k, v in candidates.items()}, args.bootstrap)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(render(table, command_line("pipeline compare", sys.argv[2:])))
    write_json(out.with_suffix(".json"), table.to_dict(orient="records"))
    print(table[["candidate", "accuracy_difference", "roc_auc_difference", "verdict"]].to_string(index=False)
          + f"\n-> {out}")


def _seeds(args: argparse.Namespace, folders: dict[str, Path]) -> None:
    import sys

    from pipeline.files import atomic_path, write_json
    from pipeline.selection.compare import render_seeds, seeds_summary

    summary = seeds_summary(folders)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(render_seeds(summary, command_line("pipeline compare", sys.argv[2:])))
    write_json(out.with_suffix(".json"), summary)
    print(render_seeds(summary, "") + f"-> {out}")
