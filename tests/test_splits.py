"""xrayfeat.splits: validation cut by patient and class, official splits kept, the same
folds as scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

from xrayfeat.dataset import find_labelled_files
from xrayfeat.errors import UsageError
from xrayfeat.splits import MIN_VAL_IMAGES, assign_splits, grouped_split


def test_grouped_split_keeps_patients_whole():
    rng = np.random.default_rng(0)
    groups = [f"p{g}" for g in rng.integers(0, 120, 600)]
    labels = np.array([hash(g) % 2 for g in groups])
    mask = grouped_split(labels, groups, 0.2, seed=1)
    val_groups = {g for g, m in zip(groups, mask) if m}
    train_groups = {g for g, m in zip(groups, mask) if not m}
    assert not val_groups & train_groups
    assert 0.1 < mask.mean() < 0.3
    np.testing.assert_array_equal(mask, grouped_split(labels, groups, 0.2, seed=1))


def test_grouped_split_rejects_bad_input():
    with pytest.raises(UsageError):
        grouped_split(np.zeros(10), [str(i) for i in range(10)], 1.5, seed=0)
    with pytest.raises(UsageError, match="at least 2 patients of every class"):
        grouped_split(np.array([0, 1, 1]), ["a", "b", "c"], 0.1, seed=0)


def test_small_official_val_is_replaced_by_a_grouped_cut(examples_dir):
    files, classes, _ = find_labelled_files(examples_dir)
    assert sum(f.split == "val" for f in files) < MIN_VAL_IMAGES
    splits, cut = assign_splits(files, classes, 0.1, seed=0)
    assert cut
    assert splits.count("test") == sum(f.split == "test" for f in files)  # test untouched
    by_split: dict[str, set[str]] = {}
    for f, s in zip(files, splits):
        by_split.setdefault(s, set()).add(f.patient)
    assert not by_split["train"] & by_split["val"]
    assert 0 < splits.count("val") < splits.count("train")


def test_large_official_val_is_kept(tmp_path, make_class_folder):
    per_class = MIN_VAL_IMAGES // 2
    src = make_class_folder(splits={"train": 4, "val": per_class}, size=40)
    files, classes, _ = find_labelled_files(src)
    splits, cut = assign_splits(files, classes, 0.1, seed=0)
    assert not cut
    assert splits == [f.split for f in files]


def test_no_split_folders_cuts_val_from_everything(class_folder):
    files, classes, _ = find_labelled_files(class_folder)
    splits, cut = assign_splits(files, classes, 0.25, seed=0)
    assert cut and set(splits) == {"train", "val"}
    for name in classes:  # stratified: both classes in val
        assert any(s == "val" and f.class_name == name for f, s in zip(files, splits))


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_stratified_group_folds_equal_scikit_learns(seed):
    """The split is written out (scikit-learn's import costs more than a small prepare);
    it must cut exactly the folds scikit-learn's StratifiedGroupKFold cuts."""
    from sklearn.model_selection import StratifiedGroupKFold

    from xrayfeat.splits import stratified_group_folds

    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 90, 400).astype(str)
    labels = (rng.random(400) < 0.7).astype(int) + (rng.random(400) < 0.1)  # 3 classes
    ours = list(stratified_group_folds(labels, groups, 5, seed))
    theirs = [test for _, test in StratifiedGroupKFold(5, shuffle=True, random_state=seed)
              .split(np.zeros(400), labels, groups)]
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
