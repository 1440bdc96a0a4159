"""Where labels, patients and views come from: folder names, a labels table, DICOM headers.

A hospital export is not laid out like the Kermany folders: its patient is in the DICOM
header (PatientID), not in the file name, and its labels usually come as a table. Reading
the patient from the header is what keeps one patient's images out of two splits.
"""

from __future__ import annotations

import csv
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xrayfeat.errors import UsageError

#: Identity fields stored per image (HDF5 column -> DICOM keyword); "" where unknown.
DICOM_FIELDS = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "modality": "Modality",
    "view": "ViewPosition",
    "photometric": "PhotometricInterpretation",
    "body_part": "BodyPartExamined",
}
META_COLUMNS = tuple(DICOM_FIELDS)
#: DICOM modalities that are projection radiographs; anything else is refused by default.
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
TABLE_SPLITS = ("train", "val", "test")


def dicom_identity(path: str | os.PathLike) -> tuple[str, dict[str, str]] | None:
    """``(PatientID, identity fields)`` of a DICOM file, read from its header alone; None for
    a file that is not DICOM, or whose header cannot be read (the decoder reports it)."""
    try:
        # Non-blocking, regular files only: a FIFO named like an image would block open().
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, 132)
    except OSError:
        return None
    finally:
        os.close(fd)
    if head[128:132] != b"DICM":
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PatientID", *DICOM_FIELDS.values()])
    except Exception:  # not installed, or a damaged header: decoding says why, per file
        return None
    fields = {column: " ".join(str(ds.get(keyword, "") or "").split())
              for column, keyword in DICOM_FIELDS.items()}
    fields["modality"] = fields["modality"].upper()
    fields["view"] = fields["view"].upper()
    return " ".join(str(ds.get("PatientID", "") or "").split()), fields


@dataclass(frozen=True)
class TableRow:
    """One row of a labels table."""

    path: Path
    label: str
    patient: str | None
    split: str | None
    view: str | None


def read_labels_table(table: str | os.PathLike, src: str | os.PathLike) -> list[TableRow]:
    """Rows of a labels CSV with columns ``path,label`` and optional ``patient``, ``split``,
    ``view``. Paths are relative to the CSV's folder, else to ``src``. The first bad row is
    a one-line :class:`UsageError` naming its line."""
    table, src = Path(table), Path(src)
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise UsageError(f"{table} has no {' or '.join(missing)} column (needs "
                                 "path,label and optionally patient,split,view)")
            rows = []
            for line, raw in enumerate(reader, start=2):
                row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
                rows.append(_table_row(table, src, line, row))
    except OSError as exc:
        raise UsageError(f"cannot read {table}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{table} is not UTF-8 text") from None
    except csv.Error as exc:
        raise UsageError(f"{table} is not a valid CSV: {exc}") from None
    if not rows:
        raise UsageError(f"{table} has no rows")
    return rows


def _table_row(table: Path, src: Path, line: int, row: dict[str, str]) -> TableRow:
    def bad(why: str) -> UsageError:
        return UsageError(f"{table}, line {line}: {why}")

    if not row.get("path"):
        raise bad("empty path")
    if not row.get("label"):
        raise bad("empty label")
    given = Path(row["path"])
    candidates = [given] if given.is_absolute() else [table.parent / given, src / given]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise bad(f"{row['path']} is not a file (looked beside the table and in {src})")
    split = row.get("split", "").lower() or None
    if split is not None and split not in TABLE_SPLITS:
        raise bad(f"split must be one of {', '.join(TABLE_SPLITS)}, got {row['split']!r}")
    return TableRow(path, row["label"], row.get("patient") or None, split,
                    row.get("view", "").upper() or None)


def compile_patient_regex(pattern: str | None) -> re.Pattern | None:
    """``--patient-regex``: a regular expression whose first group (or whole match) in a
    file name is the patient id."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--patient-regex is not a valid regular expression: {exc}") from None


def parse_views(text: str | None) -> tuple[str, ...] | None:
    """``--views PA,AP`` -> ``("PA", "AP")``."""
    if text is None:
        return None
    views = tuple(v.strip().upper() for v in text.split(",") if v.strip())
    if not views:
        raise UsageError("--views needs at least one view, e.g. --views PA,AP")
    return views


def filter_files(files: list, any_modality: bool,
                 views: Sequence[str] | None) -> tuple[list, list[tuple[str, str]]]:
    """The files (``dataset.LabelledFile``) to prepare, and ``(path, reason)`` for those
    refused by modality or view."""
    kept, refused = [], []
    wanted = {v.upper() for v in views} if views else None
    for f in files:
        modality, view = f.meta.get("modality", ""), f.meta.get("view", "")
        if modality and modality not in RADIOGRAPH_MODALITIES and not any_modality:
            refused.append((str(f.path), f"modality {modality} is not a radiograph "
                            f"({'/'.join(RADIOGRAPH_MODALITIES)}); --any-modality takes it"))
        elif wanted is not None and view not in wanted:
            refused.append((str(f.path), f"view {view or 'not recorded'} is not one of "
                            f"--views {','.join(sorted(wanted))}"))
        else:
            kept.append(f)
    return kept, refused


def check_shared_patients(files: list, allow: bool, min_val_images: int) -> list[str]:
    """Refuse (or, with ``allow``, note) a known patient in two official splits."""
    where: dict[str, set[str]] = {}
    if not any(f.split for f in files):
        return []  # no official splits: validation is cut from train by patient
    # As assign_splits will have it: no split is train, and a val split too small to keep
    # joins train (validation is then cut from train by patient).
    small_val = sum(f.split == "val" for f in files) < min_val_images
    for f in files:
        if f.patient_known:
            split = "train" if f.split is None or (f.split == "val" and small_val) else f.split
            where.setdefault(f.patient, set()).add(split)
    shared = sorted(p for p, s in where.items() if len(s) > 1)
    if not shared:
        return []
    first = shared[0]
    text = (f"{len(shared)} patient(s) are in two official splits (patient {first} is in "
            f"{' and '.join(sorted(where[first]))}): their scores would leak")
    if not allow:
        raise UsageError(f"{text}; fix the splits or pass --allow-shared-patients")
    return [f"warning: {text}"]


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
