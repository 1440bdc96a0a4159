"""Property-based tests (hypothesis) of the reader, the ROI cropper and preprocessing.

- any byte string given to the reader yields a 2-D uint8 array or raises the tool's own
  :class:`ImageReadError` (never another exception, never a hang);
- any 2-D array given to the ROI cropper yields a non-empty box inside the image;
- preprocessing is deterministic: the same input gives the same bytes, in this process and
  in a worker process.
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import dicom_dataset, make_synthetic_xray
from xrayfeat.errors import ImageReadError
from xrayfeat.imaging import decode_radiograph
from xrayfeat.preprocessing import PreprocessSettings, prepare_array, prepare_file
from xrayfeat.roi import RoiSettings, find_roi

# Hostile inputs make pydicom and NumPy complain (invalid VRs, NaN cast to uint8): expected.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:.*encountered in cast:RuntimeWarning")]

FAST = settings(max_examples=int(__import__("os").environ.get("XF_EXAMPLES", 150)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


_GRAY = make_synthetic_xray(48, seed=11)
_VALID = {
    "jpeg": _encode(_GRAY, ".jpg"),
    "png": _encode(_GRAY, ".png"),
    "png16": _encode(_GRAY.astype(np.uint16) * 257, ".png"),
    "bmp": _encode(_GRAY, ".bmp"),
    "tiff": _encode(_GRAY, ".tif"),
}
_SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*",
               b"\0" * 128 + b"DICM"]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _dicom_bytes() -> bytes | None:
    """A small valid DICOM file, or None without pydicom."""
    try:
        ds = dicom_dataset()
    except ImportError:
        return None
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", 48, 48, 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (_GRAY.astype(np.uint16) * 16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


_DICOM = _dicom_bytes()
if _DICOM is not None:
    _VALID["dicom"] = _DICOM


def _check_reader(data: bytes) -> None:
    """The reader's contract on arbitrary bytes."""
    try:
        image, source_shape = decode_radiograph(data, target_size=16)
    except ImageReadError as exc:
        assert str(exc)  # a reason a person can read
        return
    assert isinstance(image, np.ndarray)
    assert image.ndim == 2 and image.dtype == np.uint8
    assert min(image.shape) >= 1
    assert len(source_shape) == 2 and all(int(v) >= 1 for v in source_shape)


# --------------------------------------------------------------------------- reader

