"""Patient-grouped, label-stratified train/val/test splits."""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")


def group_split(
    labels: np.ndarray,
    groups: np.ndarray,
    val_ratio: float,
    test_ratio: float,
    seed: int,
) -> np.ndarray:
    """Assign every sample to train/val/test so that no group spans two subsets.

    Uses scikit-learn's ``StratifiedGroupKFold``: the test set is one fold of
    ``round(1 / test_ratio)`` folds, the validation set one fold of the rest, so
    the ratios are met as closely as whole groups allow.

    Returns:
        An array of split names aligned with ``labels``.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if not 0 < val_ratio < 1 or not 0 < test_ratio < 1 or val_ratio + test_ratio >= 1:
        raise ValueError(
            f"val_ratio={val_ratio} and test_ratio={test_ratio} must be in (0, 1) "
            "and sum to less than 1"
        )
    n_groups = len(np.unique(groups))
    if n_groups < 3:
        raise ValueError(f"need at least 3 patients/groups to split, found {n_groups}")
    split = np.full(len(labels), "train", dtype=object)
    test_idx = one_fold(labels, groups, test_ratio, seed)
    split[test_idx] = "test"
    rest = np.flatnonzero(split == "train")
    val_share = val_ratio / (1.0 - test_ratio)
    val_idx = one_fold(labels[rest], groups[rest], val_share, seed + 1)
    split[rest[val_idx]] = "val"
    return split.astype(str)


def one_fold(labels: np.ndarray, groups: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Indices of one stratified group fold holding about ``ratio`` of the samples."""
    n_groups = len(np.unique(groups))
    n_splits = int(min(max(2, round(1.0 / ratio)), n_groups))
    from sklearn.model_selection import (
        StratifiedGroupKFold,  # here: sklearn takes ~1 s to import,
    )
    # and every reader of the prepared layout (each scoring actor too) imports this module

    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    best = None
    for _, idx in folds.split(np.zeros(len(labels)), labels, groups):
        # Pick the fold whose size is closest to the target share.
        if best is None or abs(len(idx) - ratio * len(labels)) < abs(len(best) - ratio * len(labels)):
            best = idx
    assert best is not None
    return best
