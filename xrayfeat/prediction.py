"""Batch prediction over any mix of files, folders and glob patterns.

Decoding runs on all cores in worker processes (the same preprocessing as training) and
overlaps with inference, which runs in batches in this process. Only the path list and a
few batches are ever in memory, so a folder of any size streams through.

Outputs are written atomically (temporary file, then rename), except with ``skip_done``:
then the output is a journal that grows by whole batches, so an interrupted run keeps
every finished row and the next ``--skip-done`` run carries on where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np

from xrayfeat.atomic import atomic_output, locks_output, remove_stale_temporaries
from xrayfeat.cams import write_gradcam_overlays
from xrayfeat.choices import FORMATS
from xrayfeat.csvout import csv_text, read_cell
from xrayfeat.dataset import iter_image_files
from xrayfeat.decoding import map_prepare
from xrayfeat.errors import UsageError
from xrayfeat.filenames import unique_stems
from xrayfeat.imaging import looks_like_image_path
from xrayfeat.metrics import NOT_A_NUMBER, decide, operating_threshold
from xrayfeat.runs import Run, load_run
from xrayfeat.tta import check_views, predict_batch


@dataclass
class PredictSummary:
    """Counts of a prediction run, for the CLI's summary."""
    out: Path | None
    total: int  # files in this shard
    predicted: int
    errors: int
    skipped_done: int  # already in the output (--skip-done)
    per_class: dict[str, int]
    seconds: float
    rows: list[dict] = field(default_factory=list)  # kept only when there is no output file


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (recursive) and glob patterns -> unique paths sorted by their text.

    A path that does not exist and matches no glob is a usage error: a typo should not
    silently predict nothing.
    """
    found: set[Path] = set()
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found.update(p for p, ok in iter_image_files(path) if ok)
        elif path.exists():
            found.add(path)
        else:
            matches = glob.glob(str(path), recursive=True)
            if not matches:
                raise UsageError(f"{item} does not exist and matches no file")
            for match in map(Path, matches):
                if match.is_dir():
                    found.update(p for p, ok in iter_image_files(match) if ok)
                elif looks_like_image_path(match) or match.exists():
                    found.add(match)
    return sorted(found, key=str)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (1-based) -> ``(I, N)``; the I-th of N disjoint slices of the inputs."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard takes I/N such as 1/4, got {text!r}") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: I must be between 1 and N")
    return i, n


def in_shard(path: Path, shard: tuple[int, int] | None) -> bool:
    """Stable by path: a file's shard depends on its path alone, not on the other files."""
    if shard is None:
        return True
    i, n = shard
    return zlib.crc32(str(path).encode("utf-8", "surrogateescape")) % n == i - 1


def output_format(out: Path | None, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    if out is None:
        return "csv"
    suffix = out.suffix.lower().lstrip(".")
    return {"jsonl": "jsonl", "ndjson": "jsonl", "json": "json"}.get(suffix, "csv")


def columns(classes: Sequence[str]) -> list[str]:
    """Output columns, in order."""
    return (["path", "label", "probability"] + [f"prob_{c}" for c in classes]
            + ["threshold", "roi_x0", "roi_y0", "roi_x1", "roi_y1", "error"])


def _read_done(out: Path, fmt: str) -> set[str]:
    """Paths already predicted in an existing output; a torn last line is cut off."""
    if not out.exists():
        return set()
    if fmt == "json":
        raise UsageError("--skip-done needs an appendable output: use .csv or .jsonl")
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):  # killed mid-write: drop the partial row
        data = data[: data.rfind(b"\n") + 1]
        with open(out, "r+b") as fh:
            fh.truncate(len(data))
    text = data.decode("utf-8", "surrogateescape")
    if fmt == "jsonl":
        return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}
    return {read_cell(row["path"]) for row in csv.DictReader(io.StringIO(text))}


#: Digits of the probabilities written out. Rows keep the exact values: evaluate scores
#: and decides on those (rounded ones moved an image across a threshold it sat on).
WRITTEN_DIGITS = 6


def _written(row: dict) -> dict:
    return {k: round(v, WRITTEN_DIGITS) if isinstance(v, float) and
            (k == "probability" or k.startswith("prob_")) else v for k, v in row.items()}


def _format_rows(rows: list[dict], names: list[str], fmt: str, header: bool) -> str:
    rows = [_written(r) for r in rows]
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    return csv_text(rows, names, header=header)


