"""Tests for xrayfeat.evaluation and the evaluation plots of xrayfeat.figures."""

from __future__ import annotations

import json
import math
import time

import matplotlib.image as mpimg
import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from xrayfeat.metrics import (
    SCALAR_METRICS,
    _weighted_metrics,
    binary_metrics,
    bootstrap_ci,
    evaluate_predictions,
    expected_calibration_error,
    multiclass_metrics,
    reliability_curve,
)
from xrayfeat.thresholds import youden_threshold

# --------------------------------------------------------------------------- fixtures

# Hand-checked binary case: 6 negatives, 4 positives, threshold 0.5.
#   negatives  0.05 0.20 0.30 0.45 | 0.60 0.70   -> tn = 4, fp = 2
#   positives  0.40 | 0.65 0.80 0.90             -> fn = 1, tp = 3
HAND_Y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
HAND_P = np.array([0.05, 0.20, 0.30, 0.45, 0.60, 0.70, 0.40, 0.65, 0.80, 0.90])


def _synthetic(n: int = 600, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping scores (AUC ~0.9), rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.round(np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1), 2)
    return y, p


def _same(a: float, b: float, tol: float = 1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# -------------------------------------------------------------------- binary metrics


def test_binary_metrics_hand_checked():
    m = binary_metrics(HAND_Y, HAND_P, 0.5)
    assert m["confusion_matrix"] == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}
    assert m["n"] == 10
    assert m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(7 / 10)  # (3 + 4) / 10
    assert m["sensitivity"] == pytest.approx(3 / 4)  # tp / (tp + fn)
    assert m["specificity"] == pytest.approx(4 / 6)  # tn / (tn + fp)
    assert m["precision"] == pytest.approx(3 / 5)  # tp / (tp + fp)
    assert m["npv"] == pytest.approx(4 / 5)  # tn / (tn + fn)
    assert m["f1"] == pytest.approx(6 / 9)  # 2tp / (2tp + fp + fn)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # AUC by counting (positive, negative) pairs where the positive scores higher:
    #   0.40 beats 0.05 0.20 0.30 -> 3;  0.65 beats five -> 5;  0.80, 0.90 beat all six
    #   (3 + 5 + 6 + 6) / (4 * 6) = 20 / 24
    assert m["roc_auc"] == pytest.approx(20 / 24)
    # Average precision, descending scores 0.90P 0.80P 0.70N 0.65P 0.60N 0.45N 0.40P:
    #   precision at each positive 1/1, 2/2, 3/4, 4/7 -> mean = 93 / 112
    assert m["pr_auc"] == pytest.approx(93 / 112)
    # Brier: negatives .0025+.04+.09+.2025+.36+.49 = 1.185, positives .36+.1225+.04+.01
    #   = .5325 -> 1.7175 / 10
    assert m["brier"] == pytest.approx(0.17175)


def test_binary_metrics_are_plain_python_and_json_serialisable():
    m = binary_metrics(HAND_Y, HAND_P, 0.5)
    for key, value in m.items():
        if key == "confusion_matrix":
            assert all(type(v) is int for v in value.values())
        elif key == "n":
            assert type(value) is int
        else:
            assert type(value) is float, key
    json.dumps(m)


def test_predicted_positive_at_equal_threshold():
    # prob == threshold counts as positive
    m = binary_metrics(np.array([0, 1]), np.array([0.3, 0.5]), 0.5)
    assert m["confusion_matrix"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 0}


def test_single_class_gives_nan_not_exceptions():
    y = np.ones(5, dtype=int)
    p = np.array([0.1, 0.6, 0.7, 0.8, 0.9])
    m = binary_metrics(y, p, 0.5)
    assert m["confusion_matrix"] == {"tp": 4, "fp": 0, "tn": 0, "fn": 1}
    assert m["sensitivity"] == pytest.approx(0.8)
    for key in ("specificity", "balanced_accuracy", "roc_auc", "pr_auc"):
        assert math.isnan(m[key]), key
    assert m["npv"] == 0.0  # 0 / (0 + 1): defined, and zero
    # nothing called positive: precision is 0/0
    m0 = binary_metrics(np.zeros(4, dtype=int), np.full(4, 0.1), 0.5)
    assert math.isnan(m0["precision"]) and math.isnan(m0["sensitivity"])
    assert m0["specificity"] == 1.0 and m0["accuracy"] == 1.0
    json.dumps(m0)  # NaN is allowed by json's default