@FAST
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\xff\xd8\xff")
@example(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
@example(b"\0" * 128 + b"DICM")
def test_any_bytes_decode_or_raise_image_read_error(data):
    _check_reader(data)


@FAST
@given(st.sampled_from(_SIGNATURES), st.binary(max_size=2048))
def test_any_bytes_behind_an_image_signature(signature, body):
    _check_reader(signature + body)


@FAST
@given(st.sampled_from(sorted(_VALID)), st.data())
def test_mutated_valid_images(kind, data):
    """Valid files of every format, cut short, with bytes flipped or inserted."""
    raw = bytearray(_VALID[kind])
    edit = data.draw(st.sampled_from(["truncate", "flip", "insert", "header"]))
    if edit == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif edit == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif edit == "insert":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    else:  # the header region, where sizes and offsets live
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, min(len(raw), 160) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    _check_reader(bytes(raw))


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([0, 2, 3, 4, 6]))
def test_png_headers_with_any_size_and_depth(width, height, depth, colour):
    """A PNG header may claim any size: refused from the header, never decoded blindly."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 256)) + _png_chunk(b"IEND", b""))
    _check_reader(data)


_DICOM_TEXT = st.sampled_from(["0", "1", "-1", "0.5", "1e30", "-1e30", "100\\200", "0\\0",
                               "4095", "2048", "-0.001"])


@FAST
@given(bits=st.sampled_from([1, 8, 16, 32]), stored=st.integers(1, 40),
       samples=st.sampled_from([1, 3]), signed=st.booleans(),
       photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR",
                                    "YBR_FULL", "junk"]),
       frames=st.sampled_from([None, "0", "1", "2"]),
       slope=st.one_of(st.none(), _DICOM_TEXT), intercept=_DICOM_TEXT,
       center=st.one_of(st.none(), _DICOM_TEXT), width=_DICOM_TEXT,
       voi_function=st.sampled_from([None, "LINEAR", "SIGMOID", "LINEAR_EXACT", "junk"]),
       size_delta=st.sampled_from([0, 0, 0, -1, -100, 7]), seed=st.integers(0, 2**16))
@example(bits=16, stored=12, samples=1, signed=False, photometric="MONOCHROME2", frames=None,
         slope=None, intercept="0", center="100", width="0", voi_function=None, size_delta=0,
         seed=0)  # WindowWidth 0 once escaped as a ValueError from pydicom's VOI LUT
def test_dicom_with_any_pixel_and_window_attributes(bits, stored, samples, signed, photometric,
                                                    frames, slope, intercept, center, width,
                                                    voi_function, size_delta, seed):
    """DICOM headers from hospital exports may say anything about their pixels: the reader
    decodes them or gives a reason (a window of width 0 once escaped as a ValueError)."""
    pytest.importorskip("pydicom")
    buffer = io.BytesIO()
    try:
        _write_fuzzed_dicom(buffer, bits, stored, samples, signed, photometric, frames, slope,
                            intercept, center, width, voi_function, size_delta, seed)
    except Exception:  # pydicom refuses to write some combinations at all
        assume(False)
    _check_reader(buffer.getvalue())


def _write_fuzzed_dicom(buffer, bits, stored, samples, signed, photometric, frames, slope,
                        intercept, center, width, voi_function, size_delta, seed) -> None:
    ds = dicom_dataset()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", 40, 36, samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored = bits, stored
    ds.HighBit, ds.PixelRepresentation = stored - 1, int(signed)
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    n_frames = int(frames) if frames and frames.isdigit() else 1
    n_bytes = max(0, 40 * 36 * samples * n_frames * max(bits, 8) // 8 + size_delta)
    ds.PixelData = np.random.default_rng(seed).integers(0, 256, n_bytes, np.uint8).tobytes()
    ds.save_as(buffer, enforce_file_format=True)


def test_valid_seeds_decode():
    """The seeds of the mutation test are themselves readable (so mutations start valid)."""
    for kind, data in _VALID.items():
        image, _ = decode_radiograph(data)
        assert image.shape == _GRAY.shape, kind


# --------------------------------------------------------------------------- ROI cropper

def _check_box(image: np.ndarray) -> None:
    h, w = image.shape
    roi = find_roi(image)
    assert 0 <= roi.x0 < roi.x1 <= w, (roi, image.shape)
    assert 0 <= roi.y0 < roi.y1 <= h, (roi, image.shape)
    assert roi.method in ("lungs", "fallback", "full")
    assert all(isinstance(v, int) for v in roi.as_tuple())


_shapes = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=160)


@FAST
@given(hnp.arrays(np.uint8, _shapes, elements=st.integers(0, 255)))
def test_roi_box_inside_any_uint8_image(image):
    _check_box(image)


@FAST
@given(hnp.arrays(st.sampled_from([np.uint16, np.int32, np.float32, np.float64, np.bool_]),
                  _shapes))
def test_roi_box_inside_any_2d_array(image):
    """Any dtype, including NaN, infinities, constant and boolean images."""
    _check_box(image)


@FAST
@given(st.integers(8, 400), st.integers(8, 400), st.integers(0, 10_000),
       st.booleans(), st.integers(0, 30), st.floats(0, 40))
def test_roi_box_inside_radiograph_like_images(h, w, seed, opacity, frame, noise):
    frame = min(frame, h // 3, w // 3)
    _check_box(make_synthetic_xray((h, w), seed=seed, opacity=opacity, frame=frame,
                                   noise=noise))


@FAST
@given(st.integers(1, 200), st.integers(1, 200),
       st.floats(0.0, 0.5), st.floats(0.0, 1.0), st.floats(0.05, 1.0), st.floats(0.0, 50.0))
def test_roi_box_inside_for_any_settings(h, w, margin, min_cover, fallback, uniform_std):
    image = make_synthetic_xray((max(h, 8), max(w, 8)), seed=h * 1000 + w)
    roi = find_roi(image, RoiSettings(margin=margin, min_cover=min_cover,
                                      fallback_fraction=fallback, uniform_std=uniform_std))
    ih, iw = image.shape
    assert 0 <= roi.x0 < roi.x1 <= iw and 0 <= roi.y0 < roi.y1 <= ih


def test_roi_rejects_non_2d():
    with pytest.raises(ValueError):
        find_roi(np.zeros((8, 8, 3), np.uint8))


# --------------------------------------------------------------------------- preprocessing

@FAST
@given(st.integers(32, 300), st.integers(32, 300), st.integers(0, 1000), st.booleans(),
       st.sampled_from([32, 64]))
def test_prepare_array_is_deterministic(h, w, seed, roi, size):
    gray = make_synthetic_xray((h, w), seed=seed)
    settings = PreprocessSettings(size=size, roi=roi)
    a = prepare_array(gray.copy(), settings)
    b = prepare_array(gray.copy(), settings)
    assert a.image.shape == (size, size) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image)
    assert a.roi == b.roi and a.source_shape == b.source_shape == (h, w)
    assert 0 <= a.roi.x0 < a.roi.x1 <= w and 0 <= a.roi.y0 < a.roi.y1 <= h


def test_prepare_file_is_deterministic_across_processes(tmp_path):
    """The same files give the same bytes in this process and in spawned workers (the
    path prepare and predict take), and from run to run."""
    from xrayfeat.decoding import map_prepare

    paths = []
    for i, (ext, shape) in enumerate([(".jpeg", (300, 260)), (".png", (180, 220)),
                                      (".jpeg", (900, 700)), (".bmp", (64, 64))]):
        path = tmp_path / f"img{i}{ext}"
        cv2.imwrite(str(path), make_synthetic_xray(shape, seed=i, opacity=i % 2 == 1))
        paths.append(path)
    settings = PreprocessSettings(size=64)
    here = [prepare_file(p, settings) for p in paths]
    again = [prepare_file(p, settings) for p in paths]
    workers = {i: prep for i, prep, err in map_prepare(paths, settings, workers=2, chunksize=1)}
    for i, prep in enumerate(here):
        for other in (again[i], workers[i]):
            assert np.array_equal(prep.image, other.image)
            assert prep.roi == other.roi and prep.source_shape == other.source_shape


@FAST
@given(st.integers(1, 40), st.integers(1, 40))
def test_tiny_images_are_refused_not_crashed(h, w):
    assume(min(h, w) < 32)
    data = _encode(np.full((h, w), 128, np.uint8), ".png")
    with pytest.raises(ImageReadError, match="too small"):
        decode_radiograph(data)
