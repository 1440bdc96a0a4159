"""Class contrast: which channels respond differently to each class, over a whole split.

:func:`class_contrast` streams a dataset split in batches and keeps only running sums (per
class: images, sum of mean maps, and per channel the sum and sum of squares of each
image's mean response), so memory does not grow with the split. It ranks the channels
whose response differs most between classes by Cohen's d. The *response* of a channel on
an image is the spatial mean of its rectified map (:mod:`xrayfeat.layers`).
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from xrayfeat.atomic import prepare_out_dir, write_text
from xrayfeat.csvout import csv_text
from xrayfeat.dataset import iter_split
from xrayfeat.errors import DatasetError, RunError, UsageError
from xrayfeat.layer_figures import check_cmap, plot_class_means, plot_top_channels
from xrayfeat.filenames import inside, relative_href, safe_component
from xrayfeat.layers import ActivationModel, LayerInfo, conv_layers, rectified_layer
from xrayfeat.pages import figure_html, page_html
from xrayfeat.runs import open_run_on_split


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


# One streaming pass over the split that keeps running sums: kept whole so the sums,
# the batch loop and the figures drawn from them read top to bottom.
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

    started = time.perf_counter()
    out = Path(out)
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    check_cmap(cmap)
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
        tag = f"d{conv.depth}_{safe_component(conv.name)}"
        rect = rectified[conv.name]
        what = conv.name if rect == conv.name else f"{conv.name} (rectified: {rect})"
        present = [(c, layer_sums.maps[k] / counts_arr[k]) for k, c in enumerate(classes)
                   if counts_arr[k] > 0]
        figures.append(plot_class_means(
            [(f"{c} (n={counts[c]})", m.mean(axis=-1)) for c, m in present],
            inside(out, f"contrast_{tag}_class_means.png"),
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
                inside(out, f"contrast_{tag}_top_{safe_component(la)}_vs_"
                             f"{safe_component(lb)}.png"),
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
            f'<a href="{relative_href(out, result.table)}">{html.escape(result.table.name)}</a>; top channels: '
            f'<a href="{relative_href(out, result.summary)}">{html.escape(result.summary.name)}</a>.</p>']
    body += [f'<p class="note">{html.escape(n)}</p>' for n in result.notes]
    for conv in result.layers:
        h, w, c = conv.shape
        body.append(f"<h2>depth {conv.depth}: {html.escape(conv.name)} ({h}x{w}x{c})</h2>")
        body.append('<div class="row">')
        tag = f"contrast_d{conv.depth}_{safe_component(conv.name)}_"
        for fig in result.figures:
            if fig.name.startswith(tag):
                body.append(figure_html(out, fig, fig.stem[len(tag):].replace("_", " "), 420))
        body.append("</div><table><tr><th>comparison</th><th>rank</th><th>channel</th>"
                    "<th>Cohen's d</th><th>mean a</th><th>mean b</th></tr>")
        for r in result.top:
            if r.layer == conv.name:
                body.append(f"<tr><td>{html.escape(r.comparison)}</td><td>{r.rank}</td>"
                            f"<td>{r.channel}</td><td>{r.cohens_d:+.3f}</td>"
                            f"<td>{r.mean_a:.4g}</td><td>{r.mean_b:.4g}</td></tr>")
        body.append("</table>")
    return page_html("xrayfeat class contrast", body)
