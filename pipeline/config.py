"""Typed, frozen configuration of each section of ``params.yaml``: one class a stage.

The library takes these objects, never the file: entry points read it with
:func:`pipeline.params.read_params`. :func:`from_dict` refuses unknown keys, so a typo in
``params.yaml`` is an error that names the key rather than a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The config machinery, re-exported: the rest of the package imports it from here.
from pipeline.typedconfig import (  # noqa: F401
    Checked,
    ConfigError,
    UserError,
    flatten,
    from_dict,
    to_dict,
)

# The allowed values of every enum-like param; the modules that implement them use these.
REGIMES = ("scratch", "feature_extract", "finetune_top", "finetune_all")
OPTIMIZERS, SCHEDULERS, KEEP = ("adamw", "sgd"), ("cosine", "step", "constant"), ("best", "last")
AUGMENT_PRESETS, PROBABILITY = ("custom", "none", "light", "strong"), (0.0, 1.0)


@dataclass(frozen=True)
class SourceConfig:
    """Where one dataset's archive comes from and what it must hash to."""

    url: str  # https:// (official or mirror), file:// or a local path (a folder is zipped)
    sha256: str = ""
    md5: str = ""  # MedMNIST publishes MD5 sums


@dataclass(frozen=True)
class DownloadConfig(Checked):
    """The source of every dataset, keyed by dataset name, and transfer settings."""

    SECTION = "download"
    RANGES = {"timeout_s": (1e-3, None), "chunk_bytes": (1, None)}

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    timeout_s: float = 20.0
    chunk_bytes: int = 1 << 20


@dataclass(frozen=True)
class PrepareConfig(Checked):
    """Extraction, validation, split and resizing of the raw archive."""

    SECTION = "prepare"
    RANGES = {"image_size": (8, 4096), "val_ratio": (0.0, 0.95), "test_ratio": (0.0, 0.95),
              "max_images": (0, None), "max_archive_bytes": (1, None), "workers": (0, None),
              "max_compression_ratio": (1.0, None)}

    image_size: int = 96
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    seed: int = 42
    max_images: int = 0  # 0 keeps every image; >0 takes a seeded random subset
    workers: int = 0  # processes decoding and resizing; 0: one per core
    groups_csv: str = ""  # imagefolder: CSV of path,group for grouped splits
    drop_duplicates: bool = False  # drop identical images that recur in a later split
    max_archive_bytes: int = 8 << 30  # refuse an archive declaring more, uncompressed
    max_compression_ratio: float = 100.0  # refuse a member expanding more (a zip bomb)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_ratio + self.test_ratio >= 1:
            raise ConfigError(f"prepare.val_ratio + prepare.test_ratio must be < 1 (training needs "
                              f"patients), got {self.val_ratio} + {self.test_ratio}")


@dataclass(frozen=True)
class AugmentConfig(Checked):
    """Albumentations policy for training images: a preset, or each family's probability."""

    SECTION = "augment"
    CHOICES = {"preset": AUGMENT_PRESETS}
    RANGES = {**{k: PROBABILITY for k in ("hflip", "vflip", "rotate90", "rotate", "affine",
                                          "resized_crop", "hue_saturation", "brightness_contrast",
                                          "gamma", "gauss_noise", "blur", "stain")},
              "rotate_limit": (0.0, 180.0), "scale_limit": (0.0, 0.99), "shift_limit": (0.0, 0.99),
              "crop_scale_min": (0.01, 1.0), "brightness_limit": (0.0, 1.0), "contrast_limit": (0.0, 1.0)}

    preset: str = "custom"  # custom (the probabilities below) | none | light | strong
    hflip: float = 0.5
    vflip: float = 0.5
    rotate90: float = 0.5
    rotate: float = 0.5
    rotate_limit: float = 180.0
    affine: float = 0.0  # scale and shift
    scale_limit: float = 0.1
    shift_limit: float = 0.0625
    resized_crop: float = 0.0
    crop_scale_min: float = 0.8
    hue_saturation: float = 0.3
    brightness_contrast: float = 0.5
    brightness_limit: float = 0.15
    contrast_limit: float = 0.15
    gamma: float = 0.0
    gauss_noise: float = 0.0
    blur: float = 0.0
    stain: float = 0.0  # H&E / Giemsa-style stain variation (Albumentations HEStain)


# The models pipeline/models.py builds itself; any torchvision classifier works too.
CUSTOM_MODELS = ("baseline_cnn", "efficientnet_lite0")


