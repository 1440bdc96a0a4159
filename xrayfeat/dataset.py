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

import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np

from xrayfeat.version import __version__
from xrayfeat.atomic import atomic_output, h5_writer, locks_output, remove_stale_temporaries
from xrayfeat.choices import DECODE_POOLS, LABEL_MODES, RESIZE_MODES, SPLITS
from xrayfeat.errors import (EXIT_FAILURES, DatasetError, ImageReadError, UsageError,
                             XrayfeatError)
from xrayfeat.imaging import looks_like_image_path
from xrayfeat.preprocessing import PreprocessSettings, prepare_file
from xrayfeat.schema import MAX_STORED_SIZE, check_dataset, require_regular_file
from xrayfeat.sources import (META_COLUMNS, check_shared_patients, compile_patient_regex,
                              dicom_identity, filter_files, read_labels_table)

#: Version 2 added the DICOM identity columns (sources.META_COLUMNS); version 1 files,
#: which lack them, are read the same way.
DATASET_FORMAT = "xrayfeat-dataset/2"
#: The official Kermany val split has 16 images; below this a validation split is cut from train.
MIN_VAL_IMAGES = 50
#: Rows buffered before one write per column: 64 images of 224 px are 3 MB.
WRITE_BLOCK = 64
#: gzip level of the stored images: level 1 is about as small as 6 on radiographs and
#: several times cheaper. The decoders compress (xrayfeat.dataset.map_prepare), the writer
#: only copies chunks in.
DEFLATE_LEVEL = 1

_PERSON = re.compile(r"person(\d+)_", re.IGNORECASE)
_STUDY = re.compile(r"(?:^|-)IM-(\d+)-", re.IGNORECASE)
_SUBTYPE = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)


@dataclass(frozen=True)
class LabelledFile:
    """One image found on disk, before decoding."""

    path: Path
    class_name: str
    split: str | None  # from the folder layout or table; None when there is none
    patient: str
    # The patient is a real identity (DICOM PatientID, a labels table, --patient-regex),
    # not a guess from a Kermany file name: only then is a patient in two official splits
    # known to be a leak (Kermany numbers its children per split).
    patient_known: bool = False
    meta: dict = field(default_factory=dict, hash=False)  # sources.META_COLUMNS, "" unknown


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


