"""Figures written to PNG: evaluation plots (ROC, PR, confusion, calibration, scores),
training curves, depth probes and the audit. What the network sees (channel grids, CAM
overlays, overviews, class contrast) is drawn by :mod:`xrayfeat.layer_figures`.

Every plotting function takes plain arrays, writes one PNG through
:func:`atomic_savefig` and returns its :class:`~pathlib.Path`, so the CLI and the library
share the same pictures and an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Headless backend before pyplot is imported: the CLI runs on servers and in CI with
# no display, and only ever writes files.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from xrayfeat.atomic import atomic_output
from xrayfeat.metrics import expected_calibration_error, reliability_curve

__all__ = [
    "atomic_savefig",
    "plot_audit",
    "plot_confusion",
    "plot_per_class_roc",
    "plot_pr",
    "plot_reliability",
    "plot_roc",
    "plot_score_distribution",
    "plot_training_curves",
]

#: One (label, y_true, prob, threshold) entry per run; threshold None = no marker.
Curve = tuple[str, Any, Any, float | None]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DPI = 150  # crisp enough for a paper figure, small enough to keep in a run directory


def atomic_savefig(fig: Figure, path: str | os.PathLike[str], *, close: bool = True, **kwargs: Any) -> Path:
    """Save ``fig`` to ``path`` atomically and return the path.

    The image is written to a temporary file in the destination folder and moved into
    place with ``os.replace`` (atomic on one filesystem), so readers never see a
    partial PNG. Parent folders are created. The format follows the suffix (PNG if
    none); extra ``kwargs`` go to ``fig.savefig``. The figure is closed afterwards
    unless ``close=False``, since pyplot keeps every open figure alive.
    """

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    kwargs.setdefault("dpi", _DPI)
    kwargs.setdefault("bbox_inches", "tight")
    try:
        # A full disk becomes one line naming the figure, with nothing partial left.
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            fig.savefig(fh, format=fmt, **kwargs)
    finally:
        if close:
            plt.close(fig)
    return path


def _binary(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels and positive-class probabilities as flat arrays; both classes required."""
    y = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 2:  # a (n, 2) probability matrix: take the positive column
        p = p[:, 1]
    p = p.ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} entries but prob has {p.size}")
    return y, p


def _require_both_classes(y: np.ndarray, label: str) -> None:
    if np.unique(y).size < 2:
        raise ValueError(f"{label}: ROC/PR curves need both classes in y_true")