def known_models() -> tuple[str, ...]:
    """Every model name ``train.model`` accepts."""
    import torchvision

    return (*CUSTOM_MODELS, *torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class TrainConfig(Checked):
    """Model, optimisation and Ray Train scaling settings."""

    SECTION = "train"
    # "model" is checked in __post_init__: our own names need no torchvision import (seconds)
    CHOICES = {"regime": REGIMES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "keep": KEEP}
    RANGES = {"top_blocks": (0, None), "backbone_lr_factor": (0.0, None), "epochs": (1, None),
              "batch_size": (1, None), "lr": (1e-12, None), "momentum": (0.0, 0.999),
              "weight_decay": (0.0, None), "warmup_epochs": (0, None), "step_size": (1, None),
              "gamma": (1e-6, 1.0), "label_smoothing": (0.0, 0.99), "ema_decay": (0.0, 0.9999),
              "early_stopping_patience": (0, None), "loader_workers": (-1, None),
              "cpus_per_worker": (0.01, None), "max_failures": (-1, None)}

    model: str = "efficientnet_lite0"
    pretrained: bool = True
    regime: str = "finetune_all"  # scratch | feature_extract | finetune_top | finetune_all
    top_blocks: int = 2  # blocks below the head that train in finetune_top
    backbone_lr_factor: float = 1.0  # backbone lr = lr * factor (discriminative lr)
    epochs: int = 6  # a fixed budget, cosine schedule: docs/model-selection.md
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | step | constant, after warm-up
    warmup_epochs: int = 0
    step_size: int = 1  # step scheduler: epochs per decay
    gamma: float = 0.1  # step scheduler: decay factor
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # per-step moving average of the weights, validated and kept; 0 = off
    class_weights: bool = False  # balanced class weights in the loss
    stain_norm: bool = False  # each cell's colours matched to the training cells' (pipeline.data.stain)
    early_stopping_patience: int = 0  # epochs without val_loss improvement; 0 = off
    keep: str = "last"  # the model: last (the final epoch's) | best (lowest val_loss)
    amp: bool = True  # mixed precision, on CUDA only
    system_metrics: bool = True  # MLflow CPU/memory/GPU metrics of the driver node
    # Ray Train workers, or "auto": one per GPU with use_gpu, else one per cpus_per_worker of the
    # CPUs, at most 8 (pipeline.cluster.resolve_num_workers). "auto" first: typedconfig coerces
    # a union to its first member, and a Literal passes through to the check below.
    num_workers: Literal["auto"] | int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # DataLoader processes per worker augmenting ahead of the step; -1: none on CPU (the worker's
    # cores run torch), 4 on a GPU, whose step outruns one augmenting thread (docs/performance-gpu.md)
    loader_workers: int = -1
    seed: int = 42
    storage_path: str = "checkpoints"  # local/shared path or a pyarrow URI (s3://, gs://)
    max_failures: int = 2
    channels_last: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in CUSTOM_MODELS:
            self.check_choice("model", known_models())
        n = self.num_workers
        if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"train.num_workers: {n!r} is neither a whole number >= 1 nor 'auto'")


@dataclass(frozen=True)
class EvaluateConfig(Checked):
    """Test-split evaluation settings."""

    SECTION = "evaluate"
    RANGES = {"batch_size": (1, None), "target_sensitivity": (1e-6, 1.0), "patient_threshold": PROBABILITY,
              "bootstrap": (1, None), "ci_level": (0.5, 0.999), "gradcam_images": (0, None)}

    batch_size: int = 64
    tta: bool = True  # mean probability over the 8 flips/rotations
    positive_class: str = "Parasitized"
    target_sensitivity: float = 0.97  # operating point, chosen on the validation split
    patient_threshold: float = 0.1  # share of a patient's cells called positive to diagnose
    bootstrap: int = 1000  # patient-bootstrap resamples for confidence intervals
    ci_level: float = 0.95
    temperature_scaling: bool = False  # fit a temperature on validation, apply to test
    gradcam_images: int = 16  # worst test errors shown with Grad-CAM


@dataclass(frozen=True)
class RegisterConfig(Checked):
    """Model Registry settings and the champion rule."""

    SECTION = "register"
    RANGES = {"margin": (0.0, 1.0)}

    model_name: str = ""  # empty = the dataset's name
    metric: str = "roc_auc"
    margin: float = 0.0  # the new model must beat the champion by more than this
    alias: str = "champion"


@dataclass(frozen=True)
class ScoreConfig(Checked):
    """Ray Data batch scoring settings."""

    SECTION = "score"
    CHOICES = {"decode": ("auto", "actor", "tasks")}
    RANGES = {"batch_size": (1, None), "concurrency": (0, None), "cpus_per_actor": (0.01, None),
              "threads_per_actor": (0, None), "local_max_images": (0, None), "ood_threshold": (0, None)}

    input: str = ""  # folder or zip; empty = the test split of the manifest
    model_uri: str = ""  # empty = models:/<register.model_name>@champion
    batch_size: int = 64
    concurrency: int = 0  # predictor actors; 0: one per GPU, or one per cpus_per_actor of the CPUs (at most 8)
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 0  # torch threads of an actor; 0: the node's cores / actors
    local_max_images: int = 1_000_000  # up to this many and no cluster: in this process (faster, docs/performance.md)
    decode: str = "auto"  # auto: in the actors on CPU, separate tasks for GPU actors | actor | tasks
    use_gpu: bool = False  # one GPU per actor
    tta: bool = True  # mean probability over the 8 flips/rotations
    ood_threshold: float = 0.0  # reject above this out-of-distribution score; 0: the model's own


@dataclass(frozen=True)
class CrossvalConfig(Checked):
    """Patient-grouped cross-validation over the training and validation patients."""

    SECTION = "crossval"
    RANGES = {"folds": (2, None)}

    folds: int = 3
    seed: int = 0  # fold assignment; another seed re-checks a choice made on these folds
    exclude: str = ""  # CSV with a path column (e.g. label_issues.csv): cells kept out of training


@dataclass(frozen=True)
class ValidateConfig(Checked):
    """External validation: a labelled archive of new patients scored by a registered model."""

    SECTION = "validate"
    RANGES = {"bootstrap": (1, None), "ci_level": (0.5, 0.999), "errors_shown": (0, None)}

    archive: str = ""  # zip of <class>/<image> files (the layout prepare reads) of new patients
    model_uri: str = ""  # empty = models:/<register.model_name or dataset>@<register.alias>
    bootstrap: int = 1000  # patient-bootstrap resamples for confidence intervals
    ci_level: float = 0.95
    exclude_overlap: bool = False  # leave out (and report) patients the model trained on; else refuse
    errors_shown: int = 16  # most confident errors shown as thumbnails
