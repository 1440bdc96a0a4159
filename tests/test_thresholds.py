"""Operating thresholds chosen on validation: Youden, bootstrapped Youden, fixed sensitivity."""

from __future__ import annotations

import numpy as np
import pytest

from xrayfeat.thresholds import choose_threshold, sensitivity_threshold, youden_threshold


def test_sensitivity_threshold_is_the_highest_that_keeps_the_target():
    y = np.array([0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.35, 0.3, 0.4, 0.5, 0.6])
    assert sensitivity_threshold(y, p, 0.75) == pytest.approx(0.4)  # 3 of 4 positives >= 0.4
    assert sensitivity_threshold(y, p, 1.0) == pytest.approx(0.3)
    assert sensitivity_threshold(y, p, 0.5) == pytest.approx(0.5)
    # The rule holds at the returned threshold, and one step higher it does not.
    for target in (0.25, 0.5, 0.75, 1.0):
        t = sensitivity_threshold(y, p, target)
        assert (p[y == 1] >= t).mean() >= target
        assert (p[y == 1] > t).mean() < target
    with pytest.raises(ValueError):
        sensitivity_threshold(y, p, 0.0)


def test_choose_threshold_youden_equals_youden_and_lies_in_its_interval():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    p = np.clip(np.concatenate([rng.normal(0.3, 0.15, 60), rng.normal(0.7, 0.15, 60)]), 0, 1)
    point = choose_threshold(y, p, "youden", n_boot=300)
    assert point.threshold == youden_threshold(y, p)
    assert point.ci[0] <= point.threshold <= point.ci[1]
    assert point.n_boot == 300 and point.method == "youden"
    report = point.to_dict()
    assert report["threshold_method"] == "youden" and report["threshold_ci"]["level"] == 0.95


def test_bootstrap_threshold_is_the_median_of_resampled_youden_thresholds():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 50)
    p = np.clip(np.concatenate([rng.normal(0.35, 0.15, 50), rng.normal(0.65, 0.15, 50)]), 0, 1)
    point = choose_threshold(y, p, "bootstrap", n_boot=200, seed=3)
    # Recompute the resamples by hand: each image is its own patient here.
    rng = np.random.default_rng(3)
    values = []
    for _ in range(200):
        idx = np.concatenate([[u] for u in rng.integers(0, 100, 100)])
        if len(np.unique(y[idx])) == 2:
            values.append(youden_threshold(y[idx], p[idx]))
    assert point.threshold == pytest.approx(float(np.median(values)))
    assert point.ci == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))
    # Deterministic for a seed.
    assert choose_threshold(y, p, "bootstrap", n_boot=200, seed=3) == point


def test_bootstrap_threshold_moves_less_between_validation_splits_than_youden():
    """The reason the method exists: on many validation splits drawn from one population,
    the bootstrapped threshold varies less than Youden's on each split."""
    youden, boot = [], []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        y = np.repeat([0, 1], [40, 110])
        p = 1 / (1 + np.exp(-np.concatenate([rng.normal(-2.5, 1.2, 40),
                                              rng.normal(2.5, 1.2, 110)])))
        youden.append(choose_threshold(y, p, "youden", n_boot=1).threshold)
        boot.append(choose_threshold(y, p, "bootstrap", n_boot=300, seed=seed).threshold)
    assert np.std(boot) < np.std(youden)


def test_resampling_is_by_patient():
    """Images of one patient enter and leave a resample together: with every image of a
    class belonging to one patient, a resample holds all of that class or none of it."""
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.95])
    groups = np.array(["a", "a", "a", "b", "b", "b", "b", "b"])
    point = choose_threshold(y, p, "youden", groups=groups, n_boot=200)
    # Two-class resamples are the original set, weighted: the threshold never moves.
    assert point.ci == (youden_threshold(y, p), youden_threshold(y, p))
    ungrouped = choose_threshold(y, p, "youden", n_boot=200)
    assert ungrouped.ci[0] < ungrouped.ci[1]


def test_choose_threshold_refuses_one_class_and_unknown_methods():
    with pytest.raises(ValueError):
        choose_threshold(np.ones(4), np.linspace(0, 1, 4), "youden")
    with pytest.raises(ValueError):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), "mean")
