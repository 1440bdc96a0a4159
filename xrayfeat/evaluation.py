"""Scoring runs on datasets and folders, and writing the evaluation report.

The metrics themselves are in :mod:`xrayfeat.metrics` (pure NumPy / scikit-learn); this
module gets the probabilities (a prepared dataset's split, streamed, or a labelled folder
through ``predict``'s path), calls the metrics, and writes ``metrics.json``,
``predictions.csv`` and the figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from xrayfeat import figures
from xrayfeat.atomic import write_text
from xrayfeat.csvout import csv_text
from xrayfeat.choices import SPLITS, THRESHOLD_METHODS
from xrayfeat.dataset import (find_labelled_files, iter_split, load_split, open_dataset,
                              split_indices)
from xrayfeat.errors import DatasetError, RunError, UsageError
from xrayfeat.metrics import binary_metrics, decide, evaluate_predictions
from xrayfeat.prediction import predict_files
from xrayfeat.preprocessing import prepare_file
from xrayfeat.report import write_report_page
from xrayfeat.runs import check_dataset_matches, load_run
from xrayfeat.thresholds import choose_threshold as choose_operating_point
from xrayfeat.tta import check_views, predict_batch


# -------------------------------------------------------------------------- evaluate runs


@dataclass
class EvaluationResult:
    """Reports of one or more runs on the same images, for the CLI to render."""

    data: str
    split: str | None
    notices: list[str]
    reports: dict[str, dict[str, Any]]  # run name -> report
    left_out: list[tuple[str, str]]  # (path, reason) of files that could not be read
    files: list[str]  # written outputs


def _run_label(path: Path, taken: set[str]) -> str:
    """A short, unique name for a run in tables and legends."""
    name = path.resolve().name or str(path)
    label, k = name, 2
    while label in taken:
        label, k = f"{name}-{k}", k + 1
    taken.add(label)
    return label


def _dataset_predictions(runs, models, data: Path, split: str, notices: list[str], tta: int):
    """Probabilities of every run on one split of a prepared dataset, streamed in batches."""

    info = open_dataset(data)
    if split not in info.split_counts:
        if split == "test" and info.split_counts.get("val"):
            notices.append(f"{data} has no 'test' split; evaluating on 'val' instead "
                           "(validation scores flatter: the threshold was chosen on it)")
            split = "val"
        else:
            info.require_split(split)  # raises with the splits present
    for run in runs:
        check_dataset_matches(run, info)
        if run.preprocess.roi != info.roi:
            notices.append(f"{data} was prepared with roi={info.roi} but run {run.path} with "
                           f"roi={run.preprocess.roi}: images are not seen as in training")
        if run.preprocess.resize != info.resize:
            notices.append(f"{data} was prepared with --resize {info.resize} but run "
                           f"{run.path} with --resize {run.preprocess.resize}: images are not "
                           "seen as in training")
    meta = load_split(data, split, with_images=False)
    probs = [[] for _ in runs]
    for images, _ in iter_split(data, split, batch_size=128):
        x = images[..., None].astype(np.float32)
        for k, model in enumerate(models):
            probs[k].append(predict_batch(model, x, tta))
    return split, meta.labels, meta.patients, meta.paths, [np.concatenate(p) for p in probs]


def _folder_predictions(runs, data: Path, split: str, left_out: list, tta: int):
    """Probabilities on a class folder through ``predict``'s own code path."""

    root = data
    sub = [p for p in data.iterdir() if p.is_dir() and p.name.lower() in SPLITS]
    if sub:
        matches = [p for p in sub if p.name.lower() == split]
        if not matches:
            raise DatasetError(f"{data} has no '{split}' folder; it has "
                               f"{', '.join(sorted(p.name for p in sub))}")
        root = matches[0]
    files, classes, _ = find_labelled_files(root)
    for run in runs:
        if sorted(c.casefold() for c in classes) != sorted(c.casefold() for c in run.classes):
            raise DatasetError(f"classes differ: run {run.path} has {run.classes}, "
                               f"{root} has {classes}")
    index = {c.casefold(): i for i, c in enumerate(runs[0].classes)}
    paths = [f.path for f in files]
    per_run = []
    for run in runs:
        rows = [r for batch in predict_files(run, paths, tta=tta) for r in batch]
        per_run.append(rows)
    ok = [i for i, r in enumerate(per_run[0]) if not r["error"]]
    left_out.extend((r["path"], r["error"]) for r in per_run[0] if r["error"])
    labels = np.array([index[files[i].class_name.casefold()] for i in ok], dtype=int)
    patients = np.array([files[i].patient for i in ok])
    out_paths = np.array([str(paths[i]) for i in ok])
    probs = [np.array([[rows[i][f"prob_{c}"] for c in run.classes] for i in ok], dtype=float)
             for run, rows in zip(runs, per_run)]
    return labels, patients, out_paths, probs


