"""xrayfeat.imaging: one reader for every radiograph format, failing with a reason."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from xrayfeat.errors import ImageReadError
from xrayfeat.imaging import (
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    decode_radiograph,
    read_header,
    read_radiograph,
)
from xrayfeat.preprocessing import PreprocessSettings, prepare_array, prepare_file


def encode(image: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok
    return buffer.tobytes()


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


# --------------------------------------------------------------------------- formats

def test_real_jpeg_reads_as_2d_uint8(example_images):
    path = example_images[0]
    image, source_shape = read_radiograph(path)
    assert image.ndim == 2 and image.dtype == np.uint8
    assert image.flags["C_CONTIGUOUS"]
    assert source_shape == image.shape == (224, 224)
    np.testing.assert_array_equal(image, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


def test_rgb_saved_grayscale_jpeg(tmp_path, synthetic_xray):
    gray = synthetic_xray(128, seed=1)
    path = tmp_path / "rgb.jpg"
    path.write_bytes(encode(cv2.merge([gray, gray, gray]), ".jpg", cv2.IMWRITE_JPEG_QUALITY, 98))
    image, _ = read_radiograph(path)
    assert image.shape == gray.shape
    assert mean_abs(image, gray) < 2


def test_cmyk_jpeg(tmp_path, synthetic_xray):
    PIL = pytest.importorskip("PIL", reason="Pillow is needed to write a CMYK JPEG")
    from PIL import Image

    gray = synthetic_xray(128, seed=2)
    buffer = io.BytesIO()
    Image.fromarray(gray).convert("RGB").convert("CMYK").save(buffer, "JPEG", quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "CMYK", PIL.__version__
    image, _ = decode_radiograph(buffer.getvalue())
    assert image.shape == gray.shape
    assert mean_abs(image, gray) < 3  # not inverted, not a channel


def test_png_8bit_roundtrip_and_alpha(tmp_path, synthetic_xray):
    gray = synthetic_xray(96, seed=3)
    image, _ = decode_radiograph(encode(gray, ".png"))
    np.testing.assert_array_equal(image, gray)
    bgra = cv2.merge([gray, gray, gray, np.full_like(gray, 255)])
    image, _ = decode_radiograph(encode(bgra, ".png"))
    np.testing.assert_array_equal(image, gray)


def test_png_16bit_scaled_by_its_own_range():
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(1000, 3000, 200), (120, 1))
    source = (ramp + rng.normal(0, 5, ramp.shape)).clip(1000, 3000).astype(np.uint16)
    data = encode(source, ".png")
    assert data[24] == 16  # IHDR bit depth: really a 16-bit PNG
    image, _ = decode_radiograph(data)
    assert image.dtype == np.uint8 and image.shape == source.shape
    assert image.min() <= 1 and image.max() >= 254  # spans the range, not truncated/saturated
    expected = (source.astype(np.float64) - source.min()) * 255 / (source.max() - source.min())
    assert np.abs(image - expected).max() <= 1
    assert np.corrcoef(image.ravel(), source.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("ext", [".bmp", ".tif", ".png"])
def test_bmp_tiff_png_roundtrip(tmp_path, synthetic_xray, ext):
    gray = synthetic_xray((80, 100), seed=4)
    path = tmp_path / f"img{ext}"
    path.write_bytes(encode(gray, ext))
    image, source_shape = read_radiograph(path)
    np.testing.assert_array_equal(image, gray)
    assert source_shape == (80, 100)


def test_tiff_16bit_and_big_endian_header():
    source = np.tile(np.linspace(0, 60000, 64), (48, 1)).astype(np.uint16)
    image, shape = decode_radiograph(encode(source, ".tif"))
    assert shape == (48, 64) and image.min() == 0 and image.max() == 255
    # A hand-made big-endian header: width/height are read from the IFD before decoding.
    ifd = struct.pack(">H", 2) + struct.pack(">HHII", 256, 4, 1, 5000) \
        + struct.pack(">HHI", 257, 3, 1) + struct.pack(">H", 4000) + b"\0\0" + b"\0\0\0\0"
    header = read_header(b"MM\x00*" + struct.pack(">I", 8) + ifd)
    assert (header.kind, header.width, header.height) == ("tiff", 5000, 4000)


def test_format_decided_by_content_not_extension(tmp_path, synthetic_xray):
    gray = synthetic_xray(64, seed=5)
    png_named_jpeg = tmp_path / "really_png.jpeg"
    png_named_jpeg.write_bytes(encode(gray, ".png"))
    jpeg_no_ext = tmp_path / "scan0001"
    jpeg_no_ext.write_bytes(encode(gray, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95))
    bmp_named_dcm = tmp_path / "x.dcm"
    bmp_named_dcm.write_bytes(encode(gray, ".bmp"))
    assert read_header(png_named_jpeg.read_bytes()).kind == "png"
    assert read_header(jpeg_no_ext.read_bytes()).kind == "jpeg"
    np.testing.assert_array_equal(read_radiograph(png_named_jpeg)[0], gray)
    assert mean_abs(read_radiograph(jpeg_no_ext)[0], gray) < 2
    np.testing.assert_array_equal(read_radiograph(bmp_named_dcm)[0], gray)


# --------------------------------------------------------------------------- DICOM

@pytest.fixture
def dicom_ramp() -> np.ndarray:
    """Stored values 0..4000 left to right, 64 x 128."""
    return np.tile(np.linspace(0, 4000, 128), (64, 1)).astype(np.uint16)


def test_dicom_monochrome1_is_inverted(tmp_path, dicom_ramp, write_dicom):
    mono2, shape = read_radiograph(write_dicom(tmp_path / "m2.dcm", dicom_ramp))
    mono1, _ = read_radiograph(write_dicom(tmp_path / "m1.dcm", dicom_ramp,
                                           photometric="MONOCHROME1"))
    assert shape == (64, 128) and mono2.dtype == np.uint8
    assert mono2[0, 0] == 0 and mono2[0, -1] == 255  # high stored value is bright
    assert mono1[0, 0] == 255 and mono1[0, -1] == 0  # MONOCHROME1: high value is dark
    np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))


def test_dicom_rescale_then_window(tmp_path, dicom_ramp, write_dicom):
    # Stored 0..4000 -> slope 0.5, intercept -1000 -> -1000..1000 in modality units; the
    # window (centre 0, width 400) is in those units: only stored 1600..2400 is grey.
    path = write_dicom(tmp_path / "w.dcm", dicom_ramp, slope=0.5, intercept=-1000,
                       window=(0, 400))
    image, _ = read_radiograph(path)
    stored = dicom_ramp[0].astype(float)
    modality = stored * 0.5 - 1000
    row = image[0].astype(int)
    assert (row[modality < -200] == 0).all()
    assert (row[modality > 200] == 255).all()
    middle = np.argmin(np.abs(modality))
    assert abs(row[middle] - 128) <= 8
    inside = (modality > -180) & (modality < 180)
    assert (np.diff(row[inside]) >= 0).all() and np.ptp(row[inside]) > 200
    # Without the rescale the same window would put (almost) every pixel at white.
    raw = write_dicom(tmp_path / "raw.dcm", dicom_ramp, window=(0, 400))
    assert (read_radiograph(raw)[0] == 255).mean() > 0.9


def test_dicom_negative_slope_inverts(tmp_path, dicom_ramp, write_dicom):
    path = write_dicom(tmp_path / "neg.dcm", dicom_ramp, slope=-1.0, intercept=4095)
    image, _ = read_radiograph(path)
    assert image[0, 0] == 255 and image[0, -1] == 0


def test_dicom_without_pixel_data(tmp_path, write_dicom):
    path = write_dicom(tmp_path / "nopix.dcm", None, rows_cols=(64, 64))
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_radiograph(path)


def test_dicom_size_checked_from_header(tmp_path, write_dicom):
    # 60000 x 60000 declared, no pixels written: refused from the header alone.
    path = write_dicom(tmp_path / "huge.dcm", None, rows_cols=(60000, 60000))
    with pytest.raises(ImageReadError, match="too large"):
        read_radiograph(path)


def test_dicom_with_a_tiff_header_in_its_preamble_is_read_as_dicom(tmp_path, dicom_ramp,
                                                                    write_dicom):
    """The standard lets the 128-byte preamble hold a TIFF header (pydicom's CT_small.dcm
    does); the file is a DICOM all the same, not a truncated TIFF."""
    plain = write_dicom(tmp_path / "plain.dcm", dicom_ramp)
    data = bytearray(plain.read_bytes())
    data[:8] = b"II*\x00\x08\x00\x00\x00"  # a little-endian TIFF header, IFD at byte 8
    dual = tmp_path / "dual.dcm"
    dual.write_bytes(bytes(data))
    assert read_header(bytes(data)).kind == "dicom"
    np.testing.assert_array_equal(read_radiograph(dual)[0], read_radiograph(plain)[0])


def test_dicom_needing_a_missing_decoder_plugin_is_one_line_naming_it(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    from conftest import dicom_dataset

    ds = dicom_dataset()
    ds.Modality = "CR"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\x00" * 100])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "jpegls.dcm"
    ds.save_as(path, enforce_file_format=True)
    try:
        import pylibjpeg  # noqa: F401
        pytest.skip("a JPEG-LS decoder plugin is installed here")
    except ImportError:
        pass
    with pytest.raises(ImageReadError) as info:
        read_radiograph(path)
    message = str(info.value)
    assert "\n" not in message and "\t" not in message
    assert "JPEG-LS" in message and "pylibjpeg" in message and "install one of" in message


# --------------------------------------------------------------------------- bad inputs

def test_empty_file(tmp_path):
    (tmp_path / "empty.jpeg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_radiograph(tmp_path / "empty.jpeg")


def test_text_file_named_jpeg(tmp_path):
    path = tmp_path / "x.jpeg"
    path.write_text("this is not a radiograph\n")
    with pytest.raises(ImageReadError, match="not an image"):
        read_radiograph(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError):
        read_radiograph(path)


@pytest.mark.parametrize("prefix", [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00"])
def test_random_bytes_behind_a_valid_signature(prefix):
    body = np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    with pytest.raises(ImageReadError):
        decode_radiograph(prefix + body)


@pytest.mark.parametrize("cut", [2, 200, 2000])
def test_truncated_jpeg(tmp_path, example_images, cut):
    data = example_images[0].read_bytes()
    path = tmp_path / "cut.jpeg"
    path.write_bytes(data[: len(data) - cut])
    with pytest.raises(ImageReadError, match="truncated"):
        read_radiograph(path)


def test_jpeg_cut_inside_its_header(example_images):
    with pytest.raises(ImageReadError, match="truncated"):
        decode_radiograph(example_images[0].read_bytes()[:100])


def test_truncated_png(synthetic_xray):
    data = encode(synthetic_xray(64, seed=6), ".png")
    with pytest.raises(ImageReadError, match="truncated"):
        decode_radiograph(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        decode_radiograph(data[:20])


def test_directory_named_like_an_image(tmp_path):
    folder = tmp_path / "folder.jpeg"
    folder.mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        read_radiograph(folder)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="cannot open"):
        read_radiograph(tmp_path / "nope.jpeg")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def test_png_bomb_fails_fast_from_its_header(tmp_path):
    # IHDR claims 100000 x 100000 (10 GB of pixels); the data is a few bytes.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    started = time.perf_counter()
    with pytest.raises(ImageReadError, match="too large.*100000 x 100000"):
        read_radiograph(path)
    # Refused from the header in milliseconds; decoding 10 GB of pixels would take minutes.
    assert time.perf_counter() - started < 5.0


def test_jpeg_bomb_fails_from_its_frame_header(example_images):
    data = bytearray(example_images[0].read_bytes())
    sof = max(data.find(bytes([0xFF, m])) for m in (0xC0, 0xC2))
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(ImageReadError, match="too large"):
        decode_radiograph(bytes(data))


def test_pixel_budget_is_configurable(example_images):
    assert DEFAULT_MAX_PIXELS == 50_000_000
    data = example_images[0].read_bytes()
    with pytest.raises(ImageReadError, match="too large"):
        decode_radiograph(data, max_pixels=224 * 224 - 1)
    image, _ = decode_radiograph(data, max_pixels=224 * 224)
    assert image.shape == (224, 224)


def test_too_small(synthetic_xray):
    with pytest.raises(ImageReadError, match="too small"):
        decode_radiograph(encode(synthetic_xray((MIN_SIDE - 1, 200), seed=7), ".png"))
    image, _ = decode_radiograph(encode(synthetic_xray(MIN_SIDE, seed=7), ".png"))
    assert image.shape == (MIN_SIDE, MIN_SIDE)


# --------------------------------------------------------------------------- reduced decode

def _big_jpeg(path: Path, source: Path, shape=(1700, 1900), seed=0) -> Path:
    """Upscale a real sample to a realistic size, with film-grain-like noise, JPEG q=90."""
    small = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
    big = cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(seed).normal(0, 4, big.shape)
    big = np.clip(big + noise, 0, 255).astype(np.uint8)
    path.write_bytes(encode(big, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90))
    return path


def test_reduced_decode_factor_and_source_shape(tmp_path, example_images):
    path = _big_jpeg(tmp_path / "big.jpeg", example_images[0], shape=(1700, 1900))
    full, full_shape = read_radiograph(path)
    assert full.shape == full_shape == (1700, 1900)
    # Short side 1700: 1/2 keeps 850 >= 448; 1/4 keeps 425 < 448 -> factor 2.
    half, shape = read_radiograph(path, target_size=448)
    assert half.shape == (850, 950) and shape == (1700, 1900)
    eighth, _ = read_radiograph(path, target_size=200)
    assert eighth.shape == (213, 238)  # ceil(1700 / 8), ceil(1900 / 8)
    same, _ = read_radiograph(path, target_size=1000)  # not >= 2x: decoded in full
    assert same.shape == (1700, 1900)
    small, _ = read_radiograph(example_images[0], target_size=150)  # 224 // 2 < 150
    assert small.shape == (224, 224)
    small, _ = read_radiograph(example_images[0], target_size=112)  # 224 // 2 == 112
    assert small.shape == (112, 112)
    # PNG has no reduced decode: target_size is ignored.
    png = tmp_path / "big.png"
    png.write_bytes(encode(full, ".png"))
    assert read_radiograph(png, target_size=200)[0].shape == (1700, 1900)


def test_prepared_reduced_decode_close_to_full_decode(tmp_path, example_images):
    """prepare_file decodes big JPEGs at 1/2-1/8 scale; the stored 224 image must match the
    full-decode path to within a few grey levels."""
    sample = example_images[::10]  # 6 real radiographs from different splits and classes
    for roi, per_image, typical in ((False, 1.0, 1.0), (True, None, 3.0)):
        settings = PreprocessSettings(size=224, roi=roi)
        diffs = []
        for k, source in enumerate(sample):
            path = _big_jpeg(tmp_path / f"big{k}.jpeg", source, shape=(2000, 2400), seed=k)
            reduced = prepare_file(path, settings)
            assert reduced.source_shape == (2000, 2400)
            full, shape = read_radiograph(path)
            reference = prepare_array(full, settings, shape)
            assert reduced.image.shape == reference.image.shape == (224, 224)
            diffs.append(mean_abs(reduced.image, reference.image))
        if per_image is not None:
            assert max(diffs) < per_image, diffs
        # With the ROI on, the lung mask can settle on a slightly different box for one
        # image; the typical image must still be within a few grey levels.
        assert float(np.median(diffs)) < typical, diffs


# --------------------------------------------------------------------------- pixel budget bypasses

def _tiff_with_two_widths() -> bytes:
    """A little-endian TIFF header whose first IFD declares the width twice."""
    entries = [(256, 3, 1, 100), (257, 3, 1, 100), (256, 3, 1, 8000)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHIHH", tag, typ, count, value, 0) for tag, typ, count, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00"


def test_tiff_declaring_its_size_twice_is_refused():
    with pytest.raises(ImageReadError, match="declared twice"):
        read_header(_tiff_with_two_widths())


def _multiframe(path: Path, frames: int, side: int = 64) -> Path:
    pytest.importorskip("pydicom")
    from conftest import dicom_dataset

    ds = dicom_dataset()
    ds.Modality, ds.Rows, ds.Columns = "CR", side, side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = frames
    pixels = np.stack([np.full((side, side), 40 * k % 256, np.uint8) for k in range(frames)])
    pixels[0, :, side // 2:] = 200  # the first frame: half dark, half bright
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_multiframe_dicom_counts_every_frame_and_decodes_the_first(tmp_path):
    path = _multiframe(tmp_path / "multi.dcm", 5)
    image, shape = read_radiograph(path)
    assert shape == (64, 64) and image.shape == (64, 64)
    assert image[0, 0] < image[0, -1]  # the first frame, not a later one
    with pytest.raises(ImageReadError, match="x 5 frames exceeds the budget"):
        read_radiograph(path, max_pixels=64 * 64 * 4)


def test_deflated_dicom_is_refused_before_it_is_inflated(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from conftest import write_dicom_file

    path = write_dicom_file(tmp_path / "plain.dcm", np.zeros((64, 64), np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="deflated DICOM is refused"):
        read_radiograph(deflated)


def test_a_jpeg_frame_larger_than_its_dicom_header_is_refused(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from conftest import dicom_dataset

    ok, jpeg = cv2.imencode(".jpg", np.full((256, 256), 128, np.uint8))
    ds = dicom_dataset()
    ds.Modality, ds.Rows, ds.Columns = "CR", 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "liar.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="JPEG frame is 256 x 256 but the header says 64"):
        read_radiograph(path)
