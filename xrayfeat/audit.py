"""Shortcut audit: how a run's predictions move under nuisance transforms of its input.

A model that reads lung opacity should barely move when an image is made a little
brighter, sharper, framed differently or given a burned-in marker; a model that leans on
acquisition traits (exposure, processing, borders, text markers, the crop) moves a lot,
and is the model that fails on another hospital's images. For every image of a split, each
transform is applied to the stored image the model reads, and the change in the score is
recorded: the probability of the positive class for binary runs, of the image's own class
for N > 2. Reported per transform and class: the mean shift with a 95 % interval, and the
share of images whose predicted label flips at the run's operating threshold.

Transforms are deterministic and of a size that differs between acquisition sites
(exposure +-15 % of the range, contrast x0.75 / x1.33, gamma, blur and sharpening of
about 1 % of the side, sensor noise, a black frame, a text marker, a looser or tighter
crop, a stretched aspect ratio, histogram equalisation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from xrayfeat.atomic import prepare_out_dir, write_text
from xrayfeat.csvout import csv_text
from xrayfeat.dataset import load_split
from xrayfeat.errors import UsageError
from xrayfeat.figures import plot_audit
from xrayfeat.metrics import decide, operating_threshold
from xrayfeat.runs import open_run_on_split, write_json
from xrayfeat.training import predict_local

#: A transform maps one stored image (S, S) uint8 to another of the same shape.
Transform = Callable[[np.ndarray], np.ndarray]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _contrast(factor: float) -> Transform:
    return lambda im: _to_uint8((im.astype(np.float32) - im.mean()) * factor + im.mean())


def _gamma(gamma: float) -> Transform:
    table = _to_uint8(255.0 * (np.arange(256) / 255.0) ** gamma)
    return lambda im: table[im]


def _blur(im: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(im, (0, 0), sigmaX=max(0.5, im.shape[0] / 100))


def _sharpen(im: np.ndarray) -> np.ndarray:
    blurred = cv2.GaussianBlur(im, (0, 0), sigmaX=max(0.5, im.shape[0] / 100)).astype(np.float32)
    return _to_uint8(im.astype(np.float32) * 2.0 - blurred)  # unsharp mask, amount 1


def _noise(im: np.ndarray) -> np.ndarray:
    # Seeded by the image itself: the same image always gets the same noise.
    rng = np.random.default_rng(int(im.astype(np.int64).sum()) % (2**32))
    return _to_uint8(im.astype(np.float32) + rng.normal(0.0, 8.0, im.shape))


def _black_frame(im: np.ndarray) -> np.ndarray:
    out = im.copy()
    k = max(1, round(im.shape[0] * 0.08))
    out[:k], out[-k:], out[:, :k], out[:, -k:] = 0, 0, 0, 0
    return out


def _marker(im: np.ndarray) -> np.ndarray:
    """A burned-in laterality marker: a white 'R' in the top-left corner."""
    out = im.copy()
    s = im.shape[0]
    scale = s / 160
    cv2.putText(out, "R", (round(0.05 * s), round(0.16 * s)), cv2.FONT_HERSHEY_SIMPLEX,
                scale, 255, max(1, round(scale * 2)), cv2.LINE_AA)
    return out


def _zoom(factor: float) -> Transform:
    """Scale about the centre: < 1 is a looser crop (edges filled by replication), > 1 a
    tighter one."""
    def apply(im: np.ndarray) -> np.ndarray:
        s = im.shape[0]
        c = (s - 1) / 2
        matrix = np.float32([[factor, 0, c - factor * c], [0, factor, c - factor * c]])
        return cv2.warpAffine(im, matrix, (s, s), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
    return apply


def _stretch(im: np.ndarray) -> np.ndarray:
    """Horizontal stretch by 1.2 (a different source aspect ratio squeezed to a square)."""
    s = im.shape[0]
    c = (s - 1) / 2
    matrix = np.float32([[1.2, 0, c - 1.2 * c], [0, 1, 0]])
    return cv2.warpAffine(im, matrix, (s, s), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


#: name -> (what it simulates, transform). Order is the order of the report.
TRANSFORMS: dict[str, tuple[str, Transform]] = {
    "brighter": ("exposure +15 % of the range", lambda im: _to_uint8(im + 38.0)),
    "darker": ("exposure -15 % of the range", lambda im: _to_uint8(im - 38.0)),
    "more_contrast": ("contrast x1.33 about the mean", _contrast(4 / 3)),
    "less_contrast": ("contrast x0.75 about the mean", _contrast(0.75)),
    "gamma_0.67": ("gamma 0.67 (lifted mid-tones)", _gamma(0.67)),
    "gamma_1.5": ("gamma 1.5 (deepened mid-tones)", _gamma(1.5)),
    "equalized": ("global histogram equalisation", cv2.equalizeHist),
    "blur": ("Gaussian blur, sigma 1 % of the side", _blur),
    "sharpen": ("unsharp mask, sigma 1 % of the side", _sharpen),
    "noise": ("Gaussian noise, SD 8 grey levels", _noise),
    "black_frame": ("outer 8 % of each side set to black", _black_frame),
    "marker": ("burned-in 'R' marker, top left", _marker),
    "looser_crop": ("zoom out to 85 % (a looser ROI box)", _zoom(0.85)),
    "tighter_crop": ("zoom in to 115 % (a tighter ROI box)", _zoom(1.15)),
    "stretched": ("stretched 1.2x horizontally (aspect ratio)", _stretch),
}


@dataclass
class AuditRow:
    """The effect of one transform on the images of one class."""

    transform: str
    description: str
    class_name: str
    n: int
    mean_shift: float  # mean of (score after - score before)
    ci_low: float  # 95 % interval of the mean (normal approximation)
    ci_high: float
    flipped: float  # share of images whose predicted label changed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AuditResult:
    """What ``audit`` returns: rows per transform and class, and the files it wrote."""

    run: str
    data: str
    split: str
    classes: list[str]
    score: str  # what the shifts are shifts of
    threshold: float | None
    n: int
    baseline_mean: dict[str, float]  # mean score per class before any transform
    rows: list[AuditRow]
    files: list[str] = field(default_factory=list)

    def largest(self, k: int = 3) -> list[AuditRow]:
        """The ``k`` rows with the largest absolute mean shift."""
        return sorted(self.rows, key=lambda r: -abs(r.mean_shift))[:k]

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "data": self.data, "split": self.split,
                "classes": self.classes, "score": self.score, "threshold": self.threshold,
                "n": self.n, "baseline_mean": self.baseline_mean,
                "rows": [r.to_dict() for r in self.rows]}


def _scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    if probs.shape[1] == 2:
        return probs[:, 1]
    return probs[np.arange(len(labels)), labels]


def audit_run(
    run_path: str | os.PathLike,
    data: str | os.PathLike,
    *,
    split: str = "val",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    limit: int | None = None,
    transforms: dict[str, tuple[str, Transform]] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> AuditResult:
    """Measure how ``run_path``'s scores on ``split`` of the prepared dataset ``data`` move
    under each nuisance transform; write ``audit.json``, ``audit.csv`` and ``audit.png``
    into ``out`` when given. ``limit`` takes every k-th image so that at most ``limit``
    are used (both classes kept in proportion)."""

    run, info, _ = open_run_on_split(run_path, data, split)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    transforms = TRANSFORMS if transforms is None else transforms
    arrays = load_split(info.path, split)
    images, labels = arrays.images, arrays.labels
    if limit is not None and len(labels) > limit:
        keep = np.linspace(0, len(labels) - 1, limit).round().astype(int)
        images, labels = images[keep], labels[keep]
    out_dir = None
    if out is not None:
        out_dir = prepare_out_dir(Path(out), overwrite)
    model = run.load_model()
    classes = run.classes
    threshold = operating_threshold(run.threshold) if len(classes) == 2 else None

    if on_start:
        on_start(len(transforms) + 1)
    base_probs = predict_local(model, images[..., None])
    base = _scores(base_probs, labels)
    base_labels, _ = decide(base_probs, classes, threshold)
    if on_progress:
        on_progress(1)
    rows: list[AuditRow] = []
    for name, (description, transform) in transforms.items():
        moved = np.stack([transform(im) for im in images])
        probs = predict_local(model, moved[..., None])
        shift = _scores(probs, labels) - base
        flipped = decide(probs, classes, threshold)[0] != base_labels
        for k, cls in enumerate(classes):
            mask = labels == k
            if not mask.any():
                continue
            d = shift[mask]
            half = 1.96 * d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
            rows.append(AuditRow(name, description, cls, int(d.size), float(d.mean()),
                                 float(d.mean() - half), float(d.mean() + half),
                                 float(flipped[mask].mean())))
        if on_progress:
            on_progress(1)

    score = (f"probability of {classes[1]}" if len(classes) == 2
             else "probability of the image's own class")
    result = AuditResult(
        run=str(run.path), data=str(info.path), split=split, classes=classes, score=score,
        threshold=threshold, n=int(len(labels)),
        baseline_mean={cls: float(base[labels == k].mean()) for k, cls in enumerate(classes)
                       if (labels == k).any()},
        rows=rows)
    if out_dir is not None:
        result.files = _write_audit(out_dir, result)
    return result


def _write_audit(out: Path, result: AuditResult) -> list[str]:

    write_json(out / "audit.json", result.to_dict())
    write_text(out / "audit.csv", csv_text([r.to_dict() for r in result.rows],
                                           list(result.rows[0].to_dict())))
    plot_audit(result.rows, result.classes, result.score, out / "audit.png")
    return [str(out / name) for name in ("audit.json", "audit.csv", "audit.png")]
