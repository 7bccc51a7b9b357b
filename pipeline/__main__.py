"""Command line: ``python -m pipeline demo`` runs every stage on synthetic cells."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.utils import set_quiet_env, setup_logging


def demo(args: argparse.Namespace) -> None:
    """Scaffold a demo project on synthetic images and ``dvc repro`` it."""
    from pipeline.project import repro, scaffold
    from pipeline.synthetic import DEMO_NOTE, make_archive

    root = Path(args.dir).resolve()
    archive = make_archive(root / "synthetic_cells.zip", n_patients=args.patients,
                           cells_per_patient=args.cells, seed=0, corrupt=1)
    overrides = {
        "download": {"url": str(archive), "sha256": ""},
        "prepare": {"image_size": args.image_size},
        "train": {"epochs": args.epochs, "lr": 0.003},
        "register": {"model_name": "malaria-demo"},
    }
    scaffold(root, overrides)
    print(f"*** {DEMO_NOTE} ***\nproject: {root}", flush=True)
    t0 = time.perf_counter()
    repro(root)
    print(f"\n*** demo finished in {time.perf_counter() - t0:.0f} s on {DEMO_NOTE.lower()} ***\n"
          f"metrics:      cd {args.dir} && dvc metrics show\n"
          f"plots:        cd {args.dir} && dvc plots show   (opens dvc_plots/index.html)\n"
          f"MLflow UI:    cd {args.dir} && mlflow ui   (experiment 'malaria', model 'malaria-demo')\n"
          f"predictions:  {args.dir}/data/scores/predictions.parquet")


def synth(args: argparse.Namespace) -> None:
    """Write a synthetic archive in the official layout."""
    from pipeline.synthetic import make_archive

    path = make_archive(args.output, n_patients=args.patients, cells_per_patient=args.cells,
                        seed=args.seed, corrupt=args.corrupt)
    print(path)


def main(argv: list[str] | None = None) -> None:
    set_quiet_env()
    setup_logging()
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run every stage on synthetic cell images (offline)")
    p.add_argument("--dir", default="demo", help="demo project folder (default: demo)")
    p.add_argument("--patients", type=int, default=24)
    p.add_argument("--cells", type=int, default=40, help="cells per patient")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=3)
    p.set_defaults(func=demo)
    p = sub.add_parser("synth", help="write a synthetic cell-image zip")
    p.add_argument("output")
    p.add_argument("--patients", type=int, default=12)
    p.add_argument("--cells", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupt", type=int, default=0)
    p.set_defaults(func=synth)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
