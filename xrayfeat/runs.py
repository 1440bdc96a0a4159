"""A run directory that describes itself: later commands need nothing but its path.

Layout written by ``train``::

    RUN/model.keras         best epoch by validation ROC AUC, float32 weights alone (what
                            predict/evaluate load)
    RUN/last.keras          last finished epoch, with optimizer state, for --resume
    RUN/state.json          where training stands (epoch, best AUC, patience counters)
    RUN/config.json         every setting, classes, preprocessing, data hash, versions
    RUN/validation.json     operating threshold (chosen on validation), its 95 % interval, metrics
    RUN/history.csv         one row per epoch
    RUN/training_curves.png loss and validation AUC per epoch
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from xrayfeat.atomic import check_not_interrupted, temporary_sibling, write_text
from xrayfeat.choices import RESIZE_MODES
from xrayfeat.csvout import csv_text
from xrayfeat.dataset import open_dataset
from xrayfeat.errors import DatasetError, RunError, UsageError
from xrayfeat.preprocessing import PreprocessSettings
from xrayfeat.roi import RoiSettings
from xrayfeat.version import __version__

RUN_FORMAT = "xrayfeat-run/1"
MODEL_FILE = "model.keras"
LAST_FILE = "last.keras"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
VALIDATION_FILE = "validation.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value: Any):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None


@dataclass
class Run:
    """A trained run, as loaded from its directory."""
    path: Path
    config: RunConfig  # config.json
    validation: dict  # validation.json (threshold and metrics); {} if training never finished

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def threshold(self) -> float | None:
        """Operating threshold on the positive-class probability (binary runs)."""
        value = self.validation.get("threshold")
        return None if value is None else float(value)

    @property
    def preprocess(self) -> PreprocessSettings:
        """The preprocessing the training data went through: reused for raw files."""
        return self.config.preprocess

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def load_model(self):
        """Load the best model with Keras' safe mode: a run is data and never runs code."""
        model = load_model_safely(self.model_path)
        size = self.preprocess.size
        if tuple(model.input_shape[1:]) != (size, size, 1):
            raise RunError(
                f"{self.model_path} takes input {tuple(model.input_shape[1:])} but "
                f"{CONFIG_FILE} says {size} x {size} x 1 stored images; the run is "
                "inconsistent: retrain it"
            )
        n_outputs = model.output_shape[-1]
        if n_outputs != len(self.classes):
            raise RunError(
                f"{self.model_path} predicts {n_outputs} classes but {CONFIG_FILE} names "
                f"{len(self.classes)} ({', '.join(self.classes)}); the run is inconsistent: "
                "retrain it"
            )
        return model


def load_model_safely(path: Path, *, compile: bool = False):
    """``keras.models.load_model`` with ``safe_mode=True``, errors as :class:`RunError`.

    ``compile=True`` restores the optimizer state too (``train --resume``).
    """
    import keras

    if not path.is_file():
        raise RunError(f"{path} is missing: the run has no trained model (did training finish?)")
    try:
        return keras.models.load_model(path, compile=compile, safe_mode=True)
    except ValueError as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text or "lambda" in text:
            raise RunError(
                f"{path} contains code (a Lambda layer); refusing to load it in safe mode"
            ) from None
        raise RunError(f"cannot load {path}: {text.splitlines()[0] if text else exc}") from None
    except Exception as exc:
        text = str(exc)
        if "Could not locate" in text:  # a class or function Keras does not know: code
            raise RunError(
                f"{path} refers to code that is not part of Keras (a custom class or "
                "function); refusing to load it in safe mode"
            ) from None
        first = (text.splitlines() or [""])[0]  # Keras messages run over many lines
        raise RunError(f"cannot load {path}: {type(exc).__name__}: {first}") from None


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory written by ``train``; one-line errors for anything else."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} does not exist")
    if not path.is_dir() or not (path / CONFIG_FILE).is_file():
        raise RunError(f"{path} is not a run directory (no {CONFIG_FILE}); create one with "
                       "'xrayfeat train'")
    config = read_json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise RunError(f"{path / CONFIG_FILE} is not a run configuration; retrain the run")
    if config.get("format") != RUN_FORMAT:
        raise RunError(
            f"{path} was written by another version of xrayfeat (format "
            f"{config.get('format')!r}, this version reads {RUN_FORMAT!r}); retrain it"
        )
    if not (path / MODEL_FILE).is_file():
        raise RunError(f"{path} has no {MODEL_FILE}: training did not finish an epoch")
    settings = RunConfig.from_dict(config, path / CONFIG_FILE)
    validation_path = path / VALIDATION_FILE
    validation = read_json(validation_path) if validation_path.is_file() else {}
    threshold = validation.get("threshold") if isinstance(validation, dict) else "?"
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and not isinstance(threshold, bool)
                                      and 0 <= threshold <= 1):
        raise RunError(f"{validation_path} is damaged (the threshold must be a number between "
                       "0 and 1); retrain the run or restore the file")
    return Run(path=path, config=settings, validation=validation)