def grouped_split(
    labels: np.ndarray, groups: Sequence[str], fraction: float, seed: int,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Boolean mask of a validation split: about ``fraction`` of the images, stratified by
    class, with every patient wholly inside or outside it (no leakage)."""
    n_splits = _validation_folds(labels, groups, fraction, class_names)
    labels = np.asarray(labels)
    classes = set(labels.tolist())
    for val_index in stratified_group_folds(labels, np.asarray(groups), n_splits, seed):
        mask = np.zeros(len(labels), bool)
        mask[val_index] = True
        if set(labels[mask]) == classes == set(labels[~mask]):
            break  # the first fold holding every class on both sides
    return mask


def stratified_group_folds(labels: np.ndarray, groups: np.ndarray, n_splits: int,
                           seed: int) -> Iterator[np.ndarray]:
    """The validation indices of each fold of scikit-learn's ``StratifiedGroupKFold(n_splits,
    shuffle=True, random_state=seed)`` (its algorithm as of 1.6, tested equal to it).

    Written out rather than imported for two measured reasons: importing scikit-learn
    takes 1.2-2.6 s, more than preparing 150 radiographs on two cores; and a dataset's
    validation split must not change when scikit-learn changes its implementation (its
    shuffling was corrected in 1.6, which moved every seeded split). Each patient in turn
    (most class-skewed first, ties in seeded random order) joins the fold where the
    per-class shares across folds spread least, the smaller fold on a tie.
    """
    _, y_inv, y_cnt = np.unique(labels, return_inverse=True, return_counts=True)
    _, groups_inv = np.unique(groups, return_inverse=True)
    n_groups = int(groups_inv.max()) + 1
    per_group = np.zeros((n_groups, len(y_cnt)))
    np.add.at(per_group, (groups_inv, y_inv), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)
    per_group = per_group[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(n_groups)
    groups_inv = inv_perm[groups_inv]
    per_fold = np.zeros((n_splits, len(y_cnt)))
    fold_of_group = np.empty(n_groups, int)
    for group in np.argsort(-np.std(per_group, axis=1), kind="stable"):
        counts = per_group[group]
        best, best_eval, best_size = None, np.inf, np.inf
        for i in range(n_splits):
            per_fold[i] += counts
            spread = np.mean(np.std(per_fold / y_cnt.reshape(1, -1), axis=0))
            per_fold[i] -= counts
            size = np.sum(per_fold[i])
            if spread < best_eval or (np.isclose(spread, best_eval) and size < best_size):
                best, best_eval, best_size = i, spread, size
        per_fold[best] += counts
        fold_of_group[group] = best
    fold_of_image = fold_of_group[groups_inv]
    for i in range(n_splits):
        yield np.flatnonzero(fold_of_image == i)


def _validation_folds(labels, groups, fraction: float, class_names=None) -> int:
    """How many folds :func:`grouped_split` cuts; a one-line error when it cannot cut any."""
    if not 0 < fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {fraction}")
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    patients = {int(c): len(set(groups[labels == c])) for c in np.unique(labels)}
    fewest = min(patients.values())
    if fewest < 2:
        scarce = ", ".join(class_names[c] if class_names else f"class index {c}"
                           for c, n in patients.items() if n < 2)
        raise UsageError(f"a validation split needs at least 2 patients of every class (one "
                         f"for validation, one for training); {scarce} has 1: add images or "
                         "give a val/ folder")
    # Small folders: fewer folds than 1 / fraction, so every class can appear in each fold
    # (a larger validation share, rather than scikit-learn's error).
    return min(max(2, round(1 / fraction)), fewest)


def assign_splits(
    files: Sequence[LabelledFile], classes: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], bool]:
    """The split of every file, and whether validation was cut from train.

    Official split folders are kept; when there is no val split, or one under
    ``MIN_VAL_IMAGES`` images, its images join train and val is cut from train by patient.
    """
    splits, train_idx, labels, groups = _train_pool(files, classes)
    if train_idx is None:
        return splits, False
    val_mask = grouped_split(labels, groups, val_fraction, seed, class_names=classes)
    for i in train_idx[val_mask]:
        splits[i] = "val"
    return splits, True


def check_splits_possible(files: Sequence[LabelledFile], classes: Sequence[str],
                          val_fraction: float) -> None:
    """Raise at once the error :func:`assign_splits` would raise (it runs in the background
    while images decode, and would otherwise report it only at the end)."""
    _, train_idx, labels, groups = _train_pool(files, classes)
    if train_idx is not None:
        _validation_folds(labels, groups, val_fraction, class_names=classes)


def _train_pool(files, classes):
    """``(splits, train indices, their labels, their patients)``; the last three are
    ``None`` when an official val split of ``MIN_VAL_IMAGES`` or more is kept."""
    splits = [f.split or "train" for f in files]
    if splits.count("val") >= MIN_VAL_IMAGES:
        return splits, None, None, None
    splits = ["train" if s == "val" else s for s in splits]
    train_idx = np.array([i for i, s in enumerate(splits) if s == "train"])
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[files[i].class_name] for i in train_idx])
    groups = np.asarray([files[i].patient for i in train_idx])
    return splits, train_idx, labels, groups


def _prepare_worker(args: tuple[int, str, PreprocessSettings, int | None]):
    """Runs in a worker: decode and prepare one file (and deflate the image at
    ``deflate_level``, when given); errors come back as text."""
    index, path, settings, deflate_level = args
    try:
        prepared = prepare_file(path, settings)
    except XrayfeatError as exc:
        return index, None, str(exc)
    except Exception as exc:  # a decoder bug on one hostile file must not stop the run
        return index, None, f"unreadable: {type(exc).__name__}: {exc}"
    if deflate_level is not None:
        prepared = replace(prepared, deflated=zlib.compress(prepared.image.tobytes(),
                                                            deflate_level))
    return index, prepared, None


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one decode per core; OpenCV's own threads would oversubscribe


def _init_pool_worker() -> None:
    import signal

    _init_worker()
    # Ctrl-C is the parent's to handle: it stops handing out work and lets in-flight
    # chunks finish (see map_prepare), so a worker process must not die of it mid-result.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


#: The error row of a file whose decoding process died on it twice (a decoder crash on
#: that file, or the out-of-memory killer).
WORKER_DIED = "the decoding process died on this file (a decoder crash, or killed)"


POOLS = DECODE_POOLS  # see xrayfeat.choices


def _executor(workers: int, pool: str = "process"):
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if pool == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="xrayfeat-decode")
    # Spawned, not forked: safe after TensorFlow has started its threads.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_pool_worker)


@contextlib.contextmanager
def _opencv_threads(n: int):
    """OpenCV's own thread count, set for a block and restored: decoding threads of ours
    each running OpenCV's parallel loops would oversubscribe the cores."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _retry_alone(chunk: list) -> list:
    """A chunk lost with a dead worker, run again in a process of its own; if that dies
    too, the chunk's files become error rows and the run goes on."""
    from concurrent.futures.process import BrokenProcessPool

    executor = _executor(1)
    try:
        return executor.submit(_prepare_chunk, chunk).result()
    except BrokenProcessPool:
        return [(task[0], None, WORKER_DIED) for task in chunk]
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def map_prepare(
    paths: Sequence[str], settings: PreprocessSettings, workers: int | None = None,
    chunksize: int = 8, pool: str = "process", deflate_level: int | None = None,
) -> Iterator[tuple[int, object, str | None]]:
    """Prepare files on all cores, yielding ``(index, PreparedImage | None, error)`` in order.

    Results stream: only a few chunks per worker are in flight, so memory does not grow
    with the number of files. A worker that dies (``kill -9``, the out-of-memory killer, a
    decoder crash) costs only the chunks in flight: the pool notices at once
    (concurrent.futures marks it broken), each lost chunk runs again alone, and a chunk
    that kills its process twice becomes error rows. ``pool`` is one of :data:`POOLS`;
    with ``thread`` nothing is isolated (a crash is the whole command's). With
    ``deflate_level``, each image also comes back zlib-compressed (``deflated``), so the
    HDF5 writer's compression runs on every core instead of the writer's one.
    """
    if pool not in POOLS:
        raise UsageError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if pool == "thread" and (workers or 2) > 1:
        with _opencv_threads(1):
            yield from _map_prepare(paths, settings, workers, chunksize, pool, deflate_level)
        return
    yield from _map_prepare(paths, settings, workers, chunksize, pool, deflate_level)