def evaluate_runs(
    run_paths: list[Path],
    data: Path,
    *,
    split: str = "test",
    out: Path | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    tta: int = 1,
    choose_threshold: str | None = None,
    threshold_sensitivity: float = 0.95,
) -> EvaluationResult:
    """Evaluate runs on a dataset split (.h5) or a class folder; write report files to ``out``.

    Each run is scored at its own operating threshold (chosen on validation by ``train``)
    unless ``threshold`` is given. Confidence intervals resample patients. ``tta`` > 1
    averages each image's probabilities over that many fixed views (xrayfeat.tta).
    ``choose_threshold`` (a threshold method) also picks each binary run's threshold on
    these images: see :func:`threshold_for_these_images`.
    """

    check_views(tta)
    if choose_threshold is not None and choose_threshold not in THRESHOLD_METHODS:
        raise UsageError(f"--choose-threshold must be one of {', '.join(THRESHOLD_METHODS)}, "
                         f"got {choose_threshold!r}")
    if not 0 < threshold_sensitivity <= 1:
        raise UsageError(f"--threshold-sensitivity must be in (0, 1], got "
                         f"{threshold_sensitivity}")
    if not run_paths:
        raise UsageError("give at least one run directory before DATA")
    if not data.exists():
        raise UsageError(f"{data} does not exist")
    if n_boot < 0:
        raise UsageError("--bootstrap must be 0 or more")
    runs = [load_run(p) for p in run_paths]
    if len({tuple(r.classes) for r in runs}) > 1:
        raise DatasetError("the runs have different classes; compare runs trained on the same "
                           "classes")
    if choose_threshold is not None and len(runs[0].classes) != 2:
        raise UsageError("--choose-threshold needs binary runs: runs of more classes decide by "
                         "the most probable class, without a threshold")
    notices: list[str] = []
    left_out: list[tuple[str, str]] = []
    if data.is_dir():
        labels, patients, paths, probs = _folder_predictions(runs, data, split, left_out, tta)
    else:
        models = [r.load_model() for r in runs]
        split, labels, patients, paths, probs = _dataset_predictions(runs, models, data, split,
                                                                     notices, tta)
    if len(labels) == 0:
        raise DatasetError(f"no readable images to evaluate in {data}")
    for run, p in zip(runs, probs):
        if not np.isfinite(p).all():
            raise RunError(f"run {run.path}'s model gives no number (NaN or infinite) for "
                           f"{int((~np.isfinite(p).all(axis=1)).sum())} image(s): its weights "
                           "are damaged; retrain it")
    taken: set[str] = set()
    names = [_run_label(r.path, taken) for r in runs]
    reports = {}
    for name, run, prob in zip(names, runs, probs):
        thr = threshold if threshold is not None else run.threshold
        report = evaluate_predictions(labels, prob, run.classes, threshold=thr,
                                      groups=patients, n_boot=n_boot, seed=seed)
        report["run"] = str(run.path)
        report["left_out"] = len(left_out)
        if choose_threshold is not None:
            report["threshold_for_these_images"] = threshold_for_these_images(
                labels, prob, choose_threshold, groups=patients,
                min_sensitivity=threshold_sensitivity, n_boot=n_boot, seed=seed)
        reports[name] = report
    files = []
    if out:
        files = _write_report(out, names, runs, reports, labels, paths, probs, left_out)
        figures_written = [Path(f) for f in files if f.endswith(".png")]
        files += [str(f) for f in write_report_page(
            out, data=str(data), split=None if data.is_dir() else split, names=names,
            runs=runs, reports=reports, labels=labels, paths=paths, probs=probs,
            left_out=left_out, figures=figures_written,
            stored=_stored_images(data, split, paths, runs[0]))]
    return EvaluationResult(data=str(data), split=split if not data.is_dir() else split,
                            notices=notices, reports=reports, left_out=left_out, files=files)


