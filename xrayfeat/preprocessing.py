"""The one preprocessing path every command uses: read, crop to the thorax, resize.

``prepare`` stores the result in the dataset; ``predict``, ``evaluate`` on a folder and
``visualize-layers`` call the same function on raw files, so a radiograph is seen the same
way everywhere. Scaling to [0, 1] and resizing to the network's input size happen inside the
model itself (its first layers), so they cannot drift between commands either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from xrayfeat.imaging import DEFAULT_MAX_PIXELS, read_radiograph
from xrayfeat.roi import Roi, RoiSettings, find_roi

# How a crop that is not square becomes the stored square (choices.RESIZE_MODES):
# ``stretch`` scales each side on its own (the Kermany release and most recipes do this);
# ``pad`` keeps the aspect ratio and letterboxes the short side with the crop's own
# background (the median of its outermost pixels, so no artificial black edge appears:
# `xrayfeat audit` measures a black frame as one of the default model's shortcuts).


@dataclass(frozen=True)
class PreprocessSettings:
    """How a radiograph becomes a stored image; saved with the dataset and the run."""

    size: int = 224  # stored side in pixels; the model resizes further to its input size
    roi: bool = True  # crop to the thorax before resizing
    roi_settings: RoiSettings = RoiSettings()
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize: str = "stretch"  # one of RESIZE_MODES; chosen by measurement (BENCHMARKS.md)


@dataclass(frozen=True)
class PreparedImage:
    """A radiograph ready for the model, with where it came from."""

    image: np.ndarray  # (size, size) uint8
    roi: Roi  # crop box in source pixel coordinates
    source_shape: tuple[int, int]  # (height, width) of the original file
    deflated: bytes | None = None  # the image zlib-compressed, when asked (``image`` then
    # empty: see xrayfeat.decoding._prepare_worker)


def prepare_array(
    gray: np.ndarray, settings: PreprocessSettings, source_shape: tuple[int, int] | None = None
) -> PreparedImage:
    """Crop (optionally) and resize an already decoded 2-D uint8 image.

    ``source_shape`` is the original file's size when ``gray`` was decoded at reduced
    resolution; the ROI box is reported in those original coordinates.
    """
    h, w = gray.shape
    source_shape = source_shape or (h, w)
    roi = find_roi(gray, settings.roi_settings) if settings.roi else Roi(0, 0, w, h, "full")
    crop = gray[roi.y0 : roi.y1, roi.x0 : roi.x1]
    if settings.resize == "pad":
        crop = letterbox(crop)
    interpolation = cv2.INTER_AREA if min(crop.shape) >= settings.size else cv2.INTER_LINEAR
    image = cv2.resize(crop, (settings.size, settings.size), interpolation=interpolation)
    sy, sx = source_shape[0] / h, source_shape[1] / w
    box = Roi(
        int(round(roi.x0 * sx)), int(round(roi.y0 * sy)),
        min(source_shape[1], int(round(roi.x1 * sx))), min(source_shape[0], int(round(roi.y1 * sy))),
        roi.method,
    )
    return PreparedImage(image=np.ascontiguousarray(image), roi=box, source_shape=source_shape)


def letterbox(image: np.ndarray) -> np.ndarray:
    """``image`` centred in a square, the short side filled with its background value."""
    h, w = image.shape
    if h == w:
        return image
    edge = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = int(np.median(edge))
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return cv2.copyMakeBorder(image, top, side - h - top, left, side - w - left,
                              cv2.BORDER_CONSTANT, value=background)


def prepare_file(path: str | os.PathLike, settings: PreprocessSettings) -> PreparedImage:
    """Read a radiograph file and prepare it; raises ``ImageReadError`` with a reason."""
    # Decode large JPEGs at 1/2, 1/4 or 1/8 scale directly (the inverse DCT shrinks with
    # it), keeping the short side at least 1.5x the stored size so that the ROI crop is
    # still downsampled, not blown up (measured: within ~2 grey levels of a full decode).
    gray, source_shape = read_radiograph(
        path, max_pixels=settings.max_pixels, target_size=settings.size * 3 // 2
    )
    return prepare_array(gray, settings, source_shape)
