"""Metrics, confidence intervals, calibration, and the one decision rule.

Pure NumPy / scikit-learn: no TensorFlow here, so a saved set of predictions can be
re-evaluated (or bootstrapped) without loading a model.

Conventions used throughout:

* ``y_true`` holds integer class indices; in the binary case label 1 is the positive
  class (PNEUMONIA) and an image is called positive when ``prob >= threshold``.
* Every returned number is a plain Python ``float``/``int`` so reports go straight to
  JSON. A ratio whose denominator is zero (e.g. sensitivity with no positives) is
  ``float("nan")``, never an exception: a small or one-class split is a fact to report,
  not a crash.
* Confusion matrices are indexed ``[true, predicted]`` (scikit-learn's convention).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from xrayfeat.errors import RunError

__all__ = [
    "SCALAR_METRICS",
    "binary_metrics",
    "bootstrap_ci",
    "called_positive",
    "decide",
    "evaluate_predictions",
    "expected_calibration_error",
    "multiclass_metrics",
    "reliability_curve",
]

#: Scalar metrics of :func:`binary_metrics` that get a bootstrap confidence interval
#: (``threshold`` and ``n`` are fixed by design, so they have none).
SCALAR_METRICS: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "balanced_accuracy",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)

# Resamples processed at once in bootstrap_ci: bounds memory at about
# _BOOT_CHUNK * n_images * 8 bytes per working array, whatever n_boot is.
_BOOT_CHUNK = 250

_NAN = float("nan")

#: The operating threshold of a binary run that has none of its own: even odds.
DEFAULT_THRESHOLD = 0.5


# --------------------------------------------------------------------------- helpers


def as_binary(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert binary labels / positive-class probabilities."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} entries but prob has {p.size}")
    if y.size == 0:
        raise ValueError("cannot evaluate an empty set of predictions")
    if not np.all(np.isfinite(p)):
        raise ValueError("prob contains NaN or infinite values")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"binary labels must be 0 or 1, got {np.unique(y).tolist()}")
    return y.astype(np.int64), p


def _ratio(num: float, den: float) -> float:
    """num/den as a float, NaN when the denominator is zero (undefined, not zero)."""
    return float(num) / float(den) if den else _NAN


def _mean_defined(*values: float) -> float:
    """Mean of values, NaN if any is NaN (balanced accuracy needs both halves)."""
    return _NAN if any(math.isnan(v) for v in values) else float(np.mean(values))


def _bin_ids(prob: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin index of each probability.

    Same rule as ``sklearn.calibration.calibration_curve`` (right-closed bins, 0 in the
    first), so our ECE and reliability curve agree with scikit-learn's curve.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], prob)


# ----------------------------------------------------------------------- calibration


def reliability_curve(
    y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability (calibration) curve over equal-width probability bins.

    Returns ``(mean_prob, frac_pos, counts)`` for the non-empty bins only (as
    ``calibration_curve`` does): mean predicted probability, observed fraction of
    positives and number of images in each bin. Unlike ``calibration_curve`` it also
    works when only one class is present, and it returns the counts.
    """
    y, p = as_binary(y_true, prob)
    ids = _bin_ids(p, n_bins)
    counts = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    keep = counts > 0
    return sum_p[keep] / counts[keep], sum_y[keep] / counts[keep], counts[keep]


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error with equal-width bins.

    ``sum_b (n_b / n) * |mean_prob_b - frac_pos_b|``: the average gap between stated
    confidence and observed frequency, weighted by how many images sit in each bin.
    """
    mean_p, frac_pos, counts = reliability_curve(y_true, prob, n_bins)
    return float(np.sum(counts * np.abs(mean_p - frac_pos)) / np.sum(counts))


# -------------------------------------------------------------------------- binary


def _sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, min_specificity: float) -> float:
    fpr, tpr, _ = roc_curve(y, p)
    return float(tpr[fpr <= 1.0 - min_specificity + 1e-12].max())


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, Any]:
    """Threshold-dependent and threshold-free metrics for a binary classifier.

    Keys: accuracy, sensitivity (recall of class 1), specificity, precision (PPV), npv,
    f1, balanced_accuracy, roc_auc, pr_auc (average precision), sens_at_spec85 (the
    highest sensitivity of any threshold whose specificity is >= 85 %), brier, ece,
    threshold, n, and confusion_matrix = {"tp", "fp", "tn", "fn"}. Undefined values are NaN.
    """
    y, p = as_binary(y_true, prob)
    pred = called_positive(p, threshold).astype(np.int64)
    # labels=[0, 1] keeps the matrix 2x2 even when a class is missing from y or pred.
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())

    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    both_classes = tp + fn > 0 and tn + fp > 0
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        # 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall, but
        # stays defined when precision alone is 0/0 (no predicted positives).
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": _mean_defined(sensitivity, specificity),
        # Ranking metrics compare positives with negatives: undefined with one class.
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else _NAN,
        "pr_auc": float(average_precision_score(y, p)) if both_classes else _NAN,
        "sens_at_spec85": _sensitivity_at_specificity(y, p, 0.85) if both_classes else _NAN,
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "ece": expected_calibration_error(y, p),
        "threshold": float(threshold),
        "n": int(y.size),
        "confusion_matrix": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


# ------------------------------------------------------------------------- bootstrap


def _weighted_metrics(
    y: np.ndarray, prob: np.ndarray, threshold: float, weights: np.ndarray, n_bins: int = 10
) -> dict[str, np.ndarray]:
    """Every SCALAR_METRICS value for many resamples at once.

    A bootstrap resample is fully described by how many times each image was drawn,
    so ``weights`` (resamples x images, integer counts) turns all metrics into weighted
    sums and one pass of matrix arithmetic replaces a Python loop over resamples. The
    result for row r equals ``binary_metrics`` on the explicitly resampled data
    (checked in the tests). Returns arrays of shape (resamples,), NaN where undefined.
    """
    w = np.asarray(weights, dtype=np.float64)
    pos = y == 1
    pred = called_positive(prob, threshold)

    w_pos, w_neg = w[:, pos].sum(1), w[:, ~pos].sum(1)
    tp = w[:, pos & pred].sum(1)
    fn = w_pos - tp
    fp = w[:, ~pos & pred].sum(1)
    tn = w_neg - fp
    total = w_pos + w_neg

    def div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        out = np.full(num.shape, np.nan)
        np.divide(num, den, out=out, where=den > 0)
        return out

    sens, spec = div(tp, w_pos), div(tn, w_neg)
    out: dict[str, np.ndarray] = {
        "accuracy": div(tp + tn, total),
        "sensitivity": sens,
        "specificity": spec,
        "precision": div(tp, tp + fp),
        "npv": div(tn, tn + fn),
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2,  # NaN propagates, as intended
        "brier": div(w @ (prob - y) ** 2, total),
    }

    # ECE: per-bin weighted sums via a (images x bins) indicator; n_bins is small.
    onehot = np.eye(n_bins)[_bin_ids(prob, n_bins)]
    bin_p = w @ (onehot * prob[:, None])
    bin_y = w @ (onehot * y[:, None])
    # sum_b (n_b/n)|sum_p_b/n_b - sum_y_b/n_b| == sum_b |sum_p_b - sum_y_b| / n
    out["ece"] = div(np.abs(bin_p - bin_y).sum(1), total)

    # Ranking metrics: sort images by score once; tied scores form one ROC/PR step.
    order = np.argsort(-prob, kind="stable")
    p_sorted = prob[order]
    wp = w[:, order] * pos[order]
    wn = w[:, order] * ~pos[order]
    # last sorted index of each group of tied scores (descending order)
    ends = np.flatnonzero(np.r_[p_sorted[1:] != p_sorted[:-1], True])
    tp_cum = np.cumsum(wp, axis=1)[:, ends]  # weighted tp at threshold = each score
    fp_cum = np.cumsum(wn, axis=1)[:, ends]
    d_tp = np.diff(tp_cum, axis=1, prepend=0.0)
    d_fp = np.diff(fp_cum, axis=1, prepend=0.0)
    both = (w_pos > 0) & (w_neg > 0)

    # ROC AUC = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney, what the ROC
    # trapezoid gives): the positives of a tie group beat every negative scored lower
    # (those not yet in fp_cum, scores being descending) and tie with their group's.
    neg_below = w_neg[:, None] - fp_cum
    auc_num = (d_tp * (neg_below + 0.5 * d_fp)).sum(1)
    out["roc_auc"] = np.where(both, div(auc_num, w_pos * w_neg), np.nan)

    # Average precision = sum over thresholds of (recall step) * precision, exactly as
    # sklearn's average_precision_score; steps with zero recall gain contribute 0.
    prec = div(tp_cum, tp_cum + fp_cum)
    ap_num = np.where(d_tp > 0, d_tp * np.nan_to_num(prec), 0.0).sum(1)
    out["pr_auc"] = np.where(both, div(ap_num, w_pos), np.nan)
    return out


def _resample_counts(
    rng: np.random.Generator, n_boot: int, n_units: int
) -> np.ndarray:
    """(n_boot x n_units) counts of how often each unit is drawn, n_units draws each."""
    draws = rng.integers(0, n_units, size=(n_boot, n_units))
    flat = draws + np.arange(n_boot)[:, None] * n_units  # offset rows -> one bincount
    return np.bincount(flat.ravel(), minlength=n_boot * n_units).reshape(n_boot, n_units)


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap confidence intervals for every scalar binary metric.

    The threshold stays fixed: the interval covers sampling variability of the test
    set, not re-tuning. With ``groups`` (e.g. patient ids) whole groups are resampled,
    because images of one patient are correlated and resampling them independently
    would give intervals that are too narrow. Resamples in which a metric is undefined
    (e.g. no positives drawn) are left out for that metric (``nanpercentile``);
    ``n_valid`` says how many remained. Deterministic for a given ``seed``.

    Returns ``{metric: {"lower": float, "upper": float, "n_valid": int}}``; bounds are
    NaN when no resample defined the metric.
    """
    y, p = as_binary(y_true, prob)
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    if groups is None:
        unit_of_image = np.arange(y.size)  # each image is its own unit
        n_units = y.size
    else:
        g = np.asarray(groups).ravel()
        if g.size != y.size:
            raise ValueError(f"groups has {g.size} entries but y_true has {y.size}")
        _, unit_of_image = np.unique(g, return_inverse=True)
        n_units = int(unit_of_image.max()) + 1

    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in SCALAR_METRICS}
    for start in range(0, n_boot, _BOOT_CHUNK):
        counts = _resample_counts(rng, min(_BOOT_CHUNK, n_boot - start), n_units)
        # an image is drawn as often as its group: whole groups enter or leave together
        chunk = _weighted_metrics(y, p, threshold, counts[:, unit_of_image])
        for m in SCALAR_METRICS:
            parts[m].append(chunk[m])

    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    result: dict[str, dict[str, float]] = {}
    for m in SCALAR_METRICS:
        values = np.concatenate(parts[m])
        n_valid = int(np.count_nonzero(~np.isnan(values)))
        if n_valid:
            lo, hi = np.nanpercentile(values, q)
        else:  # nanpercentile would warn on all-NaN input
            lo = hi = _NAN
        result[m] = {"lower": float(lo), "upper": float(hi), "n_valid": n_valid}
    return result


