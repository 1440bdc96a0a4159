"""The prepared dataset's schema, and the one validator every reader goes through.

A dataset file is data from outside: a crafted or damaged one must be a one-line error
when it is opened, not an internal error (or a silent misreading) in the middle of
training. :func:`check_dataset` checks every column the package reads: presence, type,
shape and agreement with the others, the label range, and that nothing is stored outside
the file (HDF5 external storage and external links can read any file on the machine).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import h5py
import numpy as np

from xrayfeat.choices import RESIZE_MODES, SPLITS
from xrayfeat.errors import DatasetError, UsageError

#: The largest stored side a dataset may have (runs.py checks a run's the same way).
MAX_STORED_SIZE = 4096
#: Columns every dataset has: (dtype kind, shape after N); "S" = any string.
COLUMNS = {"images": ("u", None), "labels": ("i", ()), "split": ("S", ()), "path": ("S", ()),
           "patient": ("S", ())}
#: Columns older or hand-made datasets may lack: checked when present.
OPTIONAL_COLUMNS = {"roi": ("i", (4,)), "source_shape": ("i", (2,))}


def require_regular_file(path: Path) -> None:
    """A dataset is a regular file: a FIFO or device named ``.h5`` would block the reader."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path} is a folder, not a dataset file from 'xrayfeat prepare'")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} is not a regular file (a pipe or device?); give a dataset "
                         "file from 'xrayfeat prepare'")


def check_dataset(h5: h5py.File, path: Path) -> tuple[list[str], int, np.ndarray]:
    """``(classes, size, split column)`` of an open dataset; a :class:`DatasetError` naming
    the first thing wrong otherwise."""
    def bad(why: str) -> DatasetError:
        return DatasetError(f"{path} is not a valid xrayfeat dataset ({why}); create one "
                            "with 'xrayfeat prepare'")

    missing = [name for name in COLUMNS if name not in h5]
    if missing or "classes" not in h5.attrs:
        raise DatasetError(f"{path} is not an xrayfeat dataset (missing "
                           f"{', '.join(missing) or 'classes'}); create one with "
                           "'xrayfeat prepare'")
    try:
        classes = json.loads(h5.attrs["classes"])
    except (TypeError, ValueError):
        raise bad("'classes' is not a JSON list") from None
    if (not isinstance(classes, list) or len(classes) < 2
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise bad("'classes' must list two or more distinct class names")
    size = h5.attrs.get("size")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 8 <= size <= MAX_STORED_SIZE:
        raise bad(f"'size' must be the stored side in pixels, got {size!r}")
    size = int(size)
    resize = h5.attrs.get("resize", "stretch")  # datasets before --resize were stretched
    if resize not in RESIZE_MODES:
        raise bad(f"'resize' must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    columns = {**COLUMNS, **{k: v for k, v in OPTIONAL_COLUMNS.items() if k in h5}}
    n = None
    for name, (kind, shape) in columns.items():
        link = h5.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise bad(f"'{name}' is a link to another file")
        ds = h5[name]
        if not isinstance(ds, h5py.Dataset):
            raise bad(f"'{name}' is not a data column")
        if ds.external:
            raise bad(f"'{name}' is stored outside the file")
        if name == "images":
            shape = (size, size)
        is_string = h5py.check_string_dtype(ds.dtype) is not None
        if (kind == "S") != is_string or (kind != "S" and ds.dtype.kind not in kind):
            raise bad(f"'{name}' has the wrong type ({ds.dtype})")
        if name == "images" and ds.dtype != np.uint8:
            raise bad(f"'images' must be 8-bit, got {ds.dtype}")
        if ds.shape[1:] != shape:
            raise bad(f"'{name}' has shape {ds.shape}, expected (N, {', '.join(map(str, shape))})"
                      .replace(", )", ")"))
        if n is not None and ds.shape[0] != n:
            raise bad(f"'{name}' has {ds.shape[0]} rows but 'images' has {n}")
        n = ds.shape[0] if n is None else n
    labels = h5["labels"][:]
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise bad(f"labels must be class indices 0..{len(classes) - 1}, found "
                  f"{int(labels.min())}..{int(labels.max())}")
    splits = h5["split"].asstr()[:]
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise bad(f"unknown split name(s) {', '.join(map(repr, unknown[:3]))}")
    return classes, size, splits