@dataclass(frozen=True)
class DataProvenance:
    """The prepared dataset a run was trained on."""

    path: str
    sha256: str | None
    splits: dict[str, int]
    label_mode: str = "folders"


@dataclass(frozen=True)
class RunConfig:
    """``config.json``, typed: what a run was trained on and how.

    Written once by ``train`` (:func:`write_run_config`) and read back by
    :meth:`from_dict`, which checks it (a run directory is data from outside: a damaged or
    hand-edited file is a one-line error) and brings older runs up to date, in one place.
    """

    classes: list[str]
    preprocess: PreprocessSettings
    train: dict[str, Any]  # the TrainConfig settings, as saved (checked again on --resume)
    data: DataProvenance | None
    precision: str | None = None  # what precision "auto" became on the training machine
    class_weights: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. an ensemble's members

    @property
    def positive_class(self) -> str | None:
        return self.classes[1] if len(self.classes) == 2 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT, "created": self.created, "classes": self.classes,
            "positive_class": self.positive_class, "train": self.train,
            "precision": self.precision, "class_weights": self.class_weights,
            "preprocess": {"size": self.preprocess.size, "roi": self.preprocess.roi,
                           "resize": self.preprocess.resize,
                           "roi_settings": asdict(self.preprocess.roi_settings)},
            "data": None if self.data is None else asdict(self.data),
            "versions": self.versions, **self.extra,
        }

    @classmethod
    def from_dict(cls, config: dict, path: Path) -> "RunConfig":
        """Check ``config`` (read from ``path``) and migrate what older runs lack."""
        def damaged(what: str):
            raise RunError(f"{path} is damaged ({what}); retrain the run or restore the file")

        classes = config.get("classes")
        if (not isinstance(classes, list) or len(classes) < 2
                or len(set(classes)) != len(classes)
                or not all(isinstance(c, str) and c for c in classes)):
            damaged("'classes' must name two or more distinct classes")
        p = config.get("preprocess")
        if not isinstance(p, dict):
            damaged("no 'preprocess' settings")
        size = p.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
            damaged(f"'preprocess.size' must be a number of pixels, got {size!r}")
        if not isinstance(p.get("roi"), bool):
            damaged("'preprocess.roi' must be true or false")
        resize = p.get("resize", "stretch")  # migration: runs before --resize stretched
        if resize not in RESIZE_MODES:
            damaged(f"'preprocess.resize' must be one of {', '.join(RESIZE_MODES)}")
        roi = p.get("roi_settings", {})
        known = {f.name for f in fields(RoiSettings)}
        if (not isinstance(roi, dict) or set(roi) - known
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in roi.values())):
            damaged(f"'preprocess.roi_settings' must hold numbers for {', '.join(sorted(known))}")
        train = config.get("train", {})
        if not isinstance(train, dict):
            damaged("'train' must be a table of settings")
        data = config.get("data")
        provenance = None
        if isinstance(data, dict):
            provenance = DataProvenance(
                path=str(data.get("path", "")), sha256=data.get("sha256"),
                splits=dict(data.get("splits") or {}),
                label_mode=str(data.get("label_mode", "folders")))
        known_keys = {"format", "created", "classes", "positive_class", "train", "precision",
                      "class_weights", "preprocess", "data", "versions"}
        return cls(
            classes=list(classes),
            preprocess=PreprocessSettings(size=size, roi=p["roi"], resize=resize,
                                          roi_settings=RoiSettings(**roi)),
            train=dict(train), data=provenance, precision=config.get("precision"),
            class_weights=dict(config.get("class_weights") or {}),
            versions=dict(config.get("versions") or {}), created=str(config.get("created", "")),
            extra={k: v for k, v in config.items() if k not in known_keys})


def write_run_config(out: Path, config: RunConfig) -> None:
    """Write ``out/config.json`` (atomically)."""
    write_json(out / CONFIG_FILE, config.to_dict())


