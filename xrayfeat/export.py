"""``xrayfeat export``: a trained run as a SavedModel, an ONNX file or a LiteRT model, with a
``preprocessing.json`` that says exactly what the model expects.

The exported graph takes the stored images (``(n, S, S, 1)`` float32, 0-255, after this
package's ROI crop and resize: see ``preprocessing.json``) and returns class probabilities,
like ``model.keras``. One layer is rewritten on the way: Keras' antialiased resize (the
model's first layer) is TensorFlow's ``ScaleAndTranslate``, which neither ONNX nor LiteRT
has; it is a separable linear filter, so the export computes the same resize as two matrix
products with the kernel's own weights (tested equal to it). The operating threshold and
the crop stay outside the model, as in every command: they are in ``preprocessing.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrayfeat.atomic import atomic_output
from xrayfeat.errors import UsageError
from xrayfeat.roi import ROI_ALGORITHM_VERSION
from xrayfeat.runs import file_sha256, load_run, write_json
from xrayfeat.version import __version__

#: The file (or folder) each of :data:`xrayfeat.choices.EXPORT_FORMATS` goes to in ``--out``.
EXPORT_TARGETS = {"saved_model": "saved_model", "onnx": "model.onnx", "litert": "model.tflite"}
#: Which pip extra each format's converter comes from (``pip install "xrayfeat[export]"``).
_NEEDS = {"onnx": ("tf2onnx", "onnxruntime"), "litert": ("ai_edge_litert",)}
PREPROCESSING_FILE = "preprocessing.json"


@dataclass
class ExportResult:
    """What ``export`` wrote."""

    out: Path
    format: str
    model: Path
    preprocessing: Path
    seconds: float
    files: list[str] = field(default_factory=list)


def resize_matrix(source: int, target: int) -> np.ndarray:
    """``(target, source)`` weights of Keras' antialiased bilinear resize along one axis:
    resizing an image equals ``A @ image @ A.T`` (the kernel is separable)."""
    import tensorflow as tf

    identity = np.eye(source, dtype=np.float32)[None, :, :, None]  # rows pass through
    rows = tf.image.resize(identity, (target, source), method="bilinear", antialias=True)
    return np.asarray(rows)[0, :, :, 0]


def deployable(model):
    """``model`` with every antialiased Resizing layer replaced by its matrix form, always
    in inference mode; the other layers are the same objects (same weights)."""
    return _in_inference_mode(matrix_resized(model))


def matrix_resized(model):
    """``model`` with every antialiased Resizing layer replaced by its matrix form
    (:func:`resize_matrix`); the other layers are the same objects (same weights)."""
    import keras

    class MatrixResize(keras.layers.Layer):
        """Resize (n, S, S, c) to (n, T, T, c) as ``A @ x @ A.T`` per channel."""

        def __init__(self, matrix: np.ndarray, **kwargs):
            super().__init__(**kwargs)
            # A weight, not a captured tensor: exporters freeze weights into constants.
            self.matrix = self.add_weight(shape=matrix.shape, trainable=False, name="matrix",
                                          initializer=keras.initializers.Constant(matrix))

        def call(self, x):
            x = keras.ops.transpose(x, (0, 3, 1, 2))  # channels first: matmul on H, W
            x = keras.ops.matmul(keras.ops.matmul(self.matrix, x),
                                 keras.ops.transpose(self.matrix))
            return keras.ops.transpose(x, (0, 2, 3, 1))

    def rewrite(layer):
        if isinstance(layer, keras.layers.Resizing):
            config = layer.get_config()
            source = int(layer.input.shape[1])
            if (config["interpolation"] != "bilinear" or config["crop_to_aspect_ratio"]
                    or config["pad_to_aspect_ratio"] or config["height"] != config["width"]
                    or layer.input.shape[1] != layer.input.shape[2]):
                raise UsageError(f"cannot export layer {layer.name}: only a square bilinear "
                                 "resize is rewritten for ONNX and LiteRT")
            if not config["antialias"] and config["height"] < source:
                raise UsageError(f"cannot export layer {layer.name} without antialiasing")
            return MatrixResize(resize_matrix(source, config["height"]), name=layer.name)
        return layer

    # clone_model rebuilds the graph; returning a layer itself reuses it, weights and all.
    return keras.models.clone_model(model, clone_function=rewrite)


def preprocessing_spec(run) -> dict[str, Any]:
    """Everything a runtime needs to feed the exported model as ``predict`` feeds it."""
    p = run.preprocess
    return {
        "xrayfeat_version": __version__,
        "run": str(run.path.resolve()),
        "model_sha256": file_sha256(run.model_path),
        "input": {"shape": [None, p.size, p.size, 1], "dtype": "float32",
                  "range": [0, 255], "layout": "NHWC",
                  "meaning": "the stored image: grayscale radiograph, ROI-cropped and "
                             "resized as below, 0 = black; not scaled (the model scales)"},
        "preprocessing": {
            "decode": "8-bit grayscale (DICOM: modality and VOI LUT applied, MONOCHROME1 "
                      "inverted; 16-bit images scaled by their own range)",
            "roi": p.roi, "roi_algorithm": "xrayfeat.roi.find_roi",
            "roi_algorithm_version": ROI_ALGORITHM_VERSION,
            "roi_settings": run.config.to_dict()["preprocess"]["roi_settings"],
            "resize": p.resize, "stored_size": p.size,
            "interpolation": "area when shrinking, else bilinear (OpenCV)",
        },
        "output": {"classes": run.classes, "kind": "softmax probabilities"},
        "decision": {
            "rule": "positive (classes[1]) when probability of classes[1] >= threshold"
                    if len(run.classes) == 2 else "argmax",
            "threshold": run.threshold,
            "threshold_method": run.validation.get("threshold_method"),
            "threshold_ci": run.validation.get("threshold_ci"),
        },
    }


def export_run(run_path: str | os.PathLike, out: str | os.PathLike, fmt: str = "saved_model",
               *, overwrite: bool = False) -> ExportResult:
    """Write ``run_path``'s model in ``fmt`` and ``preprocessing.json`` into the folder
    ``out`` (atomically: the folder appears complete or not at all)."""
    started = time.perf_counter()
    if fmt not in EXPORT_TARGETS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_TARGETS)}, got {fmt!r}")
    for module in _NEEDS.get(fmt, ()):
        try:
            __import__(module)
        except ImportError:
            raise UsageError(f"exporting to {fmt} needs {module}: pip install "
                             "'xrayfeat[export]'") from None
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    run = load_run(run_path)
    model = run.load_model()
    graph = deployable(model) if fmt in ("onnx", "litert") else _in_inference_mode(model)
    size = run.preprocess.size
    graph(np.zeros((1, size, size, 1), np.float32))  # built: the ONNX exporter requires it
    with atomic_output(out, directory=True) as tmp:
        target = tmp / EXPORT_TARGETS[fmt]
        keras_format = {"saved_model": "tf_saved_model"}.get(fmt, fmt)
        graph.export(str(target), format=keras_format, verbose=False)
        write_json(tmp / PREPROCESSING_FILE, preprocessing_spec(run))
    files = sorted(str(p) for p in out.rglob("*") if p.is_file())
    return ExportResult(out=out, format=fmt, model=out / EXPORT_TARGETS[fmt],
                        preprocessing=out / PREPROCESSING_FILE,
                        seconds=time.perf_counter() - started, files=files)


def _in_inference_mode(model):
    """The model behind one tensor in and one out, always in inference mode.

    Keras' exporters trace ``model(x)``, with ``training`` unset. On a run loaded from
    disk that is not inference: its batch-norm layers then normalise with the batch's own
    statistics (measured: probabilities off by up to 0.11, and changing with the batch), so
    the export calls the model with ``training=False`` explicitly, as ``predict`` does.
    """
    import keras

    class Inference(keras.Model):
        def __init__(self, inner, **kwargs):
            super().__init__(**kwargs)
            self.inner = inner

        def call(self, images):
            return self.inner(images, training=False)

    return Inference(model, name=model.name)


__all__ = ["EXPORT_TARGETS", "ExportResult", "deployable", "export_run", "matrix_resized",
           "preprocessing_spec", "resize_matrix"]
