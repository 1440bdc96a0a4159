"""The ``xrayfeat`` command line: parse options, call one core function, render with Rich.

Nothing heavy is imported at module level (TensorFlow, OpenCV, h5py), so ``--help``
answers at once; each command imports the core module it calls.
Results go to stdout, progress and messages to stderr.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
import rich.markup
import rich.text
from rich.console import Console
from rich.table import Table

from xrayfeat import __version__
from xrayfeat.config import TrainConfig
from xrayfeat.errors import EXIT_INTERRUPTED, EXIT_USAGE, XrayfeatError

app = typer.Typer(
    name="xrayfeat",
    help="Prepare chest radiographs, train a MiniVGGNet, evaluate it, predict folders, and "
    "see what every layer of the network sees.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
#: C0/C1 control characters but tab and newline: an ESC in a file name would otherwise
#: reach the terminal raw and drive it (colours, cursor, title).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    # Bytes of a file name that is not UTF-8 (lone surrogates in Python) shown as \xNN:
    # printing the surrogates themselves fails on a UTF-8 terminal.
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name makes
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def Text(text: str = "", *args, **kwargs) -> rich.text.Text:  # noqa: N802 (stands in for it)
    """Data (file, class, layer names) for the terminal: never Rich markup, and control
    characters shown as escapes."""
    return rich.text.Text(_printable(str(text)), *args, **kwargs)


def escape(text: str) -> str:
    """Data inside a markup string: markup escaped, control characters shown as escapes."""
    return rich.markup.escape(_printable(str(text)))


#: Width of tables written off a terminal (wide enough for long paths in every column).
UNBOUNDED_WIDTH = 240
out_console = Console()  # results
err_console = Console(stderr=True)  # progress, messages, errors
_state = {"debug": False}
_DEFAULTS = TrainConfig()  # shown in --help, so the help can never disagree with the code


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
    _state["debug"] = debug
    # Off a terminal (a pipe, a file, a log) no terminal width applies: tables are drawn
    # wide enough never to cut a name, whatever COLUMNS says.
    for console in (out_console, err_console):
        console.width = None if console.is_terminal else UNBOUNDED_WIDTH


def _quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up lines (oneDNN, absl) kept off the terminal.

    They are written to file descriptor 2 before any log level applies; a Python error
    during the import still surfaces as an exception.
    """
    if "tensorflow" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def friendly_errors(command: Callable) -> Callable:
    """Turn the core's exceptions into one line on stderr and a documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except XrayfeatError as exc:
            if _state["debug"]:
                raise
            # escape: paths are data ("scan [1].png"), never Rich markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: partial outputs were removed")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except Exception as exc:  # a bug: say so in one line, traceback only with --debug
            if _state["debug"]:
                raise
            from xrayfeat.atomic import MACHINE_ERRNOS

            if isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS:
                # A full disk or a read-only folder is the machine's state, not a bug.
                where = f"{exc.filename}: " if exc.filename else ""
                err_console.print(
                    f"[bold red]error:[/] {escape(where)}{os.strerror(exc.errno)} "
                    f"({MACHINE_ERRNOS[exc.errno]})", highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_USAGE) from None
            first_line = (str(exc).splitlines() or [""])[0]
            err_console.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(first_line)} "
                "(run with --debug for the traceback, and please report it)",
                highlight=False, soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    class _ErrorClearsProgress(Progress):
        """On an error the bar is cleared, so the one-line message stands alone."""

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                return super().__exit__(exc_type, exc, tb)
            self.live.transient = True
            # Off a terminal (a pipe, a log file) Rich prints the bar's last frame when it
            # stops, a blank line before the error if nothing had started: print nothing.
            quiet, self.console.quiet = self.console.quiet, not self.console.is_terminal
            try:
                return super().__exit__(exc_type, exc, tb)
            finally:
                self.console.quiet = quiet

    return _ErrorClearsProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err_console, transient=False,
    )


class _Bar:
    """Adapts the core's on_start/on_progress callbacks to a Rich progress bar."""

    def __init__(self, progress, description: str):
        self.progress, self.description, self.task = progress, description, None

    def start(self, total: int) -> None:
        self.task = self.progress.add_task(self.description, total=total, rate="")

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)
        speed = self.progress.tasks[self.task].speed
        self.progress.update(self.task, rate=f"{speed:.1f} img/s" if speed else "")


