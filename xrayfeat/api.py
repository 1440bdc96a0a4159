"""The public Python API: what a notebook uses, and what the command line calls.

    import xrayfeat

    run = xrayfeat.load_run("runs/mvgg")
    result = run.predict(["a.jpeg", "b.dcm"])       # or a list of 2-D arrays
    result.labels, result.probabilities, result.rois
    maps = run.gradcam(["a.jpeg"])                  # (n, S, S) in [0, 1]
    acts = run.activations(["a.jpeg"], ["block1_conv1"])

``prepare``, ``train``, ``evaluate`` and ``predict`` take the command-line options as
keyword arguments (``xrayfeat prepare --val-fraction 0.2`` is
``xrayfeat.prepare(..., val_fraction=0.2)``). Every radiograph, file or array, goes through
the one preprocessing path (:mod:`xrayfeat.preprocessing`) and every binary decision
through the one rule (:func:`xrayfeat.metrics.decide`), exactly as the commands do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from xrayfeat import runs
from xrayfeat.cams import gradcam_maps
from xrayfeat.choices import CAM_METHODS
from xrayfeat.config import TrainConfig, load_train_config
from xrayfeat.dataset import PrepareResult, prepare_dataset
from xrayfeat.errors import ImageReadError, UsageError
from xrayfeat.evaluation import EvaluationResult, evaluate_runs
from xrayfeat.export import ExportResult, export_run
from xrayfeat.imaging import to_grayscale, to_uint8
from xrayfeat.layers import ActivationModel, conv_layers
from xrayfeat.metrics import decide, operating_threshold
from xrayfeat.prediction import PredictSummary
from xrayfeat.prediction import predict as predict_files_to
from xrayfeat.preprocessing import PreprocessSettings, prepare_array, prepare_file
from xrayfeat.roi import Roi
from xrayfeat.sources import parse_views
from xrayfeat.training import TrainResult
from xrayfeat.training import train as train_run
from xrayfeat.tta import check_views, predict_batch

#: What :meth:`Run.predict` and friends accept: file paths, or decoded images (2-D
#: grayscale, or 3-D with channels last in BGR order as OpenCV gives them; 8-bit as they
#: are, any other numeric type scaled to 0-255 by its own range, as 16-bit files are).
Images = Sequence[Union[str, os.PathLike, np.ndarray]]


@dataclass
class Prediction:
    """What :meth:`Run.predict` returns, one entry per image, in input order."""

    classes: list[str]
    probabilities: np.ndarray  # (n, classes) float64
    label_indices: np.ndarray  # (n,) int: the decision (threshold for binary runs)
    probability: np.ndarray  # (n,) the positive class's (binary) or the predicted class's
    threshold: float | None  # the operating threshold used (binary runs)
    rois: list[Roi]  # crop box of each image, in its own pixel coordinates
    images: np.ndarray  # (n, S, S) uint8: what the model saw

    @property
    def labels(self) -> list[str]:
        """The predicted class names."""
        return [self.classes[i] for i in self.label_indices]


class Run:
    """A trained run directory, loaded once; every method returns arrays.

    The model is loaded on first use (Keras safe mode: a run is data, never code).
    """

    def __init__(self, run: runs.Run):
        self._run = run
        self._model = None

    def __repr__(self) -> str:
        return f"xrayfeat.Run({str(self.path)!r}, classes={self.classes})"

    @property
    def path(self) -> Path:
        return self._run.path

    @property
    def classes(self) -> list[str]:
        return self._run.classes

    @property
    def threshold(self) -> float | None:
        """The operating threshold chosen on validation (binary runs), else ``None``."""
        return self._run.threshold

    @property
    def config(self) -> runs.RunConfig:
        """The run's ``config.json``, typed: settings, classes, preprocessing, data hash,
        versions."""
        return self._run.config

    @property
    def validation(self) -> dict[str, Any]:
        """The run's ``validation.json``: threshold, how it was chosen, validation metrics."""
        return self._run.validation

    @property
    def model(self):
        """The Keras model (float32 weights; it takes stored ``(n, S, S, 1)`` images)."""
        if self._model is None:
            self._model = self._run.load_model()
        return self._model

    def prepare_images(self, images: Images) -> tuple[np.ndarray, list[Roi]]:
        """Each image as the model sees it, ``(n, S, S)`` uint8, and its ROI box: files
        are read and cropped exactly as ``predict`` does; arrays are cropped the same way.
        An unreadable file raises :class:`~xrayfeat.errors.ImageReadError` naming it."""
        settings = self._run.preprocess
        prepared = [_prepare_one(image, settings) for image in images]
        if not prepared:
            raise UsageError("no images given")
        return np.stack([p.image for p in prepared]), [p.roi for p in prepared]

    def predict(self, images: Images, *, threshold: float | None = None,
                tta: int = 1) -> Prediction:
        """Probabilities and decisions for ``images`` (paths or arrays). ``threshold``
        overrides the run's own; ``tta`` averages that many fixed views."""
        check_views(tta)
        stored, rois = self.prepare_images(images)
        probs = predict_batch(self.model, stored[..., None], tta)
        threshold = self.threshold if threshold is None else threshold
        if len(self.classes) == 2:
            threshold = operating_threshold(threshold)
        labels, reported = decide(probs, self.classes, threshold)
        return Prediction(classes=self.classes, probabilities=probs,
                          label_indices=np.asarray(labels), probability=np.asarray(reported),
                          threshold=threshold if len(self.classes) == 2 else None, rois=rois,
                          images=stored)

    def gradcam(self, images: Images, class_: str | int | None = None,
                method: str = "gradcam") -> np.ndarray:
        """Class-activation maps ``(n, S, S)`` in [0, 1], on the stored image grid, for
        ``class_`` (a name or index; by default each image's predicted class, as
        ``predict`` decides it). ``method``: one of ``CAM_METHODS``."""
        if method not in CAM_METHODS:
            raise UsageError(f"unknown CAM method {method!r}; use one of {', '.join(CAM_METHODS)}")
        prediction = self.predict(images)
        if class_ is None:
            targets = prediction.label_indices
        else:
            targets = np.full(len(prediction.images), self._class_index(class_))
        return gradcam_maps(self.model, prediction.images[..., None].astype(np.float32),
                            list(targets), method)

    def activations(self, images: Images,
                    layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Each named layer's output for ``images``, ``{layer: (n, h, w, channels)}``
        (default: every Conv2D layer), from one forward pass."""
        names = list(layers) if layers is not None else [c.name for c in conv_layers(self.model)]
        known = {layer.name for layer in self.model.layers}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"no layer named {', '.join(unknown)}; layers: "
                             f"{', '.join(sorted(known))}")
        stored, _ = self.prepare_images(images)
        outputs, _ = ActivationModel(self.model, names)(stored[..., None])
        return outputs

    def evaluate(self, data: str | os.PathLike, **options: Any) -> EvaluationResult:
        """:func:`evaluate` of this run alone."""
        return evaluate([self.path], data, **options)

    def _class_index(self, class_: str | int) -> int:
        if isinstance(class_, (int, np.integer)) and 0 <= class_ < len(self.classes):
            return int(class_)
        folded = [c.casefold() for c in self.classes]
        if isinstance(class_, str) and class_.casefold() in folded:
            return folded.index(class_.casefold())
        raise UsageError(f"unknown class {class_!r}; this run has {', '.join(self.classes)}")


def _prepare_one(image, settings: PreprocessSettings):
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
            raise UsageError(f"an image array must be 2-D (or 3-D, channels last), got shape "
                             f"{image.shape}")
        gray = to_grayscale(to_uint8(image))
        return prepare_array(np.ascontiguousarray(gray), settings)
    try:
        return prepare_file(image, settings)
    except ImageReadError as exc:
        raise ImageReadError(f"{image}: {exc}") from None


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory written by :func:`train` (or ``xrayfeat ensemble``)."""
    return Run(runs.load_run(path))


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, size: int = 224,
            roi: bool = True, resize: str = "stretch", val_fraction: float = 0.1,
            seed: int = 42, labels: str = "folders", patient_regex: str | None = None,
            any_modality: bool = False, views: str | Sequence[str] | None = None,
            allow_shared_patients: bool = False, overwrite: bool = False,
            strict: bool = False, workers: int | None = None, isolate: bool = False,
            on_start=None, on_progress=None) -> PrepareResult:
    """``xrayfeat prepare``: a folder (or a labels CSV, ``labels="x.csv"``) into an HDF5
    dataset. Keyword arguments are the command's options."""
    if isinstance(views, str):
        views = parse_views(views)
    return prepare_dataset(
        Path(src), Path(out), settings=PreprocessSettings(size=size, roi=roi, resize=resize),
        val_fraction=val_fraction, seed=seed, label_mode=labels, patient_regex=patient_regex,
        any_modality=any_modality, views=views, allow_shared_patients=allow_shared_patients,
        overwrite=overwrite, strict=strict, workers=workers,
        pool="process" if isolate else "thread", on_start=on_start, on_progress=on_progress)


