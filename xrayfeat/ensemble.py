"""Ensembles as runs: several trained runs averaged into one ordinary run directory.

The ensemble's ``model.keras`` is one flat Keras graph (xrayfeat.model.build_ensemble):
every member's layers, renamed ``member{i}_{layer}``, read one shared input, and an
``Average`` layer (named ``predictions``) averages their class probabilities. Being an
ordinary functional model of Keras' own layers, it loads with ``safe_mode``, and
predict, evaluate, audit and visualize-layers read it unchanged (Grad-CAM averages the
members' maps). Its threshold is chosen again on the validation split all members
share, with the members' threshold method.

Averaging independently trained networks is the method whose benefit under dataset shift
is best documented (Lakshminarayanan et al. 2017; Ovadia et al. 2019): the members agree
on what generalises and disagree on what each latched onto.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


from xrayfeat.atomic import atomic_output
from xrayfeat.choices import THRESHOLD_METHODS
from xrayfeat.dataset import load_split, open_dataset
from xrayfeat.errors import DatasetError, UsageError
from xrayfeat.metrics import evaluate_predictions
from xrayfeat.thresholds import choose_threshold
from xrayfeat.runs import (MODEL_FILE, VALIDATION_FILE, file_sha256, load_run, write_json,
                           write_run_config)
from xrayfeat.training import predict_local, val_auc

@dataclass
class EnsembleResult:
    """What ``ensemble`` returns to the CLI."""
    run: Path
    members: list[str]
    threshold: float | None
    threshold_method: str | None
    threshold_ci: dict[str, Any] | None
    validation: dict[str, Any]
    member_val_auc: list[float]
    val_auc: float
    seconds: float


def _data_of(runs, data: Path | None) -> Path:
    """The prepared dataset every member was trained on (checked by SHA-256)."""
    hashes = {r.config.data.sha256 if r.config.data else None for r in runs}
    if len(hashes) != 1 or None in hashes:
        raise DatasetError("the members were trained on different data; ensemble runs trained "
                           "on the same prepared dataset (their validation splits must agree)")
    path = Path(data) if data is not None else Path(runs[0].config.data.path)
    if not path.is_file():
        raise UsageError(f"the members' dataset {path} is not there; pass --data with it")
    if file_sha256(path) != hashes.pop():
        raise DatasetError(f"{path} is not the dataset the members were trained on "
                           "(SHA-256 differs)")
    return path


def ensemble_runs(
    run_paths: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    threshold_method: str | None = None,
    overwrite: bool = False,
) -> EnsembleResult:
    """Average trained runs into a new run directory ``out`` and choose its threshold on
    the validation split they share."""
    from xrayfeat.model import build_ensemble

    started = time.perf_counter()
    out = Path(out)
    if len(run_paths) < 2:
        raise UsageError("an ensemble needs at least two runs")
    if threshold_method is not None and threshold_method not in THRESHOLD_METHODS:
        raise UsageError(f"--threshold-method must be one of {', '.join(THRESHOLD_METHODS)}")
    runs = [load_run(p) for p in run_paths]
    if len({p.resolve() for p in (r.path for r in runs)}) != len(runs):
        raise UsageError("a run is named twice; an ensemble's members must differ")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if any(out.resolve() == r.path.resolve() for r in runs):
        raise UsageError("--out must not be one of the members")
    first = runs[0]
    for run in runs[1:]:
        if run.classes != first.classes:
            raise DatasetError(f"classes differ: {run.path} has {run.classes}, "
                               f"{first.path} has {first.classes}")
        if run.config.preprocess != first.config.preprocess:
            raise DatasetError(f"{run.path} was prepared differently from {first.path} "
                               "(size or ROI settings); ensemble runs on the same data")
    data_path = _data_of(runs, Path(data) if data is not None else None)
    info = open_dataset(data_path)
    val = load_split(info.path, "val")
    models = [r.load_model() for r in runs]
    member_probs = [predict_local(m, val.images[..., None]) for m in models]
    model = build_ensemble(models)
    probs = predict_local(model, val.images[..., None])

    train_settings = dict(first.config.train)
    method = threshold_method or train_settings.get("threshold_method", "youden")
    validation: dict[str, Any] = {"threshold": None, "threshold_method": None}
    if len(first.classes) == 2:
        point = choose_threshold(val.labels, probs[:, 1], method, groups=val.patients,
                                 min_sensitivity=float(train_settings.get(
                                     "threshold_sensitivity", 0.95)))
        validation.update(point.to_dict())
    metrics = evaluate_predictions(val.labels, probs, first.classes,
                                   threshold=validation["threshold"], groups=val.patients,
                                   n_boot=0)
    validation.update(best_epoch=None, metrics=metrics)
    member_aucs = [val_auc(val.labels, p) for p in member_probs]
    config = replace(first.config, train={**train_settings, "threshold_method": method},
                     extra={**first.config.extra, "ensemble": {
                         "members": [str(r.path.resolve()) for r in runs],
                         "member_model_sha256": [file_sha256(r.model_path) for r in runs],
                         "member_val_auc": member_aucs}})

    with atomic_output(out, directory=True) as tmp:
        model.save(tmp / MODEL_FILE)
        write_run_config(tmp, config)
        write_json(tmp / VALIDATION_FILE, validation)
    return EnsembleResult(run=out, members=[str(r.path) for r in runs],
                          threshold=validation["threshold"],
                          threshold_method=validation["threshold_method"],
                          threshold_ci=validation.get("threshold_ci"), validation=metrics,
                          member_val_auc=member_aucs, val_auc=val_auc(val.labels, probs),
                          seconds=time.perf_counter() - started)