def test_input_validation():
    with pytest.raises(ValueError):
        binary_metrics(np.array([0, 1]), np.array([0.5]), 0.5)
    with pytest.raises(ValueError):
        binary_metrics(np.array([0, 2]), np.array([0.5, 0.5]), 0.5)
    with pytest.raises(ValueError):
        binary_metrics(np.array([0, 1]), np.array([0.5, np.nan]), 0.5)


# -------------------------------------------------------------------------- threshold


def test_youden_threshold_perfectly_separable():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    thr = youden_threshold(y, p)
    assert type(thr) is float
    assert 0.3 < thr <= 0.6  # any threshold in (0.3, 0.6] separates; roc_curve gives 0.6
    m = binary_metrics(y, p, thr)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_youden_threshold_hand_checked():
    # J at each observed score (>= rule): 0.65 -> 3/4 - 1/6 = 7/12 is the maximum
    # (0.40 -> 1 - 3/6 = 1/2; 0.80 -> 1/2 - 0 = 1/2; 0.90 -> 1/4).
    assert youden_threshold(HAND_Y, HAND_P) == pytest.approx(0.65)


def test_youden_threshold_is_a_probability_and_rejects_one_class():
    y, p = _synthetic(200)
    assert 0.0 <= youden_threshold(y, p) <= 1.0
    with pytest.raises(ValueError):
        youden_threshold(np.ones(3, dtype=int), np.array([0.2, 0.5, 0.9]))


# ------------------------------------------------------------------------ calibration


def test_ece_hand_checked():
    # bin (0.1, 0.2]: mean 0.15, 1 of 2 positive -> |0.15 - 0.5| = 0.35, weight 1/2
    # bin (0.8, 0.9]: mean 0.85, 2 of 2 positive -> |0.85 - 1.0| = 0.15, weight 1/2
    y = np.array([0, 1, 1, 1])
    p = np.array([0.15, 0.15, 0.85, 0.85])
    assert expected_calibration_error(y, p) == pytest.approx(0.25)
    # perfectly calibrated within one bin
    assert expected_calibration_error(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.0)


def test_reliability_curve_matches_sklearn():
    y, p = _synthetic(300)
    mean_p, frac_pos, counts = reliability_curve(y, p, n_bins=10)
    sk_frac, sk_mean = calibration_curve(y, p, n_bins=10)
    np.testing.assert_allclose(mean_p, sk_mean)
    np.testing.assert_allclose(frac_pos, sk_frac)
    assert counts.sum() == y.size and np.all(counts > 0)


# -------------------------------------------------------------------------- bootstrap


def test_vectorised_resample_metrics_equal_explicit_resampling():
    """The weight trick in bootstrap_ci gives what binary_metrics gives on the resample."""
    y, p = _synthetic(200)
    rng = np.random.default_rng(7)
    for size in (200, 200, 200, 3):  # a tiny resample exercises the NaN paths too
        idx = rng.integers(0, y.size, size)
        weights = np.bincount(idx, minlength=y.size)[None, :]
        fast = _weighted_metrics(y, p, 0.5, weights)
        slow = binary_metrics(y[idx], p[idx], 0.5)
        for metric in SCALAR_METRICS:
            assert _same(float(fast[metric][0]), slow[metric]), metric


def test_bootstrap_deterministic_and_brackets_point_estimate():
    y, p = _synthetic(600)
    point = binary_metrics(y, p, 0.5)
    ci = bootstrap_ci(y, p, 0.5, groups=None, n_boot=300, seed=3)
    assert ci == bootstrap_ci(y, p, 0.5, groups=None, n_boot=300, seed=3)
    assert ci != bootstrap_ci(y, p, 0.5, groups=None, n_boot=300, seed=4)
    assert set(ci) == set(SCALAR_METRICS)
    for metric, bounds in ci.items():
        assert bounds["n_valid"] == 300
        assert bounds["lower"] <= point[metric] <= bounds["upper"], metric
        assert bounds["upper"] - bounds["lower"] < 0.2, metric
    json.dumps(ci)


def test_bootstrap_is_fast_enough():
    y, p = _synthetic(600)
    start = time.perf_counter()
    bootstrap_ci(y, p, 0.5, groups=np.array([f"p{i // 2}" for i in range(600)]), n_boot=1000)
    bootstrap_ci(y, p, 0.5, n_boot=1000)
    assert time.perf_counter() - start < 5.0


