"""Read any supported radiograph file into a 2-D uint8 grayscale array.

One reader for the whole tool: JPEG (grayscale, RGB-saved grayscale, CMYK), PNG 8/16-bit,
BMP, TIFF, and DICOM when pydicom is installed. The kind of file is decided from its first
bytes, never from its extension, and its size is read from the header before any pixel is
decoded, so a decompression bomb or a truncated file costs nothing and fails with a reason.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from xrayfeat.errors import ImageReadError, NotAvailableError

#: Default pixel budget: the largest real radiographs are ~3000 x 3000 (9 MP); 50 MP leaves
#: room for scanned films while refusing absurd headers before decoding.
DEFAULT_MAX_PIXELS = 50_000_000
#: A radiograph smaller than this a side carries no usable detail (and breaks the ROI step).
MIN_SIDE = 32
#: Extensions looked at when searching folders (the content still decides the format).
#: Files without an extension are included because DICOM exports often have none.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class ImageHeader:
    """What the first bytes of a file say: its format and size, before decoding."""

    kind: str  # "jpeg", "png", "bmp", "tiff" or "dicom"
    width: int
    height: int
    frames: int = 1  # DICOM NumberOfFrames: the budget counts every frame in the file


def looks_like_image_path(path: Path) -> bool:
    """Whether a folder search should consider ``path`` (by extension, case-insensitive)."""
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix == ""


def _jpeg_header(data: bytes) -> ImageHeader:
    i, n = 2, len(data)
    width = height = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageReadError("corrupt JPEG: bad marker structure")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (seglen,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF and i + 9 <= n:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
        if marker == 0xDA:  # start of scan: the entropy-coded image follows
            if width is None:
                raise ImageReadError("corrupt JPEG: no frame header before the image data")
            # Inside entropy-coded data 0xFF is always stuffed (FF00), so FFD9 after the
            # first scan can only be the end-of-image marker: without it the file is cut.
            if data.rfind(b"\xff\xd9") < i:
                raise ImageReadError("truncated JPEG: the end-of-image marker is missing")
            return ImageHeader("jpeg", int(width), int(height))
        i += 2 + seglen
    raise ImageReadError("truncated JPEG: the file ends inside its header")


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageReadError("truncated PNG: no image header")
    width, height = struct.unpack(">II", data[16:24])
    if data.find(b"IEND", 33) == -1:
        raise ImageReadError("truncated PNG: the end chunk is missing")
    return ImageHeader("png", int(width), int(height))


def _bmp_header(data: bytes) -> ImageHeader:
    if len(data) < 26:
        raise ImageReadError("truncated BMP: no image header")
    width, height = struct.unpack("<ii", data[18:26])
    return ImageHeader("bmp", abs(int(width)), abs(int(height)))


def _tiff_header(data: bytes) -> ImageHeader:
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
        tags: dict[int, int] = {}
        for k in range(count):
            entry = data[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
            tag, typ = struct.unpack(order + "HH", entry[:4])
            if tag in (256, 257) and tag in tags:
                # A reader keeping the last and a decoder the first would disagree on the
                # size: the pixel budget could be bypassed.
                raise ImageReadError("corrupt TIFF: the width or length is declared twice")
            if tag in (256, 257):
                fmt = order + ("H" if typ == 3 else "I")
                tags[tag] = struct.unpack(fmt, entry[8 : 8 + struct.calcsize(fmt)])[0]
    except struct.error:
        raise ImageReadError("truncated TIFF: the file ends inside its header") from None
    if 256 not in tags or 257 not in tags:
        raise ImageReadError("corrupt TIFF: no image width/height")
    return ImageHeader("tiff", int(tags[256]), int(tags[257]))


#: (0002,0010) Transfer Syntax UID, explicit VR "UI", in the file meta group.
_TRANSFER_SYNTAX_TAG = b"\x02\x00\x10\x00UI"
_DEFLATED = b"1.2.840.10008.1.2.1.99"


def _dicom_header(data: bytes) -> ImageHeader:
    pydicom = _import_pydicom()
    at = data.find(_TRANSFER_SYNTAX_TAG, 132, 132 + 4096)
    if at >= 0 and len(data) >= at + 8:  # a cut file is pydicom's to name below
        (length,) = struct.unpack("<H", data[at + 6 : at + 8])
        if data[at + 8 : at + 8 + length].rstrip(b"\x00 ") == _DEFLATED:
            # pydicom inflates a deflated dataset whole before any element can be looked
            # at: a small file could expand to gigabytes before the size check.
            raise ImageReadError("deflated DICOM is refused: it must be inflated whole "
                                 "before its size can be checked")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return ImageHeader("dicom", int(ds.Columns), int(ds.Rows), max(1, frames))
    except AttributeError:
        raise ImageReadError("DICOM file has no image (no Rows/Columns)") from None
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageReadError(f"corrupt DICOM: {exc}") from None


def _import_pydicom():
    try:
        import pydicom
    except ImportError:
        raise NotAvailableError(
            "reading DICOM needs pydicom: pip install 'xrayfeat[dicom]'"
        ) from None
    return pydicom


def read_header(data: bytes) -> ImageHeader:
    """Identify the format from the first bytes and read the image size from the header.

    Raises :class:`ImageReadError` for empty, unknown or truncated files.
    """
    if not data:
        raise ImageReadError("empty file")
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header(data)
    if data[:2] == b"BM":
        return _bmp_header(data)
    # DICOM first: its 128-byte preamble is free-form, and the standard lets it hold a TIFF
    # header (dual-personality files), which must not make a valid DICOM a "truncated TIFF".
    if data[128:132] == b"DICM":
        return _dicom_header(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_header(data)
    raise ImageReadError("not an image (unknown format)")


def _check_size(header: ImageHeader, max_pixels: int) -> None:
    if header.width * header.height * header.frames > max_pixels:
        frames = f" x {header.frames} frames" if header.frames > 1 else ""
        raise ImageReadError(
            f"image too large: {header.width} x {header.height} pixels{frames} exceeds the "
            f"budget of {max_pixels / 1e6:g} megapixels"
        )
    if min(header.width, header.height) < MIN_SIDE:
        raise ImageReadError(
            f"image too small: {header.width} x {header.height} (need {MIN_SIDE} px a side)"
        )


def _reduction_for(header: ImageHeader, target_size: int | None) -> int:
    """Largest JPEG DCT scaling factor (2, 4, 8) that keeps the short side >= target_size."""
    if target_size is None or header.kind != "jpeg":
        return 1
    short = min(header.width, header.height)
    for factor in (8, 4, 2):
        if short // factor >= target_size:
            return factor
    return 1


_REDUCED_FLAGS = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an integer or float image to uint8 by its own range (16-bit PNG, DICOM)."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(array.shape, np.uint8)
    return np.clip((array - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def to_grayscale(array: np.ndarray) -> np.ndarray:
    """Drop colour (and alpha) channels the way OpenCV orders them (BGR/BGRA)."""
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        return array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2GRAY)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2GRAY)
    raise ImageReadError(f"unsupported pixel layout {array.shape}")


def _pixel_error(exc: Exception, ds) -> str:
    """pydicom's decoding error as one line; a missing decoder plugin is named with what to
    install (pydicom lists each plugin on a line of its own: ``\tNAME - requires ...``)."""
    text = str(exc)
    if "missing dependencies" in text:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "its compressed transfer syntax")
        needs = [line.split("requires", 1)[1].strip() for line in text.splitlines()[1:]
                 if "requires" in line]
        return (f"'{name}' needs a pydicom decoder plugin that is not installed; install one "
                f"of: {' | '.join(needs) or 'pylibjpeg, gdcm'}")
    return " ".join(text.split())


def _check_encapsulated_jpeg(ds) -> None:
    """Refuse a compressed frame whose own header disagrees with the DICOM header: a
    9000 x 9000 JPEG inside a file that says 64 x 64 would be decoded before any check."""
    from pydicom.encaps import generate_frames

    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = next(generate_frames(ds.PixelData, number_of_frames=frames), b"")
    if frame[:3] == b"\xff\xd8\xff":
        inner = _jpeg_header(frame)
        if (inner.height, inner.width) != (int(ds.Rows), int(ds.Columns)):
            raise ImageReadError(f"corrupt DICOM: its JPEG frame is {inner.width} x "
                                 f"{inner.height} but the header says {ds.Columns} x {ds.Rows}")


def _decode_dicom(data: bytes) -> np.ndarray:
    pydicom = _import_pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in ds:
            raise ImageReadError("DICOM file has no pixel data")
        _check_encapsulated_jpeg(ds)
        # Only the first frame of a multi-frame file is decoded (and needed).
        pixels = pixel_array(ds, index=0) if int(ds.get("NumberOfFrames", 1) or 1) > 1 \
            else ds.pixel_array
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"cannot decode DICOM pixels: {_pixel_error(exc, ds)}") from None
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if ds.get("SamplesPerPixel", 1) == 1:
        try:
            pixels = apply_modality_lut(pixels, ds)  # rescale slope/intercept to stored units
        except Exception as exc:
            raise ImageReadError(f"corrupt DICOM rescale (modality LUT): {exc}") from None
        try:
            pixels = apply_voi_lut(pixels, ds)  # the window the radiographer chose, if any
        except Exception:
            pass  # an invalid window (width 0, garbage text): scale by the pixel range instead
        image = to_uint8(np.asarray(pixels))
        if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark
            image = 255 - image
        return image
    return to_grayscale(to_uint8(np.asarray(pixels))[:, :, ::-1].copy())  # RGB -> BGR order


def decode_radiograph(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, target_size: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode file bytes into a 2-D uint8 grayscale array.

    ``target_size`` lets a large JPEG be decoded at 1/2, 1/4 or 1/8 scale directly (OpenCV's
    reduced decode) while its short side stays at least ``target_size``.
    Returns the array and the source ``(height, width)`` from the header.
    Raises :class:`ImageReadError` with a reason for any unreadable input.
    """
    header = read_header(data)
    _check_size(header, max_pixels)
    if header.kind == "dicom":
        image = _decode_dicom(data)
    else:
        buffer = np.frombuffer(data, np.uint8)
        if header.kind == "jpeg":
            flag = _REDUCED_FLAGS[_reduction_for(header, target_size)]
            image = cv2.imdecode(buffer, flag)
        else:
            # UNCHANGED keeps 16-bit depth so it can be scaled by its range, not truncated.
            image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ImageReadError(f"corrupt {header.kind.upper()}: the decoder could not read it")
        image = to_uint8(to_grayscale(image))
    if image.ndim != 2 or min(image.shape) < 1:
        raise ImageReadError(f"unsupported pixel layout {image.shape}")
    return np.ascontiguousarray(image), (header.height, header.width)


