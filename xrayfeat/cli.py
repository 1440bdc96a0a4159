"""The ``xrayfeat`` command line: parse options, call one API function, render with Rich.

Each command calls the function of :mod:`xrayfeat.api` (or the core module) that a notebook
would call, with the options as keyword arguments, and hands the result to
:mod:`xrayfeat.render`. Nothing heavy is imported at module level (TensorFlow, OpenCV,
h5py), so ``--help`` answers at once. Results go to stdout, progress and messages to stderr.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional, Sequence

import typer

from xrayfeat import choices
from xrayfeat.cli_base import OneLineErrorsGroup, friendly_errors, quiet_tensorflow, state
from xrayfeat.config import TrainConfig
from xrayfeat.errors import EXIT_FAILURES, UsageError
from xrayfeat.render import (UNBOUNDED_WIDTH, Bar, TrainProgress, err_console,
                             out_console, progress_display, render_audit, render_ensemble,
                             render_evaluate, render_export, render_predict, render_prepare,
                             render_probes, render_train, render_visualize)
from xrayfeat.version import __version__


app = typer.Typer(
    name="xrayfeat",
    cls=OneLineErrorsGroup,
    help="Prepare chest radiographs, train a MiniVGGNet, evaluate it, predict folders, and "
    "see what every layer of the network sees.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_DEFAULTS = TrainConfig()  # shown in --help, so the help can never disagree with the code


def _choice(name: str, values: Sequence[str]) -> type[Enum]:
    """A click.Choice for Typer: ``--help`` lists the values, a typo fails at once."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


Split = _choice("Split", choices.SPLITS)
Resize = _choice("Resize", choices.RESIZE_MODES)
Precision = _choice("Precision", choices.PRECISIONS)
ColorMode = _choice("ColorMode", choices.COLOR_MODES)
ClassWeight = _choice("ClassWeight", choices.CLASS_WEIGHTS)
Strategy = _choice("Strategy", choices.STRATEGIES)
ThresholdMethod = _choice("ThresholdMethod", choices.THRESHOLD_METHODS)
Format = _choice("Format", choices.FORMATS)
Cam = _choice("Cam", choices.CAM_METHODS)
LayerMode = _choice("LayerMode", choices.LAYER_MODES)
ProbePool = _choice("ProbePool", choices.PROBE_POOLS)
ExportFormat = _choice("ExportFormat", choices.EXPORT_FORMATS)


def _value(choice: Enum | None) -> str | None:
    return None if choice is None else choice.value


