"""Labelled radiograph folders and the prepared HDF5 dataset.

Finding images, reading patient ids from Kermany file names, cutting patient-grouped
validation splits, and ``prepare``: stream every image through the one preprocessing path
into a chunked, compressed HDF5 file, decoded on all cores, with memory flat in the number
of images, written to a temporary file and renamed only when complete.

HDF5 schema (also in the README):
    images        (N, S, S) uint8   ROI-cropped, resized radiographs
    labels        (N,) int32        index into the ``classes`` attribute
    split         (N,) str          "train", "val" or "test"
    path          (N,) str          source file path
    patient       (N,) str          patient/study id (file stem when unknown)
    roi           (N, 4) int32      crop box x0, y0, x1, y1 in source pixels
    source_shape  (N, 2) int32      height, width of the source file
    study_uid, series_uid, modality, view, photometric, body_part
                  (N,) str          DICOM identity fields, "" when unknown (format 2 on)
    attrs: classes (JSON list), size, roi (bool), roi_settings (JSON), resize ("stretch"
           or "pad"; absent = stretch), xrayfeat_version, label_mode,
           format ("xrayfeat-dataset/2")
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np

from xrayfeat.atomic import atomic_output, h5_writer, locks_output, remove_stale_temporaries
from xrayfeat.choices import LABEL_MODES, RESIZE_MODES, SPLITS
from xrayfeat.decoding import map_prepare
from xrayfeat.errors import EXIT_FAILURES, DatasetError, ImageReadError, UsageError
from xrayfeat.imaging import looks_like_image_path
from xrayfeat.preprocessing import PreprocessSettings
from xrayfeat.schema import MAX_STORED_SIZE, check_dataset, require_regular_file
from xrayfeat.sources import (META_COLUMNS, LabelledFile, check_shared_patients,
                              compile_patient_regex, dicom_identity, filter_files,
                              read_labels_table)
from xrayfeat.splits import MIN_VAL_IMAGES, assign_splits, check_splits_possible
from xrayfeat.version import __version__

#: Version 2 added the DICOM identity columns (sources.META_COLUMNS); version 1 files,
#: which lack them, are read the same way.
DATASET_FORMAT = "xrayfeat-dataset/2"
#: Rows buffered before one write per column: 64 images of 224 px are 3 MB.
WRITE_BLOCK = 64
#: gzip level of the stored images: ISA-L's level 2 (xrayfeat.decoding.deflate), 5x faster
#: than zlib's level 1 and within 7 % of its size (zlib's level 1 is about as small as 6 on
#: radiographs). The decoders compress (xrayfeat.decoding.map_prepare), the writer only
#: copies chunks in.
DEFLATE_LEVEL = 2

_PERSON = re.compile(r"person(\d+)_", re.IGNORECASE)
_STUDY = re.compile(r"(?:^|-)IM-(\d+)-", re.IGNORECASE)
_SUBTYPE = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)


@dataclass
class PrepareResult:
    """What ``prepare`` did: returned to the CLI for its summary."""

    out: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    skipped: list[tuple[str, str]]  # (path, reason)
    ignored: int  # files not looked at (unsupported extension)
    seconds: float
    val_cut_from_train: bool
    settings: dict = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)  # split -> distinct patients
    notes: list[str] = field(default_factory=list)  # warnings for the user


def patient_id(filename: str) -> str:
    """Patient or study id from a Kermany file name; the file stem when there is none.

    ``person1234_bacteria_3167.jpeg`` -> ``1234``; ``IM-0115-0001.jpeg`` and
    ``NORMAL2-IM-0115-0001.jpeg`` -> ``0115``.
    """
    if m := _PERSON.search(filename):
        return m.group(1)
    if m := _STUDY.search(filename):
        return m.group(1)
    return Path(filename).stem


def iter_image_files(root: Path) -> Iterator[tuple[Path, bool]]:
    """Yield ``(path, considered)`` for every non-hidden file below ``root``, recursively.

    Symlinked folders are followed once; a symlink loop is skipped, not followed forever.
    ``considered`` is False for files whose extension is not an image's.
    """
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a loop (or a second link to the same folder)
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            yield path, looks_like_image_path(path)


def _class_order(names: Sequence[str]) -> list[str]:
    """NORMAL first (label 0), then the rest alphabetically: positive classes after it."""
    return sorted(names, key=lambda n: (n.upper() != "NORMAL", n.upper()))


def _subtype(path: Path, class_name: str) -> str:
    if class_name.upper() == "NORMAL":
        return "NORMAL"
    m = _SUBTYPE.search(path.name)
    if not m:
        raise DatasetError(
            f"--labels kermany-subtype: cannot tell bacteria from virus in {path.name!r}"
        )
    return m.group(1).upper()


def find_labelled_files(
    src: Path, label_mode: str = "folders", *, patient_regex: str | None = None
) -> tuple[list[LabelledFile], list[str], int]:
    """Index ``src`` laid out as ``SRC/{train,val,test}/CLASS/*`` or ``SRC/CLASS/*``, or
    the files a labels table names (``label_mode`` a ``.csv`` path; see xrayfeat.sources).

    Returns the files, the class names in label order, and the count of ignored files.
    Class folder names match case-insensitively across splits. The patient of each file
    is, in order: the table's ``patient``, the DICOM PatientID, ``patient_regex``'s match
    in the file name, the Kermany file-name convention, the file stem.
    """
    regex = compile_patient_regex(patient_regex)
    if label_mode.lower().endswith(".csv"):
        files, ignored = _files_from_table(Path(label_mode), src), 0
    else:
        files, ignored = _files_from_folders(src, label_mode)
    files = [_with_identity(f, regex) for f in files]
    classes = _class_order(sorted({f.class_name for f in files}))
    if len(classes) < 2:
        children = sorted(p for p in src.iterdir() if _is_data_dir(p)) if src.is_dir() else []
        inner = next((c for c in children if c.name == classes[0]), None)
        if inner is not None and any(_is_data_dir(p) and p.name.lower() in SPLITS
                                     for p in inner.iterdir()):
            # The Kaggle zip unpacks to chest_xray/chest_xray/{train,val,test}/...
            raise UsageError(f"{src} holds the dataset one folder down: point at {inner}")
        raise DatasetError(
            f"only one class ({classes[0]}) in {src}: a classifier needs at least two class folders"
        )
    return files, classes, ignored


def _files_from_table(table: Path, src: Path) -> list[LabelledFile]:
    rows = read_labels_table(table, src)
    return [LabelledFile(r.path, r.label, r.split, r.patient or patient_id(r.path.name),
                         patient_known=r.patient is not None,
                         meta={"view": r.view} if r.view else {}) for r in rows]


def _with_identity(f: LabelledFile, regex) -> LabelledFile:
    """``f`` with its DICOM identity fields, and its patient from the best source."""
    identity = dicom_identity(f.path)
    meta = {column: "" for column in META_COLUMNS}
    if identity is not None:
        meta.update(identity[1])
    meta.update({k: v for k, v in f.meta.items() if v})  # the table's view wins
    patient, known = f.patient, f.patient_known
    if not known and identity is not None and identity[0]:
        patient, known = identity[0], True
    elif not known and regex is not None and (match := regex.search(f.path.name)):
        patient, known = (match.group(1) if match.groups() else match.group(0)), True
    return LabelledFile(f.path, f.class_name, f.split, patient, known, meta)


def _files_from_folders(src: Path, label_mode: str) -> tuple[list[LabelledFile], int]:
    if label_mode not in LABEL_MODES:
        raise UsageError(f"unknown --labels {label_mode!r}; use one of {', '.join(LABEL_MODES)}"
                         " or a labels .csv")
    if not src.exists():
        raise UsageError(f"{src} does not exist")
    if not src.is_dir():
        raise UsageError(f"{src} is not a folder of class folders")
    children = sorted(p for p in src.iterdir() if _is_data_dir(p))
    split_dirs = {p.name.lower(): p for p in children if p.name.lower() in SPLITS}
    roots: list[tuple[str | None, Path]]
    roots = [(s, p) for s, p in split_dirs.items()] if split_dirs else [(None, src)]
    display: dict[str, str] = {}  # case-folded class name -> name as first seen
    files: list[LabelledFile] = []
    ignored = 0
    for split, root in roots:
        for class_dir in sorted(p for p in root.iterdir() if _is_data_dir(p)):
            key = class_dir.name.casefold()
            name = display.setdefault(key, class_dir.name)
            for path, considered in iter_image_files(class_dir):
                if not considered:
                    ignored += 1
                    continue
                label = name if label_mode == "folders" else _subtype(path, name)
                files.append(LabelledFile(path, label, split, patient_id(path.name)))
    if not files:
        raise DatasetError(f"no images found in {src} (expected SRC/CLASS/*.jpeg folders)")
    return files, ignored


def _is_data_dir(path: Path) -> bool:
    """A folder that may hold classes or images: not hidden, not a zip's ``__MACOSX``."""
    return path.is_dir() and not path.name.startswith(".") and path.name != "__MACOSX"


# One streaming pass: decode, buffer, write, count, with the HDF5 file open throughout;
# kept whole so the order in which the output appears (atomically, at the end) is plain.
@locks_output  # a second command writing the same output is refused
def prepare_dataset(
    src: Path,
    out: Path,
    *,
    settings: PreprocessSettings = PreprocessSettings(),
    val_fraction: float = 0.1,
    seed: int = 42,
    label_mode: str = "folders",
    patient_regex: str | None = None,
    any_modality: bool = False,
    views: Sequence[str] | None = None,
    allow_shared_patients: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    workers: int | None = None,
    pool: str = "thread",
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> PrepareResult:
    """Turn a labelled folder (or a labels table: ``label_mode`` a ``.csv``) into an HDF5
    dataset (schema in the module docstring).

    Bad files are skipped and listed, or stop the run with ``strict``; so are DICOM files
    of a modality other than CR/DX/DR (unless ``any_modality``) and, with ``views``, files
    whose view is not one of them. A patient known by identity (DICOM, table, regex) in two
    official splits is refused unless ``allow_shared_patients``. ``out`` appears only when
    complete; an existing ``out`` is refused unless ``overwrite``, and is replaced only at
    the very end, so an interrupted run leaves it as it was. Files decode in threads
    (``pool="thread"``, measured faster to start and leaner) or, with ``pool="process"``,
    in worker processes that isolate a crashing decoder (see :data:`xrayfeat.choices.DECODE_POOLS`).
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UsageError(f"{out} is a folder; give a file name such as data/kermany.h5")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if not 32 <= settings.size <= MAX_STORED_SIZE:
        raise UsageError(f"--size must be between 32 and {MAX_STORED_SIZE}, got {settings.size}")
    if settings.resize not in RESIZE_MODES:
        raise UsageError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got "
                         f"{settings.resize!r}")
    files, classes, ignored = find_labelled_files(Path(src), label_mode,
                                                  patient_regex=patient_regex)
    files, refused = filter_files(files, any_modality, views)
    if not files:
        raise DatasetError(f"every file in {src} was refused: {refused[0][1]}")
    notes = check_shared_patients(files, allow_shared_patients, MIN_VAL_IMAGES)
    # Cutting validation by patient is a Python loop over patients (about 1 s for 5,000
    # files): it runs in a thread while the images decode, and the split column is
    # written last. Its errors (too few patients) are raised at once, before any decoding.
    check_splits_possible(files, classes, val_fraction)
    split_thread = ThreadPoolExecutor(1, thread_name_prefix="xrayfeat-split")
    split_job = split_thread.submit(assign_splits, files, classes, val_fraction, seed)
    split_thread.shutdown(wait=False)
    label_of = {c: i for i, c in enumerate(classes)}
    if on_start:
        on_start(len(files))
    size = settings.size
    skipped: list[tuple[str, str]] = list(refused)
    counts: dict[str, Counter] = {}
    text = h5py.string_dtype()
    remove_stale_temporaries(out.parent)  # half-written datasets of killed earlier runs
    with atomic_output(out) as tmp, h5_writer(tmp) as h5:
        n_max = len(files)

        def column(name, shape, dtype, **kw):
            return h5.create_dataset(name, shape=(0, *shape), maxshape=(n_max, *shape),
                                     dtype=dtype, chunks=(min(n_max, 256), *shape), **kw)

        images = h5.create_dataset(
            "images", shape=(0, size, size), maxshape=(n_max, size, size), dtype=np.uint8,
            chunks=(1, size, size), compression="gzip", compression_opts=DEFLATE_LEVEL,
            shuffle=False, rdcc_nbytes=1,  # chunks are written once: cache none (0 would mean the default)
        )
        columns = {
            "images": images,
            "labels": column("labels", (), np.int32),
            "path": column("path", (), text),
            "patient": column("patient", (), text),
            "roi": column("roi", (4,), np.int32),
            "source_shape": column("source_shape", (2,), np.int32),
            **{name: column(name, (), text) for name in META_COLUMNS},
        }
        # Rows are buffered and written a block at a time: one h5py call per column per
        # block instead of seven per image keeps the writer off the decoders' cores.
        block: dict[str, list] = {name: [] for name in columns}
        n = 0
        kept: list[int] = []  # file index of every row written

        def flush() -> None:
            nonlocal n
            count = len(block["labels"])
            if not count:
                return
            for name, ds in columns.items():
                ds.resize(n + count, axis=0)
                if name == "images":  # one image a chunk, deflated by the decoders already
                    for row, deflated in enumerate(block[name], start=n):
                        ds.id.write_direct_chunk((row, 0, 0), deflated)
                else:
                    ds[n : n + count] = np.asarray(block[name], dtype=object if ds.dtype == text
                                                   else ds.dtype)
                block[name].clear()
            n += count

        for index, prepared, error in map_prepare([f.path for f in files], settings, workers,
                                                       pool=pool, deflate_level=DEFLATE_LEVEL):
            if on_progress:
                on_progress(1)
            f = files[index]
            if error is not None:
                if strict:
                    stop = ImageReadError(f"{f.path}: {error} (--strict stops at the first bad file)")
                    stop.exit_code = EXIT_FAILURES  # documented: inputs failed under --strict
                    raise stop
                skipped.append((str(f.path), error))
                continue
            kept.append(index)
            for name, value in (("images", prepared.deflated), ("labels", label_of[f.class_name]),
                                ("path", str(f.path)),
                                ("patient", f.patient), ("roi", prepared.roi.as_tuple()),
                                ("source_shape", prepared.source_shape),
                                *((c, f.meta.get(c, "")) for c in META_COLUMNS)):
                block[name].append(value)
            if len(block["labels"]) == WRITE_BLOCK:
                flush()
        flush()
        if n == 0:
            raise DatasetError(f"none of the {len(files)} files in {src} could be read")
        splits, val_cut = split_job.result()
        h5.create_dataset("split", data=np.array([splits[i] for i in kept], dtype=object),
                          dtype=text, chunks=(min(n, 256),))
        for index in kept:
            counts.setdefault(splits[index], Counter())[files[index].class_name] += 1
        h5.attrs["classes"] = json.dumps(classes)
        h5.attrs["size"] = size
        h5.attrs["roi"] = settings.roi
        h5.attrs["roi_settings"] = json.dumps(asdict(settings.roi_settings))
        h5.attrs["resize"] = settings.resize
        h5.attrs["label_mode"] = label_mode
        h5.attrs["xrayfeat_version"] = __version__
        h5.attrs["format"] = DATASET_FORMAT
    unread = {path for path, _ in skipped}
    patients = {split: len({f.patient for f, s in zip(files, splits)
                            if s == split and str(f.path) not in unread}) for split in SPLITS}
    return PrepareResult(
        out=out,
        classes=classes,
        counts={s: {c: counts.get(s, Counter())[c] for c in classes} for s in SPLITS if s in counts},
        skipped=skipped,
        ignored=ignored,
        seconds=time.perf_counter() - started,
        val_cut_from_train=val_cut,
        settings={"size": size, "roi": settings.roi, "resize": settings.resize,
                  "val_fraction": val_fraction, "seed": seed,
                  "label_mode": label_mode},
        patients={s: n for s, n in patients.items() if n},
        notes=notes,
    )


# --- reading a prepared dataset -------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What a prepared HDF5 file holds, read from its attributes and columns."""

    path: Path
    classes: list[str]
    size: int
    roi: bool
    split_counts: dict[str, int]  # split -> images
    label_mode: str = "folders"
    resize: str = "stretch"  # how non-square crops became square (preprocessing.RESIZE_MODES)

    def require_split(self, split: str) -> int:
        """Number of images in ``split``; a one-line error when there are none."""
        n = self.split_counts.get(split, 0)
        if n == 0:
            have = ", ".join(f"{s} ({c})" for s, c in self.split_counts.items()) or "none"
            raise DatasetError(f"{self.path} has no '{split}' images; splits present: {have}")
        return n


def open_dataset(path: str | os.PathLike) -> DatasetInfo:
    """Check that ``path`` is a valid dataset written by ``prepare`` (xrayfeat.schema) and
    describe it."""
    path = Path(path)
    require_regular_file(path)
    try:
        with h5py.File(path, "r") as h5:
            classes, size, splits = check_dataset(h5, path)
            names, counts = np.unique(splits, return_counts=True)
            return DatasetInfo(
                path=path,
                classes=classes,
                size=size,
                roi=bool(h5.attrs.get("roi", True)),
                split_counts={str(s): int(c) for s, c in zip(names, counts)},
                label_mode=str(h5.attrs.get("label_mode", "folders")),
                resize=str(h5.attrs.get("resize", "stretch")),
            )
    except OSError as exc:
        raise DatasetError(f"{path} is not an HDF5 dataset ({exc})") from None


@dataclass
class SplitArrays:
    """One split held in memory: the stored images and their metadata."""

    images: np.ndarray  # (n, S, S) uint8
    labels: np.ndarray  # (n,) int
    patients: np.ndarray  # (n,) str
    paths: np.ndarray  # (n,) str


def split_indices(path: Path, split: str) -> np.ndarray:
    """Row numbers of ``split`` in the dataset, in file order."""
    with h5py.File(path, "r") as h5:
        return np.flatnonzero(h5["split"].asstr()[:] == split)


def load_split(path: Path, split: str, with_images: bool = True) -> SplitArrays:
    """Read one split into memory (use :func:`iter_split` for splits larger than RAM)."""
    index = split_indices(path, split)
    with h5py.File(path, "r") as h5:
        return SplitArrays(
            images=(_read_rows(h5["images"], index) if with_images
                    else np.empty((0,), np.uint8)),
            labels=h5["labels"][:][index].astype(np.int64),
            patients=h5["patient"].asstr()[:][index],
            paths=h5["path"].asstr()[:][index],
        )


def iter_split(
    path: Path, split: str, batch_size: int, order: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(images, labels)`` batches of a split from disk; memory is one batch.

    ``order`` (a permutation of the split's rows) shuffles at the granularity of rows, and
    batches keep that order, so they are exactly the batches of the same order in memory.
    """
    index = split_indices(path, split)
    if order is not None:
        index = index[order]
    with h5py.File(path, "r") as h5:
        images, all_labels = h5["images"], h5["labels"][:]
        for start in range(0, len(index), batch_size):
            rows = index[start : start + batch_size]
            yield _read_rows(images, rows), all_labels[rows].astype(np.int64)


def _read_rows(images: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``images[rows]`` in the order given, one read per run of consecutive rows.

    A split's rows in file order are long runs (train) or scattered rows (a 10 % validation
    split); reading each run alone reads no row of another split: the Kermany validation
    split in 0.15 s against 1.2 s through 512-row slabs of the whole file, the train split
    in the same time (BENCHMARKS.md, "The real epoch against the benchmark's"). h5py's
    fancy indexing took 6x longer than one read per row (60 against 10 ms per 32 rows).
    """
    batch = np.empty((len(rows), *images.shape[1:]), images.dtype)
    if not len(rows):
        return batch
    # Where a run ends: the next row is not this one's successor.
    ends = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.r_[0, ends], np.r_[ends, len(rows)]):
        first = int(rows[start])
        images.read_direct(batch, np.s_[first : first + (stop - start)], np.s_[start:stop])
    return batch
