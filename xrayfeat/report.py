"""``report.html``: one page per evaluation that says how good the model is.

Written by ``evaluate --out`` beside ``metrics.json``, ``predictions.csv`` and the figures,
which it links by relative paths (the folder can be zipped or copied whole): where each
run came from (its data's SHA-256, versions, settings, threshold and how it was chosen),
the metrics with their 95 % intervals side by side for every run, every figure, and the
first run's misclassified images as thumbnails with their probability and Grad-CAM.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from xrayfeat.atomic import atomic_output, write_text
from xrayfeat.cams import write_gradcam_overlays
from xrayfeat.filenames import relative_href, unique_stems
from xrayfeat.metrics import decide
from xrayfeat.pages import figure_html, page_html

REPORT_FILE = "report.html"
#: Misclassified images shown (the first ones in file order): enough to see a pattern,
#: few enough for the page and its Grad-CAM maps to stay quick.
MAX_MISCLASSIFIED = 24
_METRIC_ROWS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1",
                "balanced_accuracy", "roc_auc", "pr_auc", "sens_at_spec85", "brier", "ece",
                "threshold", "n")


def _cell(report: dict[str, Any], key: str) -> str:
    value = report.get(key)
    if value is None:
        return ""
    text = f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))
    ci = (report.get("ci") or {}).get(key)
    if ci:
        text += f' <span class="note">({ci["lower"]:.3f}-{ci["upper"]:.3f})</span>'
    return text


def _metrics_table(names: Sequence[str], reports: dict[str, dict]) -> str:
    first = reports[names[0]]
    if "per_class" in first:  # N > 2 classes: the headline numbers and each class's AUC
        rows = [("accuracy", lambda r: r["accuracy"]),
                ("balanced_accuracy", lambda r: r["balanced_accuracy"]),
                ("macro roc_auc", lambda r: r["macro"]["roc_auc"])]
        rows += [(f"{c} roc_auc", lambda r, c=c: r["per_class"][c]["roc_auc"])
                 for c in first["classes"]]
        body = "".join(f"<tr><th>{html.escape(label)}</th>"
                       + "".join(f"<td>{get(reports[n]):.4f}</td>" for n in names) + "</tr>"
                       for label, get in rows)
    else:
        body = "".join(f"<tr><th>{key}</th>" + "".join(f"<td>{_cell(reports[n], key)}</td>"
                                                      for n in names) + "</tr>"
                       for key in _METRIC_ROWS if key in first)
        body += _site_threshold_row(names, reports)
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names)
    return f"<table>{head}</tr>{body}</table>"


def _site_threshold_row(names: Sequence[str], reports: dict[str, dict]) -> str:
    """``evaluate --choose-threshold`` (every run, or none): the threshold picked on these
    images, per run."""
    chosen = [reports[n].get("threshold_for_these_images") for n in names]
    if not chosen[0]:
        return ""
    cells = "".join(
        f"<td>{c['threshold']:.4f} <span class=\"note\">({c['threshold_ci']['lower']:.3f}-"
        f"{c['threshold_ci']['upper']:.3f}); sensitivity {c['sensitivity']:.3f}, specificity "
        f"{c['specificity']:.3f} on the images it was chosen on</span></td>" for c in chosen)
    return (f"<tr><th>threshold chosen on these images "
            f"({html.escape(chosen[0]['threshold_method'])})</th>{cells}</tr>")


def _provenance(names: Sequence[str], runs: Sequence[Any]) -> str:
    rows = []
    for name, run in zip(names, runs):
        config = run.config
        data = config.data
        train = config.train
        settings = ", ".join(f"{k} {train[k]}" for k in ("input_size", "epochs", "batch_size",
                                                           "lr", "seed", "ema") if k in train)
        method = run.validation.get("threshold_method") or "-"
        threshold = "-" if run.threshold is None else f"{run.threshold:.4f} ({method})"
        versions = ", ".join(f"{k} {v}" for k, v in config.versions.items())
        rows.append(
            f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(run.path))}</td>"
            f"<td><code>{html.escape((data.sha256 or '-')[:16] if data else '-')}</code> "
            f"{html.escape(data.path if data else '')}</td>"
            f"<td>{html.escape(settings)}</td><td>{html.escape(threshold)}</td>"
            f"<td>{html.escape(config.created)}</td><td>{html.escape(versions)}</td></tr>")
    return ("<table><tr><th>run</th><th>folder</th><th>trained on (SHA-256)</th>"
            "<th>settings</th><th>threshold</th><th>created</th><th>versions</th></tr>"
            + "".join(rows) + "</table>")


def _misclassified(out: Path, run, report: dict, labels: np.ndarray, paths: Sequence[str],
                   prob: np.ndarray, stored: Callable[[list[int]], np.ndarray]) -> tuple[str, list[Path]]:
    classes = run.classes
    predicted, reported = decide(prob, classes, report.get("threshold"))
    wrong = [int(i) for i in np.flatnonzero(np.asarray(predicted) != labels)]
    if not wrong:
        return "<p>No image was misclassified.</p>", []
    shown = wrong[:MAX_MISCLASSIFIED]
    folder = out / "misclassified"
    folder.mkdir(exist_ok=True)
    images = stored(shown)
    stems = unique_stems([paths[i] for i in shown])
    written: list[Path] = []
    for stem, image in zip(stems, images):
        ok, png = cv2.imencode(".png", image)
        with atomic_output(folder / f"{stem}.png") as tmp:
            tmp.write_bytes(png.tobytes())
        written.append(folder / f"{stem}.png")
    cams = write_gradcam_overlays(run.load_model(), [Path(paths[i]) for i in shown], images,
                                  folder, class_indices=[int(predicted[i]) for i in shown],
                                  class_names=classes, stems=stems)
    written += cams
    cards = []
    for i, stem, cam in zip(shown, stems, cams):
        caption = (f"{Path(paths[i]).name}: true {classes[labels[i]]}, called "
                   f"{classes[predicted[i]]} (p = {float(reported[i]):.3f})")
        cards.append(figure_html(out, folder / f"{stem}.png", caption, 160)
                     + figure_html(out, cam, "Grad-CAM of the called class", 240))
    note = (f"<p>{len(wrong)} misclassified by {html.escape(str(run.path.name))}"
            + (f"; the first {len(shown)} are shown" if len(wrong) > len(shown) else "")
            + ". Each image is what the model saw (the stored crop); the heatmap shows what "
            "spoke for the class it called.</p>")
    return note + '<div class="row">' + "".join(cards) + "</div>", written


def write_report_page(out: Path, *, data: str, split: str | None, names: Sequence[str],
                      runs: Sequence[Any], reports: dict[str, dict], labels: np.ndarray,
                      paths: Sequence[str], probs: Sequence[np.ndarray],
                      left_out: Sequence[tuple[str, str]], figures: Sequence[Path],
                      stored: Callable[[list[int]], np.ndarray]) -> list[Path]:
    """Write ``out/report.html`` (and its thumbnails); return every file written."""
    title = f"xrayfeat evaluation: {Path(data).name}" + (f" [{split}]" if split else "")
    gallery, written = _misclassified(out, runs[0], reports[names[0]], labels, paths,
                                      probs[0], stored)
    others = [f for f in ("metrics.json", "predictions.csv") if (out / f).is_file()]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{len(labels)} images of {html.escape(str(data))}'
        + (f", {len(left_out)} left out (unreadable)" if left_out else "")
        + ". Intervals are 95 % bootstrap intervals over patients. Files: "
        + ", ".join(f'<a href="{relative_href(out, out / f)}">{f}</a>' for f in others)
        + ".</p>",
        "<h2>Runs</h2>", _provenance(names, runs),
        "<h2>Metrics</h2>", _metrics_table(names, reports),
        "<h2>Figures</h2>", '<div class="row">'
        + "".join(figure_html(out, f, f.stem.replace("_", " "), 420) for f in figures)
        + "</div>",
        "<h2>Misclassified</h2>", gallery,
    ]
    page = write_text(out / REPORT_FILE, page_html(title, body))
    return [*written, page]