def check_dataset_matches(run: Run, info) -> None:
    """Refuse a prepared dataset the run cannot read as it was trained.

    ``info`` is a :class:`xrayfeat.dataset.DatasetInfo`. Classes must match (in order,
    ignoring case) and the stored image size must equal the run's, since the model's input
    is the stored image.
    """

    if [c.casefold() for c in info.classes] != [c.casefold() for c in run.classes]:
        raise DatasetError(f"classes differ: {info.path} has {', '.join(info.classes)} but "
                           f"run {run.path} was trained on {', '.join(run.classes)}")
    if info.size != run.preprocess.size:
        raise UsageError(f"{info.path} stores {info.size} px images but run {run.path} takes "
                         f"{run.preprocess.size} px; prepare the data with --size "
                         f"{run.preprocess.size}")


def open_run_on_split(run_path: str | os.PathLike, data: str | os.PathLike, split: str):
    """Load a run and the prepared dataset it will read one split of, checked together.

    Returns ``(run, info, n)`` with ``n`` the split's image count; one-line errors for a
    missing run, a file that is not a dataset, an empty split or mismatched classes/size.
    """

    run = load_run(run_path)
    info = open_dataset(data)
    n = info.require_split(split)
    check_dataset_matches(run, info)
    return run, info, n


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read a megabyte at a time (datasets and models are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Validate ``--out``; True when it holds a previous run that --overwrite will replace."""
    if resume:
        missing = [f for f in (CONFIG_FILE, STATE_FILE, LAST_FILE) if not (out / f).is_file()]
        if missing:
            raise UsageError(f"cannot --resume {out}: {', '.join(missing)} missing "
                             "(no finished epoch to resume from)")
        return False
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out} exists and is not empty; pass --resume to continue it "
                             "or --overwrite to replace it")
        return True
    return False


def swap_in(new: Path, out: Path) -> None:
    """Replace the run in ``out`` by the finished run in ``new`` (two renames)."""
    check_not_interrupted()
    backup = temporary_sibling(out, ".previous")
    backup.unlink()
    os.replace(out, backup)
    os.replace(new, out)
    shutil.rmtree(backup, ignore_errors=True)


def versions() -> dict[str, str]:
    """Package versions, and which CPU kernels TensorFlow runs, for a run's config.json."""
    import cv2
    import h5py
    import keras
    import sklearn
    import tensorflow as tf

    return {"xrayfeat": __version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "tensorflow_kernels": tensorflow_kernels(),
            "keras": keras.__version__, "numpy": np.__version__,
            "h5py": h5py.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__}


def tensorflow_kernels() -> str:
    """``oneDNN`` or ``Eigen``: which CPU kernels this process's TensorFlow runs (they round
    differently, so a run records it)."""
    from tensorflow.python.util import _pywrap_util_port  # no public API says it

    return "oneDNN" if _pywrap_util_port.IsMklEnabled() else "Eigen"


#: The training state inside ``last.keras`` (a zip file Keras loads without looking at it).
STATE_MEMBER = "xrayfeat_state.json"


def embed_state(checkpoint: Path, state: dict) -> None:
    """Add the training state to a saved checkpoint, so the two can never disagree.

    Written as two files, a kill between ``last.keras`` and ``state.json`` left epoch k's
    weights with epoch k-1's state, and the resumed run replayed an epoch (seen in a test).
    """
    with zipfile.ZipFile(checkpoint, "a") as archive:
        archive.writestr(STATE_MEMBER, json.dumps(state))


def resume_state(out: Path) -> dict:
    """The state that belongs to ``out/last.keras`` (``state.json`` for older runs)."""
    try:
        with zipfile.ZipFile(out / LAST_FILE) as archive:
            state = json.loads(archive.read(STATE_MEMBER))
    except KeyError:  # a run from before the state was embedded
        state = read_json(out / STATE_FILE)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise RunError(f"cannot resume {out}: {out / LAST_FILE} is damaged ({exc})") from None
    numbers = ("epoch", "best_epoch", "wait", "lr_wait")
    if (not isinstance(state, dict) or not isinstance(state.get("history"), list)
            or not all(isinstance(state.get(k), int) and state[k] >= 0 for k in numbers)
            or not isinstance(state.get("best_val_auc"), (int, float))):
        raise RunError(f"cannot resume {out}: its training state is damaged (epoch, history "
                       "or counters missing); start a new run")
    return state


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    write_text(path, csv_text(rows, list(rows[0])))
