"""What the network sees, drawn to PNG: channel grids, filters, CAM overlays, per-image
overviews and class-contrast figures.

Normalisation of activation maps, the same in every figure here:

* per channel (default): every tile is min-max scaled on its own, so each channel uses the
  whole colormap and its spatial pattern is visible however weak it is; brightness can
  NOT be compared between tiles. A channel that is constant on the image is drawn at the
  colormap's low end and labelled "flat".
* shared (``shared_scale=True``): one min-max range over all tiles shown for the layer
  and image, with a colour bar in activation units, so tiles can be compared with each
  other (weak channels then look dark).

Class-activation maps are already scaled to [0, 1] per image (tf-keras-vis' convention)
and drawn with the ``jet`` colormap at alpha 0.4 over the grayscale radiograph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np

from xrayfeat.errors import UsageError
from xrayfeat.figures import atomic_savefig, plt


CAM_CMAP = "jet"  # the colormap Grad-CAM figures are usually read with


CAM_ALPHA = 0.4  # enough heat to read, enough radiograph to see the anatomy under it


def _scale01(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """Min-max scale to [0, 1]; (zeros, True) for a constant array."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(np.min(a)), float(np.max(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(a), True
    return (a - lo) / (hi - lo), False


def channel_mosaic(
    maps: np.ndarray, channels: Sequence[int], *, shared_scale: bool = False, gap: int | None = None
) -> tuple[np.ndarray, int, list[bool], tuple[float, float]]:
    """Tile ``maps[..., channels]`` (``maps`` is (h, w, C)) into one 2-D array.

    Returns ``(mosaic, columns, flat, (vmin, vmax))``. Gaps between tiles are NaN. With the
    default per-channel scaling every tile is in [0, 1] and the range is (0, 1); with
    ``shared_scale`` tiles keep their activation values and the range is their min and max.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"expected an (h, w, channels) array, got shape {maps.shape}")
    channels = list(channels)
    n = len(channels)
    h, w = maps.shape[:2]
    cols = max(1, int(np.ceil(np.sqrt(n))))
    rows = max(1, int(np.ceil(n / cols)))
    gap = max(1, min(h, w) // 16) if gap is None else gap
    mosaic = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap), np.nan, np.float32)
    flat: list[bool] = []
    if shared_scale:
        shown = maps[..., channels]
        vmin, vmax = float(shown.min()), float(shown.max())
        if vmax - vmin <= 1e-12 * max(1.0, abs(vmax)):
            vmax = vmin + 1.0
    else:
        vmin, vmax = 0.0, 1.0
    for k, ch in enumerate(channels):
        r, c = divmod(k, cols)
        tile = maps[..., ch]
        if shared_scale:
            is_flat = bool(np.ptp(tile) <= 1e-12 * max(1.0, abs(float(tile.max()))))
        else:
            tile, is_flat = _scale01(tile)
        flat.append(is_flat)
        mosaic[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return mosaic, cols, flat, (vmin, vmax)


def _cmap(name: str):
    return matplotlib.colormaps[name].with_extremes(bad="white")


def plot_channel_grid(
    maps: Any,
    path: str | os.PathLike[str],
    *,
    title: str,
    channels: Sequence[int] | None = None,
    shared_scale: bool = False,
    cmap: str = "viridis",
) -> Path:
    """One layer's output for one image: a grid of its channels, numbered.

    ``maps`` is (h, w, C); ``channels`` picks and orders the tiles (default: all). The
    normalisation (per channel or shared) is stated under the title, see the notes above.
    """
    maps = np.asarray(maps, dtype=np.float32)
    channels = list(range(maps.shape[-1])) if channels is None else list(channels)
    mosaic, cols, flat, (vmin, vmax) = channel_mosaic(maps, channels, shared_scale=shared_scale)
    h, w = maps.shape[:2]
    rows = int(np.ceil(len(channels) / cols))
    tile_in = float(np.clip(9.0 / cols, 0.9, 2.2))
    fig_w = cols * tile_in + 1.2
    fig_h = rows * tile_in * h / w + 1.1
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(mosaic, cmap=_cmap(cmap), vmin=vmin, vmax=vmax, interpolation="nearest")
    gap = max(1, min(h, w) // 16)
    fontsize = float(np.clip(5 + tile_in * 2, 6, 9))
    for k, ch in enumerate(channels):
        r, c = divmod(k, cols)
        x0, y0 = c * (w + gap), r * (h + gap)
        label = f"{ch}" + (" flat" if flat[k] else "")
        ax.text(x0 + 0.5, y0 + 0.5, label, color="white", fontsize=fontsize, va="top", ha="left",
                bbox=dict(facecolor="black", alpha=0.55, pad=0.6, lw=0))
    ax.set_axis_off()
    scale = ("shared scale across the layer (colour bar in activation units)" if shared_scale
             else "each channel min-max scaled on its own (tiles not comparable)")
    ax.set_title(f"{title}\n{scale}; cmap {cmap}", fontsize=10)
    cbar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    cbar.set_label("activation" if shared_scale else "per-channel min-max", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    return atomic_savefig(fig, path)


def plot_filters(kernel: Any, path: str | os.PathLike[str], *, title: str) -> Path:
    """The learned kernels of a convolutional layer, one tile per output channel.

    ``kernel`` is (kh, kw, in, out); with several input channels their mean is drawn.
    Weights are signed, so one symmetric range is shared by every tile (diverging colormap:
    red excites, blue inhibits).
    """
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 4:
        raise ValueError(f"expected a (kh, kw, in, out) kernel, got shape {k.shape}")
    maps = k.mean(axis=2) if k.shape[2] > 1 else k[:, :, 0, :]
    m = float(np.abs(maps).max()) or 1.0
    n = maps.shape[-1]
    cols = max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 1.2, rows * 0.9 + 1.0), squeeze=False,
                             layout="constrained")
    im = None
    for idx, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if idx < n:
            im = ax.imshow(maps[..., idx], cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
            ax.set_title(str(idx), fontsize=7, pad=1)
    note = f"mean over {k.shape[2]} input channels, " if k.shape[2] > 1 else ""
    fig.suptitle(f"{title}\n{k.shape[0]}x{k.shape[1]} kernels, {note}one symmetric scale", fontsize=10)
    if im is not None:
        cbar = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        cbar.set_label("weight", fontsize=8)
    return atomic_savefig(fig, path)


def _draw_cam(ax: Any, image: np.ndarray, cam: np.ndarray, alpha: float = CAM_ALPHA):
    ax.imshow(image, cmap="gray", interpolation="bilinear")
    im = ax.imshow(cam, cmap=CAM_CMAP, alpha=alpha, vmin=0, vmax=1, interpolation="bilinear",
                   extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
    ax.set_axis_off()
    return im


def plot_cam_overlay(
    image: Any, cam: Any, path: str | os.PathLike[str], *, title: str, alpha: float = CAM_ALPHA
) -> Path:
    """A class-activation map (values in [0, 1]) over the grayscale image it explains."""
    image = np.asarray(image)
    image = image[..., 0] if image.ndim == 3 else image
    fig, ax = plt.subplots(figsize=(5.2, 5))
    im = _draw_cam(ax, image, np.asarray(cam, dtype=np.float32), alpha)
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("relative importance (scaled to [0, 1] per image)", fontsize=8)
    return atomic_savefig(fig, path)


def plot_overview(
    raw: Any,
    roi_box: tuple[int, int, int, int] | None,
    crop: Any,
    strongest: Sequence[tuple[str, Any]],
    cam: Any,
    probs: Sequence[float],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str,
    cam_title: str = "Grad-CAM",
    cmap: str = "viridis",
    predicted: int | None = None,
    threshold: float | None = None,
) -> Path:
    """One image at a glance.

    Top row: the input radiograph with the ROI box, the crop the model saw, the CAM overlay
    and the class probabilities (the ``predicted`` class in red, default the most probable;
    ``threshold`` on the positive class of a binary run is drawn as a dashed line). Bottom
    row: one strongest channel per depth (each min-max scaled on its own), given as
    ``(label, map)`` pairs.
    """
    raw = np.asarray(raw)
    crop = np.asarray(crop)
    crop = crop[..., 0] if crop.ndim == 3 else crop
    n_bottom = max(1, len(strongest))
    cols = max(4, n_bottom)
    fig, axes = plt.subplots(2, cols, figsize=(3.1 * cols, 6.9), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    ax = axes[0, 0]
    ax.imshow(raw, cmap="gray")
    if roi_box is not None:
        x0, y0, x1, y1 = roi_box
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="yellow",
                               lw=1.5))
    ax.set_title(f"input {raw.shape[1]}x{raw.shape[0]}" + (" + ROI" if roi_box else ""), fontsize=9)
    ax = axes[0, 1]
    ax.imshow(crop, cmap="gray")
    ax.set_title(f"ROI crop the model saw ({crop.shape[1]}x{crop.shape[0]})", fontsize=9)
    _draw_cam(axes[0, 2], crop, np.asarray(cam, dtype=np.float32))
    axes[0, 2].set_title(cam_title, fontsize=9)
    ax = axes[0, 3]
    ax.set_axis_on()
    p = np.asarray(probs, dtype=np.float64)
    best = predicted if predicted is not None else (int(np.argmax(p)) if p.size else -1)
    ax.barh(range(len(class_names)), p,
            color=["tab:red" if i == best else "tab:gray" for i in range(len(class_names))])
    ax.set_yticks(range(len(class_names)), labels=list(class_names), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    if threshold is not None and len(class_names) == 2:
        ax.plot([threshold, threshold], [0.55, 1.45], ls="--", color="black", lw=1.2)
    for i, v in enumerate(p):
        ax.text(min(v + 0.02, 0.8), i, f"{v:.3f}", va="center", fontsize=8)
    ax.set_xlabel("probability" + (f" (dashed: threshold {threshold:.3g})"
                                   if threshold is not None and len(class_names) == 2 else ""),
                  fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("class probabilities", fontsize=9)
    for j, (label, m) in enumerate(strongest):
        m01, _ = _scale01(np.asarray(m))
        axes[1, j].imshow(m01, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axes[1, j].set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def plot_class_means(
    maps: Sequence[tuple[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str,
    difference: tuple[str, str] | None = None,
    cmap: str = "viridis",
) -> Path:
    """Mean activation map per class (one shared scale), plus a difference panel.

    ``maps`` is ``[(class_label, (h, w) map), ...]``; ``difference=(a, b)`` adds ``a - b``
    on a symmetric diverging scale.
    """
    arrays = [np.asarray(m, dtype=np.float32) for _, m in maps]
    vmin = float(min(a.min() for a in arrays))
    vmax = float(max(a.max() for a in arrays))
    if vmax <= vmin:
        vmax = vmin + 1.0
    n = len(arrays) + (1 if difference else 0)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.2, 3.9), squeeze=False,
                             layout="constrained")
    im = None
    for ax, (label, _), a in zip(axes[0], maps, arrays):
        im = ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=axes[0, : len(arrays)].tolist(), fraction=0.03, pad=0.02,
                     label="mean activation")
    if difference:
        lookup = dict(zip((label for label, _ in maps), arrays))
        d = lookup[difference[0]] - lookup[difference[1]]
        m = float(np.abs(d).max()) or 1.0
        ax = axes[0, -1]
        dim = ax.imshow(d, cmap="RdBu_r", vmin=-m, vmax=m)
        ax.set_title(f"{difference[0]} - {difference[1]}", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(dim, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle(title, fontsize=10)
    return atomic_savefig(fig, path)


def plot_top_channels(
    rows: Sequence[tuple[int, float, Any, Any]],
    labels: tuple[str, str],
    path: str | os.PathLike[str],
    *,
    title: str,
    cmap: str = "viridis",
) -> Path:
    """Channels that separate two groups most: one row each, ranked.

    ``rows`` holds ``(channel, cohens_d, mean_map_a, mean_map_b)``. The two mean maps of a
    row share one scale (so they compare); the third column is ``a - b`` on a symmetric
    diverging scale.
    """
    n = max(1, len(rows))
    fig, axes = plt.subplots(n, 3, figsize=(7.4, 2.25 * n + 1.0), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (channel, d, map_a, map_b) in enumerate(rows):
        a = np.asarray(map_a, dtype=np.float32)
        b = np.asarray(map_b, dtype=np.float32)
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        hi = hi if hi > lo else lo + 1.0
        axes[i, 0].imshow(a, cmap=cmap, vmin=lo, vmax=hi)
        axes[i, 1].imshow(b, cmap=cmap, vmin=lo, vmax=hi)
        diff = a - b
        m = float(np.abs(diff).max()) or 1.0
        axes[i, 2].imshow(diff, cmap="RdBu_r", vmin=-m, vmax=m)
        axes[i, 0].set_title(f"#{i + 1} ch {channel}  d = {d:+.2f}\n{labels[0]}", fontsize=8)
        axes[i, 1].set_title(f"range {lo:.3g}..{hi:.3g}\n{labels[1]}", fontsize=8)
        axes[i, 2].set_title(f"difference (+-{m:.2g})\n{labels[0]} - {labels[1]}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return atomic_savefig(fig, path)


def check_cmap(cmap: str) -> None:
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise UsageError(f"unknown colormap {cmap!r}; try viridis, magma, gray or inferno "
                         "(any matplotlib colormap name)")
