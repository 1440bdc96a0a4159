"""What the network sees: per-layer outputs, class-activation maps, class contrast.

``visualize-layers`` in two modes:

* **Per image** (:func:`visualize_images`): every radiograph goes through the one
  preprocessing path (:func:`xrayfeat.preprocessing.prepare_file`); a batch of images goes
  through *one* multi-output Keras model (:class:`ActivationModel`) that returns every
  requested layer's output and the prediction from a single forward pass. Per image it
  writes one channel grid per layer, a Grad-CAM overlay (plus Grad-CAM++ or Score-CAM when
  asked) and an overview; ``index.html`` links them all, grouped by image and depth.
* **Class contrast** (:func:`class_contrast`): streams a dataset split in batches and keeps
  only running sums (per class: images, sum of mean maps, and per channel the sum and sum
  of squares of each image's mean response), so memory does not grow with the split. It
  ranks the channels whose response differs most between classes by Cohen's d.

Definitions used throughout:

* *depth* of a layer: how many Conv2D layers come before it, itself included
  (``block1_conv1`` is depth 1, its ReLU and batch norm too, ``block2_conv2`` depth 4).
* *activation of a conv layer* (overview's strongest channel, class contrast): its
  rectified output, i.e. the ReLU that follows it in MiniVGGNet (the conv output itself
  when no ReLU follows). The *response* of a channel on an image is the spatial mean of
  that map; the *strongest* channel is the one with the largest response.
* Grad-CAM etc. come from tf-keras-vis, with the softmax replaced by a linear output
  (``ReplaceToLinear``) so the score is the class logit, at the last Conv2D layer; maps are
  resized to the stored image size and scaled to [0, 1] per image.
* Channel-grid normalisation: see the notes in :mod:`xrayfeat.figures`.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
import re
import time
import unicodedata
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import quote

import numpy as np

from xrayfeat.atomic import prepare_out_dir, write_text
from xrayfeat.csvout import csv_text
from xrayfeat.errors import DatasetError, ImageReadError, RunError, UsageError, XrayfeatError

CAM_METHODS = ("gradcam", "gradcam++", "scorecam")
#: File-name tag of each CAM method (``<stem>_<tag>.png``); Grad-CAM is always written.
CAM_TAGS = {"gradcam": "gradcam", "gradcam++": "gradcampp", "scorecam": "scorecam"}
CAM_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}
LAYER_MODES = ("conv", "all")
DEFAULT_MAX_CHANNELS = 64  # an 8 x 8 grid: readable on one screen; --max-channels for more
MAX_STEM_BYTES = 96  # leaves room for "_d4_block2_conv2.png" under the 255-byte name limit
_DISPLAY_SIDE = 512  # the overview's input panel is decoded at about this size

# --------------------------------------------------------------------------- safe file names

_FORBIDDEN = set('/\\:*?"<>|')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


def _safe_component(text: str, fallback: str = "image") -> str:
    """``text`` made into one safe file-name component (no extension handling)."""
    text = unicodedata.normalize("NFC", str(text))
    chars = []
    for ch in text:
        category = unicodedata.category(ch)
        # C*: control, format (bidi overrides), surrogates, private, unassigned;
        # Z*: spaces and line/paragraph separators (U+2028, U+2029).
        chars.append("_" if ch in _FORBIDDEN or category[0] in "CZ" else ch)
    name = "".join(chars)
    name = re.sub(r"\.{2,}", ".", name)  # never ".."
    name = re.sub(r"_{2,}", "_", name)
    name = name.strip("._- ")  # no hidden files, no "-option" names, no trailing dots
    encoded = name.encode("utf-8")[:MAX_STEM_BYTES]
    name = encoded.decode("utf-8", errors="ignore").strip("._- ")
    if not name:
        return fallback
    head, dot, rest = name.partition(".")
    if head.upper() in _WINDOWS_RESERVED:
        # "CON.x" is reserved too: mark the device name itself, within the byte budget.
        rest = (dot + rest).encode("utf-8")[: MAX_STEM_BYTES - len(head) - 1]
        name = f"{head}_{rest.decode('utf-8', errors='ignore')}"
    return name


def safe_stem(path: str | os.PathLike) -> str:
    """A file-name-safe stem for an input path: its last component without the extension.

    Separators (``/`` and ``\\``), control and format characters, line separators and
    whitespace become ``_``; ``..`` cannot survive, nor a leading dot or dash; non-ASCII
    letters are kept; the result is at most :data:`MAX_STEM_BYTES` UTF-8 bytes and never
    empty. Use :func:`unique_stems` for several paths at once.
    """
    name = re.split(r"[/\\]", os.fspath(path))[-1]
    stem, dot, _ = name.rpartition(".")
    if not dot or not stem.strip("."):
        stem = name
    return _safe_component(stem)


def unique_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """:func:`safe_stem` of each path, made unique (ignoring case) within the list.

    Stems that collide get ``_`` and 8 hex digits of a hash of the full path; a path given
    twice gets ``_2``, ``_3``...
    """
    stems = [safe_stem(p) for p in paths]
    groups: dict[str, set[str]] = {}
    for p, s in zip(paths, stems):
        groups.setdefault(s.casefold(), set()).add(os.fspath(p))
    out, seen = [], set()
    for p, s in zip(paths, stems):
        if len(groups[s.casefold()]) > 1:
            digest = hashlib.sha1(os.fsencode(os.fspath(p))).hexdigest()[:8]
            s = f"{s}_{digest}"
        candidate, k = s, 1
        while candidate.casefold() in seen:
            k += 1
            candidate = f"{s}_{k}"
        seen.add(candidate.casefold())
        out.append(candidate)
    return out


def _inside(out: Path, name: str) -> Path:
    """``out / name``, checked to stay inside ``out`` (defence in depth)."""
    target = out / name
    if target.resolve().parent != out.resolve():
        raise UsageError(f"refusing to write {name!r} outside {out}")
    return target


# --------------------------------------------------------------------------- layers

@dataclass(frozen=True)
class LayerInfo:
    """A layer with a spatial (h, w, channels) output."""

    name: str
    kind: str  # "conv", "activation", "batchnorm", "pooling" or "other"
    depth: int  # Conv2D layers up to and including this one
    shape: tuple[int, int, int]  # (h, w, channels) of its output


def _kind(layer) -> str:
    from keras import layers

    if isinstance(layer, layers.Conv2D):
        return "conv"
    if isinstance(layer, (layers.Activation, layers.ReLU, layers.LeakyReLU)):
        return "activation"
    if isinstance(layer, layers.BatchNormalization):
        return "batchnorm"
    if isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
        return "pooling"
    return "other"


def describe_layers(model) -> list[LayerInfo]:
    """Every layer of ``model`` whose output is an image-like (batch, h, w, c) tensor."""
    from keras import layers

    from xrayfeat.model import member_of

    found, depths = [], {}  # conv layers so far, per ensemble member ("" outside ensembles)
    for layer in model.layers:
        if isinstance(layer, layers.InputLayer):
            continue
        kind = _kind(layer)
        member = member_of(layer.name)
        depths[member] = depth = depths.get(member, 0) + (kind == "conv")
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and all(d is not None for d in shape[1:]):
            found.append(LayerInfo(layer.name, kind, depth, tuple(int(d) for d in shape[1:])))
    return found


def conv_layers(model) -> list[LayerInfo]:
    """The Conv2D layers, shallow to deep."""
    return [info for info in describe_layers(model) if info.kind == "conv"]


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


def select_layers(
    model, names: Sequence[str] | None = None, all_layers: bool = False
) -> list[LayerInfo]:
    """The layers to draw: ``names`` (in model order), else every Conv2D, or with
    ``all_layers`` also every activation, batch-norm and pooling output."""
    spatial = describe_layers(model)
    if names:
        valid = {info.name: info for info in spatial}
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise UsageError(
                f"unknown layer {', '.join(repr(n) for n in unknown)}; valid names: "
                f"{', '.join(info.name for info in spatial)}"
            )
        wanted = set(names)
        return [info for info in spatial if info.name in wanted]
    kinds = {"conv", "activation", "batchnorm", "pooling"} if all_layers else {"conv"}
    return [info for info in spatial if info.kind in kinds and info.depth > 0]


def rectified_layer(model, conv_name: str) -> str:
    """The layer holding a conv layer's rectified output: the ReLU applied to it when there
    is one (MiniVGGNet), else the conv layer itself."""
    from keras import layers

    conv = model.get_layer(conv_name)
    activation = getattr(conv.activation, "__name__", "")
    if activation != "linear":
        return conv_name
    for layer in model.layers:
        is_relu = isinstance(layer, layers.ReLU) or (
            isinstance(layer, layers.Activation)
            and getattr(layer.activation, "__name__", "") == "relu")
        if is_relu:
            try:
                if layer.input is conv.output:
                    return layer.name
            except (AttributeError, ValueError):
                continue
    return conv_name


class ActivationModel:
    """One multi-output model over a trained one: every named layer's output and the
    prediction, from a single forward pass per batch (never one model per layer)."""

    def __init__(self, model, layer_names: Sequence[str]):
        import keras

        self.names = list(dict.fromkeys(layer_names))
        outputs = [model.get_layer(n).output for n in self.names] + [model.outputs[0]]
        self.model = keras.Model(model.inputs, outputs, name="xrayfeat_activations")

    def __call__(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(layer name -> (b, h, w, c) array, (b, classes) probabilities)``."""
        outputs = self.model.predict_on_batch(np.asarray(images, dtype=np.float32))
        outputs = [np.asarray(o) for o in outputs]
        return dict(zip(self.names, outputs[:-1])), outputs[-1]


