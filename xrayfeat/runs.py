"""A run directory that describes itself: later commands need nothing but its path.

Layout written by ``train``::

    RUN/model.keras         best epoch by validation ROC AUC (what predict/evaluate load)
    RUN/last.keras          last finished epoch, with optimizer state, for --resume
    RUN/state.json          where training stands (epoch, best AUC, patience counters)
    RUN/config.json         every setting, classes, preprocessing, data hash, versions
    RUN/validation.json     operating threshold (Youden's J on validation) and metrics
    RUN/history.csv         one row per epoch
    RUN/training_curves.png loss and validation AUC per epoch
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrayfeat.atomic import atomic_output
from xrayfeat.errors import RunError
from xrayfeat.preprocessing import PreprocessSettings
from xrayfeat.roi import RoiSettings

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
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


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
    config: dict  # the whole config.json
    validation: dict  # validation.json (threshold and metrics); {} if training never finished

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def threshold(self) -> float | None:
        """Operating threshold on the positive-class probability (binary runs)."""
        value = self.validation.get("threshold")
        return None if value is None else float(value)

    @property
    def preprocess(self) -> PreprocessSettings:
        """The preprocessing the training data went through: reused for raw files."""
        p = self.config["preprocess"]
        return PreprocessSettings(size=int(p["size"]), roi=bool(p["roi"]),
                                  roi_settings=RoiSettings(**p.get("roi_settings", {})))

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def load_model(self):
        """Load the best model with Keras' safe mode: a run is data and never runs code."""
        return load_model_safely(self.model_path)


def load_model_safely(path: Path):
    """``keras.models.load_model`` with ``safe_mode=True``, errors as :class:`RunError`."""
    import keras

    if not path.is_file():
        raise RunError(f"{path} is missing: the run has no trained model (did training finish?)")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text or "lambda" in text:
            raise RunError(
                f"{path} contains code (a Lambda layer); refusing to load it in safe mode"
            ) from None
        raise RunError(f"cannot load {path}: {text.splitlines()[0] if text else exc}") from None
    except Exception as exc:
        raise RunError(f"cannot load {path}: {type(exc).__name__}: {exc}") from None


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory written by ``train``; one-line errors for anything else."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} does not exist")
    if not path.is_dir() or not (path / CONFIG_FILE).is_file():
        raise RunError(f"{path} is not a run directory (no {CONFIG_FILE}); create one with "
                       "'xrayfeat train'")
    config = read_json(path / CONFIG_FILE)
    if config.get("format") != RUN_FORMAT:
        raise RunError(
            f"{path} was written by another version of xrayfeat (format "
            f"{config.get('format')!r}, this version reads {RUN_FORMAT!r}); retrain it"
        )
    if not (path / MODEL_FILE).is_file():
        raise RunError(f"{path} has no {MODEL_FILE}: training did not finish an epoch")
    validation_path = path / VALIDATION_FILE
    validation = read_json(validation_path) if validation_path.is_file() else {}
    return Run(path=path, config=config, validation=validation)
