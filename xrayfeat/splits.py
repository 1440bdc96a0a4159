"""Which split each image belongs to: official folders kept, validation cut by patient.

When a folder has no validation split (or the Kermany one of 16 images), validation is cut
from train, stratified by class and grouped by patient, so no patient's images are on both
sides (leakage inflates every score downstream).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from xrayfeat.errors import UsageError
from xrayfeat.sources import LabelledFile

#: The official Kermany val split has 16 images; below this a validation split is cut from train.
MIN_VAL_IMAGES = 50


def grouped_split(
    labels: np.ndarray, groups: Sequence[str], fraction: float, seed: int,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Boolean mask of a validation split: about ``fraction`` of the images, stratified by
    class, with every patient wholly inside or outside it (no leakage)."""
    n_splits = _validation_folds(labels, groups, fraction, class_names)
    labels = np.asarray(labels)
    classes = set(labels.tolist())
    for val_index in stratified_group_folds(labels, np.asarray(groups), n_splits, seed):
        mask = np.zeros(len(labels), bool)
        mask[val_index] = True
        if set(labels[mask]) == classes == set(labels[~mask]):
            break  # the first fold holding every class on both sides
    return mask


def stratified_group_folds(labels: np.ndarray, groups: np.ndarray, n_splits: int,
                           seed: int) -> Iterator[np.ndarray]:
    """The validation indices of each fold of scikit-learn's ``StratifiedGroupKFold(n_splits,
    shuffle=True, random_state=seed)`` (its algorithm as of 1.6, tested equal to it).

    Written out rather than imported for two measured reasons: importing scikit-learn
    takes 1.2-2.6 s, more than preparing 150 radiographs on two cores; and a dataset's
    validation split must not change when scikit-learn changes its implementation (its
    shuffling was corrected in 1.6, which moved every seeded split). Each patient in turn
    (most class-skewed first, ties in seeded random order) joins the fold where the
    per-class shares across folds spread least, the smaller fold on a tie.
    """
    _, y_inv, y_cnt = np.unique(labels, return_inverse=True, return_counts=True)
    _, groups_inv = np.unique(groups, return_inverse=True)
    n_groups = int(groups_inv.max()) + 1
    per_group = np.zeros((n_groups, len(y_cnt)))
    np.add.at(per_group, (groups_inv, y_inv), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)
    per_group = per_group[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(n_groups)
    groups_inv = inv_perm[groups_inv]
    per_fold = np.zeros((n_splits, len(y_cnt)))
    fold_of_group = np.empty(n_groups, int)
    for group in np.argsort(-np.std(per_group, axis=1), kind="stable"):
        counts = per_group[group]
        best, best_eval, best_size = None, np.inf, np.inf
        for i in range(n_splits):
            per_fold[i] += counts
            spread = np.mean(np.std(per_fold / y_cnt.reshape(1, -1), axis=0))
            per_fold[i] -= counts
            size = np.sum(per_fold[i])
            if spread < best_eval or (np.isclose(spread, best_eval) and size < best_size):
                best, best_eval, best_size = i, spread, size
        per_fold[best] += counts
        fold_of_group[group] = best
    fold_of_image = fold_of_group[groups_inv]
    for i in range(n_splits):
        yield np.flatnonzero(fold_of_image == i)


def _validation_folds(labels, groups, fraction: float, class_names=None) -> int:
    """How many folds :func:`grouped_split` cuts; a one-line error when it cannot cut any."""
    if not 0 < fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {fraction}")
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    patients = {int(c): len(set(groups[labels == c])) for c in np.unique(labels)}
    fewest = min(patients.values())
    if fewest < 2:
        scarce = ", ".join(class_names[c] if class_names else f"class index {c}"
                           for c, n in patients.items() if n < 2)
        raise UsageError(f"a validation split needs at least 2 patients of every class (one "
                         f"for validation, one for training); {scarce} has 1: add images or "
                         "give a val/ folder")
    # Small folders: fewer folds than 1 / fraction, so every class can appear in each fold
    # (a larger validation share, rather than scikit-learn's error).
    return min(max(2, round(1 / fraction)), fewest)


def assign_splits(
    files: Sequence[LabelledFile], classes: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], bool]:
    """The split of every file, and whether validation was cut from train.

    Official split folders are kept; when there is no val split, or one under
    ``MIN_VAL_IMAGES`` images, its images join train and val is cut from train by patient.
    """
    splits, train_idx, labels, groups = _train_pool(files, classes)
    if train_idx is None:
        return splits, False
    val_mask = grouped_split(labels, groups, val_fraction, seed, class_names=classes)
    for i in train_idx[val_mask]:
        splits[i] = "val"
    return splits, True


def check_splits_possible(files: Sequence[LabelledFile], classes: Sequence[str],
                          val_fraction: float) -> None:
    """Raise at once the error :func:`assign_splits` would raise (it runs in the background
    while images decode, and would otherwise report it only at the end)."""
    _, train_idx, labels, groups = _train_pool(files, classes)
    if train_idx is not None:
        _validation_folds(labels, groups, val_fraction, class_names=classes)


def _train_pool(files, classes):
    """``(splits, train indices, their labels, their patients)``; the last three are
    ``None`` when an official val split of ``MIN_VAL_IMAGES`` or more is kept."""
    splits = [f.split or "train" for f in files]
    if splits.count("val") >= MIN_VAL_IMAGES:
        return splits, None, None, None
    splits = ["train" if s == "val" else s for s in splits]
    train_idx = np.array([i for i, s in enumerate(splits) if s == "train"])
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[files[i].class_name] for i in train_idx])
    groups = np.asarray([files[i].patient for i in train_idx])
    return splits, train_idx, labels, groups
