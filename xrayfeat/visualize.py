"""``visualize-layers`` per image: what the network sees at every depth.

Every radiograph goes through the one preprocessing path
(:func:`xrayfeat.preprocessing.prepare_file`); a batch of images goes through *one*
multi-output Keras model (:class:`xrayfeat.layers.ActivationModel`) that returns every
requested layer's output and the prediction from a single forward pass. Per image it writes
one channel grid per layer, a Grad-CAM overlay (plus Grad-CAM++ or Score-CAM when asked,
:mod:`xrayfeat.cams`) and an overview whose *strongest* channel is the one with the largest
spatial mean of its rectified map; ``index.html`` links them all, grouped by image and
depth. Channel-grid normalisation: see the notes in :mod:`xrayfeat.figures`. The class
contrast over a whole split is :mod:`xrayfeat.contrast`.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import quote

import numpy as np

from xrayfeat.atomic import prepare_out_dir, write_text
from xrayfeat.cams import CAM_TAGS, CAM_TITLES, gradcam_maps
from xrayfeat.choices import CAM_METHODS
from xrayfeat.dataset import iter_image_files
from xrayfeat.errors import ImageReadError, RunError, UsageError, XrayfeatError
from xrayfeat.layer_figures import (check_cmap, plot_cam_overlay, plot_channel_grid,
                                    plot_filters, plot_overview)
from xrayfeat.filenames import inside, safe_component, shorten, unique_stems
from xrayfeat.imaging import read_radiograph
from xrayfeat.layers import (ActivationModel, LayerInfo, conv_layers, rectified_layer,
                             select_layers)
from xrayfeat.metrics import decide, operating_threshold
from xrayfeat.pages import figure_html, page_html
from xrayfeat.preprocessing import prepare_file
from xrayfeat.runs import load_run

DEFAULT_MAX_CHANNELS = 64  # an 8 x 8 grid: readable on one screen; --max-channels for more
_DISPLAY_SIDE = 512  # the overview's input panel is decoded at about this size


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


def _evidence(classes: Sequence[str], reported: float, threshold: float | None) -> str:
    """The probability behind a prediction, said unambiguously."""
    if len(classes) == 2:
        return f"P({classes[1]}) = {float(reported):.3f}, threshold {threshold:.3g}"
    return f"p = {float(reported):.3f}"


# One batch loop over the images with one forward pass per batch: layer grids, CAMs
# and the overview of an image are drawn from the same outputs, so they stay together.
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

    started = time.perf_counter()
    out = Path(out)
    if cam_method not in CAM_METHODS:
        raise UsageError(f"unknown --cam {cam_method!r}; use one of {', '.join(CAM_METHODS)}")
    if max_channels < 1:
        raise UsageError(f"--max-channels must be at least 1, got {max_channels}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    check_cmap(cmap)
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
    threshold = operating_threshold(run.threshold) if len(classes) == 2 else None
    prepare_out_dir(out, overwrite)

    extractor = ActivationModel(model, [info.name for info in chosen] + list(rectified.values()))
    stems = unique_stems(paths)
    filters_png = None
    if filters:
        if not convs:
            raise RunError("the model has no Conv2D layer whose filters could be drawn")
        first = model.get_layer(convs[0].name)
        filters_png = plot_filters(
            np.asarray(first.kernel), inside(out, f"filters_{safe_component(first.name)}.png"),
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
        labels, reported = decide(probs, classes, threshold)
        targets = np.full(len(batch), forced) if forced is not None else np.asarray(labels)
        cams = {"gradcam": gradcam_maps(model, x, targets, "gradcam")}
        if cam_method != "gradcam":
            cams[cam_method] = gradcam_maps(model, x, targets, cam_method)
        for i, (path, stem, prep) in enumerate(batch):
            folder = inside(out, stem)
            folder.mkdir(exist_ok=True)
            predicted = classes[int(labels[i])]
            target = classes[int(targets[i])]
            p_target = float(probs[i, int(targets[i])])
            head = f"{shorten(path)}: predicted {predicted} ({_evidence(classes, reported[i], threshold)})"
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
                    maps, folder / f"{stem}_d{info.depth}_{safe_component(info.name)}.png",
                    title=f"{shorten(path)}\n{info.name} ({info.kind}), depth {info.depth}, "
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
                 figure_html(out, result.filters, "learned filters of the first conv layer", 360),
                 "</div>"]
    for image in result.images:
        body.append(f'<h2 id="{html.escape(quote(image.stem))}">{html.escape(str(image.source))}</h2>')
        body.append(f'<p>predicted <b>{html.escape(image.predicted)}</b> '
                    f'({html.escape(image.evidence)}); CAMs for {html.escape(image.cam_class)}</p>')
        body.append('<div class="row">')
        body.append(figure_html(out, image.overview, "overview", 560))
        for method, path in image.cams.items():
            body.append(figure_html(out, path, CAM_TITLES[method], 280))
        body.append("</div>")
        depths: dict[int, list[tuple[LayerInfo, Path]]] = {}
        for info, path in image.grids:
            depths.setdefault(info.depth, []).append((info, path))
        for depth, items in sorted(depths.items()):
            body.append(f"<h3>depth {depth}</h3>")
            body.append('<div class="row">')
            for info, path in items:
                h, w, c = info.shape
                body.append(figure_html(out, path, f"{info.name} ({h}x{w}x{c})", 300))
            body.append("</div>")
    if result.skipped:
        body.append(f"<h2>Skipped ({len(result.skipped)})</h2><table>")
        body += [f"<tr><td>{html.escape(p)}</td><td>{html.escape(r)}</td></tr>"
                 for p, r in result.skipped]
        body.append("</table>")
    return page_html("xrayfeat visualize-layers", body)