@app.command()
@friendly_errors
def prepare(
    src: Path = typer.Argument(..., help="Folder: SRC/{train,val,test}/CLASS/* or SRC/CLASS/*."),
    out: Path = typer.Option(..., "--out", "-o", help="HDF5 file to write."),
    size: int = typer.Option(224, help="Side of the stored square images, in pixels."),
    roi: bool = typer.Option(True, "--roi/--no-roi", help="Crop to the thorax before resizing."),
    resize: str = typer.Option("stretch", help="How a crop that is not square becomes "
                               "square: 'stretch' each side, or 'pad' (keep the aspect "
                               "ratio, fill with the image's background)."),
    val_fraction: float = typer.Option(0.1, help="Validation share cut from train, by patient, "
                                       "when SRC has no val split of 50+ images."),
    seed: int = typer.Option(42, help="Seed of the validation split."),
    labels: str = typer.Option("folders", help="Class names: 'folders' (folder names), "
                               "'kermany-subtype' (NORMAL/BACTERIA/VIRUS from file names), or "
                               "a labels CSV (columns path,label[,patient,split,view])."),
    patient_regex: Optional[str] = typer.Option(None, help="Regular expression whose first "
                                                "group in a file name is the patient id."),
    any_modality: bool = typer.Option(False, help="Accept DICOM modalities other than "
                                      "CR/DX/DR."),
    views: Optional[str] = typer.Option(None, help="Keep only these views, e.g. PA,AP "
                                        "(DICOM ViewPosition or the table's view)."),
    allow_shared_patients: bool = typer.Option(False, help="Warn instead of refusing when a "
                                               "patient is in two official splits."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable file."),
    workers: Optional[int] = typer.Option(None, help="Decoding threads or processes (default: "
                                          "all cores)."),
    isolate: bool = typer.Option(False, help="Decode in separate processes, so a decoder "
                                 "crash or the out-of-memory killer costs one file, not the "
                                 "run (slower to start, more memory): for untrusted files."),
) -> None:
    """Index, check, crop and resize a folder of radiographs into an HDF5 dataset.

    [bold]Example:[/] xrayfeat prepare chest_xray/ --out data/kermany.h5
    """
    from xrayfeat.dataset import prepare_dataset
    from xrayfeat.preprocessing import PreprocessSettings
    from xrayfeat.sources import parse_views

    with _progress() as progress:
        bar = _Bar(progress, "prepare")
        result = prepare_dataset(
            src, out, settings=PreprocessSettings(size=size, roi=roi, resize=resize),
            val_fraction=val_fraction,
            seed=seed, label_mode=labels, patient_regex=patient_regex,
            any_modality=any_modality, views=parse_views(views),
            allow_shared_patients=allow_shared_patients, overwrite=overwrite, strict=strict,
            workers=workers, pool="process" if isolate else "thread", on_start=bar.start, on_progress=bar.advance,
        )
    render_prepare(result)


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    """A table of files that were skipped, with the reason for each."""
    if not skipped:
        return
    table = Table(title=f"{len(skipped)} skipped file(s)")
    table.add_column("path", overflow="fold")
    table.add_column("reason", overflow="fold")
    for path, reason in skipped:
        table.add_row(Text(str(path)), Text(reason))
    out_console.print(table)


def render_prepare(result) -> None:
    """Summary table of a prepare run: images per split and class, then skipped files."""
    table = Table(title=f"{escape(str(result.out))}  ({result.seconds:.1f} s)")
    table.add_column("split")
    for name in result.classes:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    table.add_column("patients", justify="right")
    for split, per_class in result.counts.items():
        note = " (cut from train by patient)" if split == "val" and result.val_cut_from_train else ""
        table.add_row(Text(split + note), *(str(per_class[c]) for c in result.classes),
                      str(sum(per_class.values())), str(result.patients.get(split, "")))
    out_console.print(table)
    for note in result.notes:
        err_console.print(Text(note), highlight=False)
    _print_skipped(result.skipped)
    if result.ignored:
        err_console.print(f"{result.ignored} file(s) without an image extension were ignored")


class _TrainProgress:
    """Rich display of training: prepare bar, then one bar over all batches with the
    latest loss and validation AUC, and a line per finished epoch."""

    def __init__(self, progress):
        self.progress = progress
        self.prepare = _Bar(progress, "prepare")
        self.task = None
        self.loss = float("nan")
        self.auc = "-"

    def on_prepare_start(self, total: int) -> None:
        self.prepare.start(total)

    def on_prepare_progress(self, n: int) -> None:
        self.prepare.advance(n)

    def on_train_start(self, epochs: int, initial_epoch: int, steps: int) -> None:
        self.steps = steps
        self.task = self.progress.add_task("train", total=epochs * steps, rate="",
                                           completed=initial_epoch * steps)

    def on_batch_end(self, loss: float) -> None:
        self.loss = loss
        self.progress.update(self.task, advance=1, rate=f"loss {loss:.3f}  val AUC {self.auc}")

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        self.auc = f"{logs['val_auc']:.4f}"
        self.progress.console.print(
            f"epoch {epoch:>3}  loss {logs['loss']:.4f}  val loss {logs['val_loss']:.4f}  "
            f"val AUC {logs['val_auc']:.4f}  lr {logs['lr']:.2g}  {logs['seconds']:.0f} s")
        done = epoch * self.steps
        self.progress.update(self.task, completed=done,
                             rate=f"loss {self.loss:.3f}  val AUC {self.auc}")


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
    color_mode: Optional[str] = typer.Option(None, help="grayscale, or rgb (the image copied "
                                             "into three channels) "
                                             f"\\[default: {_DEFAULTS.color_mode}]."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs "
                                         f"\\[default: {_DEFAULTS.epochs}]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size "
                                             f"\\[default: {_DEFAULTS.batch_size}]."),
    lr: Optional[float] = typer.Option(None, help=f"Learning rate \\[default: {_DEFAULTS.lr}]."),
    seed: Optional[int] = typer.Option(None, help=f"Random seed \\[default: {_DEFAULTS.seed}]."),
    class_weight: Optional[str] = typer.Option(None, help="'balanced' or 'none' "
                                               f"\\[default: {_DEFAULTS.class_weight}]."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="Radiograph-safe augmentation \\[default: on]."),
    precision: Optional[str] = typer.Option(None, help="auto, float32 or bfloat16 arithmetic; "
                                            "auto picks bfloat16 on CPUs that have it "
                                            f"\\[default: {_DEFAULTS.precision}]."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Score and save a moving "
                                       "average of the weights "
                                       f"\\[default: {'on' if _DEFAULTS.ema else 'off'}]."),
    threshold_method: Optional[str] = typer.Option(
        None, help="How the operating threshold is chosen on validation: youden, bootstrap "
        "(median over patient resamples) or sensitivity (highest threshold keeping "
        f"--threshold-sensitivity) \\[default: {_DEFAULTS.threshold_method}]."),
    threshold_sensitivity: Optional[float] = typer.Option(
        None, help="Validation sensitivity the 'sensitivity' method keeps "
        f"\\[default: {_DEFAULTS.threshold_sensitivity}]."),
    strategy: Optional[str] = typer.Option(None, help="auto, mirrored or multi-worker "
                                           f"(TF_CONFIG) \\[default: {_DEFAULTS.strategy}]."),
    tensorboard: Optional[Path] = typer.Option(None, help="Write TensorBoard logs here."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last epoch."),
    overwrite: bool = typer.Option(False, help="Replace an existing run (kept until the new "
                                   "one finishes)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Train a MiniVGGNet on a prepared dataset or a raw folder.

    [bold]Example:[/] xrayfeat train data/kermany.h5 --out runs/mvgg
    """
    from xrayfeat.config import load_train_config

    _quiet_tensorflow()

    settings = load_train_config(config, {
        "input_size": input_size, "width": width, "color_mode": color_mode, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "seed": seed, "class_weight": class_weight,
        "augment": augment, "precision": precision, "strategy": strategy, "ema": ema,
        "threshold_method": threshold_method, "threshold_sensitivity": threshold_sensitivity,
        "tensorboard": str(tensorboard) if tensorboard else None,
    })
    from xrayfeat.training import train as train_run

    with _progress() as progress:
        result = train_run(data, out, settings, resume=resume, overwrite=overwrite,
                           reporter=_TrainProgress(progress))
    render_train(result, json_out)


def render_train(result, json_out: bool) -> None:
    """Best epoch, threshold and validation metrics of a finished training run."""
    import json

    m = result.validation
    if json_out:
        print(json.dumps({"run": str(result.run), "best_epoch": result.best_epoch,
                          "best_val_auc": result.best_val_auc, "epochs_run": result.epochs_run,
                          "threshold": result.threshold,
                          "threshold_method": result.threshold_method,
                          "threshold_ci": result.threshold_ci, "seconds": result.seconds,
                          "validation": m}, default=str))
        return
    table = Table(title=f"{escape(str(result.run))}: best epoch {result.best_epoch} of "
                  f"{result.epochs_run}"
                  f"{' (stopped early)' if result.stopped_early else ''}, "
                  f"{result.seconds / 60:.1f} min")
    table.add_column("validation metric")
    table.add_column("value", justify="right")
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy",
                "f1", "threshold", "n"):
        if key in m and m[key] is not None:
            value = m[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    if result.threshold_ci:
        ci = result.threshold_ci
        table.add_row(f"threshold 95% interval ({result.threshold_method})",
                      f"{ci['lower']:.4f}-{ci['upper']:.4f}")
    out_console.print(table)


@app.command()
@friendly_errors
def evaluate(
    paths: List[Path] = typer.Argument(..., help="RUN [RUN...] DATA: one or more run "
                                       "directories, then a dataset (.h5) or class folder."),
    split: str = typer.Option("test", help="Split of DATA to evaluate (test falls back to "
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
    json_out: bool = typer.Option(False, "--json", help="Print exactly one JSON object on "
                                  "stdout."),
) -> None:
    """Evaluate one or more runs on a dataset split or a class folder.

    [bold]Example:[/] xrayfeat evaluate runs/mvgg data/kermany.h5 --split test --out report/
    """
    from xrayfeat.errors import UsageError
    from xrayfeat.evaluation import evaluate_runs

    _quiet_tensorflow()

    if len(paths) < 2:
        raise UsageError("give RUN [RUN...] DATA: at least one run directory and the data")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(f"--threshold must be between 0 and 1, got {threshold}")
    result = evaluate_runs(paths[:-1], paths[-1], split=split, out=out, threshold=threshold,
                           n_boot=bootstrap, seed=seed, tta=tta)
    render_evaluate(result, json_out)


_EVAL_ROWS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1",
              "balanced_accuracy", "roc_auc", "pr_auc", "brier", "ece", "threshold", "n")


def render_evaluate(result, json_out: bool) -> None:
    """One column per run: metric value with its 95% CI; notices and left-out files."""
    import json

    for notice in result.notices:
        err_console.print(f"[yellow]notice:[/] {escape(notice)}", highlight=False)
    if result.left_out:
        err_console.print(f"[yellow]{len(result.left_out)} file(s) could not be read and were "
                          "left out of the metrics:[/]", highlight=False)
        for path, reason in result.left_out:
            err_console.print(Text(f"  {path}: {reason}"), highlight=False, soft_wrap=True)
    if json_out:
        reports = result.reports
        obj = next(iter(reports.values())) if len(reports) == 1 else {"runs": reports}
        print(json.dumps(obj, default=float))
        return
    table = Table(title=f"{escape(str(result.data))} \\[{escape(result.split)}]"
                  + (f", {len(result.left_out)} file(s) left out" if result.left_out else ""))
    table.add_column("metric")
    for name in result.reports:
        table.add_column(Text(name), justify="right")
    first = next(iter(result.reports.values()))
    if "per_class" in first:  # N > 2 classes
        rows = [("accuracy", lambda r: r["accuracy"]),
                ("balanced_accuracy", lambda r: r["balanced_accuracy"]),
                ("macro roc_auc", lambda r: r["macro"]["roc_auc"]),
                ("weighted roc_auc", lambda r: r["weighted"]["roc_auc"])]
        for cls in first["classes"]:
            for key in ("sensitivity", "specificity", "roc_auc"):
                rows.append((f"{cls} {key}", lambda r, c=cls, k=key: r["per_class"][c][k]))
        for label, get in rows:
            table.add_row(label, *(f"{get(r):.4f}" for r in result.reports.values()))
    else:
        for key in _EVAL_ROWS:
            cells = []
            for report in result.reports.values():
                value = report.get(key)
                ci = report.get("ci", {}).get(key)
                text = f"{value:.4f}" if isinstance(value, float) else str(value)
                if ci:
                    text += f" [dim]({ci['lower']:.3f}-{ci['upper']:.3f})[/]"
                cells.append(text)
            table.add_row(key, *cells)
        table.add_row("tp / fp / tn / fn", *(
            "{tp} / {fp} / {tn} / {fn}".format(**r["confusion_matrix"])
            for r in result.reports.values()))
    out_console.print(table)
    if result.files:
        err_console.print(Text(f"wrote {len(result.files)} file(s) to "
                               f"{Path(result.files[0]).parent}"), highlight=False)


@app.command()
@friendly_errors
def predict(
    run: Path = typer.Argument(..., help="Run directory from 'train'."),
    inputs: List[str] = typer.Argument(..., help="Files, folders (recursive) or glob patterns."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (.csv, .jsonl "
                                       "or .json), or - for stdout; without it, rows go "
                                       "to stdout (a table when stdout is a terminal)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv, jsonl or json "
                                      "\\[default: from --out's extension, else csv]."),
    threshold: Optional[float] = typer.Option(None, help="Override the run's operating "
                                              "threshold (binary runs)."),
    gradcam: Optional[Path] = typer.Option(None, "--gradcam", help="Also write a Grad-CAM "
                                           "overlay PNG per input into this folder."),
    shard: Optional[str] = typer.Option(None, help="I/N: process only the I-th of N disjoint "
                                        "slices of the inputs (stable by path), 1-based."),
    skip_done: bool = typer.Option(False, help="Append to --out and skip paths already in it "
                                   "(resume an interrupted run)."),
    strict: bool = typer.Option(False, help="Exit 1 if any file could not be predicted."),
    batch_size: int = typer.Option(32, help="Images per inference batch."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes (default: all cores)."),
    tta: int = typer.Option(1, help="Test-time augmentation: average over this many fixed "
                            "shifted/zoomed views (1 = off)."),
) -> None:
    """Predict every radiograph in files, folders and globs.

    [bold]Example:[/] xrayfeat predict runs/mvgg ~/incoming/ --out preds.csv
    """
    from xrayfeat.errors import EXIT_FAILURES

    _quiet_tensorflow()
    from xrayfeat.prediction import predict as predict_run

    to_stdout = out is not None and str(out) == "-"
    out = None if to_stdout else out
    # Rows for scripts go to stdout whole; a table is only for a person at a terminal.
    stream = sys.stdout if out is None and (to_stdout or fmt or not sys.stdout.isatty()) \
        else None
    with _progress() as progress:
        bar = _Bar(progress, "predict")
        summary = predict_run(run, inputs, out=out, fmt=fmt, threshold=threshold, stream=stream,
                              gradcam_dir=gradcam, shard=shard, skip_done=skip_done,
                              batch_size=batch_size, workers=workers, tta=tta,
                              on_start=bar.start, on_progress=bar.advance)
    render_predict(summary, table=out is None and stream is None)
    if strict and summary.errors:
        raise typer.Exit(EXIT_FAILURES)


def render_predict(summary, table: bool) -> None:
    """Rows as a table (``table``: stdout is a terminal); then counts per class and errors."""
    if table and summary.rows:
        table = Table()
        for name in ("path", "label", "probability", "error"):
            table.add_column(name, overflow="fold")
        for row in summary.rows:
            prob = row["probability"]
            table.add_row(Text(row["path"]), Text(row["label"]),
                          f"{prob:.4f}" if isinstance(prob, float) else "", Text(row["error"]))
        out_console.print(table)
        if summary.predicted + summary.errors > len(summary.rows):
            err_console.print(f"(first {len(summary.rows)} rows shown; use --out for all)")
    counts = escape(", ".join(f"{c}: {n}" for c, n in summary.per_class.items()))
    where = f" -> {escape(str(summary.out))}" if summary.out else ""
    err_console.print(f"predicted {summary.predicted} file(s) in {summary.seconds:.1f} s "
                      f"({counts}){where}", highlight=False)
    if summary.skipped_done:
        err_console.print(f"{summary.skipped_done} file(s) already in {escape(str(summary.out))} "
                          "were skipped")
    if summary.errors:
        err_console.print(f"[yellow]{summary.errors} file(s) could not be read[/]; "
                          "see the error column", highlight=False)


@app.command("visualize-layers")
@friendly_errors
def visualize_layers(
    run: Path = typer.Argument(..., help="Run directory from 'train'."),
    images: Optional[List[Path]] = typer.Argument(None, help="Radiographs (files or folders) "
                                                  "to visualise."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs and index.html "
                             "(refused if not empty, unless --overwrite)."),
    layers: str = typer.Option("conv", "--layers", help="'conv': every Conv2D layer; 'all': "
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
    cam: str = typer.Option("gradcam", "--cam", help="Heatmap of the overview: gradcam, "
                            "gradcam++ or scorecam (Grad-CAM is always written too)."),
    class_name: Optional[str] = typer.Option(None, "--class", help="Explain this class "
                                             "\\[default: the predicted class]."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset (.h5) for --contrast "
                                        "and --probe."),
    split: str = typer.Option("val", "--split", help="Split of --data for --contrast and "
                              "--probe."),
    contrast: bool = typer.Option(False, "--contrast", help="Class contrast over --data "
                                  "--split: mean maps per class and the channels that differ "
                                  "most (Cohen's d)."),
    top_k: int = typer.Option(8, "--top-k", help="Channels per layer in the contrast figures."),
    probe: bool = typer.Option(False, "--probe", help="Depth analysis over --data --split: a "
                               "linear probe per layer, ROC AUC with patient-grouped "
                               "cross-validation, for the trained and a random-weights model "
                               "(probes.json, probes.png)."),
    pool: str = typer.Option("avg", "--pool", help="How --probe pools a layer's maps to one "
                             "number per channel: avg or max."),
    pool_grid: int = typer.Option(1, "--pool-grid", help="--probe pools over an N x N grid "
                                  "of cells (N*N numbers per channel) \\[default: 1, global]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward "
                                             "pass \\[default: 8, or 64 with --contrast or "
                                             "--probe]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
) -> None:
    """Export what every layer sees, as PNG grids, overviews and Grad-CAM heatmaps.

    [bold]Example:[/] xrayfeat visualize-layers runs/mvgg img.jpeg --out grids/

    Over a dataset split: --contrast (what each class activates) and --probe (at which
    depth the classes separate: xrayfeat visualize-layers runs/mvgg --data data.h5 --split
    val --probe --out probes/).
    """
    from xrayfeat.errors import UsageError

    _quiet_tensorflow()

    if layers not in ("conv", "all"):
        raise UsageError(f"--layers must be 'conv' or 'all', got {layers!r}")
    if not probe and (pool != "avg" or pool_grid != 1):
        raise UsageError("--pool and --pool-grid set how --probe pools; add --probe")
    if probe and pool not in ("avg", "max"):
        raise UsageError(f"--pool must be avg or max, got {pool!r}")
    if probe:
        from xrayfeat.probes import MAX_GRID

        if not 1 <= pool_grid <= MAX_GRID:
            raise UsageError(f"--pool-grid must be between 1 and {MAX_GRID}, got {pool_grid}")
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
            from xrayfeat.activations import class_contrast

            with _progress() as progress:
                bar = _Bar(progress, f"contrast {split}")
                result = class_contrast(run, data, split, out, overwrite=overwrite, top_k=top_k,
                                        batch_size=batch_size or 64, cmap=cmap,
                                        on_start=bar.start, on_progress=bar.advance)
            render_visualize(result)
        if probe:
            from xrayfeat.probes import depth_probes

            with _progress() as progress:
                bar, fits = _Bar(progress, f"probe {split}"), []

                def fit_start(n: int) -> None:  # counts layers, not images: no img/s
                    fits.append(progress.add_task("fit probes", total=n, rate=""))

                result = depth_probes(run, data, split, out, pool=pool, grid=pool_grid,
                                      batch_size=batch_size or 64,
                                      overwrite=overwrite or contrast,  # contrast made --out
                                      on_start=bar.start, on_progress=bar.advance,
                                      on_fit_start=fit_start,
                                      on_fit=lambda n: progress.advance(fits[0], n))
            render_probes(result)
        return
    if not images:
        raise UsageError("no images given: name one or more radiographs, or use --contrast "
                         "or --probe with --data DATA.h5")
    from xrayfeat.activations import visualize_images

    with _progress() as progress:
        bar = _Bar(progress, "visualize")
        result = visualize_images(
            run, images, out, layers=layer or None, all_layers=layers == "all",
            max_channels=max_channels, shared_scale=shared_scale, cmap=cmap, filters=filters,
            cam_method=cam, class_name=class_name, overwrite=overwrite,
            batch_size=batch_size or 8, on_start=bar.start, on_progress=bar.advance,
        )
    render_visualize(result)


def render_visualize(result) -> None:
    """Files written per image (or the top contrast channels), then skipped files."""

    if hasattr(result, "comparisons"):  # class contrast
        counts = escape(", ".join(f"{c} {n}" for c, n in result.counts.items()))
        table = Table(title=f"{escape(str(result.out))}: class contrast on "
                      f"{escape(result.split)} ({counts}), "
                      f"{result.seconds:.1f} s")
        for name, justify in (("layer", "left"), ("comparison", "left"), ("top channels "
                              "(Cohen's d)", "left")):
            table.add_column(name, justify=justify, overflow="fold")
        groups: dict = {}
        for r in result.top:
            groups.setdefault((r.layer, r.comparison), []).append(r)
        for (layer_name, comparison), rows in groups.items():
            table.add_row(layer_name, Text(comparison),
                          ", ".join(f"{r.channel} ({r.cohens_d:+.2f})" for r in rows[:5]))
        out_console.print(table)
        for note in result.notes:
            err_console.print(Text(note))
        out_console.print(Text(f"{len(result.files)} files; ranked channels in {result.table}; "
                               f"open {result.index}"), soft_wrap=True)
        return
    table = Table(title=f"{escape(str(result.out))}: {len(result.images)} image(s), "
                  f"{len(result.layers)} layer(s), {result.seconds:.1f} s")
    table.add_column("image", overflow="fold")
    table.add_column("predicted")
    table.add_column("probability")
    table.add_column("files", justify="right")
    table.add_column("folder", overflow="fold")
    for image in result.images:
        table.add_row(Text(str(image.source)), Text(image.predicted), Text(image.evidence),
                      str(len(image.files)), Text(str(image.overview.parent)))
    out_console.print(table)
    _print_skipped(result.skipped)
    out_console.print(Text(f"{len(result.files)} files; open {result.index}"), soft_wrap=True)


def render_probes(result) -> None:
    """One row per probed layer: depth, feature size, AUC of the trained and random model."""

    counts = escape(", ".join(f"{c} {n}" for c, n in result.counts.items()))
    table = Table(title=f"{escape(str(result.out))}: linear probes on {escape(result.split)} "
                  f"({counts}; {result.patients} patients); {result.metric}, mean ± sd over "
                  f"{result.folds} patient-grouped folds; {result.seconds:.1f} s")
    table.add_column("layer", overflow="fold")
    table.add_column("depth", justify="right")
    table.add_column("features", justify="right")
    table.add_column("AUC trained", justify="right")
    if result.baseline:
        table.add_column("AUC random weights", justify="right")
    for r in result.rows:
        cells = [Text(r.layer), str(r.depth), str(r.features), f"{r.auc_mean:.3f} ± {r.auc_sd:.3f}"]
        if result.baseline:
            cells.append("-" if r.random_auc_mean is None
                         else f"{r.random_auc_mean:.3f} ± {r.random_auc_sd:.3f}")
        table.add_row(*cells)
    out_console.print(table)
    for note in result.notes:
        err_console.print(Text(note))
    best = result.best()
    gain = ("" if best.random_auc_mean is None
            else f", {best.auc_mean - best.random_auc_mean:+.3f} over random weights")
    out_console.print(Text(f"best hidden layer: {best.layer} (depth {best.depth}), AUC "
                           f"{best.auc_mean:.3f}{gain}; {result.summary}, {result.figure}"),
                      soft_wrap=True)


@app.command()
@friendly_errors
def ensemble(
    runs: List[Path] = typer.Argument(..., help="Two or more run directories trained on the "
                                      "same prepared dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    data: Optional[Path] = typer.Option(None, help="The members' dataset, when it has moved "
                                        "since training (checked by SHA-256)."),
    threshold_method: Optional[str] = typer.Option(
        None, help="youden, bootstrap or sensitivity \\[default: the members' method]."),
    overwrite: bool = typer.Option(False, help="Replace an existing run at --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Average trained runs into one run (its threshold chosen again on validation).

    [bold]Example:[/] xrayfeat ensemble runs/seed1 runs/seed2 runs/seed3 --out runs/ensemble
    """
    _quiet_tensorflow()
    from xrayfeat.ensemble import ensemble_runs

    result = ensemble_runs(runs, out, data=data, threshold_method=threshold_method,
                           overwrite=overwrite)
    render_ensemble(result, json_out)


def render_ensemble(result, json_out: bool) -> None:
    """Each member's and the ensemble's validation AUC, its metrics and threshold."""
    import dataclasses
    import json

    if json_out:
        print(json.dumps(dataclasses.asdict(result), default=str))
        return
    table = Table(title=f"{escape(str(result.run))}: {len(result.members)} members, "
                  f"{result.seconds:.1f} s")
    table.add_column("validation")
    table.add_column("value", justify="right")
    for member, auc in zip(result.members, result.member_val_auc):
        table.add_row(Text(f"roc_auc of {member}"), f"{auc:.4f}")
    table.add_row("roc_auc of the ensemble", f"{result.val_auc:.4f}")
    for key in ("accuracy", "sensitivity", "specificity"):
        if key in result.validation:
            table.add_row(key, f"{result.validation[key]:.4f}")
    if result.threshold is not None:
        ci = result.threshold_ci
        table.add_row(f"threshold ({result.threshold_method})",
                      f"{result.threshold:.4f} ({ci['lower']:.4f}-{ci['upper']:.4f})")
    out_console.print(table)


@app.command()
@friendly_errors
def audit(
    run: Path = typer.Argument(..., help="Run directory from 'train'."),
    data: Path = typer.Argument(..., help="Dataset from 'prepare' (.h5)."),
    split: str = typer.Option("val", help="Split of DATA to audit."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write audit.json, audit.csv "
                                       "and audit.png here."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many images (evenly "
                                        "spaced)."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out folder."),
    json_out: bool = typer.Option(False, "--json", help="Print exactly one JSON object on "
                                  "stdout."),
) -> None:
    """Find shortcuts: how the run's predictions move under nuisance transforms.

    [bold]Example:[/] xrayfeat audit runs/mvgg data/kermany.h5 --split val --out audit/
    """
    _quiet_tensorflow()
    from xrayfeat.audit import audit_run

    with _progress() as progress:
        bar = _Bar(progress, "audit")
        result = audit_run(run, data, split=split, out=out, overwrite=overwrite, limit=limit,
                           on_start=bar.start, on_progress=bar.advance)
    render_audit(result, json_out)


def render_audit(result, json_out: bool) -> None:
    """One row per transform and class: mean shift of the score with its interval, flips."""
    import json

    if json_out:
        print(json.dumps(result.to_dict()))
        return
    table = Table(title=f"{escape(result.split)} of {escape(result.data)}: {result.n} images; "
                  f"shift of the {escape(result.score)}"
                  + (f"; flips at threshold {result.threshold:.3f}"
                     if result.threshold is not None else ""))
    table.add_column("transform")
    table.add_column("true class")
    table.add_column("mean shift (95% interval)", justify="right")
    table.add_column("label flipped", justify="right")
    for row in result.rows:
        table.add_row(Text(row.transform), Text(row.class_name),
                      f"{row.mean_shift:+.3f} ({row.ci_low:+.3f} to {row.ci_high:+.3f})",
                      f"{100 * row.flipped:.1f} %")
    out_console.print(table)
    largest = ", ".join(f"{r.transform} on {r.class_name} ({r.mean_shift:+.3f})"
                        for r in result.largest(3))
    out_console.print(Text(f"largest shifts: {largest}"), soft_wrap=True)
    if result.files:
        err_console.print(Text(f"wrote {len(result.files)} file(s) to "
                               f"{Path(result.files[0]).parent}"), highlight=False)


def main() -> None:
    """Console-script entry point."""
    # TensorFlow's C++ start-up chatter is not for users; real errors still surface.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app(prog_name="xrayfeat")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
