"""``pipeline benchmark`` (``make bench``): every performance comparison in one process run,
written to ``reports/performance.md`` and ``reports/performance.json`` (``--out docs``
publishes them), ratios printed last.

The end-to-end part scaffolds a project on the archive, runs ``dvc repro`` (each stage
records its wall time and peak memory in ``logs/<stage>.stats.json``), then a no-op
``dvc repro``. ``--smoke`` runs every part small (the CI test), not for the figures.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from pipeline.bench import page_path
from pipeline.bench import scoring as benchmark
from pipeline.bench import training as benchmark_train
from pipeline.config import AugmentConfig, TrainConfig
from pipeline.files import write_json

PAGE = "performance.md"
STAGES = ("download", "prepare", "augment", "train", "evaluate", "register", "score")


@dataclass(frozen=True)
class BenchSize:
    """How big each part runs: the full figures, or a smoke run that only proves it works."""

    score_images: int = 20000
    small_job_sizes: tuple[int, ...] = (100, 1000, 5000)
    train_images: int = 1024
    train_epochs: int = 3
    repeats: int = 3
    end_to_end: bool = True


SMOKE = BenchSize(score_images=96, small_job_sizes=(16,), train_images=128, train_epochs=1, repeats=1,
                  end_to_end=False)


def machine() -> dict[str, Any]:
    """CPU model, cores, GPU and library versions."""
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": cpu, "cores": benchmark.cores(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()}


def end_to_end(archive: Path, sha256: str, work: Path) -> dict[str, Any]:
    """``dvc repro`` of a fresh project on ``archive``: per-stage wall time and peak memory."""
    from pipeline.project import dvc_env, scaffold

    project = scaffold(work / "project", {"download": {"sources": {"malaria": {
        "url": str(archive.resolve()), "sha256": sha256}}}}, git=True)
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "--quiet"], cwd=project, env=dvc_env(), check=True,
                   capture_output=True)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "--quiet"], cwd=project, env=dvc_env(), check=True,
                   capture_output=True)
    noop = time.perf_counter() - t0
    stages = {s: json.loads((project / "logs" / f"{s}.stats.json").read_text()) for s in STAGES}
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    train = json.loads((project / "metrics" / "train.json").read_text())
    test = {k: metrics[k] for k in metrics if isinstance(metrics[k], float) and k.split("_ci_")[0] in
            ("accuracy", "roc_auc", "sensitivity", "specificity")}
    return {"repro_s": round(total, 1), "noop_repro_s": round(noop, 2), "stages": stages,
            "test_accuracy": metrics.get("accuracy"), "test_roc_auc": metrics.get("roc_auc"),
            "test": test, "best_epoch": train.get("best_epoch")}


def run_all(prepared: Path, model_uri: str, archive: Path, sha256: str, work: Path,
            size: BenchSize, train_cfg: TrainConfig, augment: AugmentConfig) -> dict[str, Any]:
    """Every comparison, in this process; the results as one dict."""
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"date": date.today().isoformat(), "machine": machine(),
                           "size": size.__dict__}
    out["scoring"] = benchmark.scoring(model_uri, prepared, size.score_images, 64, size.repeats,
                                       work / "scoring")
    out["small_job"] = benchmark.small_job(model_uri, prepared, size.small_job_sizes, work / "small")
    out["bf16"] = benchmark.bf16_check(model_uri, prepared, size.repeats)
    out["training"] = benchmark_train.training(prepared, train_cfg, augment, size.train_images,
                                               size.train_epochs, work / "training")
    out["prepare"] = benchmark.prepare_speedup(archive, work / "prepare", size.repeats)
    if size.end_to_end:
        out["end_to_end"] = end_to_end(archive, sha256, work / "e2e")
    return out


def ratios(r: dict[str, Any]) -> list[str]:
    """The comparisons as one line each (printed last)."""
    t = r["training"]
    lines = [f"scoring: score {r['scoring']['score_images_per_s']} img/s / plain "
             f"{r['scoring']['plain_images_per_s']} img/s = {r['scoring']['ratio']} (goal >= 0.9)",
             f"bf16 inference: {r['bf16']['bf16_images_per_s']} vs fp32 {r['bf16']['fp32_images_per_s']} "
             f"img/s; {r['bf16']['share_within_1e-2_same_label']:.2%} of cells within 1e-2, same label",
             f"training: augmentation / pre-materialised = {t['augment_over_materialised']} (goal >= 0.9)",
             f"training: torch.compile / eager = {t['compiled_over_eager']} "
             f"(warm-up epoch {t['warmup_epoch_s']['compiled']} s vs {t['warmup_epoch_s']['eager']} s)"]
    lines += [f"training {k} (workers x threads): plain / Ray Train = {v['plain_over_ray']} (goal <= 1.05)"
              for k, v in t["ray"].items()]
    lines.append(f"prepare: one process / {r['prepare']['workers']} = {r['prepare']['speedup']}x "
                 f"(byte-identical: {r['prepare']['byte_identical']})")
    return lines


def write(results: dict[str, Any], out: str | Path, command: str) -> Path:
    """The page (tables) and the JSON beside it; ``out`` is the page or a folder for
    ``performance.md``. Returns the page's path."""
    markdown = page_path(out, PAGE)
    write_json(markdown.with_suffix(".json"), results)
    gpu = markdown.with_name("performance-gpu.json")  # from `python -m pipeline.bench.gpu`
    markdown.write_text(render(results, command, json.loads(gpu.read_text()) if gpu.exists() else None))
    return markdown


