"""Choosing a binary run's operating threshold on validation scores.

Three rules (``threshold_method`` in the config, :data:`xrayfeat.config.THRESHOLD_METHODS`):
Youden's J, the median of Youden thresholds over patient-grouped bootstrap resamples
(cutpointr's approach), and the highest threshold that keeps a target sensitivity. Each
comes with a 95 % bootstrap interval. How a threshold is then applied is
:func:`xrayfeat.metrics.called_positive`. Pure NumPy / scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from xrayfeat.choices import THRESHOLD_METHODS
from xrayfeat.metrics import as_binary


def youden_threshold(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Operating threshold maximising Youden's J = sensitivity + specificity - 1.

    Meant to be chosen on a validation split and then frozen for the test split.
    Candidates are the thresholds of ``sklearn.metrics.roc_curve``, i.e. observed
    scores, used with the ``prob >= threshold`` rule. On ties the highest threshold
    (first ROC point) wins. Raises ``ValueError`` if only one class is present, since
    J is then undefined.
    """
    y, p = as_binary(y_true, prob)
    if np.unique(y).size < 2:
        raise ValueError("youden_threshold needs both classes in y_true")
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold is +inf ("call nothing positive"); map it, and any
    # score outside [0, 1], onto a usable probability threshold.
    thr = thresholds[best]
    if not np.isfinite(thr):
        thr = 1.0
    return float(np.clip(thr, 0.0, 1.0))


def sensitivity_threshold(y_true: np.ndarray, prob: np.ndarray, min_sensitivity: float) -> float:
    """The highest threshold that keeps sensitivity >= ``min_sensitivity`` on these scores.

    With the ``prob >= threshold`` rule that is the k-th highest positive score, where
    ``k = ceil(min_sensitivity * n_positives)``.
    """
    y, p = as_binary(y_true, prob)
    if not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        raise ValueError("sensitivity_threshold needs positives in y_true")
    k = max(1, math.ceil(min_sensitivity * positives.size - 1e-9))
    return float(np.clip(positives[k - 1], 0.0, 1.0))


@dataclass
class OperatingPoint:
    """A chosen threshold, how it was chosen, and its 95 % bootstrap interval."""

    threshold: float
    method: str
    ci: tuple[float, float]
    n_boot: int
    min_sensitivity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "threshold_method": self.method,
                "threshold_ci": {"lower": self.ci[0], "upper": self.ci[1], "level": 0.95,
                                 "n_boot": self.n_boot, "unit": "patient"},
                "threshold_min_sensitivity": self.min_sensitivity}


def choose_threshold(
    y_true: np.ndarray,
    prob: np.ndarray,
    method: str = "youden",
    *,
    groups: np.ndarray | None = None,
    min_sensitivity: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> OperatingPoint:
    """Choose an operating threshold on validation scores by ``method`` (THRESHOLD_METHODS).

    Every method also gets a 95 % interval: the 2.5th-97.5th percentiles of the thresholds
    the same rule picks on ``n_boot`` bootstrap resamples of whole groups (patients), so a
    wide interval says the threshold is poorly determined by this validation split.
    Resamples holding a single class are skipped. Deterministic for a given ``seed``.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method must be one of {THRESHOLD_METHODS}, got {method!r}")
    y, p = as_binary(y_true, prob)
    if np.unique(y).size < 2:
        raise ValueError("choosing a threshold needs both classes")

    def rule(yy: np.ndarray, pp: np.ndarray) -> float:
        if method == "sensitivity":
            return sensitivity_threshold(yy, pp, min_sensitivity)
        return youden_threshold(yy, pp)

    g = np.arange(y.size) if groups is None else np.asarray(groups).ravel()
    _, unit_of_image = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(unit_of_image == u) for u in range(unit_of_image.max() + 1)]
    rng = np.random.default_rng(seed)
    resampled = []
    for _ in range(n_boot):
        idx = np.concatenate([members[u] for u in rng.integers(0, len(members), len(members))])
        if np.unique(y[idx]).size == 2:
            resampled.append(rule(y[idx], p[idx]))
    if not resampled:  # too few groups for a single two-class resample
        resampled = [rule(y, p)]
    values = np.asarray(resampled)
    lower, upper = (float(v) for v in np.percentile(values, [2.5, 97.5]))
    threshold = float(np.median(values)) if method == "bootstrap" else rule(y, p)
    return OperatingPoint(threshold=threshold, method=method, ci=(lower, upper),
                          n_boot=len(resampled),
                          min_sensitivity=min_sensitivity if method == "sensitivity" else None)