def test_grouped_bootstrap_resamples_whole_groups():
    # Each image repeated 3 times under one patient id: resampling patients must give
    # exactly the image-level interval of the de-duplicated data (every metric is
    # invariant to scaling all weights), while image-level resampling of the
    # duplicated data pretends to have 3x the data and gives narrower intervals.
    y, p = _synthetic(150)
    y3, p3 = np.repeat(y, 3), np.repeat(p, 3)
    # zero-padded so that sorted ids keep data order and both runs draw the same units
    patients = np.repeat(np.array([f"person{i:03d}" for i in range(y.size)]), 3)

    by_patient = bootstrap_ci(y3, p3, 0.5, groups=patients, n_boot=400, seed=0)
    one_per_patient = bootstrap_ci(y, p, 0.5, groups=None, n_boot=400, seed=0)
    for metric in SCALAR_METRICS:
        assert _same(by_patient[metric]["lower"], one_per_patient[metric]["lower"], 1e-9)
        assert _same(by_patient[metric]["upper"], one_per_patient[metric]["upper"], 1e-9)

    by_image = bootstrap_ci(y3, p3, 0.5, groups=None, n_boot=400, seed=0)
    width = lambda ci, m: ci[m]["upper"] - ci[m]["lower"]  # noqa: E731
    for metric in ("accuracy", "roc_auc", "sensitivity"):
        assert width(by_image, metric) < width(by_patient, metric)

    point = binary_metrics(y3, p3, 0.5)
    for metric in ("accuracy", "roc_auc", "brier"):
        assert by_patient[metric]["lower"] <= point[metric] <= by_patient[metric]["upper"]
    assert by_patient == bootstrap_ci(y3, p3, 0.5, groups=patients, n_boot=400, seed=0)


def test_bootstrap_skips_undefined_resamples():
    # 1 positive among 20: many resamples contain no positive -> sensitivity undefined
    y = np.zeros(20, dtype=int)
    y[0] = 1
    p = np.linspace(0.05, 0.95, 20)
    ci = bootstrap_ci(y, p, 0.5, groups=None, n_boot=200, seed=0)
    assert 0 < ci["sensitivity"]["n_valid"] < 200
    assert ci["accuracy"]["n_valid"] == 200
    assert not math.isnan(ci["sensitivity"]["lower"])
    # one class only: never defined, NaN bounds without warnings or errors
    ci1 = bootstrap_ci(np.zeros(10, dtype=int), np.linspace(0, 1, 10), 0.5, n_boot=50)
    assert ci1["roc_auc"]["n_valid"] == 0 and math.isnan(ci1["roc_auc"]["lower"])


# ------------------------------------------------------------------------- multiclass

# 3-class toy case; argmax predictions are 0 0 1 1 2 2 for true 0 0 0 1 1 2.
MC_Y = np.array([0, 0, 0, 1, 1, 2])
MC_P = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.5, 0.2],
        [0.2, 0.7, 0.1],
        [0.1, 0.4, 0.5],
        [0.1, 0.2, 0.7],
    ]
)
MC_NAMES = ["NORMAL", "BACTERIA", "VIRUS"]