# ---------------------------------------------------------------------- multiclass


def multiclass_metrics(
    y_true: np.ndarray, prob_matrix: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Per-class one-vs-rest metrics for N classes, with macro and weighted averages.

    The predicted class is the argmax of ``prob_matrix`` (n x N). For each class:
    sensitivity (recall), specificity, precision, f1, roc_auc, pr_auc and support.
    Macro averages ignore classes where a metric is undefined; weighted averages
    weight by support. ``confusion_matrix`` is an N x N list of lists [true][pred].
    """
    y = np.asarray(y_true).ravel().astype(np.int64)
    prob = np.asarray(prob_matrix, dtype=np.float64)
    n_classes = len(class_names)
    if prob.ndim != 2 or prob.shape != (y.size, n_classes):
        raise ValueError(
            f"prob_matrix must have shape ({y.size}, {n_classes}), got {prob.shape}"
        )
    if y.size == 0:
        raise ValueError("cannot evaluate an empty set of predictions")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}), got {np.unique(y).tolist()}")

    pred = prob.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(n_classes)))
    n = int(y.size)
    per_class: dict[str, dict[str, float]] = {}
    for k, name in enumerate(class_names):
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = n - tp - fn - fp
        is_k = (y == k).astype(np.int64)
        both = 0 < is_k.sum() < n
        per_class[name] = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "roc_auc": float(roc_auc_score(is_k, prob[:, k])) if both else _NAN,
            "pr_auc": float(average_precision_score(is_k, prob[:, k])) if both else _NAN,
            "support": tp + fn,
        }

    support = np.array([per_class[c]["support"] for c in class_names], dtype=np.float64)
    macro: dict[str, float] = {}
    weighted: dict[str, float] = {}
    for metric in ("sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc"):
        vals = np.array([per_class[c][metric] for c in class_names])
        ok = ~np.isnan(vals)
        macro[metric] = float(vals[ok].mean()) if ok.any() else _NAN
        w = support * ok
        weighted[metric] = float((vals[ok] * w[ok]).sum() / w.sum()) if w.sum() else _NAN

    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": macro["sensitivity"],
        "n": n,
        "per_class": per_class,
        "macro": macro,
        "weighted": weighted,
        "confusion_matrix": cm.astype(int).tolist(),
    }


# ------------------------------------------------------------------------ decisions


def operating_threshold(threshold: float | None) -> float:
    """The threshold a binary decision uses: the run's own, or :data:`DEFAULT_THRESHOLD`
    when it has none (training stopped before validation chose one)."""
    return DEFAULT_THRESHOLD if threshold is None else float(threshold)


def called_positive(prob: Any, threshold: float | None) -> np.ndarray:
    """The one decision rule of binary runs: positive when ``prob >= threshold`` (so a
    probability exactly at the threshold is positive). Every command and the API use it."""
    return np.asarray(prob, dtype=np.float64) >= operating_threshold(threshold)


def decide(probs: Any, classes: Sequence[str], threshold: float | None = None):
    """Predicted label indices and the reported probability for each row.

    Binary runs compare the positive-class probability with the threshold
    (:func:`called_positive`); N > 2 take the argmax and report the probability of the
    predicted class. A probability that is not a number is a :class:`RunError`
    (``nan >= threshold`` is False: it would read as the negative class); ``predict_files``
    turns such images into error rows first.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if not np.isfinite(probs).all():
        raise RunError(NOT_A_NUMBER)
    if len(classes) == 2:
        positive = probs[:, 1]
        return called_positive(positive, threshold).astype(int), positive
    labels = probs.argmax(axis=1)
    return labels, probs[np.arange(len(labels)), labels]


#: The error row of an image the model scored as NaN or infinity (damaged weights).
NOT_A_NUMBER = "the model's output is not a number (NaN or infinite): its weights are damaged"


def evaluate_predictions(
    y_true: np.ndarray,
    prob_matrix: np.ndarray,
    class_names: list[str],
    threshold: float | None = None,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluation report for a set of predictions (JSON-serialisable dict).

    Two classes: ``binary_metrics`` on ``prob_matrix[:, 1]`` (class_names[1] is the
    positive class) at ``threshold`` (0.5 if None), plus ``ci`` from
    :func:`bootstrap_ci` (omitted when ``n_boot == 0``; resampling by ``groups`` when
    given) and ``classes``. A 1-D ``prob_matrix`` is read as the positive-class
    probability. More classes: :func:`multiclass_metrics` plus ``classes``;
    ``threshold``, ``groups`` and ``n_boot`` do not apply there (argmax decides).
    """
    classes = [str(c) for c in class_names]
    if len(classes) < 2:
        raise ValueError("need at least two class names")
    prob = np.asarray(prob_matrix, dtype=np.float64)

    if len(classes) > 2:
        report = multiclass_metrics(y_true, prob, classes)
        report["classes"] = classes
        return report

    if prob.ndim == 2:
        if prob.shape[1] != 2:
            raise ValueError(f"prob_matrix has {prob.shape[1]} columns for 2 classes")
        prob = prob[:, 1]
    thr = operating_threshold(threshold)
    report = binary_metrics(y_true, prob, thr)
    report["classes"] = classes
    report["positive_class"] = classes[1]
    if n_boot:
        report["ci"] = bootstrap_ci(y_true, prob, thr, groups=groups, n_boot=n_boot, seed=seed)
        report["ci_level"] = 0.95
        report["n_boot"] = int(n_boot)
        report["ci_unit"] = "group" if groups is not None else "image"
    return report
