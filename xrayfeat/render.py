"""How the command line shows results: Rich tables on stdout, progress and messages on
stderr, and ``--json`` objects for scripts.

Names that come from data (files, classes, layers) are printed as data, never as Rich
markup, with control characters shown as escapes. Off a terminal (a pipe, a log) tables
are drawn :data:`UNBOUNDED_WIDTH` wide, so no name is ever cut, whatever ``COLUMNS`` says.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import rich.markup
import rich.text
from rich.console import Console
from rich.table import Table


def jsonable(value):
    """``value`` as plain JSON types: dataclasses and ``to_dict()`` objects as objects,
    paths as text, NumPy values as numbers or lists, NaN and infinity as null."""
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def print_json(value) -> None:
    """Exactly one JSON object on stdout (``--json``)."""
    print(json.dumps(jsonable(value)))  # ASCII: a name that is not UTF-8 stays printable


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


def progress_display():
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


class Bar:
    """Adapts the core's on_start/on_progress callbacks to a Rich progress bar."""

    def __init__(self, progress, description: str):
        self.progress, self.description, self.task = progress, description, None

    def start(self, total: int) -> None:
        self.task = self.progress.add_task(self.description, total=total, rate="")

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)
        speed = self.progress.tasks[self.task].speed
        self.progress.update(self.task, rate=f"{speed:.1f} img/s" if speed else "")


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


def render_prepare(result, json_out: bool = False) -> None:
    """Summary table of a prepare run: images per split and class, then skipped files."""
    if json_out:
        print_json(result)
        return
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


class TrainProgress:
    """Rich display of training: prepare bar, then one bar over all batches with the
    latest loss and validation AUC, and a line per finished epoch."""

    def __init__(self, progress):
        self.progress = progress
        self.prepare = Bar(progress, "prepare")
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


def render_train(result, json_out: bool) -> None:
    """Best epoch, threshold and validation metrics of a finished training run."""

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


_EVAL_ROWS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1",
              "balanced_accuracy", "roc_auc", "pr_auc", "brier", "ece", "threshold", "n")


def render_evaluate(result, json_out: bool) -> None:
    """One column per run: metric value with its 95% CI; notices and left-out files."""

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
    for name, report in result.reports.items():
        chosen = report.get("threshold_for_these_images")
        if chosen:
            ci = chosen["threshold_ci"]
            rule = chosen["threshold_method"] + (
                f" >= {chosen['threshold_min_sensitivity']}"
                if chosen["threshold_min_sensitivity"] is not None else "")
            out_console.print(Text(
                f"{name}: on these images, {rule} picks threshold {chosen['threshold']:.4f} "
                f"(95 % CI {ci['lower']:.4f}-{ci['upper']:.4f}; sensitivity "
                f"{chosen['sensitivity']:.3f}, specificity {chosen['specificity']:.3f} here, "
                "where it was chosen). For more images of this site: predict --threshold "
                f"{chosen['threshold']:.4f}"), soft_wrap=True, highlight=False)
    if result.files:
        err_console.print(Text(f"wrote {len(result.files)} file(s) to "
                               f"{Path(result.files[0]).parent}"), highlight=False)


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


def render_visualize(result, json_out: bool = False) -> None:
    """Files written per image (or the top contrast channels), then skipped files."""
    if json_out:
        print_json(result)
        return
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


def render_probes(result, json_out: bool = False) -> None:
    """One row per probed layer: depth, feature size, AUC of the trained and random model."""
    if json_out:
        print_json(result)
        return
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


def render_ensemble(result, json_out: bool) -> None:
    """Each member's and the ensemble's validation AUC, its metrics and threshold."""

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


def render_audit(result, json_out: bool) -> None:
    """One row per transform and class: mean shift of the score with its interval, flips."""

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


def render_export(result, json_out: bool) -> None:
    """Where the exported model and its preprocessing.json are."""
    if json_out:
        print_json(result)
        return
    out_console.print(Text(f"exported {result.format} model to {result.model} and its input "
                           f"specification to {result.preprocessing} in "
                           f"{result.seconds:.1f} s"), soft_wrap=True)