def _operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(fpr, tpr, precision) at ``prob >= threshold``; precision NaN with no positives called."""
    pred = p >= threshold
    tp = np.sum(pred & (y == 1))
    fp = np.sum(pred & (y == 0))
    tpr = tp / max(np.sum(y == 1), 1)
    fpr = fp / max(np.sum(y == 0), 1)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    return float(fpr), float(tpr), float(precision)


def _square_axes(ax: Any) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def plot_roc(curves: Sequence[Curve], path: str | os.PathLike[str]) -> Path:
    """ROC curves of one or several runs overlaid, AUC in the legend.

    Each entry is ``(label, y_true, prob, threshold)``; the operating point at the
    threshold is marked, with a different marker per run.
    """
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for i, (label, y_true, prob, threshold) in enumerate(curves):
        y, p = _binary(y_true, prob)
        _require_both_classes(y, label)
        fpr, tpr, _ = roc_curve(y, p)
        (line,) = ax.plot(fpr, tpr, lw=2, label=f"{label} (AUC = {roc_auc_score(y, p):.3f})")
        if threshold is not None:
            ofpr, otpr, _ = _operating_point(y, p, threshold)
            ax.plot(ofpr, otpr, _MARKERS[i % len(_MARKERS)], color=line.get_color(), ms=9,
                    mec="black", label=f"{label} @ {threshold:.3g}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC curve")
    _square_axes(ax)
    ax.legend(loc="lower right", fontsize="small")
    return atomic_savefig(fig, path)


def plot_pr(curves: Sequence[Curve], path: str | os.PathLike[str]) -> Path:
    """Precision-recall curves of one or several runs, average precision in the legend.

    Same entries as :func:`plot_roc`. A dotted line per run shows its prevalence, the
    precision of a classifier without skill (PR curves depend on class balance).
    """
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for i, (label, y_true, prob, threshold) in enumerate(curves):
        y, p = _binary(y_true, prob)
        _require_both_classes(y, label)
        precision, recall, _ = precision_recall_curve(y, p)
        ap = average_precision_score(y, p)
        # step plot: average precision is the area under this staircase, not a trapezoid
        (line,) = ax.step(recall, precision, where="post", lw=2, label=f"{label} (AP = {ap:.3f})")
        ax.axhline(y.mean(), ls=":", lw=1, color=line.get_color())
        if threshold is not None:
            _, orec, oprec = _operating_point(y, p, threshold)
            if not np.isnan(oprec):
                ax.plot(orec, oprec, _MARKERS[i % len(_MARKERS)], color=line.get_color(),
                        ms=9, mec="black", label=f"{label} @ {threshold:.3g}")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title("Precision-recall curve")
    _square_axes(ax)
    ax.legend(loc="lower left", fontsize="small")
    return atomic_savefig(fig, path)


def plot_confusion(cm: Any, class_names: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """N x N confusion matrix (rows true, columns predicted) with counts and row %."""
    cm = np.asarray(cm)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class names")
    row_totals = cm.sum(axis=1, keepdims=True)
    # colour by row fraction, so a rare class's errors are as visible as a common one's
    frac = np.divide(cm, row_totals, out=np.zeros(cm.shape), where=row_totals > 0)
    size = 1.5 + 1.1 * n
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * frac[i, j]:.1f}%", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black", fontsize=10)
    ax.set_xticks(range(n), labels=list(class_names), rotation=30 if n > 3 else 0)
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    return atomic_savefig(fig, path)


def plot_reliability(y_true: Any, prob: Any, path: str | os.PathLike[str], n_bins: int = 10) -> Path:
    """Reliability diagram: observed frequency vs mean predicted probability per bin.

    The diagonal is perfect calibration; the expected calibration error is in the
    title and a lower panel shows how many images each bin holds (sparse bins are
    noisy, so their points should be read with care).
    """
    y, p = _binary(y_true, prob)
    mean_p, frac_pos, counts = reliability_curve(y, p, n_bins)
    ece = expected_calibration_error(y, p, n_bins)
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.plot(mean_p, frac_pos, "o-", lw=2, label="model")
    ax.set_ylabel("observed fraction of positives")
    ax.set_title(f"Reliability diagram (ECE = {ece:.3f}, {n_bins} bins)")
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    edges = np.linspace(0, 1, n_bins + 1)
    ax_n.hist(p, bins=edges, color="tab:blue", alpha=0.6, edgecolor="white")
    ax_n.set_xlim(-0.01, 1.01)
    ax_n.set_xlabel("mean predicted probability")
    ax_n.set_ylabel("images")
    return atomic_savefig(fig, path)


def plot_score_distribution(
    y_true: Any,
    prob: Any,
    class_names: Sequence[str],
    threshold: float,
    path: str | os.PathLike[str],
) -> Path:
    """Histograms of the positive-class probability, one per true class, with threshold.

    ``prob`` is the probability of class_names[1] (or an (n, 2) matrix). Shows how well
    the classes separate and what moving the threshold would trade.
    """
    y, p = _binary(y_true, prob)
    edges = np.linspace(0, 1, 26)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, name in enumerate(class_names):
        scores = p[y == k]
        if scores.size:
            ax.hist(scores, bins=edges, alpha=0.55, label=f"true {name} (n={scores.size})",
                    edgecolor="white")
    ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold = {threshold:.3g}")
    positive = class_names[1] if len(class_names) > 1 else "positive"
    ax.set_xlabel(f"predicted probability of {positive}")
    ax.set_ylabel("images")
    ax.set_xlim(0, 1)
    ax.set_title("Score distribution by true class")
    ax.legend(fontsize="small")
    return atomic_savefig(fig, path)


def plot_per_class_roc(
    y_true: Any, prob_matrix: Any, class_names: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """One-vs-rest ROC curve for each of N classes, AUC in the legend.

    A class absent from ``y_true`` (or present everywhere) has no ROC curve; it is
    listed in the legend as undefined rather than raising.
    """
    y = np.asarray(y_true).ravel().astype(np.int64)
    prob = np.asarray(prob_matrix, dtype=np.float64)
    if prob.ndim != 2 or prob.shape != (y.size, len(class_names)):
        raise ValueError(f"prob_matrix must have shape ({y.size}, {len(class_names)}), got {prob.shape}")
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for k, name in enumerate(class_names):
        is_k = (y == k).astype(np.int64)
        if 0 < is_k.sum() < y.size:
            fpr, tpr, _ = roc_curve(is_k, prob[:, k])
            ax.plot(fpr, tpr, lw=2, label=f"{name} vs rest (AUC = {roc_auc_score(is_k, prob[:, k]):.3f})")
        else:
            ax.plot([], [], lw=2, label=f"{name} vs rest (undefined: one class)")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("One-vs-rest ROC curves")
    _square_axes(ax)
    ax.legend(loc="lower right", fontsize="small")
    return atomic_savefig(fig, path)


def plot_training_curves(history: Sequence[dict[str, float]], path: str | os.PathLike[str]) -> Path:
    """Training and validation loss, and validation ROC AUC, per epoch (from history.csv rows)."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["loss"] for row in history], marker="o", label="train loss")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], marker="s", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    aucs = [row["val_auc"] for row in history]
    ax_auc.plot(epochs, aucs, marker="o", color="tab:green")
    best = int(np.nanargmax(aucs)) if aucs else 0
    if aucs:
        ax_auc.scatter([epochs[best]], [aucs[best]], s=120, facecolors="none",
                       edgecolors="black", label=f"best: epoch {epochs[best]}, AUC {aucs[best]:.3f}")
        ax_auc.legend(loc="lower right")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation ROC AUC")
    ax_auc.grid(alpha=0.3)
    fig.suptitle("Training curves")
    fig.tight_layout()
    return atomic_savefig(fig, path)


