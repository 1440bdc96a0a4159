"""Shared fixtures: tiny synthetic radiographs on disk, and the real samples in examples/.

Synthetic images look enough like a chest radiograph for the ROI step to find "lungs": dark
air around a bright body ellipse, two dark lung ellipses inside it, a brighter spine, noise.
PNEUMONIA images get a bright opacity in one lung so the two classes are distinguishable.

Fixtures that return functions (``synthetic_xray``, ``write_image``, ``make_class_folder``)
let later test files build exactly the data they need; ``class_folder`` is a ready-made
two-class folder in the ``SRC/CLASS/*`` layout.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable, Mapping

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "examples" / "chest_xray"

# Tests read the CLI's output as a pipe gets it, whatever the machine running them sets.
# These make Rich (FORCE_COLOR, TTY_COMPATIBLE, TTY_INTERACTIVE) and Typer (PY_COLORS, and
# GITHUB_ACTIONS unless told otherwise) draw for a terminal even into a pipe: colour codes
# in every line, tables cut to 80 columns. Set here, before any test imports the CLI, and
# inherited by the commands the tests run in subprocesses.
for _name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "PY_COLORS"):
    os.environ.pop(_name, None)
os.environ["_TYPER_FORCE_DISABLE_TERMINAL"] = "1"


# --------------------------------------------------------------------------- image makers

def make_synthetic_xray(
    size: int | tuple[int, int] = 128,
    seed: int = 0,
    *,
    opacity: bool = False,
    noise: float = 6.0,
    frame: int = 0,
) -> np.ndarray:
    """A radiograph-like 2-D uint8 image.

    ``size`` is the side, or ``(height, width)``. ``opacity`` adds a bright patch in the left
    lung (a crude "pneumonia"). ``frame`` adds a pure black border that wide on every side.
    The geometry jitters a little with ``seed``; the same arguments give the same image.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    jitter = lambda scale: 1 + rng.uniform(-scale, scale)  # noqa: E731
    img = np.full((h, w), 25, np.float32)  # air outside the body
    cx, cy = w / 2 * jitter(0.03), h / 2 * jitter(0.03)
    cv2.ellipse(img, (round(cx), round(cy)), (round(0.42 * w * jitter(0.05)),
                round(0.46 * h * jitter(0.05))), 0, 0, 360, 175, -1)  # body
    lung_axes = (round(0.14 * w * jitter(0.08)), round(0.28 * h * jitter(0.08)))
    for side in (-1, 1):  # two lungs, darker than soft tissue
        centre = (round(cx + side * 0.19 * w), round(cy - 0.02 * h))
        cv2.ellipse(img, centre, lung_axes, 0, 0, 360, 70, -1)
    cv2.rectangle(img, (round(cx - 0.03 * w), round(cy - 0.4 * h)),
                  (round(cx + 0.03 * w), round(cy + 0.4 * h)), 205, -1)  # spine
    if opacity:
        cv2.circle(img, (round(cx - 0.19 * w), round(cy + 0.08 * h)), max(2, round(0.08 * w)),
                   150, -1)
    img = cv2.GaussianBlur(img, (0, 0), max(0.5, w / 128))
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if frame:
        img[:frame, :] = 0
        img[-frame:, :] = 0
        img[:, :frame] = 0
        img[:, -frame:] = 0
    return img


