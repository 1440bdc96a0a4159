"""Region of interest: crop a chest radiograph to the thorax, with no model weights.

Kermany radiographs vary in size and aspect and carry burned-in letters, tubes and wide
black borders. Cropping to the lungs before resizing means every pixel the network gets is
anatomy, and the same anatomy lands at roughly the same place whatever the source framing.

Method (deterministic, NumPy/OpenCV only):
1. trim uniform borders (black frames, scanner margins);
2. on a small copy, CLAHE then Otsu: the lungs are the large dark regions that do not
   touch the image edge (air outside the body does);
3. keep the two largest such regions, take their bounding box plus a margin;
4. never crop tighter than the central part of the content (``min_cover``), because
   radiographs are framed on the thorax and a mask that found one lung must not cut the other;
5. if the mask is implausible (too small, too large, too narrow), fall back to a centred crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Work on a copy this many pixels on its long side: enough for lung shapes, cheap.
WORK_SIDE = 256
#: Version of :func:`find_roi`'s algorithm, recorded with exported models: bump it whenever
#: the same image and settings would give a different box.
ROI_ALGORITHM_VERSION = 1


@dataclass(frozen=True)
class RoiSettings:
    """Tunable parameters of the cropper; stored with every prepared dataset."""

    margin: float = 0.08  # added around the lung box, as a fraction of its size
    min_cover: float = 0.5  # the box always covers this central fraction of the content
    fallback_fraction: float = 0.85  # centred crop used when the lung mask is implausible
    uniform_std: float = 3.0  # a border row/column with less spread than this is trimmed


@dataclass(frozen=True)
class Roi:
    """A crop box in source pixel coordinates, ``x0 <= x < x1``, ``y0 <= y < y1``."""

    x0: int
    y0: int
    x1: int
    y1: int
    method: str  # "lungs", "fallback" (centred crop) or "full" (no crop asked)

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


def _content_box(image: np.ndarray, uniform_std: float) -> tuple[int, int, int, int]:
    """Box left after trimming uniform rows and columns at the edges."""
    img = image.astype(np.float32)
    rows = img.std(axis=1) > uniform_std
    cols = img.std(axis=0) > uniform_std
    if not rows.any() or not cols.any():
        return 0, 0, image.shape[1], image.shape[0]
    y0, y1 = np.argmax(rows), len(rows) - np.argmax(rows[::-1])
    x0, x1 = np.argmax(cols), len(cols) - np.argmax(cols[::-1])
    # A trimmed box thinner than a quarter of the image is noise, not content: keep all.
    if (x1 - x0) < image.shape[1] // 4 or (y1 - y0) < image.shape[0] // 4:
        return 0, 0, image.shape[1], image.shape[0]
    return int(x0), int(y0), int(x1), int(y1)


def _lung_box(work: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box of the two largest dark regions not touching the edge, or None."""
    h, w = work.shape
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    smooth = cv2.GaussianBlur(clahe.apply(work), (5, 5), 0)
    _, dark = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    candidates = []
    for label in range(1, count):
        x, y, bw, bh, area = stats[label]
        touches_edge = x == 0 or y == 0 or x + bw >= w or y + bh >= h
        if not touches_edge and area >= 0.01 * h * w:
            candidates.append((area, x, y, x + bw, y + bh))
    if not candidates:
        return None
    candidates.sort(reverse=True)
    kept = candidates[:2]
    area = sum(c[0] for c in kept)
    x0 = min(c[1] for c in kept)
    y0 = min(c[2] for c in kept)
    x1 = max(c[3] for c in kept)
    y1 = max(c[4] for c in kept)
    plausible = (
        0.05 * h * w <= area <= 0.7 * h * w
        and (x1 - x0) >= 0.3 * w
        and (y1 - y0) >= 0.25 * h
    )
    return (x0, y0, x1, y1) if plausible else None


def _centred(box: tuple[int, int, int, int], fraction: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * (1 - fraction) / 2, (y1 - y0) * (1 - fraction) / 2
    return x0 + mx, y0 + my, x1 - mx, y1 - my


def find_roi(image: np.ndarray, settings: RoiSettings = RoiSettings()) -> Roi:
    """Find the thorax in a 2-D uint8 radiograph; the box always lies inside the image."""
    if image.ndim != 2:
        raise ValueError("find_roi expects a 2-D grayscale array")
    h, w = image.shape
    if h < 8 or w < 8:
        return Roi(0, 0, w, h, "full")
    if image.dtype != np.uint8:
        image = cv2.normalize(image.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(
            np.uint8
        )
    # Everything is measured on one small copy: the source can be 3000 px a side, and
    # borders and lung shapes need no more than WORK_SIDE pixels.
    scale = min(1.0, WORK_SIDE / max(h, w))
    small = image if scale == 1.0 else cv2.resize(
        image, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
    sx0, sy0, sx1, sy1 = _content_box(small, settings.uniform_std)
    work = small[sy0:sy1, sx0:sx1]
    content = (sx0 / scale, sy0 / scale, min(w, sx1 / scale), min(h, sy1 / scale))
    cx0, cy0 = content[0], content[1]
    lungs = _lung_box(work)
    if lungs is None:
        fx0, fy0, fx1, fy1 = _centred(content, settings.fallback_fraction)
        method = "fallback"
    else:
        lx0, ly0, lx1, ly1 = (v / scale for v in lungs)
        mx, my = (lx1 - lx0) * settings.margin, (ly1 - ly0) * settings.margin
        fx0, fy0 = cx0 + lx0 - mx, cy0 + ly0 - my
        fx1, fy1 = cx0 + lx1 + mx, cy0 + ly1 + my
        # Never tighter than the central part of the content (see module docstring).
        kx0, ky0, kx1, ky1 = _centred(content, settings.min_cover)
        fx0, fy0, fx1, fy1 = min(fx0, kx0), min(fy0, ky0), max(fx1, kx1), max(fy1, ky1)
        method = "lungs"
    x0, y0 = max(0, int(np.floor(fx0))), max(0, int(np.floor(fy0)))
    x1, y1 = min(w, int(np.ceil(fx1))), min(h, int(np.ceil(fy1)))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return Roi(0, 0, w, h, "full")
    return Roi(x0, y0, x1, y1, method)