class _StreamWriter:
    """Rows to an open text stream (stdout), in the output format, as they come."""
    def __init__(self, stream: TextIO, fmt: str, names: list[str]):
        self.stream, self.fmt, self.names = stream, fmt, names
        self.rows_json: list[dict] = []
        if fmt == "csv":
            self._write(_format_rows([], names, "csv", header=True))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except UnicodeEncodeError:  # a file name that is not UTF-8: its bytes as they were
            buffer = getattr(self.stream, "buffer", None)
            if buffer is None:
                raise
            self.stream.flush()
            buffer.write(text.encode("utf-8", "surrogateescape"))
        self.stream.flush()

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "json":
            self.rows_json.extend(_written(r) for r in rows)
        else:
            self._write(_format_rows(rows, self.names, self.fmt, header=False))

    def close(self) -> None:
        if self.fmt == "json":
            self._write(json.dumps(self.rows_json, indent=1) + "\n")


class _Writer:
    """Rows to CSV / JSON Lines / JSON: atomic, or an append-only journal (skip_done)."""
    def __init__(self, out: Path, fmt: str, names: list[str], journal: bool):
        self.out, self.fmt, self.names, self.journal = out, fmt, names, journal
        self.rows_json: list[dict] = []

    def __enter__(self):
        if self.journal:
            new = not self.out.exists() or self.out.stat().st_size == 0
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(self.out, "a", encoding="utf-8", errors="surrogateescape",
                               newline="")
            except OSError as exc:
                raise UsageError(f"cannot write {self.out}: {exc.strerror or exc}") from None
            if new and self.fmt == "csv":
                try:
                    self._write(_format_rows([], self.names, "csv", header=True))
                except BaseException:
                    with contextlib.suppress(OSError):
                        self.fh.close()
                    raise
        else:
            remove_stale_temporaries(self.out.parent)  # half-written outputs of killed runs
            self._atomic = atomic_output(self.out)
            tmp = self._atomic.__enter__()
            self.fh = open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="")
            if self.fmt == "csv":
                self.fh.write(_format_rows([], self.names, "csv", header=True))
        return self

    def _write(self, text: str) -> None:
        self.fh.write(text)
        self.fh.flush()
        if self.journal:
            os.fsync(self.fh.fileno())  # a finished batch survives a kill

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "json":
            self.rows_json.extend(_written(r) for r in rows)
        else:
            self._write(_format_rows(rows, self.names, self.fmt, header=False))

    def __exit__(self, exc_type, exc, tb):
        close_error = None
        try:
            if self.fmt == "json" and exc_type is None:
                self.fh.write(json.dumps(self.rows_json, indent=1) + "\n")
            self.fh.close()
        except OSError as error:  # a full disk can show first at the last flush
            with contextlib.suppress(OSError):
                self.fh.close()
            if exc is None:
                close_error = error
                exc_type, exc, tb = type(error), error, error.__traceback__
        if not self.journal:
            # Renames the temporary into place, or removes it on any error (a full disk
            # becomes a one-line UsageError there).
            self._atomic.__exit__(exc_type, exc, tb)
        if close_error is not None:
            raise close_error
        return False