def read_radiograph(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a radiograph file; see :func:`decode_radiograph`.

    Only regular files are read, and at most :func:`max_file_bytes` of them: a named pipe
    or a link to ``/dev/zero`` named like an image would otherwise block or fill memory.
    """
    limit = max_file_bytes(max_pixels)
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer forever.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageReadError(f"cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageReadError("is a directory, not an image")
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError("not a regular file (a pipe, socket or device)")
        if info.st_size > limit:
            raise ImageReadError(f"file too large: {info.st_size / 1e6:.0f} MB (the limit "
                                 f"is {limit / 1e6:.0f} MB for {max_pixels / 1e6:g} MP)")
        with os.fdopen(fd, "rb") as fh:
            fd = -1  # the file object owns it now
            data = fh.read(HEADER_PREFIX)
            if len(data) == HEADER_PREFIX:  # a larger file: check its size before reading it
                try:
                    header = read_header(data)
                except ImageReadError:
                    header = None  # the header is not all in the prefix: decide on the whole
                if header is not None:
                    _check_size(header, max_pixels)
                fh.seek(0)
                data = fh.read(limit + 1)
    except OSError as exc:
        raise ImageReadError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:  # it grew while being read
        raise ImageReadError(f"file too large: over {limit / 1e6:.0f} MB")
    return decode_radiograph(data, max_pixels=max_pixels, target_size=target_size)


#: Bytes read first to find a file's declared size: an uncompressed file far over the pixel
#: budget (a multi-frame DICOM) is refused having read this much, not the whole file.
HEADER_PREFIX = 256 * 1024


def max_file_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Largest file read for a pixel budget: uncompressed 16-bit RGBA (8 bytes a pixel) plus
    16 MB of headers; anything larger cannot be an image within the budget."""
    return 8 * max_pixels + 16 * 2**20