def _version(value: bool) -> None:
    if value:
        print(f"xrayfeat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state["debug"] = debug
    # Off a terminal (a pipe, a file, a log) no terminal width applies: tables are drawn
    # wide enough never to cut a name, whatever COLUMNS says, and a message stays on its
    # one line however long the path in it.
    for console in (out_console, err_console):
        console.width = None if console.is_terminal else UNBOUNDED_WIDTH
        console.soft_wrap = not console.is_terminal


_JSON = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")


@app.command()
@friendly_errors
def prepare(
    src: Path = typer.Argument(..., help="Folder: SRC/{train,val,test}/CLASS/* or SRC/CLASS/*."),
    out: Path = typer.Option(..., "--out", "-o", help="HDF5 file to write."),
    size: int = typer.Option(224, help="Side of the stored square images, in pixels."),
    roi: bool = typer.Option(True, "--roi/--no-roi", help="Crop to the thorax before resizing."),
    resize: Resize = typer.Option("stretch", help="How a crop that is not square becomes "
                                  "square: stretch each side, or pad (keep the aspect ratio, "
                                  "fill with the image's background)."),
    val_fraction: float = typer.Option(0.1, help="Validation share cut from train, by patient, "
                                       "when SRC has no val split of 50+ images."),
    seed: int = typer.Option(42, help="Seed of the validation split."),
    labels: str = typer.Option("folders", help="Class names: 'folders' (folder names), "
                               "'kermany-subtype' (NORMAL/BACTERIA/VIRUS from file names), or "
                               "a labels CSV (columns path,label[,patient,split,view])."),
    patient_regex: Optional[str] = typer.Option(None, help="Regular expression whose first "
                                                "group in a file name is the patient id."),
    any_modality: bool = typer.Option(False, "--any-modality", help="Accept DICOM modalities other than "
                                      "CR/DX/DR."),
    views: Optional[str] = typer.Option(None, help="Keep only these views, e.g. PA,AP "
                                        "(DICOM ViewPosition or the table's view)."),
    allow_shared_patients: bool = typer.Option(False, "--allow-shared-patients", help="Warn instead of refusing when a "
                                               "patient is in two official splits."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable file."),
    workers: Optional[int] = typer.Option(None, help="Decoding threads or processes (default: "
                                          "all cores)."),
    isolate: bool = typer.Option(False, "--isolate", help="Decode in separate processes, so a decoder "
                                 "crash or the out-of-memory killer costs one file, not the "
                                 "run (slower to start, more memory): for untrusted files."),
    json_out: bool = _JSON,
) -> None:
    """Index, check, crop and resize a folder of radiographs into an HDF5 dataset.

    [bold]Example:[/] xrayfeat prepare chest_xray/ --out data/kermany.h5
    """
    from xrayfeat import api

    with progress_display() as progress:
        bar = Bar(progress, "prepare")
        result = api.prepare(
            src, out, size=size, roi=roi, resize=resize.value, val_fraction=val_fraction,
            seed=seed, labels=labels, patient_regex=patient_regex, any_modality=any_modality,
            views=views, allow_shared_patients=allow_shared_patients, overwrite=overwrite,
            strict=strict, workers=workers, isolate=isolate, on_start=bar.start,
            on_progress=bar.advance)
    render_prepare(result, json_out)


@app.command()
@friendly_errors
def train(
    data: Path = typer.Argument(..., help="Dataset from 'prepare' (.h5) or a raw class folder "
                                "(prepared into RUN/data.h5 on the way)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with any of the "
                                          "settings below (unknown keys are errors)."),
    input_size: Optional[int] = typer.Option(None, help="Pixels a side the network sees "
                                             f"\\[default: {_DEFAULTS.input_size}]."),
    width: Optional[float] = typer.Option(None, help="Width multiplier "
                                          f"\\[default: {_DEFAULTS.width}]."),
    color_mode: Optional[ColorMode] = typer.Option(
        None, help="grayscale, or rgb (the image copied into three channels) "
        f"\\[default: {_DEFAULTS.color_mode}]."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs "
                                         f"\\[default: {_DEFAULTS.epochs}]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size "
                                             f"\\[default: {_DEFAULTS.batch_size}]."),
    lr: Optional[float] = typer.Option(None, help=f"Learning rate \\[default: {_DEFAULTS.lr}]."),
    seed: Optional[int] = typer.Option(None, help=f"Random seed \\[default: {_DEFAULTS.seed}]."),
    class_weight: Optional[ClassWeight] = typer.Option(
        None, help=f"Loss weights per class \\[default: {_DEFAULTS.class_weight}]."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="Radiograph-safe augmentation \\[default: on]."),
    precision: Optional[Precision] = typer.Option(
        None, help="Arithmetic; auto picks bfloat16 on CPUs that have it "
        f"\\[default: {_DEFAULTS.precision}]."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Score and save a moving "
                                       "average of the weights "
                                       f"\\[default: {'on' if _DEFAULTS.ema else 'off'}]."),
    threshold_method: Optional[ThresholdMethod] = typer.Option(
        None, help="How the operating threshold is chosen on validation: youden, bootstrap "
        "(median over patient resamples) or sensitivity (highest threshold keeping "
        f"--threshold-sensitivity) \\[default: {_DEFAULTS.threshold_method}]."),
    threshold_sensitivity: Optional[float] = typer.Option(
        None, help="Validation sensitivity the 'sensitivity' method keeps "
        f"\\[default: {_DEFAULTS.threshold_sensitivity}]."),
    strategy: Optional[Strategy] = typer.Option(
        None, help=f"Distribution: multi-worker reads TF_CONFIG \\[default: {_DEFAULTS.strategy}]."),
    tensorboard: Optional[Path] = typer.Option(None, help="Write TensorBoard logs here."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last epoch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run (kept until the new "
                                   "one finishes)."),
    json_out: bool = _JSON,
) -> None:
    """Train a MiniVGGNet on a prepared dataset or a raw folder.

    [bold]Example:[/] xrayfeat train data/kermany.h5 --out runs/mvgg
    """
    quiet_tensorflow()
    from xrayfeat import api

    settings = {
        "input_size": input_size, "width": width, "color_mode": _value(color_mode),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "class_weight": _value(class_weight), "augment": augment,
        "precision": _value(precision), "strategy": _value(strategy), "ema": ema,
        "threshold_method": _value(threshold_method),
        "threshold_sensitivity": threshold_sensitivity,
        "tensorboard": str(tensorboard) if tensorboard else None,
    }
    with progress_display() as progress:
        result = api.train(data, out, config=config, resume=resume, overwrite=overwrite,
                           reporter=TrainProgress(progress),
                           **{k: v for k, v in settings.items() if v is not None})
    render_train(result, json_out)


@app.command()
@friendly_errors
def evaluate(
    paths: List[Path] = typer.Argument(..., help="RUN [RUN...] DATA: one or more run "
                                       "directories, then a dataset (.h5) or class folder."),
    split: Split = typer.Option("test", help="Split of DATA to evaluate (test falls back to "
                                "val with a notice when a dataset has no test split)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write metrics.json, "
                                       "predictions.csv and figures here."),
    threshold: Optional[float] = typer.Option(None, help="Override the runs' operating "
                                              "thresholds."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples (by patient) for 95% CIs; "
                                  "0 turns them off."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    tta: int = typer.Option(1, help="Test-time augmentation: average over this many fixed "
                            "shifted/zoomed views (1 = off)."),
    choose_threshold: Optional[ThresholdMethod] = typer.Option(
        None, help="Also pick each binary run's threshold on these labelled images by this "
        "rule (a site's own threshold, for predict --threshold)."),
    threshold_sensitivity: float = typer.Option(
        _DEFAULTS.threshold_sensitivity, help="Target sensitivity of --choose-threshold "
        "sensitivity."),
    json_out: bool = _JSON,
) -> None:
    """Evaluate one or more runs on a dataset split or a class folder.

    [bold]Example:[/] xrayfeat evaluate runs/mvgg data/kermany.h5 --split test --out report/
    """
    quiet_tensorflow()
    from xrayfeat import api

    if len(paths) < 2:
        raise UsageError("give RUN [RUN...] DATA: at least one run directory and the data")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(f"--threshold must be between 0 and 1, got {threshold}")
    result = api.evaluate(paths[:-1], paths[-1], split=split.value, out=out,
                          threshold=threshold, n_boot=bootstrap, seed=seed, tta=tta,
                          choose_threshold=_value(choose_threshold),
                          threshold_sensitivity=threshold_sensitivity)
    render_evaluate(result, json_out)


@app.command()
@friendly_errors
def predict(
    run: Path = typer.Argument(..., help="Run directory from 'train'."),
    inputs: List[str] = typer.Argument(..., help="Files, folders (recursive) or glob patterns."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (.csv, .jsonl "
                                       "or .json), or - for stdout; without it, rows go "
                                       "to stdout (a table when stdout is a terminal)."),
    fmt: Optional[Format] = typer.Option(None, "--format", help="Rows' format "
                                         "\\[default: from --out's extension, else csv]."),
    threshold: Optional[float] = typer.Option(None, help="Override the run's operating "
                                              "threshold (binary runs)."),
    gradcam: Optional[Path] = typer.Option(None, "--gradcam", help="Also write a Grad-CAM "
                                           "overlay PNG per input into this folder."),
    shard: Optional[str] = typer.Option(None, help="I/N: process only the I-th of N disjoint "
                                        "slices of the inputs (stable by path), 1-based."),
    skip_done: bool = typer.Option(False, "--skip-done", help="Append to --out and skip paths already in it "
                                   "(resume an interrupted run)."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any file could not be predicted."),
    batch_size: int = typer.Option(32, help="Images per inference batch."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes (default: all cores)."),
    tta: int = typer.Option(1, help="Test-time augmentation: average over this many fixed "
                            "shifted/zoomed views (1 = off)."),
) -> None:
    """Predict every radiograph in files, folders and globs (rows in CSV, JSONL or JSON).

    [bold]Example:[/] xrayfeat predict runs/mvgg ~/incoming/ --out preds.csv
    """
    quiet_tensorflow()
    from xrayfeat import api

    to_stdout = out is not None and str(out) == "-"
    out = None if to_stdout else out
    # Rows for scripts go to stdout whole; a table is only for a person at a terminal.
    stream = sys.stdout if out is None and (to_stdout or fmt or not sys.stdout.isatty()) \
        else None
    with progress_display() as progress:
        bar = Bar(progress, "predict")
        summary = api.predict(run, inputs, out=out, fmt=_value(fmt), threshold=threshold,
                              stream=stream, gradcam_dir=gradcam, shard=shard,
                              skip_done=skip_done, batch_size=batch_size, workers=workers,
                              tta=tta, on_start=bar.start, on_progress=bar.advance)
    render_predict(summary, table=out is None and stream is None)
    if strict and summary.errors:
        raise typer.Exit(EXIT_FAILURES)


# Long because its signature is the command's option list (two modes share it); the
# body only checks combinations and calls one core function per mode.
@app.command("visualize-layers")
@friendly_errors
def visualize_layers(
    run: Path = typer.Argument(..., help="Run directory from 'train'."),
    images: Optional[List[Path]] = typer.Argument(None, help="Radiographs (files or folders) "
                                                  "to visualise."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs and index.html "
                             "(refused if not empty, unless --overwrite)."),
    layers: LayerMode = typer.Option("conv", "--layers", help="conv: every Conv2D layer; all: "
                                     "also the activation, batch-norm and pooling outputs."),
    layer: Optional[List[str]] = typer.Option(None, "--layer", help="Pick a layer by name "
                                              "(repeatable); overrides --layers."),
    max_channels: int = typer.Option(64, "--max-channels", help="Channels tiled per grid "
                                     "(the first N)."),
    shared_scale: bool = typer.Option(False, "--shared-scale", help="One colour scale across "
                                      "a layer's channels \\[default: each channel min-max "
                                      "scaled on its own]."),
    cmap: str = typer.Option("viridis", "--cmap", help="Matplotlib colormap of the grids."),
    filters: bool = typer.Option(False, "--filters", help="Also draw the first conv layer's "
                                 "learned filters."),
    cam: Cam = typer.Option("gradcam", "--cam", help="Heatmap of the overview (Grad-CAM is "
                            "always written too)."),
    class_name: Optional[str] = typer.Option(None, "--class", help="Explain this class "
                                             "\\[default: the predicted class]."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset (.h5) for --contrast "
                                        "and --probe."),
    split: Split = typer.Option("val", "--split", help="Split of --data for --contrast and "
                                "--probe."),
    contrast: bool = typer.Option(False, "--contrast", help="Class contrast over --data "
                                  "--split: mean maps per class and the channels that differ "
                                  "most (Cohen's d)."),
    top_k: int = typer.Option(8, "--top-k", help="Channels per layer in the contrast figures."),
    probe: bool = typer.Option(False, "--probe", help="Depth analysis over --data --split: a "
                               "linear probe per layer, ROC AUC with patient-grouped "
                               "cross-validation, for the trained and a random-weights model "
                               "(probes.json, probes.png)."),
    pool: ProbePool = typer.Option("avg", "--pool", help="How --probe pools a layer's maps to "
                                   "one number per channel."),
    pool_grid: int = typer.Option(1, "--pool-grid", help="--probe pools over an N x N grid "
                                  "of cells (N*N numbers per channel) \\[default: 1, global]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward "
                                             "pass \\[default: 8, or 64 with --contrast or "
                                             "--probe]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    json_out: bool = _JSON,
) -> None:
    """Export what every layer sees, as PNG grids, overviews and Grad-CAM heatmaps.

    [bold]Example:[/] xrayfeat visualize-layers runs/mvgg img.jpeg --out grids/

    Over a dataset split: --contrast (what each class activates) and --probe (at which
    depth the classes separate: xrayfeat visualize-layers runs/mvgg --data data.h5 --split
    val --probe --out probes/).
    """
    quiet_tensorflow()
    if not probe and (pool.value != "avg" or pool_grid != 1):
        raise UsageError("--pool and --pool-grid set how --probe pools; add --probe")
    if contrast or probe or data is not None:
        mode = "--contrast" if contrast else "--probe" if probe else None
        if mode is None:
            raise UsageError("--data is used with --contrast (class contrast over a split) "
                             "or --probe (linear probes per layer)")
        if data is None:
            raise UsageError(f"{mode} needs --data DATA.h5 (and --split, default val)")
        if images:
            raise UsageError(f"{mode} works on --data; visualise single images in a "
                             "separate call")
        if contrast:
            from xrayfeat.contrast import class_contrast

            with progress_display() as progress:
                bar = Bar(progress, f"contrast {split.value}")
                result = class_contrast(run, data, split.value, out, overwrite=overwrite,
                                        top_k=top_k, batch_size=batch_size or 64, cmap=cmap,
                                        on_start=bar.start, on_progress=bar.advance)
            render_visualize(result, json_out and not probe)
        if probe:
            _probe(run, data, split.value, out, pool.value, pool_grid, batch_size,
                   overwrite or contrast, json_out)  # contrast made --out
        return
    if not images:
        raise UsageError("no images given: name one or more radiographs, or use --contrast "
                         "or --probe with --data DATA.h5")
    from xrayfeat.visualize import visualize_images

    with progress_display() as progress:
        bar = Bar(progress, "visualize")
        result = visualize_images(
            run, images, out, layers=layer or None, all_layers=layers.value == "all",
            max_channels=max_channels, shared_scale=shared_scale, cmap=cmap, filters=filters,
            cam_method=cam.value, class_name=class_name, overwrite=overwrite,
            batch_size=batch_size or 8, on_start=bar.start, on_progress=bar.advance,
        )
    render_visualize(result, json_out)


def _probe(run: Path, data: Path, split: str, out: Path, pool: str, pool_grid: int,
           batch_size: int | None, overwrite: bool, json_out: bool) -> None:
    """``visualize-layers --probe``: linear probes per layer, with a bar per stage."""
    from xrayfeat.probes import MAX_GRID, depth_probes

    if not 1 <= pool_grid <= MAX_GRID:
        raise UsageError(f"--pool-grid must be between 1 and {MAX_GRID}, got {pool_grid}")
    with progress_display() as progress:
        bar, fits = Bar(progress, f"probe {split}"), []

        def fit_start(n: int) -> None:  # counts layers, not images: no img/s
            fits.append(progress.add_task("fit probes", total=n, rate=""))

        result = depth_probes(run, data, split, out, pool=pool, grid=pool_grid,
                              batch_size=batch_size or 64, overwrite=overwrite,
                              on_start=bar.start, on_progress=bar.advance,
                              on_fit_start=fit_start,
                              on_fit=lambda n: progress.advance(fits[0], n))
    render_probes(result, json_out)


@app.command()
@friendly_errors
def ensemble(
    runs: List[Path] = typer.Argument(..., help="Two or more run directories trained on the "
                                      "same prepared dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    data: Optional[Path] = typer.Option(None, help="The members' dataset, when it has moved "
                                        "since training (checked by SHA-256)."),
    threshold_method: Optional[ThresholdMethod] = typer.Option(
        None, help="How the ensemble's threshold is chosen \\[default: the members' method]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run at --out."),
    json_out: bool = _JSON,
) -> None:
    """Average trained runs into one run (its threshold chosen again on validation).

    [bold]Example:[/] xrayfeat ensemble runs/seed1 runs/seed2 runs/seed3 --out runs/ensemble
    """
    quiet_tensorflow()
    from xrayfeat.ensemble import ensemble_runs

    result = ensemble_runs(runs, out, data=data, threshold_method=_value(threshold_method),
                           overwrite=overwrite)
    render_ensemble(result, json_out)


@app.command()
@friendly_errors
def audit(
    run: Path = typer.Argument(..., help="Run directory from 'train'."),
    data: Path = typer.Argument(..., help="Dataset from 'prepare' (.h5)."),
    split: Split = typer.Option("val", help="Split of DATA to audit."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write audit.json, audit.csv "
                                       "and audit.png here."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many images (evenly "
                                        "spaced)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out folder."),
    json_out: bool = _JSON,
) -> None:
    """Find shortcuts: how the run's predictions move under nuisance transforms.

    [bold]Example:[/] xrayfeat audit runs/mvgg data/kermany.h5 --split val --out audit/
    """
    quiet_tensorflow()
    from xrayfeat.audit import audit_run

    with progress_display() as progress:
        bar = Bar(progress, "audit")
        result = audit_run(run, data, split=split.value, out=out, overwrite=overwrite,
                           limit=limit, on_start=bar.start, on_progress=bar.advance)
    render_audit(result, json_out)


@app.command()
@friendly_errors
def export(
    run: Path = typer.Argument(..., help="Run directory from 'train' (or 'ensemble')."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the model and "
                             "preprocessing.json into."),
    fmt: ExportFormat = typer.Option("saved_model", "--format", help="saved_model "
                                     "(TensorFlow Serving), onnx (ONNX Runtime) or litert "
                                     "(LiteRT, formerly TensorFlow Lite); onnx and litert "
                                     "need pip install 'xrayfeat[export]'."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    json_out: bool = _JSON,
) -> None:
    """Export a run's model to run where this package is not installed.

    [bold]Example:[/] xrayfeat export runs/mvgg --format onnx --out deploy/
    """
    quiet_tensorflow()
    from xrayfeat import api

    result = api.export(run, out, fmt.value, overwrite=overwrite)
    render_export(result, json_out)


def main() -> None:
    """Console-script entry point."""
    # TensorFlow's C++ start-up chatter is not for users; real errors still surface.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app(prog_name="xrayfeat")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
