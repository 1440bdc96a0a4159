"""xrayfeat.roi: the weight-free thorax cropper, on synthetic images with known boxes and
on the real samples."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from xrayfeat.roi import Roi, RoiSettings, find_roi


def lung_extent(h: int, w: int) -> tuple[float, float, float, float]:
    """Where make_synthetic_xray draws its lungs (before jitter): x0, y0, x1, y1."""
    return 0.17 * w, 0.20 * h, 0.83 * w, 0.76 * h


def assert_inside(roi: Roi, h: int, w: int) -> None:
    assert 0 <= roi.x0 < roi.x1 <= w and 0 <= roi.y0 < roi.y1 <= h, roi


def covers_central_half(roi: Roi, box: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = box
    qx, qy = (x1 - x0) / 4, (y1 - y0) / 4
    return (roi.x0 <= x0 + qx and roi.y0 <= y0 + qy
            and roi.x1 >= x1 - qx and roi.y1 >= y1 - qy)


@pytest.mark.parametrize("shape", [(128, 128), (256, 200), (300, 400), (1024, 1024)])
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_lungs_found(synthetic_xray, shape, seed):
    h, w = shape
    image = synthetic_xray(shape, seed=seed)
    roi = find_roi(image)
    assert roi.method == "lungs"
    assert_inside(roi, h, w)
    lx0, ly0, lx1, ly1 = lung_extent(h, w)
    slack = 0.04  # jitter of the synthetic geometry
    # Both lungs inside the box...
    assert roi.x0 <= lx0 + slack * w and roi.x1 >= lx1 - slack * w, roi
    assert roi.y0 <= ly0 + slack * h and roi.y1 >= ly1 - slack * h, roi
    # ...and the air outside the body is cut away: the box is tighter than the image.
    assert (roi.x1 - roi.x0) * (roi.y1 - roi.y0) < 0.85 * h * w


def test_opacity_in_a_lung_does_not_lose_the_box(synthetic_xray):
    clear = find_roi(synthetic_xray(256, seed=3))
    sick = find_roi(synthetic_xray(256, seed=3, opacity=True))
    assert sick.method == "lungs"
    assert max(abs(a - b) for a, b in zip(clear.as_tuple(), sick.as_tuple())) <= 8


def test_black_frame_is_cropped(synthetic_xray):
    inner = synthetic_xray(200, seed=4)
    pad = 60
    framed = cv2.copyMakeBorder(inner, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    roi = find_roi(framed)
    h, w = framed.shape
    assert_inside(roi, h, w)
    # Nothing of the frame is kept...
    assert roi.x0 >= pad and roi.y0 >= pad and roi.x1 <= w - pad and roi.y1 <= h - pad, roi
    # ...and the box is where the unframed image's box is, shifted by the frame.
    plain = find_roi(inner)
    shifted = (plain.x0 + pad, plain.y0 + pad, plain.x1 + pad, plain.y1 + pad)
    assert max(abs(a - b) for a, b in zip(roi.as_tuple(), shifted)) <= 4, (roi, shifted)


def test_white_scanner_margin_is_cropped(synthetic_xray):
    inner = synthetic_xray(200, seed=5)
    framed = cv2.copyMakeBorder(inner, 10, 50, 40, 20, cv2.BORDER_CONSTANT, value=255)
    roi = find_roi(framed)
    assert roi.x0 >= 40 and roi.y0 >= 10
    assert roi.x1 <= framed.shape[1] - 20 and roi.y1 <= framed.shape[0] - 50


@pytest.mark.parametrize("value", [0, 128, 255])
def test_uniform_image_falls_back_to_centred_crop(value):
    image = np.full((300, 400), value, np.uint8)
    settings = RoiSettings()
    roi = find_roi(image, settings)
    assert roi.method == "fallback"
    f = settings.fallback_fraction
    expected = (400 * (1 - f) / 2, 300 * (1 - f) / 2, 400 * (1 + f) / 2, 300 * (1 + f) / 2)
    assert max(abs(a - b) for a, b in zip(roi.as_tuple(), expected)) <= 1, roi
    # centred
    assert abs((roi.x0 + roi.x1) / 2 - 200) <= 1 and abs((roi.y0 + roi.y1) / 2 - 150) <= 1


def test_noise_only_image_falls_back():
    image = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    roi = find_roi(image)
    assert roi.method == "fallback"
    assert_inside(roi, 200, 200)


def test_tiny_image_is_kept_whole():
    assert find_roi(np.zeros((5, 40), np.uint8)) == Roi(0, 0, 40, 5, "full")


def test_non_uint8_input(synthetic_xray):
    image = synthetic_xray(160, seed=6)
    as16 = image.astype(np.uint16) * 200 + 1000
    assert find_roi(as16).as_tuple() == find_roi(image).as_tuple()


def test_rejects_colour_input():
    with pytest.raises(ValueError):
        find_roi(np.zeros((64, 64, 3), np.uint8))


def test_min_cover_one_keeps_all_content(synthetic_xray):
    image = synthetic_xray(200, seed=7)
    roi = find_roi(image, RoiSettings(min_cover=1.0))
    assert roi.as_tuple() == (0, 0, 200, 200)


def test_deterministic(synthetic_xray):
    image = synthetic_xray(300, seed=8)
    assert find_roi(image) == find_roi(image.copy())


def test_real_samples_box_inside_and_covers_central_half(example_images):
    methods = []
    for path in example_images:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        h, w = image.shape
        roi = find_roi(image)
        methods.append(roi.method)
        assert_inside(roi, h, w)
        assert covers_central_half(roi, (0, 0, w, h)), (path.name, roi)
        assert roi.method in ("lungs", "fallback")
    # On real chest films the lung mask should succeed most of the time.
    assert methods.count("lungs") >= len(methods) // 2, methods