# What was measured by hand (2026-11-27, not by this command) about the slower layout.
LAYOUT_NOTE = """A layout over 1.05 fails the regression check. `train.num_workers` x
`train.cpus_per_worker` defaults to the faster layout (cores x 1). Measured by hand, for
1 worker x 2 threads: the worker's two torch threads ran at about 90 % each. Ray's own
processes took about 10 % of one core together: the Train controller, the placement-group
cleaner, the synchronisation actor, the autoscaling coordinator, the dashboard agent,
the raylet and the GCS. The same plain loop ran at the plain rate inside a Ray task, and
in a thread of one, with no Ray Train (87-88 against 84-92 img/s). `OMP_WAIT_POLICY=PASSIVE`
changed nothing. So the likely cost is a two-thread OpenMP team losing a core to these
wake-ups. One process per core does not pay it."""


def _header(r: dict[str, Any], command: str, gpu_run: dict[str, Any] | None) -> str:
    """Title, command, machine, and the GPU line (a link to ``gpu_run``'s page when there is one)."""
    m = r["machine"]
    gpu = f"GPU: {m['gpu']}." if m["gpu"] else "No GPU on the machine measured."
    gpu += (f" GPU figures ({gpu_run['machine']['gpu']}, {gpu_run.get('date', '')}, by `python -m "
            "pipeline.bench.gpu`): [performance-gpu.md](performance-gpu.md)." if gpu_run else
            " No GPU run is on record, so the CUDA path (`train.use_gpu`, AMP, `score.use_gpu`) is unmeasured.")
    return f"""# Performance

Generated by `{command}` on {r['date']}; the raw figures are in
[performance.json](performance.json). Every comparison ran in one process run, after a
warm-up, as the median of {r['size']['repeats']} runs. On a shared virtual machine such figures
move by tens of per cent from one run to the next: compare rows of one run, not figures of
different runs.

Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Ray {m['ray']}, Python {m['python']}.
{gpu}

Measure your own machine with `make bench` (about 20 minutes after the README's sample
command; it writes `reports/performance.md` and its JSON); `make bench OUT=docs` replaces this
page and [performance.json](performance.json).
"""


def _scoring(sc: dict[str, Any]) -> str:
    """``score`` against the plain program, and how it scales with predictor actors."""
    actors = " / ".join(f"{k} actor(s): {v} img/s" for k, v in sc["actors_images_per_s"].items())
    return f"""
## Batch scoring

{sc['images']:,} real cell PNGs (the sample's test cells, cycled), batch {sc['batch_size']}, from
files to probabilities. The plain program is a forked Python pool decoding and resizing with
the project's `load_rgb`/`resize` while torch runs the same model's forward pass (fp32,
channels_last), with the fastest layout of those tried (torch threads x decoding processes:
{", ".join(f"{k}: {v}" for k, v in sc['plain_layout']['tried'].items())} img/s on 1,000 files).
`score` runs with its defaults (Ray Data: one predictor actor per core, each on one torch
thread, decoding its batches itself, two in flight; one Parquet file); its rate counts from the
dataset's creation, actor start included, with Ray already running (the first run, which
starts Ray, is shown apart).

| | images/s |
|---|---|
| plain program ({sc['plain_layout']['threads']} torch threads, {sc['plain_layout']['workers']} decoding process(es)) | {sc['plain_images_per_s']} |
| `score`, defaults | {sc['score_images_per_s']} |
| **ratio** (goal >= 0.9) | **{sc['ratio']}** |
| `score`, first run of the process (starts Ray) | {sc['score_first_run_images_per_s']} |

Time to the first row written: {sc['score_time_to_first_row_s']} s. Scaling with the number of
predictor actors ({sc['actors_images']:,} images, one run each; each actor's torch threads =
cores / actors): {actors}.
"""


def _small_jobs(sj: dict[str, Any]) -> str:
    """Small jobs through Ray Data and in-process, each in a fresh process."""
    small = "\n".join(f"| {n} | " + " | ".join(f"{v[e]['process_wall_s']} | {v[e]['score_call_s']} | "
                                                f"{v[e]['first_row_s']}" for e in ("ray", "in_process")) + " |"
                      for n, v in sj.items())
    return f"""
Jobs of a few sizes, each in a fresh Python process (imports included in the process time),
through Ray Data (`local_max_images: 0`, the only way before) and in-process (the default up
to `score.local_max_images` images when no `RAY_ADDRESS` is set):

| images | Ray Data: process (s) | `score()` call (s) | first row (s) | in-process: process (s) | `score()` call (s) | first row (s) |
|---|---|---|---|---|---|---|
{small}
"""