# --------------------------------------------------------------------------- depth probes

def plot_probe_auc(
    rows: Sequence[tuple[str, int, float, float, float | None, float | None]],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str = "probe ROC AUC (held-out folds)",
    chance: float | None = 0.5,
) -> Path:
    """Linear-probe AUC against depth: one point per layer, shallow to deep.

    ``rows`` holds ``(layer, depth, auc_mean, auc_sd, random_mean, random_sd)``; the random
    pair may be ``None`` (no baseline). The trained model is a solid line with a +-SD band,
    the random-weights baseline a grey one; ``chance`` is a dashed horizontal line.
    Alternate shaded bands mark the depths; the x axis names every layer.
    """
    n = len(rows)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * n + 2.5), 4.8), layout="constrained")
    depths = [int(r[1]) for r in rows]
    start = 0
    for i in range(1, n + 1):  # one band per run of equal depth
        if i == n or depths[i] != depths[start]:
            if depths[start] % 2 == 0:
                ax.axvspan(start - 0.5, i - 0.5, color="0.93", zorder=0, lw=0)
            ax.text((start + i - 1) / 2, 1.0, f"d{depths[start]}", ha="center", va="bottom",
                    fontsize=8, color="0.35", transform=ax.get_xaxis_transform())
            start = i

    def series(mean_i: int, sd_i: int):
        m = np.array([np.nan if r[mean_i] is None else r[mean_i] for r in rows], float)
        s = np.array([np.nan if r[sd_i] is None else r[sd_i] for r in rows], float)
        return m, s

    values = []
    baseline, bsd = series(4, 5)
    if np.isfinite(baseline).any():
        ax.fill_between(x, baseline - bsd, baseline + bsd, color="0.6", alpha=0.25, lw=0)
        ax.plot(x, baseline, "s-", color="0.45", ms=4, lw=1.3,
                label="same architecture, random weights")
        values += list(baseline[np.isfinite(baseline)] - bsd[np.isfinite(baseline)])
    trained, tsd = series(2, 3)
    ax.fill_between(x, trained - tsd, trained + tsd, color="C0", alpha=0.2, lw=0)
    ax.plot(x, trained, "o-", color="C0", ms=5, lw=1.8, label="trained model")
    values += list(trained[np.isfinite(trained)] - tsd[np.isfinite(trained)])
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1.0, label=f"chance ({chance:g})")
        values.append(chance)
    low = min(values) if values else 0.0
    ax.set_ylim(max(0.0, min(0.45, np.floor((low - 0.02) * 20) / 20)), 1.005)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xticks(x, [str(r[0]) for r in rows], rotation=55, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("layer, shallow to deep (d = depth: conv and dense layers so far)")
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] != "trained model")
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower right",
              fontsize=8)
    fig.suptitle(title, fontsize=9)
    return atomic_savefig(fig, path)


# --------------------------------------------------------------------------- shortcut audit

def plot_audit(rows: Sequence[Any], classes: Sequence[str], score: str,
               path: str | os.PathLike[str]) -> Path:
    """Mean score shift per nuisance transform (rows) and class (bars), with 95 % intervals.

    ``rows`` are :class:`xrayfeat.audit.AuditRow`-like objects (``transform``,
    ``class_name``, ``mean_shift``, ``ci_low``, ``ci_high``).
    """
    transforms = list(dict.fromkeys(r.transform for r in rows))
    present = [c for c in classes if any(r.class_name == c for r in rows)]
    height = 0.8 / max(1, len(present))
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(transforms) + 1.6), layout="constrained")
    y = np.arange(len(transforms))
    for k, cls in enumerate(present):
        by_name = {r.transform: r for r in rows if r.class_name == cls}
        mean = np.array([by_name[t].mean_shift if t in by_name else np.nan for t in transforms])
        low = np.array([by_name[t].ci_low if t in by_name else np.nan for t in transforms])
        high = np.array([by_name[t].ci_high if t in by_name else np.nan for t in transforms])
        offset = (k - (len(present) - 1) / 2) * height
        ax.barh(y + offset, mean, height=height, color=f"C{k}", label=cls,
                xerr=np.nan_to_num(np.vstack([mean - low, high - mean])), ecolor="0.3",
                capsize=2)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(y, transforms, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"mean change in the {score} (95 % interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(title="true class", fontsize=8, title_fontsize=8, loc="lower right")
    ax.set_title("How predictions move under nuisance transforms", fontsize=10)
    return atomic_savefig(fig, path)