def _map_prepare(paths, settings, workers, chunksize, pool, deflate_level):
    from concurrent.futures.process import BrokenProcessPool

    workers = workers or os.cpu_count() or 1
    tasks = ((i, str(p), settings, deflate_level) for i, p in enumerate(paths))
    if workers == 1:
        _init_worker()
        yield from map(_prepare_worker, tasks)
        return
    # A window of 2 chunks a worker, refilled as each is read: workers never run far
    # ahead of a slower consumer (the HDF5 writer), so memory is bounded.
    chunks = iter(lambda: list(itertools.islice(tasks, chunksize)), [])
    executor = _executor(workers, pool)
    window: collections.deque = collections.deque()

    def refill() -> None:
        for chunk in itertools.islice(chunks, 2 * workers - len(window)):
            try:
                window.append((chunk, executor.submit(_prepare_chunk, chunk)))
            except BrokenProcessPool:  # a worker died since: the chunk is lost unstarted
                window.append((chunk, None))

    try:
        refill()
        while window:
            chunk, future = window.popleft()
            try:
                if future is None:
                    raise BrokenProcessPool
                done = future.result()
            except BrokenProcessPool:
                # Every chunk in flight was lost with the pool: rerun each alone, in order.
                lost = [chunk] + [c for c, _ in window]
                window.clear()
                executor.shutdown(wait=False, cancel_futures=True)
                for retried in map(_retry_alone, lost):
                    yield from retried
                executor = _executor(workers, pool)
                refill()
                continue
            refill()
            yield from done
    finally:
        # A consumer that stops early (an error, --strict, Ctrl-C) waits at most a minute
        # for the few chunks in flight, then stops the workers outright.
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 60
        in_flight = [future for _, future in window if future is not None]
        for future in in_flight:
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive() and any(not f.done() for f in in_flight):
                process.kill()  # stuck on one file for a minute: no public API but kill


def _prepare_chunk(chunk: list[tuple[int, str, PreprocessSettings, int | None]]):
    return [_prepare_worker(task) for task in chunk]


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
    in worker processes that isolate a crashing decoder (see :data:`POOLS`).
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
    # The validation cut needs scikit-learn, whose import alone takes 1-2 s: it runs in a
    # thread while the images decode, and the split column is written last.
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
        size = int(h5.attrs["size"])
        images = np.empty((len(index), size, size), np.uint8) if with_images else np.empty((0,))
        if with_images:
            # Read contiguous slabs and pick the split's rows: ~7x faster than asking h5py
            # for scattered rows one chunk at a time.
            done = 0
            for slab in range(0, int(index[-1]) + 1 if len(index) else 0, 512):
                rows = index[(index >= slab) & (index < slab + 512)]
                if len(rows):
                    block = h5["images"][slab : int(rows[-1]) + 1]
                    images[done : done + len(rows)] = block[rows - slab]
                    done += len(rows)
        return SplitArrays(
            images=images,
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
    """``images[rows]`` in the order given: one slab read for consecutive rows, else one read
    per row (h5py's fancy indexing took 6x longer than this: 60 vs 10 ms per 32 rows)."""
    if len(rows) and np.all(np.diff(rows) == 1):
        return images[int(rows[0]) : int(rows[-1]) + 1]
    batch = np.empty((len(rows), *images.shape[1:]), images.dtype)
    for k, row in enumerate(rows):
        images.read_direct(batch, np.s_[int(row)], np.s_[k])
    return batch