def threshold_for_these_images(labels: np.ndarray, prob: np.ndarray, method: str, *,
                               groups: np.ndarray, min_sensitivity: float,
                               n_boot: int, seed: int) -> dict[str, Any]:
    """The threshold ``method`` picks on these labelled images, as ``train`` picks one on
    validation, with its 95 % interval over patients and the figures at it.

    For a site's own labelled images: a threshold chosen on train's validation split need
    not suit another site's (BENCHMARKS.md, "Generalisation"). The figures are measured on
    the images the threshold was chosen on, so they flatter it; it is meant for the site's
    other images (``predict --threshold``).
    """
    if len(np.unique(labels)) < 2:
        raise DatasetError("choosing a threshold needs images of both classes in the data")
    point = choose_operating_point(labels, prob[:, 1], method, groups=groups,
                                   min_sensitivity=min_sensitivity, n_boot=n_boot, seed=seed)
    at = binary_metrics(labels, prob[:, 1], point.threshold)
    return {**point.to_dict(), **{k: at[k] for k in ("sensitivity", "specificity",
                                                     "accuracy", "n")}}


def _stored_images(data: Path, split: str, paths, run) -> Callable[[list[int]], np.ndarray]:
    """Reads the stored images ``(n, S, S)`` of the evaluated rows at given positions: from
    the dataset, or prepared again from the folder's files (as predict does)."""
    if data.is_dir():
        return lambda rows: np.stack([prepare_file(paths[i], run.preprocess).image
                                      for i in rows])
    index = split_indices(data, split)

    def read(rows: list[int]) -> np.ndarray:
        with h5py.File(data, "r") as h5:
            return np.stack([h5["images"][int(index[i])] for i in rows])

    return read


def _write_report(out: Path, names, runs, reports, labels, paths, probs, left_out) -> list[str]:
    """metrics.json, predictions.csv and the figures, each written atomically."""

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    classes = runs[0].classes
    single = len(names) == 1
    metrics = reports[names[0]] if single else {"runs": reports}
    write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
    written.append(out / "metrics.json")
    table: list[list] = []
    header = ["path", "true_label"]
    for name in names:
        prefix = "" if single else f"{name}:"
        header += [f"{prefix}probability", f"{prefix}predicted_label"]
    decided = [decide(prob, classes, reports[name].get("threshold"))
               for name, prob in zip(names, probs)]
    for i, path in enumerate(paths):
        row = [path, classes[labels[i]]]
        for pred, reported in decided:
            row += [round(float(reported[i]), 6), classes[pred[i]]]
        table.append(row)
    for path, reason in left_out:
        table.append([path, "", "", f"left out: {reason}"] + [""] * (len(header) - 4))
    write_text(out / "predictions.csv", csv_text(table, header))
    written.append(out / "predictions.csv")
    if len(classes) == 2:
        curves = [(name, labels, prob[:, 1], reports[name]["threshold"])
                  for name, prob in zip(names, probs)]
        written.append(figures.plot_roc(curves, out / "roc.png"))
        written.append(figures.plot_pr(curves, out / "pr.png"))
    else:
        for name, prob in zip(names, probs):
            suffix = "" if single else f"_{name}"
            written.append(figures.plot_per_class_roc(labels, prob, classes,
                                                      out / f"roc_per_class{suffix}.png"))
    for name, prob in zip(names, probs):
        suffix = "" if single else f"_{name}"
        report = reports[name]
        cm = report["confusion_matrix"]
        if isinstance(cm, dict):  # binary: rows true NORMAL/PNEUMONIA, columns predicted
            cm = [[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]]
        written.append(figures.plot_confusion(np.array(cm), classes, out / f"confusion{suffix}.png"))
        if len(classes) == 2:
            written.append(figures.plot_reliability(labels, prob[:, 1],
                                                    out / f"reliability{suffix}.png"))
            written.append(figures.plot_score_distribution(
                labels, prob[:, 1], classes, report["threshold"], out / f"scores{suffix}.png"))
    return [str(p) for p in written]