# --------------------------------------------------------------------------- CAMs

_VISUALIZERS: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


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
    from xrayfeat.figures import plot_cam_overlay

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
        title = f"{_short(path)}\n{CAM_TITLES[method]} for {name} (p = {probs[i, k]:.3f})"
        target = _inside(out_dir, f"{_safe_component(stem)}_{CAM_TAGS[method]}.png")
        written.append(plot_cam_overlay(x[i, ..., 0], cams[i], target, title=title))
    return written


def _short(path: str | os.PathLike, limit: int = 60) -> str:
    """A path's name for a figure title: printable, at most ``limit`` characters."""
    name = "".join(c if unicodedata.category(c)[0] not in "CZ" or c == " " else "?"
                   for c in Path(os.fspath(path)).name)
    return name if len(name) <= limit else name[: limit - 3] + "..."


# --------------------------------------------------------------------------- output folder

def _href(out: Path, path: Path) -> str:
    return quote(path.relative_to(out).as_posix())


# --------------------------------------------------------------------------- per image

@dataclass
class ImageFigures:
    """The figures written for one input image."""

    source: Path
    stem: str
    predicted: str
    probability: float  # as ``predict`` reports it: the positive class's for binary runs,
    #                     the predicted class's otherwise
    evidence: str  # "P(PNEUMONIA) = 0.81, threshold 0.42" or "p = 0.77"
    cam_class: str  # the class the CAMs explain (predicted, or --class)
    overview: Path
    cams: dict[str, Path]  # method -> overlay PNG
    grids: list[tuple[LayerInfo, Path]]

    @property
    def files(self) -> list[Path]:
        return [self.overview, *self.cams.values(), *(p for _, p in self.grids)]


