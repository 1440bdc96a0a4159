"""Class-activation maps: Grad-CAM, Grad-CAM++ and Score-CAM, as arrays and as overlays.

The maps come from tf-keras-vis, with the softmax replaced by a linear output
(``ReplaceToLinear``) so the score is the class logit, at the last Conv2D layer (of every
member, for an ensemble: the maps are averaged); they are resized to the stored image size
and scaled to [0, 1] per image.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xrayfeat.choices import CAM_METHODS
from xrayfeat.errors import RunError, UsageError
from xrayfeat.layer_figures import plot_cam_overlay
from xrayfeat.filenames import inside, safe_component, shorten, unique_stems
from xrayfeat.layers import conv_layers

#: tf-keras-vis visualizers per model and method, built once (each clones the model).
_VISUALIZERS: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


#: File-name tag of each CAM method (``<stem>_<tag>.png``); Grad-CAM is always written.
CAM_TAGS = {"gradcam": "gradcam", "gradcam++": "gradcampp", "scorecam": "scorecam"}


CAM_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}


def cam_layers(model) -> list[str]:
    """Where class-activation maps are taken: the last Conv2D layer, or for an ensemble
    (xrayfeat.ensemble) the last Conv2D layer of each member."""
    from xrayfeat.model import member_of

    last: dict[str, str] = {}
    for info in conv_layers(model):
        last[member_of(info.name)] = info.name
    if not last:
        raise RunError("the model has no Conv2D layer to take class-activation maps from")
    return list(last.values())


def _visualizer(model, method: str):
    """A tf-keras-vis visualiser for ``model``, built (and the model cloned) once per model
    and method; the clone is a snapshot of the weights at first use (runs are read-only)."""
    cache = _VISUALIZERS.setdefault(model, {})
    if method not in cache:
        from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

        if method == "gradcam":
            from tf_keras_vis.gradcam import Gradcam as Visualizer
        elif method == "gradcam++":
            from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus as Visualizer
        else:
            from tf_keras_vis.scorecam import Scorecam as Visualizer
        cache[method] = Visualizer(model, model_modifier=ReplaceToLinear(), clone=True)
    return cache[method]


@contextlib.contextmanager
def _quiet_keras():
    """No Keras progress bars on stdout (Score-CAM calls ``model.predict``): stdout is for
    results."""
    import keras

    was_on = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        if was_on:
            keras.config.enable_interactive_logging()


def _rescale_each(cams: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum (maps that are all zero stay zero)."""
    peak = cams.reshape(len(cams), -1).max(axis=1)
    return cams / np.where(peak > 0, peak, 1.0)[:, None, None]


def gradcam_maps(
    model, images: np.ndarray, class_indices: Sequence[int], method: str = "gradcam"
) -> np.ndarray:
    """Class-activation maps of ``images`` for one class each, at the last Conv2D layer.

    ``images`` is (b, S, S, 1) float32 in 0-255 (the stored images the model takes);
    ``method`` is "gradcam", "gradcam++" or "scorecam". Returns (b, S, S) float32 in
    [0, 1], each map scaled to its own maximum (all zeros where nothing speaks for the class).
    """
    if method not in CAM_METHODS:
        raise UsageError(f"unknown CAM method {method!r}; use one of {', '.join(CAM_METHODS)}")
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    indices = [int(i) for i in class_indices]
    if len(indices) != len(x):
        raise ValueError(f"{len(x)} images but {len(indices)} class indices")
    if len(x) == 0:
        return np.zeros((0, *x.shape[1:3]), np.float32)
    from tf_keras_vis.utils.scores import CategoricalScore

    kwargs: dict[str, Any] = {"seek_penultimate_conv_layer": False}
    if method == "scorecam":
        kwargs["batch_size"] = 32
    per_layer = []
    # An ensemble's map is the mean of its members' maps (each taken through the ensemble's
    # own output, so each member's share of the average is what is explained).
    for layer in cam_layers(model):
        with warnings.catch_warnings(), _quiet_keras():
            # Score-CAM feeds the model a tuple; Keras 3 warns about the structure, harmlessly.
            warnings.filterwarnings("ignore", message="The structure of `inputs`",
                                    category=UserWarning)
            maps = np.asarray(_visualizer(model, method)(CategoricalScore(indices), x,
                                                         penultimate_layer=layer, **kwargs),
                              dtype=np.float32)
        per_layer.append(maps[..., 0] if maps.ndim == 4 else maps)
    cams = per_layer[0] if len(per_layer) == 1 else _rescale_each(np.mean(per_layer, axis=0))
    if cams.shape[1:] != x.shape[1:3]:
        import cv2

        cams = np.stack([cv2.resize(c, (x.shape[2], x.shape[1]), interpolation=cv2.INTER_LINEAR)
                         for c in cams])
    return np.clip(np.nan_to_num(cams), 0.0, 1.0)


def write_gradcam_overlays(
    model,
    paths: Sequence[Path],
    images: np.ndarray,
    out_dir: Path,
    class_indices: Sequence[int] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    stems: Sequence[str] | None = None,
    method: str = "gradcam",
) -> list[Path]:
    """Write ``<stem>_gradcam.png`` (a Grad-CAM overlay on the stored image) per image.

    ``class_indices`` default to the predicted class (argmax of the model's output).
    ``stems`` overrides the file stems (default: :func:`unique_stems` of ``paths``, unique
    within this call only: a caller writing several batches into one folder should pass
    stems it made unique over all of them). Returns the written paths, in order.
    """

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if len(x) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(x)} images")
    probs = np.asarray(model.predict_on_batch(x), dtype=np.float64)
    indices = (probs.argmax(axis=1) if class_indices is None
               else np.asarray(list(class_indices), dtype=int))
    cams = gradcam_maps(model, x, indices, method)
    stems = list(stems) if stems is not None else unique_stems(paths)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    written = []
    for i, (path, stem) in enumerate(zip(paths, stems)):
        k = int(indices[i])
        name = class_names[k] if class_names is not None else f"class {k}"
        title = f"{shorten(path)}\n{CAM_TITLES[method]} for {name} (p = {probs[i, k]:.3f})"
        target = inside(out_dir, f"{safe_component(stem)}_{CAM_TAGS[method]}.png")
        written.append(plot_cam_overlay(x[i, ..., 0], cams[i], target, title=title))
    return written