def predict_files(
    run: Run | str | os.PathLike,
    paths: Sequence[Path],
    *,
    threshold: float | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    gradcam_dir: Path | None = None,
    tta: int = 1,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> Iterator[list[dict]]:
    """Yield one list of output rows per batch, in the order of ``paths``.

    Every path gets exactly one row; unreadable files get an ``error`` and empty
    probabilities. This is the library entry point ``predict`` and ``evaluate`` share.
    ``tta`` > 1 averages the probabilities over that many fixed views (xrayfeat.tta).
    """

    check_views(tta)
    run = run if isinstance(run, Run) else load_run(run)
    classes = run.classes
    threshold = run.threshold if threshold is None else threshold
    if len(classes) == 2:
        threshold = operating_threshold(threshold)  # the value each row reports
    model = run.load_model()
    settings = run.preprocess
    stems = None
    if gradcam_dir is not None:
        stems = unique_stems(paths)  # unique over all inputs, not just one batch

    def flush(batch: list[tuple[int, Path, object, str | None]]) -> list[dict]:
        ok = [(i, p, prep) for i, p, prep, err in batch if err is None]
        probs = np.zeros((0, len(classes)))
        if ok:
            x = np.stack([prep.image for _, _, prep in ok])[..., None].astype(np.float32)
            probs = predict_batch(model, x, tta)
            finite = np.isfinite(probs).all(axis=1)
            if not finite.all():  # NaN >= threshold is False: it would read as NORMAL
                bad = {ok[j][0] for j in np.flatnonzero(~finite)}
                batch = [(i, p, prep, NOT_A_NUMBER if i in bad else err)
                         for i, p, prep, err in batch]
                ok = [item for item, keep in zip(ok, finite) if keep]
                probs, x = probs[finite], x[finite]
        labels, reported = decide(probs, classes, threshold) if ok else ([], [])
        if ok and stems is not None:
            # Explain the label predict reports (the threshold decides, not the argmax).
            write_gradcam_overlays(model, [p for _, p, _ in ok], x, gradcam_dir,
                                   class_indices=labels, class_names=classes,
                                   stems=[stems[i] for i, _, _ in ok])
        rows, k = [], 0
        for _, path, prep, err in batch:
            row = {"path": str(path)}
            if err is None:
                row.update(label=classes[labels[k]], probability=float(reported[k]))
                row.update({f"prob_{c}": float(probs[k, j]) for j, c in enumerate(classes)})
                row.update(threshold=threshold, roi_x0=prep.roi.x0, roi_y0=prep.roi.y0,
                           roi_x1=prep.roi.x1, roi_y1=prep.roi.y1, error="")
                k += 1
            else:
                row.update(label="", probability="", threshold=threshold, error=err,
                           **{f"prob_{c}": "" for c in classes},
                           roi_x0="", roi_y0="", roi_x1="", roi_y1="")
            rows.append(row)
        return rows

    batch: list = []
    for index, prepared, error in map_prepare(paths, settings, workers, chunksize=4):
        batch.append((index, paths[index], prepared, error))
        if len(batch) == batch_size:
            yield flush(batch)
            batch = []
    if batch:
        yield flush(batch)


@locks_output  # a second command writing the same output is refused
def predict(
    run_path: str | os.PathLike,
    inputs: Sequence[str],
    *,
    out: Path | None = None,
    fmt: str | None = None,
    threshold: float | None = None,
    gradcam_dir: Path | None = None,
    shard: str | None = None,
    skip_done: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    tta: int = 1,
    stream: TextIO | None = None,
    keep_rows: int = 200,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> PredictSummary:
    """Predict every supported file in ``inputs``.

    Rows go to the file ``out``, else to the text ``stream`` (all of them, in ``fmt``), else
    the first ``keep_rows`` come back in the summary.
    """

    started = time.perf_counter()
    run = load_run(run_path)
    check_views(tta)
    fmt = output_format(out, fmt)
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(f"--threshold must be between 0 and 1, got {threshold}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if skip_done and out is None:
        raise UsageError("--skip-done needs --out (the output it resumes)")
    if skip_done and fmt == "json":
        raise UsageError("--skip-done needs an appendable output: use .csv or .jsonl")
    if out is not None and out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as preds.csv")
    paths = [p for p in expand_inputs(inputs) if in_shard(p, parse_shard(shard))]
    done = _read_done(out, fmt) if skip_done and out is not None else set()
    todo = [p for p in paths if str(p) not in done]
    if on_start:
        on_start(len(todo))
    names = columns(run.classes)
    per_class = {c: 0 for c in run.classes}
    kept: list[dict] = []
    errors = predicted = 0

    def consume(batches: Iterable[list[dict]], sink) -> None:
        nonlocal errors, predicted
        for rows in batches:
            for row in rows:
                if row["error"]:
                    errors += 1
                else:
                    predicted += 1
                    per_class[row["label"]] += 1
            if sink is not None:
                sink.write(rows)
            elif len(kept) < keep_rows:
                kept.extend(rows[: keep_rows - len(kept)])
            if on_progress:
                on_progress(len(rows))

    batches = predict_files(run, todo, threshold=threshold, batch_size=batch_size,
                            workers=workers, gradcam_dir=gradcam_dir,
                            tta=tta) if todo else iter(())
    if out is None and stream is not None:
        sink = _StreamWriter(stream, fmt, names)
        consume(batches, sink)
        sink.close()
    elif out is None:
        consume(batches, None)
    else:
        with _Writer(out, fmt, names, journal=skip_done) as writer:
            consume(batches, writer)
    return PredictSummary(out=out, total=len(paths), predicted=predicted, errors=errors,
                          skipped_done=len(paths) - len(todo), per_class=per_class,
                          seconds=time.perf_counter() - started, rows=kept)
