"""Test-time augmentation: average a model's probabilities over fixed, small warps.

The warps are deterministic (the same image always gets the same answer) and inside the
range training augments with (shift 6 %, zoom 10 %, rotation 7 degrees), so every view is
one the model has learnt to read; border pixels are filled with black, as in training.
``n = 1`` is the plain prediction.
"""

from __future__ import annotations

import cv2
import numpy as np

from xrayfeat.errors import UsageError

#: (shift x, shift y as a fraction of the side, zoom, rotation in degrees); the first n are
#: used, so a smaller n is a prefix of a larger one.
VIEWS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.0, 1.0, 0.0),
    (0.04, 0.0, 1.0, 0.0),
    (-0.04, 0.0, 1.0, 0.0),
    (0.0, 0.04, 1.0, 0.0),
    (0.0, -0.04, 1.0, 0.0),
    (0.0, 0.0, 1.06, 0.0),
    (0.0, 0.0, 0.94, 0.0),
    (0.0, 0.0, 1.0, 4.0),
    (0.0, 0.0, 1.0, -4.0),
)
MAX_VIEWS = len(VIEWS)


def check_views(n: int) -> int:
    """``n`` if it is a valid number of views, else a :class:`UsageError`."""
    if not 1 <= n <= MAX_VIEWS:
        raise UsageError(f"--tta must be between 1 (off) and {MAX_VIEWS}, got {n}")
    return n


def warp(images: np.ndarray, view: tuple[float, float, float, float]) -> np.ndarray:
    """``images`` ``(b, S, S, 1)`` float32 seen through one view (a copy)."""
    shift_x, shift_y, zoom, degrees = view
    size = images.shape[1]
    centre = ((size - 1) / 2, (size - 1) / 2)
    matrix = cv2.getRotationMatrix2D(centre, degrees, zoom)
    matrix[:, 2] += (shift_x * size, shift_y * size)
    return np.stack([cv2.warpAffine(im[..., 0], matrix, (size, size), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
                     for im in images])


def predict_batch(model, images: np.ndarray, n: int = 1) -> np.ndarray:
    """Class probabilities ``(b, classes)`` of ``images`` ``(b, S, S, 1)``, the mean over
    the first ``n`` views (one forward pass of ``b * n`` images)."""
    images = np.asarray(images, np.float32)
    if n <= 1:
        return np.asarray(model.predict_on_batch(images), dtype=np.float64)
    stacked = np.concatenate([images] + [warp(images, v) for v in VIEWS[1:n]])
    probs = np.asarray(model.predict_on_batch(stacked), dtype=np.float64)
    return probs.reshape(n, len(images), -1).mean(axis=0)