def train(data: str | os.PathLike, out: str | os.PathLike, *,
          config: str | os.PathLike | TrainConfig | None = None, resume: bool = False,
          overwrite: bool = False, reporter=None, **settings: Any) -> TrainResult:
    """``xrayfeat train``: train a MiniVGGNet on a prepared dataset (or a raw folder) into
    the run directory ``out``. ``config`` is a TOML file or a :class:`TrainConfig`;
    ``settings`` are the command's options (``epochs=5, input_size=96``), checked as the
    command checks them."""
    if isinstance(config, TrainConfig):
        base = config
        config = load_train_config(None, {**base.to_dict(), **settings})
    else:
        config = load_train_config(Path(config) if config is not None else None, settings)
    return train_run(Path(data), Path(out), config, resume=resume, overwrite=overwrite,
                     reporter=reporter)


def evaluate(runs_: Sequence[str | os.PathLike] | str | os.PathLike,
             data: str | os.PathLike, **options: Any) -> EvaluationResult:
    """``xrayfeat evaluate``: one or more runs on a prepared dataset's split or a labelled
    folder; ``options`` are the command's (``split``, ``out``, ``threshold``, ``n_boot``,
    ``tta``, ...)."""
    if isinstance(runs_, (str, os.PathLike)):
        runs_ = [runs_]
    return evaluate_runs([Path(r) for r in runs_], Path(data), **options)


def export(run: str | os.PathLike, out: str | os.PathLike, format: str = "saved_model",
           *, overwrite: bool = False) -> ExportResult:
    """``xrayfeat export``: the run's model as a SavedModel, ONNX or LiteRT file, with
    ``preprocessing.json`` (see :mod:`xrayfeat.export`)."""
    return export_run(run, out, format, overwrite=overwrite)


def predict(run: str | os.PathLike, inputs: Sequence[str | os.PathLike] | str,
            **options: Any) -> PredictSummary:
    """``xrayfeat predict``: every radiograph in ``inputs`` (files, folders, globs), rows
    written to ``out`` (CSV, JSONL or JSON); ``options`` are the command's."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return predict_files_to(run, [str(i) for i in inputs], **options)