@dataclass
class VisualizeResult:
    """What :func:`visualize_images` wrote."""

    out: Path
    index: Path
    run: Path
    layers: list[LayerInfo]
    images: list[ImageFigures]
    skipped: list[tuple[str, str]]  # (path, reason)
    filters: Path | None
    cam_method: str
    seconds: float

    @property
    def files(self) -> list[Path]:
        files = [f for image in self.images for f in image.files]
        return files + ([self.filters] if self.filters else []) + [self.index]


def _expand_images(images: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given (duplicates dropped) and the image files inside folders, sorted."""
    from xrayfeat.dataset import iter_image_files

    found: list[Path] = []
    for item in images:
        path = Path(item)
        if path.is_dir():
            found.extend(p for p, ok in iter_image_files(path) if ok)
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def _class_index(name: str | None, classes: Sequence[str]) -> int | None:
    if name is None:
        return None
    for i, c in enumerate(classes):
        if c == name:
            return i
    for i, c in enumerate(classes):
        if c.casefold() == name.casefold():
            return i
    raise UsageError(f"unknown class {name!r}; the run's classes are {', '.join(classes)}")


def _check_cmap(cmap: str) -> None:
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise UsageError(f"unknown colormap {cmap!r}; try viridis, magma, gray or inferno "
                         "(any matplotlib colormap name)")


def _decide(probs: np.ndarray, classes: Sequence[str], threshold: float | None):
    """Predicted class and reported probability, exactly as ``predict`` reports them:
    binary runs compare the positive-class probability with the run's threshold."""
    from xrayfeat.prediction import decide

    if len(classes) == 2 and threshold is None:
        threshold = 0.5
    return decide(probs, classes, threshold)


def _evidence(classes: Sequence[str], reported: float, threshold: float | None) -> str:
    """The probability behind a prediction, said unambiguously."""
    if len(classes) == 2:
        return f"P({classes[1]}) = {float(reported):.3f}, threshold {threshold:.3g}"
    return f"p = {float(reported):.3f}"


def visualize_images(
    run_path: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    all_layers: bool = False,
    max_channels: int = DEFAULT_MAX_CHANNELS,
    shared_scale: bool = False,
    cmap: str = "viridis",
    filters: bool = False,
    cam_method: str = "gradcam",
    class_name: str | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> VisualizeResult:
    """Per-layer channel grids, CAM overlays and an overview for each image, and index.html.

    Output layout (``STEM`` from :func:`unique_stems`)::

        OUT/index.html                      links every figure, by image and depth
        OUT/filters_<first conv>.png        with ``filters``
        OUT/STEM/STEM_overview.png          input, ROI crop, CAM, probabilities, strongest channels
        OUT/STEM/STEM_gradcam.png           Grad-CAM overlay (+ _gradcampp / _scorecam)
        OUT/STEM/STEM_d<depth>_<layer>.png  one channel grid per layer

    Unreadable images are skipped and listed in the result (and in index.html).
    """
    from xrayfeat.figures import plot_cam_overlay, plot_channel_grid, plot_filters, plot_overview
    from xrayfeat.imaging import read_radiograph
    from xrayfeat.preprocessing import prepare_file
    from xrayfeat.runs import load_run

    started = time.perf_counter()
    out = Path(out)
    if cam_method not in CAM_METHODS:
        raise UsageError(f"unknown --cam {cam_method!r}; use one of {', '.join(CAM_METHODS)}")
    if max_channels < 1:
        raise UsageError(f"--max-channels must be at least 1, got {max_channels}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    _check_cmap(cmap)
    run = load_run(run_path)
    paths = _expand_images(images)
    if not paths:
        raise UsageError("no images given: name one or more radiographs (or folders of them)")
    classes = run.classes
    forced = _class_index(class_name, classes)
    model = run.load_model()
    chosen = select_layers(model, layers, all_layers)
    convs = conv_layers(model)
    rectified = {c.name: rectified_layer(model, c.name) for c in convs}
    settings = run.preprocess
    threshold = run.threshold if run.threshold is not None or len(classes) != 2 else 0.5
    prepare_out_dir(out, overwrite)

    extractor = ActivationModel(model, [info.name for info in chosen] + list(rectified.values()))
    stems = unique_stems(paths)
    filters_png = None
    if filters:
        if not convs:
            raise RunError("the model has no Conv2D layer whose filters could be drawn")
        first = model.get_layer(convs[0].name)
        filters_png = plot_filters(
            np.asarray(first.kernel), _inside(out, f"filters_{_safe_component(first.name)}.png"),
            title=f"learned filters of {first.name} ({first.kernel.shape[-1]} channels)")

    if on_start:
        on_start(len(paths))
    done: list[ImageFigures] = []
    skipped: list[tuple[str, str]] = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path, stem in zip(paths[start : start + batch_size], stems[start : start + batch_size]):
            try:
                prepared = prepare_file(path, settings)
            except XrayfeatError as exc:
                skipped.append((str(path), str(exc)))
                if on_progress:
                    on_progress(1)
                continue
            except Exception as exc:  # a decoder bug on one hostile file must not stop the run
                skipped.append((str(path), f"unreadable: {type(exc).__name__}: {exc}"))
                if on_progress:
                    on_progress(1)
                continue
            batch.append((path, stem, prepared))
        if not batch:
            continue
        x = np.stack([prep.image for _, _, prep in batch])[..., None].astype(np.float32)
        acts, probs = extractor(x)  # every layer, one forward pass
        labels, reported = _decide(np.asarray(probs, np.float64), classes, threshold)
        targets = np.full(len(batch), forced) if forced is not None else np.asarray(labels)
        cams = {"gradcam": gradcam_maps(model, x, targets, "gradcam")}
        if cam_method != "gradcam":
            cams[cam_method] = gradcam_maps(model, x, targets, cam_method)
        for i, (path, stem, prep) in enumerate(batch):
            folder = _inside(out, stem)
            folder.mkdir(exist_ok=True)
            predicted = classes[int(labels[i])]
            target = classes[int(targets[i])]
            p_target = float(probs[i, int(targets[i])])
            head = f"{_short(path)}: predicted {predicted} ({_evidence(classes, reported[i], threshold)})"
            cam_files = {}
            for method, maps in cams.items():
                cam_files[method] = plot_cam_overlay(
                    prep.image, maps[i], folder / f"{stem}_{CAM_TAGS[method]}.png",
                    title=f"{head}\n{CAM_TITLES[method]} for {target} (p = {p_target:.3f})")
            grids = []
            for info in chosen:
                maps = acts[info.name][i]
                channels = list(range(min(max_channels, maps.shape[-1])))
                shown = (f"channels 0-{channels[-1]} of {maps.shape[-1]}"
                         if len(channels) < maps.shape[-1] else f"all {maps.shape[-1]} channels")
                h, w, c = info.shape
                grid = plot_channel_grid(
                    maps, folder / f"{stem}_d{info.depth}_{_safe_component(info.name)}.png",
                    title=f"{_short(path)}\n{info.name} ({info.kind}), depth {info.depth}, "
                          f"output {h}x{w}x{c}, {shown}",
                    channels=channels, shared_scale=shared_scale, cmap=cmap)
                grids.append((info, grid))
            strongest = []
            for conv in convs:
                rect = acts[rectified[conv.name]][i]
                ch = int(np.argmax(rect.mean(axis=(0, 1))))
                strongest.append((f"depth {conv.depth}: {conv.name} ch {ch}\n"
                                  f"(strongest of {rect.shape[-1]}, {rect.shape[0]}x{rect.shape[1]})",
                                  rect[..., ch]))
            try:
                raw, source_shape = read_radiograph(path, max_pixels=settings.max_pixels,
                                                    target_size=_DISPLAY_SIDE)
                sy, sx = raw.shape[0] / source_shape[0], raw.shape[1] / source_shape[1]
                r = prep.roi
                box = (r.x0 * sx, r.y0 * sy, r.x1 * sx, r.y1 * sy) if r.method != "full" else None
            except XrayfeatError:
                raw, box = prep.image, None
            method = cam_method
            overview = plot_overview(
                raw, box, prep.image, strongest, cams[method][i], probs[i], classes,
                folder / f"{stem}_overview.png", title=head,
                cam_title=f"{CAM_TITLES[method]} for {target} (p = {p_target:.3f})", cmap=cmap,
                predicted=int(labels[i]), threshold=threshold)
            done.append(ImageFigures(source=Path(path), stem=stem, predicted=predicted,
                                     probability=float(reported[i]),
                                     evidence=_evidence(classes, reported[i], threshold),
                                     cam_class=target,
                                     overview=overview, cams=cam_files, grids=grids))
            if on_progress:
                on_progress(1)
    if not done:
        first = skipped[0] if skipped else ("", "no image")
        raise ImageReadError(f"none of the {len(paths)} image(s) could be read; "
                             f"{first[0]}: {first[1]}")
    result = VisualizeResult(out=out, index=out / "index.html", run=Path(run_path), layers=chosen,
                             images=done, skipped=skipped, filters=filters_png,
                             cam_method=cam_method, seconds=0.0)
    write_text(result.index, _images_html(result, shared_scale, cmap))
    result.seconds = time.perf_counter() - started
    return result


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:.85em}
img{border:1px solid #ddd;max-width:100%}
td,th{padding:2px 8px;text-align:left}
.note{color:#555;font-size:.9em}"""


def _figure(out: Path, path: Path, caption: str, width: int) -> str:
    href = _href(out, path)
    return (f'<figure><a href="{href}"><img src="{href}" width="{width}" alt="{html.escape(caption)}">'
            f"</a><figcaption>{html.escape(caption)}</figcaption></figure>")


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _images_html(result: VisualizeResult, shared_scale: bool, cmap: str) -> str:
    out = result.out
    scale = ("one scale shared by all channels of a layer (colour bar in activation units)"
             if shared_scale else "each channel min-max scaled on its own")
    body = ["<h1>xrayfeat visualize-layers</h1>",
            f"<p>Run <code>{html.escape(str(result.run))}</code>; {len(result.images)} image(s). "
            f"Channel grids: {html.escape(scale)}, colormap <code>{html.escape(cmap)}</code>. "
            f"CAMs: {CAM_TITLES[result.cam_method]} at the last conv layer, scaled to [0, 1] per "
            f"image, jet colormap.</p>"]
    if result.filters:
        body += ["<h2>Model</h2>", '<div class="row">',
                 _figure(out, result.filters, "learned filters of the first conv layer", 360),
                 "</div>"]
    for image in result.images:
        body.append(f'<h2 id="{html.escape(quote(image.stem))}">{html.escape(str(image.source))}</h2>')
        body.append(f'<p>predicted <b>{html.escape(image.predicted)}</b> '
                    f'({html.escape(image.evidence)}); CAMs for {html.escape(image.cam_class)}</p>')
        body.append('<div class="row">')
        body.append(_figure(out, image.overview, "overview", 560))
        for method, path in image.cams.items():
            body.append(_figure(out, path, CAM_TITLES[method], 280))
        body.append("</div>")
        depths: dict[int, list[tuple[LayerInfo, Path]]] = {}
        for info, path in image.grids:
            depths.setdefault(info.depth, []).append((info, path))
        for depth, items in sorted(depths.items()):
            body.append(f"<h3>depth {depth}</h3>")
            body.append('<div class="row">')
            for info, path in items:
                h, w, c = info.shape
                body.append(_figure(out, path, f"{info.name} ({h}x{w}x{c})", 300))
            body.append("</div>")
    if result.skipped:
        body.append(f"<h2>Skipped ({len(result.skipped)})</h2><table>")
        body += [f"<tr><td>{html.escape(p)}</td><td>{html.escape(r)}</td></tr>"
                 for p, r in result.skipped]
        body.append("</table>")
    return _page("xrayfeat visualize-layers", body)


# --------------------------------------------------------------------------- class contrast

@dataclass
class ChannelEffect:
    """How one channel's response differs between two groups of images."""

    comparison: str  # "PNEUMONIA vs NORMAL" or "VIRUS vs rest"
    layer: str
    depth: int
    rank: int  # 1 = largest |d| in this layer and comparison
    channel: int
    cohens_d: float  # (mean_a - mean_b) / pooled SD; > 0: stronger in group a
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    n_a: int
    n_b: int


@dataclass
class ContrastResult:
    """What :func:`class_contrast` wrote."""

    out: Path
    index: Path
    run: Path
    data: Path
    split: str
    classes: list[str]
    counts: dict[str, int]  # images per class in the split
    layers: list[LayerInfo]  # the conv layers
    comparisons: list[tuple[str, str]]  # (group a, group b) labels
    top: list[ChannelEffect]  # the top_k channels of every layer and comparison
    table: Path  # CSV: every channel, ranked
    summary: Path  # JSON: the top channels and the settings
    figures: list[Path]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [*self.figures, self.table, self.summary, self.index]


class _LayerSums:
    """Running sums for one layer: memory is O(classes x h x w x channels), not O(images)."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int):
        self.n = np.zeros(n_classes, np.int64)
        self.maps = np.zeros((n_classes, *shape), np.float64)  # sum of activation maps
        self.s = np.zeros((n_classes, shape[-1]), np.float64)  # sum of per-image channel means
        self.ss = np.zeros((n_classes, shape[-1]), np.float64)  # ... and of their squares

    def update(self, acts: np.ndarray, labels: np.ndarray) -> None:
        acts = np.asarray(acts, np.float64)
        means = acts.mean(axis=(1, 2))  # (b, C): each image's response per channel
        for k in np.unique(labels):
            sel = labels == k
            self.n[k] += int(sel.sum())
            self.maps[k] += acts[sel].sum(axis=0)
            self.s[k] += means[sel].sum(axis=0)
            self.ss[k] += (means[sel] ** 2).sum(axis=0)

    def group(self, members: Sequence[int]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(n, mean response, SD of the response per channel, mean map) of a group of classes."""
        idx = list(members)
        n = int(self.n[idx].sum())
        s, ss = self.s[idx].sum(axis=0), self.ss[idx].sum(axis=0)
        mean = s / max(n, 1)
        var = np.maximum(ss - n * mean**2, 0.0) / max(n - 1, 1)
        return n, mean, np.sqrt(var), self.maps[idx].sum(axis=0) / max(n, 1)


def cohens_d(n_a: int, mean_a, sd_a, n_b: int, mean_b, sd_b) -> np.ndarray:
    """Cohen's d with the pooled SD; 0 where both groups are constant."""
    pooled = np.sqrt(((n_a - 1) * np.square(sd_a) + (n_b - 1) * np.square(sd_b))
                     / max(n_a + n_b - 2, 1))
    diff = np.asarray(mean_a, np.float64) - np.asarray(mean_b, np.float64)
    return np.divide(diff, pooled, out=np.zeros_like(diff), where=pooled > 1e-12)


def class_contrast(
    run_path: str | os.PathLike,
    data: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    top_k: int = 8,
    batch_size: int = 64,
    cmap: str = "viridis",
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ContrastResult:
    """What the network learns to call each class, over a whole dataset split.

    For every conv layer (its rectified output, see the module notes): the mean activation
    map of each class, and the channels whose response (per-image spatial mean) differs most
    between groups, ranked by |Cohen's d|. Two classes: positive (label 1) vs negative
    (label 0); more: each class vs the rest. The split is streamed in batches.

    Writes ``OUT/contrast_channels.csv`` (every channel, ranked), ``OUT/contrast.json`` (top
    ``top_k`` per layer and comparison), ``OUT/contrast_d<depth>_<layer>_class_means.png``,
    ``OUT/contrast_d<depth>_<layer>_top_<a>_vs_<b>.png`` and ``OUT/index.html``.
    """
    from xrayfeat.dataset import iter_split
    from xrayfeat.figures import plot_class_means, plot_top_channels
    from xrayfeat.runs import open_run_on_split

    started = time.perf_counter()
    out = Path(out)
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    _check_cmap(cmap)
    run, info, total = open_run_on_split(run_path, data, split)
    classes = run.classes
    model = run.load_model()
    convs = conv_layers(model)
    if not convs:
        raise RunError("the model has no Conv2D layer to contrast")
    rectified = {c.name: rectified_layer(model, c.name) for c in convs}
    prepare_out_dir(out, overwrite)

    extractor = ActivationModel(model, list(rectified.values()))
    sums = {c.name: _LayerSums(model.get_layer(rectified[c.name]).output.shape[1:], len(classes))
            for c in convs}
    if on_start:
        on_start(total)
    for images, labels in iter_split(Path(data), split, batch_size):
        acts, _ = extractor(images[..., None].astype(np.float32))
        for conv in convs:
            sums[conv.name].update(acts[rectified[conv.name]], labels)
        if on_progress:
            on_progress(len(labels))

    counts_arr = sums[convs[0].name].n
    counts = {c: int(counts_arr[k]) for k, c in enumerate(classes)}
    if len(classes) == 2:
        plan = [((1,), (0,), classes[1], classes[0])]
    else:
        plan = [((k,), tuple(j for j in range(len(classes)) if j != k), c, "rest")
                for k, c in enumerate(classes)]
    notes, comparisons = [], []
    for a, b, la, lb in plan:
        n_a, n_b = int(counts_arr[list(a)].sum()), int(counts_arr[list(b)].sum())
        if n_a < 2 or n_b < 2:
            notes.append(f"{la} vs {lb}: skipped, needs 2+ images a side ({n_a} vs {n_b})")
        else:
            comparisons.append((a, b, la, lb))
    if not comparisons:
        have = ", ".join(f"{c} ({n})" for c, n in counts.items())
        raise DatasetError(f"split '{split}' of {data} has too few images per class to contrast "
                           f"(needs 2+ a side): {have}")

    rows: list[ChannelEffect] = []
    figures: list[Path] = []
    for conv in convs:
        layer_sums = sums[conv.name]
        tag = f"d{conv.depth}_{_safe_component(conv.name)}"
        rect = rectified[conv.name]
        what = conv.name if rect == conv.name else f"{conv.name} (rectified: {rect})"
        present = [(c, layer_sums.maps[k] / counts_arr[k]) for k, c in enumerate(classes)
                   if counts_arr[k] > 0]
        figures.append(plot_class_means(
            [(f"{c} (n={counts[c]})", m.mean(axis=-1)) for c, m in present],
            _inside(out, f"contrast_{tag}_class_means.png"),
            title=f"{what}, depth {conv.depth}: mean activation map per class, averaged over "
                  f"{conv.shape[-1]} channels ({split} split)",
            difference=((f"{classes[1]} (n={counts[classes[1]]})",
                         f"{classes[0]} (n={counts[classes[0]]})")
                        if len(classes) == 2 and len(present) == 2 else None),
            cmap=cmap))
        for a, b, la, lb in comparisons:
            n_a, mean_a, sd_a, map_a = layer_sums.group(a)
            n_b, mean_b, sd_b, map_b = layer_sums.group(b)
            d = cohens_d(n_a, mean_a, sd_a, n_b, mean_b, sd_b)
            order = np.lexsort((np.arange(d.size), -np.abs(d)))
            name = f"{la} vs {lb}"
            for rank, ch in enumerate(order, start=1):
                rows.append(ChannelEffect(name, conv.name, conv.depth, rank, int(ch), float(d[ch]),
                                          float(mean_a[ch]), float(mean_b[ch]), float(sd_a[ch]),
                                          float(sd_b[ch]), n_a, n_b))
            top = order[:top_k]
            figures.append(plot_top_channels(
                [(int(ch), float(d[ch]), map_a[..., ch], map_b[..., ch]) for ch in top],
                (f"{la} (n={n_a})", f"{lb} (n={n_b})"),
                _inside(out, f"contrast_{tag}_top_{_safe_component(la)}_vs_"
                             f"{_safe_component(lb)}.png"),
                title=f"{what}, depth {conv.depth}: {len(top)} channels whose mean response "
                      f"differs most, {name}\n(Cohen's d of per-image channel means; "
                      f"{split} split; mean maps per group)",
                cmap=cmap))

    table = out / "contrast_channels.csv"
    names = list(ChannelEffect.__dataclass_fields__)
    write_text(table, csv_text(({k: (round(v, 6) if isinstance(v, float) else v)
                                  for k, v in row.__dict__.items()} for row in rows), names))
    top_rows = [r for r in rows if r.rank <= top_k]
    summary = out / "contrast.json"
    write_text(summary, json.dumps({
        "run": str(run_path), "data": str(data), "split": split, "classes": classes,
        "counts": counts, "top_k": top_k,
        "statistic": "Cohen's d (pooled SD) of each image's spatial-mean channel response, "
                     "on each conv layer's rectified output; > 0 means stronger in the first group",
        "comparisons": [f"{la} vs {lb}" for _, _, la, lb in comparisons],
        "notes": notes,
        "top": [r.__dict__ for r in top_rows],
    }, indent=2) + "\n")
    result = ContrastResult(
        out=out, index=out / "index.html", run=Path(run_path), data=Path(data), split=split,
        classes=classes, counts=counts, layers=convs,
        comparisons=[(la, lb) for _, _, la, lb in comparisons], top=top_rows, table=table,
        summary=summary, figures=figures, seconds=0.0, notes=notes)
    write_text(result.index, _contrast_html(result))
    result.seconds = time.perf_counter() - started
    return result


def _contrast_html(result: ContrastResult) -> str:
    out = result.out
    counts = ", ".join(f"{html.escape(c)}: {n}" for c, n in result.counts.items())
    body = ["<h1>xrayfeat visualize-layers --contrast</h1>",
            f"<p>Run <code>{html.escape(str(result.run))}</code>, data "
            f"<code>{html.escape(str(result.data))}</code>, split <b>{html.escape(result.split)}"
            f"</b> ({counts}).</p>",
            '<p class="note">Effect size: Cohen\'s d (pooled SD) of each image\'s mean channel '
            "response on the conv layer's rectified output; positive means stronger in the first "
            "group. Every channel, ranked: "
            f'<a href="{_href(out, result.table)}">{html.escape(result.table.name)}</a>; top channels: '
            f'<a href="{_href(out, result.summary)}">{html.escape(result.summary.name)}</a>.</p>']
    body += [f'<p class="note">{html.escape(n)}</p>' for n in result.notes]
    for conv in result.layers:
        h, w, c = conv.shape
        body.append(f"<h2>depth {conv.depth}: {html.escape(conv.name)} ({h}x{w}x{c})</h2>")
        body.append('<div class="row">')
        tag = f"contrast_d{conv.depth}_{_safe_component(conv.name)}_"
        for fig in result.figures:
            if fig.name.startswith(tag):
                body.append(_figure(out, fig, fig.stem[len(tag):].replace("_", " "), 420))
        body.append("</div><table><tr><th>comparison</th><th>rank</th><th>channel</th>"
                    "<th>Cohen's d</th><th>mean a</th><th>mean b</th></tr>")
        for r in result.top:
            if r.layer == conv.name:
                body.append(f"<tr><td>{html.escape(r.comparison)}</td><td>{r.rank}</td>"
                            f"<td>{r.channel}</td><td>{r.cohens_d:+.3f}</td>"
                            f"<td>{r.mean_a:.4g}</td><td>{r.mean_b:.4g}</td></tr>")
        body.append("</table>")
    return _page("xrayfeat class contrast", body)