def _bf16(bf: dict[str, Any]) -> str:
    """bf16 autocast against fp32: speed, agreement, and whether it meets the bar."""
    return f"""
bf16 autocast on the {bf['cells']} test cells: {bf['bf16_images_per_s']} img/s against
{bf['fp32_images_per_s']} img/s in fp32; {bf['share_within_1e-2_same_label']:.2%} of cells keep the
same label with every probability within 1e-2 (largest difference {bf['max_abs_diff']}). The bar
for using it is 99.9 %: {"met" if bf['share_within_1e-2_same_label'] >= 0.999 else "not met, so scoring, evaluation and the model contract stay fp32"}.
"""


def _training(t: dict[str, Any]) -> str:
    """The plain loop against Ray Train's layouts, augmentation, and ``torch.compile``."""
    layouts = "\n".join(f"| Ray Train, {k} (workers x threads) | {v['images_per_s']} | {v['plain_over_ray']} |"
                        for k, v in t["ray"].items())
    return f"""
## Training

{t['images']} training cells at {t['image_size']} px, global batch {t['global_batch']}, the
training params' model and regime, median of {t['epochs_counted']} epochs after one warm-up epoch.
The plain loop is the same epoch code (`pipeline.training.engine`) in one process on all cores; Ray Train
is `pipeline.training.driver.train` (MLflow logging and a checkpoint every epoch included).

| | images/s | plain / this |
|---|---|---|
| plain loop, augmentation on | {t['plain_images_per_s']} | |
| plain loop, pre-materialised images (no augmentation) | {t['plain_no_augment_images_per_s']} | |
{layouts}

Augmentation on / pre-materialised: **{t['augment_over_materialised']}** (goal >= 0.9).
{LAYOUT_NOTE if any(v['plain_over_ray'] > 1.05 for v in t['ray'].values()) else ""}

`torch.compile` (default mode, inductor on CPU) of the plain loop's model:
{t['compiled_images_per_s']} img/s after warm-up against {t['plain_images_per_s']} eager
(**{t['compiled_over_eager']}x**), and the warm-up epoch took {t['warmup_epoch_s']['compiled']} s
against {t['warmup_epoch_s']['eager']} s eager (the compilation). {"Training stays eager: compiling cost more than it returned in this run." if t['compiled_over_eager'] < 1.05 else "Compiled training was faster in this run (training still runs eager: one run decides nothing)."}
"""


def _prepare(pr: dict[str, Any]) -> str:
    """``prepare()`` in one process against one per core."""
    return f"""
## prepare

`prepare()` on the archive at 96 px: one process {pr['serial_s']} s, one per core
({pr['workers']}) {pr['parallel_s']} s: **{pr['speedup']}x**; outputs byte-identical: {pr['byte_identical']}.
"""


def _end_to_end(e: dict[str, Any]) -> str:
    """``dvc repro`` of a fresh project: in all, no-op, and each stage's time and memory."""
    order = ("download", "prepare", "augment", "train", "evaluate", "register", "score")
    stages = sorted(e["stages"].items(), key=lambda sv: order.index(sv[0]) if sv[0] in order else len(order))
    rows = "\n".join(f"| {s} | {v['wall_s']} | {v['peak_rss_mb']:,.0f} |" for s, v in stages)
    return f"""
## End to end

`dvc repro` of a fresh project on the archive: {e['repro_s']} s in all (DVC's own work
included); a no-op `dvc repro` afterwards: {e['noop_repro_s']} s. Test accuracy {e['test_accuracy']:.4f},
AUC {e['test_roc_auc']:.4f}; best epoch {e['best_epoch']} (the training params of this checkout). Peak memory is the resident memory of the stage's process and every
process under it (its local Ray instance and workers), sampled every 0.2 s; memory shared
between processes counts once per process.

| stage | wall (s) | peak memory (MB) |
|---|---|---|
{rows}
"""


def render(r: dict[str, Any], command: str, gpu_run: dict[str, Any] | None = None) -> str:
    """The performance page, every figure from ``r`` (and a link to ``gpu_run``'s page)."""
    text = (_header(r, command, gpu_run) + _scoring(r["scoring"]) + _small_jobs(r["small_job"])
            + _bf16(r["bf16"]) + _training(r["training"]) + _prepare(r["prepare"]))
    if "end_to_end" in r:
        text += _end_to_end(r["end_to_end"])
    return text + "\n## Ratios\n\n" + "\n".join(f"- {line}" for line in ratios(r)) + "\n"