def test_multiclass_hand_checked():
    m = multiclass_metrics(MC_Y, MC_P, MC_NAMES)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    # NORMAL: tp 2 fn 1 fp 0 tn 3;  BACTERIA: tp 1 fn 1 fp 1 tn 3;  VIRUS: tp 1 fn 0 fp 1 tn 4
    assert pc["NORMAL"]["sensitivity"] == pytest.approx(2 / 3)
    assert pc["NORMAL"]["specificity"] == pytest.approx(1.0)
    assert pc["BACTERIA"]["sensitivity"] == pytest.approx(1 / 2)
    assert pc["BACTERIA"]["specificity"] == pytest.approx(3 / 4)
    assert pc["VIRUS"]["sensitivity"] == pytest.approx(1.0)
    assert pc["VIRUS"]["specificity"] == pytest.approx(4 / 5)
    assert [pc[c]["support"] for c in MC_NAMES] == [3, 2, 1]
    # one-vs-rest AUC; BACTERIA: positives 0.7, 0.4 vs negatives 0.1 0.3 0.5 0.2 -> 7/8
    assert pc["NORMAL"]["roc_auc"] == pytest.approx(1.0)
    assert pc["BACTERIA"]["roc_auc"] == pytest.approx(7 / 8)
    assert pc["VIRUS"]["roc_auc"] == pytest.approx(1.0)
    assert m["macro"]["sensitivity"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro"]["specificity"] == pytest.approx((1 + 3 / 4 + 4 / 5) / 3)
    # support-weighted recall is accuracy
    assert m["weighted"]["sensitivity"] == pytest.approx(m["accuracy"])
    assert m["macro"]["roc_auc"] == pytest.approx(roc_auc_score(MC_Y, MC_P, multi_class="ovr"))
    assert m["weighted"]["roc_auc"] == pytest.approx(
        roc_auc_score(MC_Y, MC_P, multi_class="ovr", average="weighted")
    )
    json.dumps(m)


def test_multiclass_absent_class_is_nan_and_ignored_in_macro():
    y = np.array([0, 0, 1, 1])
    prob = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    m = multiclass_metrics(y, prob, MC_NAMES)
    assert math.isnan(m["per_class"]["VIRUS"]["roc_auc"])
    assert math.isnan(m["per_class"]["VIRUS"]["sensitivity"])
    assert m["macro"]["roc_auc"] == pytest.approx(1.0)
    assert m["weighted"]["roc_auc"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- report


def test_evaluate_predictions_binary():
    y, p = _synthetic(200)
    probs = np.column_stack([1 - p, p])
    report = evaluate_predictions(y, probs, ["NORMAL", "PNEUMONIA"], n_boot=0)
    assert "ci" not in report
    assert report["threshold"] == 0.5
    assert report["classes"] == ["NORMAL", "PNEUMONIA"]
    assert report == {**binary_metrics(y, p, 0.5), **{k: report[k] for k in ("classes", "positive_class")}}

    groups = np.array([f"p{i // 4}" for i in range(y.size)])
    report = evaluate_predictions(
        y, probs, ["NORMAL", "PNEUMONIA"], threshold=0.4, groups=groups, n_boot=100, seed=1
    )
    assert report["threshold"] == 0.4
    assert report["ci"] == bootstrap_ci(y, p, 0.4, groups=groups, n_boot=100, seed=1)
    assert report["ci_unit"] == "group"
    json.dumps(report)


def test_evaluate_predictions_multiclass():
    report = evaluate_predictions(MC_Y, MC_P, MC_NAMES)
    assert report["classes"] == MC_NAMES
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert len(report["confusion_matrix"]) == 3
    assert "ci" not in report
    json.dumps(report)


# ---------------------------------------------------------------------------- figures


def _assert_png(path, tmp_path):
    import matplotlib.pyplot as plt

    assert path.exists() and path.suffix == ".png"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.02  # not a blank canvas
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]  # no leftovers
    assert plt.get_fignums() == []  # figures were closed


def test_figures_binary(tmp_path):
    from xrayfeat import figures

    y, p = _synthetic(200)
    y2, p2 = _synthetic(200, seed=2)
    curves = [("run A", y, p, 0.5), ("run B", y2, p2, youden_threshold(y2, p2)), ("no thr", y, p, None)]
    cm = np.array([[40, 10], [5, 145]])
    outputs = [
        figures.plot_roc(curves, tmp_path / "roc.png"),
        figures.plot_pr(curves, tmp_path / "pr.png"),
        figures.plot_confusion(cm, ["NORMAL", "PNEUMONIA"], tmp_path / "cm.png"),
        figures.plot_reliability(y, p, tmp_path / "rel.png"),
        figures.plot_score_distribution(y, p, ["NORMAL", "PNEUMONIA"], 0.5, tmp_path / "scores.png"),
    ]
    for path in outputs:
        _assert_png(path, tmp_path)


def test_figures_multiclass(tmp_path):
    from xrayfeat import figures

    m = multiclass_metrics(MC_Y, MC_P, MC_NAMES)
    out = figures.plot_per_class_roc(MC_Y, MC_P, MC_NAMES, tmp_path / "sub" / "ovr.png")
    _assert_png(out, tmp_path / "sub")
    out = figures.plot_confusion(np.array(m["confusion_matrix"]), MC_NAMES, tmp_path / "cm3.png")
    _assert_png(out, tmp_path)


def test_atomic_savefig_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from xrayfeat.figures import atomic_savefig

    target = tmp_path / "fig.png"
    target.write_bytes(b"previous")
    fig, _ = plt.subplots()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        atomic_savefig(fig, target)
    assert target.read_bytes() == b"previous"
    assert [f.name for f in tmp_path.iterdir()] == ["fig.png"]
    assert plt.get_fignums() == []