def write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> Path:
    """Write ``image`` with OpenCV, format from the extension (JPEG quality ``quality``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), image, params):
        raise RuntimeError(f"cv2.imwrite failed for {path}")
    return path


def dicom_dataset():
    """An empty secondary-capture DICOM dataset with its file meta and UIDs filled in.

    Raises ImportError without pydicom; callers add the image attributes they test.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def one_error_line(result) -> str:
    """Exit 2, exactly one non-empty line on stderr that starts with 'error:', no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines
    assert "Traceback" not in result.output
    return lines[0]


def copy_moving_split(src: Path, dst: Path, split: str) -> Path:
    """Copy a prepared dataset with every ``split`` image relabelled as train."""
    import h5py

    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as h5:
        splits = h5["split"].asstr()[:]
        splits[splits == split] = "train"
        h5["split"][:] = splits.astype(object)
    return dst


def write_dicom_file(
    path: Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
    slope: float | None = None, intercept: float | None = None,
    window: tuple[float, float] | None = None, rows_cols: tuple[int, int] | None = None,
) -> Path:
    """A minimal, valid Part-10 DICOM file (pydicom 3 API), 16-bit stored in 12 bits."""
    pydicom = pytest.importorskip("pydicom")
    ds = dicom_dataset()
    ds.Modality = "CR"
    ds.PatientID = "TEST"
    rows, cols = rows_cols or pixels.shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels is not None:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows == rows
    return path


_patient_counter = itertools.count(1)


def make_class_folder_at(
    root: str | Path,
    *,
    n_per_class: int = 12,
    size: int = 96,
    splits: Mapping[str, int] | None = None,
    classes: tuple[str, ...] = ("NORMAL", "PNEUMONIA"),
    ext: str = ".jpeg",
    seed: int = 0,
) -> Path:
    """Fill ``root`` with synthetic radiographs in a Kermany-like layout and return it.

    Without ``splits``: ``root/CLASS/*`` with ``n_per_class`` images a class. With
    ``splits={"train": 12, "test": 3}``: ``root/SPLIT/CLASS/*`` with that many a class.
    File names carry unique patient ids the way Kermany's do: NORMAL gets
    ``IM-0007-0001.jpeg``, any other class ``person7_bacteria_7.jpeg``.
    Every class other than the first is drawn with an opacity.
    """
    root = Path(root)
    layout = {None: n_per_class} if splits is None else dict(splits)
    for split, count in layout.items():
        for class_index, name in enumerate(classes):
            folder = root / name if split is None else root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pid = next(_patient_counter)
                stem = (f"IM-{pid:04d}-0001" if name.upper() == "NORMAL"
                        else f"person{pid}_bacteria_{pid + 1000}")
                image = make_synthetic_xray(size, seed=seed + pid, opacity=class_index > 0)
                write_image(folder / f"{stem}{ext}", image)
    return root


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """The real sample radiographs: examples/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}."""
    if not EXAMPLES_DIR.is_dir():
        pytest.skip(f"{EXAMPLES_DIR} is missing")
    return EXAMPLES_DIR


@pytest.fixture(scope="session")
def example_images(examples_dir: Path) -> list[Path]:
    """Every sample radiograph, sorted."""
    return sorted(examples_dir.rglob("*.jpeg"))


@pytest.fixture
def synthetic_xray() -> Callable[..., np.ndarray]:
    """``synthetic_xray(size=128, seed=0, *, opacity=False, noise=6.0, frame=0)`` -> uint8."""
    return make_synthetic_xray


@pytest.fixture
def write_image_file() -> Callable[..., Path]:
    """``write_image_file(path, array, quality=95)``: write with OpenCV, return the path."""
    return write_image


@pytest.fixture
def write_dicom() -> Callable[..., Path]:
    """``write_dicom(path, pixels, *, photometric, slope, intercept, window, rows_cols)``.

    Skips the test when pydicom is not installed.
    """
    pytest.importorskip("pydicom", reason="pydicom is needed to write DICOM files")
    return write_dicom_file


@pytest.fixture
def make_class_folder(tmp_path: Path) -> Callable[..., Path]:
    """``make_class_folder(name="src", **kw)``: a synthetic class folder below tmp_path.

    Keywords as :func:`make_class_folder_at` (n_per_class, size, splits, classes, ext, seed).
    """

    def make(name: str = "src", **kwargs) -> Path:
        return make_class_folder_at(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def class_folder(make_class_folder) -> Path:
    """tmp/src/{NORMAL,PNEUMONIA}/*.jpeg, 12 synthetic 96 px images a class."""
    return make_class_folder("src")


# --------------------------------------------------------------------------- trained runs

@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A real run directory: 2 epochs of a 32 px MiniVGGNet on the bundled examples.

    Trained once per test session (~15 s on 2 cores) through the library's own ``train``,
    so every command that consumes a run is tested on what ``train`` really writes.
    """
    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import prepare_dataset
    from xrayfeat.training import train

    root = tmp_path_factory.mktemp("trained")
    data = root / "examples.h5"
    prepare_dataset(EXAMPLES_DIR, data, workers=1, val_fraction=0.25, seed=1)
    run = root / "run"
    train(data, run, TrainConfig(input_size=32, epochs=2, batch_size=16, width=0.5))
    return run


@pytest.fixture(scope="session")
def examples_h5(trained_run: Path) -> Path:
    """The prepared examples dataset the ``trained_run`` was trained on (val and test splits)."""
    return trained_run.parent / "examples.h5"
