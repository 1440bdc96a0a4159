"""Hostile inputs: what real hospital exports and real users hand to the tool.

A folder of hostile files goes through ``imaging``, ``prepare`` and ``predict``: valid images
are read, prepared and predicted; invalid ones are skipped or error rows with a reason;
nothing hangs and nothing crashes. Then every command is given wrong arguments: each
answer is one line on stderr that says what is wrong and what to do, with exit code 2
(and a traceback only with ``--debug``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_synthetic_xray, one_error_line, write_dicom_file
from xrayfeat.cli import app
from xrayfeat.dataset import prepare_dataset
from xrayfeat.errors import ImageReadError, RunError, UsageError
from xrayfeat.imaging import read_radiograph
from xrayfeat.prediction import predict

runner = CliRunner()


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def build_hostile_folder(folder: Path, seed: int = 0) -> tuple[set[str], dict[str, str]]:
    """Write the hostile set into ``folder``.

    Returns the names of the files that must be read (valid radiographs in awkward forms)
    and, for the files that must fail, a fragment of the reason each must give. Folders and
    links that a folder walk must skip (a directory named like an image, a symlink loop)
    are in neither.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gray = make_synthetic_xray(96, seed=seed + 3)
    jpeg, png = _encode(".jpg", gray), _encode(".png", gray)
    valid: set[str] = set()
    invalid: dict[str, str] = {}

    def bad(name: str, data: bytes, reason: str) -> None:
        (folder / name).write_bytes(data)
        invalid[name] = reason

    def good(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        valid.add(name)

    bad("empty.jpeg", b"", "empty")
    bad("random.png", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not an image")
    bad("random.jpg", b"\xff\xd8\xff" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "JPEG")
    bad("truncated.jpeg", jpeg[: len(jpeg) // 2], "truncated")
    bad("truncated.png", png[: len(png) // 2], "truncated")
    bad("notes.jpeg", b"patient list\nnot an image\n", "not an image")
    bad("page.png", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "not an image")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10 gigapixels claimed
    bad("bomb.png", b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _png_chunk(b"IEND", b""),
        "too large")
    bad("thin.png", _encode(".png", rng.integers(0, 255, (8, 600), dtype=np.uint8)), "too small")
    (folder / "folder.jpeg").mkdir()  # a directory named like an image
    (folder / "loop").symlink_to(".", target_is_directory=True)  # a symlink loop
    (folder / "selfloop.png").symlink_to("selfloop.png")  # a link to itself
    invalid["selfloop.png"] = "symbolic links"
    os.mkfifo(folder / "pipe.jpeg")  # would block a plain open() forever
    invalid["pipe.jpeg"] = "not a regular file"
    (folder / "zero.png").symlink_to("/dev/zero")  # would fill memory with a plain read
    invalid["zero.png"] = "not a regular file"
    with open(folder / "sparse.jpeg", "wb") as fh:  # 1 GB on paper, nothing on disk
        fh.truncate(2**30)
    invalid["sparse.jpeg"] = "file too large"

    bgra = cv2.merge([gray, gray, gray, np.full_like(gray, 200)])
    good("rgba.png", _encode(".png", bgra))
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(gray).convert("RGB").convert("CMYK").save(buffer, "JPEG", quality=95)
    good("cmyk.jpg", buffer.getvalue())
    good("sixteen.png", _encode(".png", gray.astype(np.uint16) * 200 + 1000))
    good("tall thin.png", _encode(".png", make_synthetic_xray((1200, 40), seed=seed + 4)))
    good("large.jpeg", _encode(".jpg", make_synthetic_xray((2600, 3000), seed=seed + 5)))
    good("UPPER.JPG", jpeg)
    good("UPPER.PNG", png)
    good("name with  spaces.jpeg", jpeg)
    good("радиограмма é 肺.png", png)
    good("[bold]markup[red].jpeg", jpeg)
    dicom_pixels = gray.astype(np.uint16) * 16
    write_dicom_file(folder / "mono2.dcm", dicom_pixels, photometric="MONOCHROME2")
    write_dicom_file(folder / "mono1.dcm", 4095 - dicom_pixels, photometric="MONOCHROME1")
    write_dicom_file(folder / "DICOM_WITHOUT_EXTENSION", dicom_pixels)
    valid |= {"mono2.dcm", "mono1.dcm", "DICOM_WITHOUT_EXTENSION"}
    write_dicom_file(folder / "nopixels.dcm", None, rows_cols=(96, 96))
    invalid["nopixels.dcm"] = "no pixel data"
    return valid, invalid


@pytest.fixture()
def hostile_folder(tmp_path) -> tuple[Path, set[str], dict[str, str]]:
    pytest.importorskip("pydicom")
    pytest.importorskip("PIL")
    folder = tmp_path / "export"
    valid, invalid = build_hostile_folder(folder)
    return folder, valid, invalid


# --------------------------------------------------------------------------- imaging

def test_reader_reads_valid_files_and_names_the_problem_with_the_others(hostile_folder):
    folder, valid, invalid = hostile_folder
    for name in sorted(valid):
        image, source_shape = read_radiograph(folder / name)
        assert image.ndim == 2 and image.dtype == np.uint8, name
        assert min(image.shape) >= 32 and len(source_shape) == 2, name
    for name, reason in sorted(invalid.items()):
        started = time.perf_counter()
        with pytest.raises(ImageReadError, match=reason):
            read_radiograph(folder / name)
        assert time.perf_counter() - started < 5.0, name  # refused from the header / stat
    with pytest.raises(ImageReadError, match="directory"):
        read_radiograph(folder / "folder.jpeg")


def test_monochrome1_is_inverted_to_look_like_monochrome2(hostile_folder):
    folder, _, _ = hostile_folder
    mono1, _ = read_radiograph(folder / "mono1.dcm")
    mono2, _ = read_radiograph(folder / "mono2.dcm")
    assert np.abs(mono1.astype(int) - mono2.astype(int)).max() <= 1


# --------------------------------------------------------------------------- prepare

def test_prepare_keeps_every_valid_file_and_lists_every_invalid_one(tmp_path):
    pytest.importorskip("pydicom")
    pytest.importorskip("PIL")
    src = tmp_path / "src"
    valid, invalid = build_hostile_folder(src / "NORMAL", seed=0)
    build_hostile_folder(src / "PNEUMONIA", seed=10)
    out = tmp_path / "data.h5"
    result = prepare_dataset(src, out, workers=1, val_fraction=0.5, seed=0)
    with h5py.File(out, "r") as h5:
        paths = list(h5["path"].asstr()[:])
        assert h5["images"].shape[1:] == (224, 224)
    stored = sorted(Path(p).relative_to(src).as_posix() for p in paths)
    assert stored == sorted(f"{c}/{n}" for c in ("NORMAL", "PNEUMONIA") for n in valid)
    skipped = {Path(p).relative_to(src).as_posix(): reason for p, reason in result.skipped}
    assert set(skipped) == {f"{c}/{n}" for c in ("NORMAL", "PNEUMONIA") for n in invalid}
    for path, reason in skipped.items():
        assert invalid[Path(path).name] in reason, (path, reason)


def test_prepare_cli_on_hostile_folder_finishes_and_lists_skipped_files(tmp_path):
    """In a real process, with a timeout: nothing hangs (a FIFO, /dev/zero), exit 0."""
    pytest.importorskip("pydicom")
    pytest.importorskip("PIL")
    src = tmp_path / "src"
    build_hostile_folder(src / "NORMAL", seed=0)
    build_hostile_folder(src / "PNEUMONIA", seed=10)
    out = tmp_path / "data.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "xrayfeat", "prepare", str(src), "--out", str(out),
         "--workers", "2", "--size", "64", "--val-fraction", "0.5"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "skipped file(s)" in proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert out.is_file()


# --------------------------------------------------------------------------- predict

def test_predict_gives_every_file_a_row_valid_ones_a_label(trained_run, hostile_folder, tmp_path):
    folder, valid, invalid = hostile_folder
    out = tmp_path / "preds.csv"
    summary = predict(trained_run, [str(folder)], out=out, workers=1, batch_size=8)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert set(rows) == valid | set(invalid)  # the loop and the folder are not files
    assert summary.predicted == len(valid) and summary.errors == len(invalid)
    for name in valid:
        assert rows[name]["label"] in ("NORMAL", "PNEUMONIA") and not rows[name]["error"]
        assert 0.0 <= float(rows[name]["probability"]) <= 1.0
    for name, reason in invalid.items():
        assert rows[name]["label"] == "" and reason in rows[name]["error"], rows[name]


def test_predict_cli_on_hostile_files_exit_codes(trained_run, hostile_folder, tmp_path):
    folder, valid, invalid = hostile_folder
    result = runner.invoke(app, ["predict", str(trained_run), str(folder), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"{len(invalid)} file(s) could not be read" in result.stderr
    assert "[bold]markup[red].jpeg" in result.stdout  # file names are shown, not styled
    strict = runner.invoke(app, ["predict", str(trained_run), str(folder / "empty.jpeg"),
                                 str(folder / "UPPER.JPG"), "--strict", "--workers", "1"])
    assert strict.exit_code == 1


# --------------------------------------------------------------------------- wrong arguments

@pytest.fixture(scope="module")
def bad(tmp_path_factory, trained_run, examples_h5) -> dict[str, Path]:
    """A zoo of wrong things to pass: runs from another version or without a model, a text
    file, an image, a dataset of other classes, a dataset of another image size."""
    root = tmp_path_factory.mktemp("bad")
    old = root / "old_run"
    shutil.copytree(trained_run, old)
    config = json.loads((old / "config.json").read_text())
    config["format"] = "xrayfeat-run/0"
    (old / "config.json").write_text(json.dumps(config))
    no_model = root / "no_model_run"
    shutil.copytree(trained_run, no_model)
    (no_model / "model.keras").unlink()
    (root / "notes.txt").write_text("not a dataset\n")
    image = root / "image.jpeg"
    cv2.imwrite(str(image), make_synthetic_xray(96, seed=0))
    other = root / "other_classes.h5"
    shutil.copy(examples_h5, other)
    with h5py.File(other, "r+") as h5:
        h5.attrs["classes"] = json.dumps(["CAT", "DOG"])
    folder = root / "other_folder"
    for name in ("CAT", "DOG"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(folder / name / f"{name}{i}.png"), make_synthetic_xray(64, seed=i))
    return {"run": trained_run, "h5": examples_h5, "old": old, "no_model": no_model,
            "txt": root / "notes.txt", "image": image, "other": other, "folder": folder,
            "root": root, "missing": root / "does-not-exist"}


# (command line, a fragment the one line must contain). ``{name}`` is a path from ``bad``.
WRONG = [
    # prepare
    ("prepare {missing} --out {root}/a.h5", "does not exist"),
    ("prepare {txt} --out {root}/a.h5", "not a folder"),
    ("prepare {folder} --out {h5}", "--overwrite"),
    ("prepare {folder} --out {root}", "is a folder"),
    ("prepare {folder} --out {root}/a.h5 --size 8", "--size"),
    ("prepare {folder} --out {root}/a.h5 --labels nonsense", "--labels"),
    ("prepare {folder} --out {root}/a.h5 --val-fraction 1.5", "--val-fraction"),
    # train
    ("train {missing} --out {root}/r", "does not exist"),
    ("train {txt} --out {root}/r", "not an HDF5 dataset"),
    ("train {image} --out {root}/r", "not an HDF5 dataset"),
    ("train {h5} --out {txt}", "is a file"),
    ("train {h5} --out {run}", "--resume"),
    ("train {h5} --out {root}/never_trained --resume", "cannot --resume"),
    ("train {h5} --out {root}/r --input-size 4096", "--input-size"),
    ("train {h5} --out {root}/r --config {missing}.toml", "does-not-exist"),
    ("train {h5} --out {root}/r --config {txt}", "notes.txt"),
    # evaluate
    ("evaluate {run}", "RUN"),
    ("evaluate {missing} {h5}", "does not exist"),
    ("evaluate {old} {h5}", "another version"),
    ("evaluate {no_model} {h5}", "model.keras"),
    ("evaluate {h5} {h5}", "not a run directory"),
    ("evaluate {run} {txt}", "not an HDF5 dataset"),
    ("evaluate {run} {other}", "CAT"),
    ("evaluate {run} {folder}", "CAT"),
    ("evaluate {run} {h5} --threshold 2", "--threshold"),
    # predict
    ("predict {missing} {image}", "does not exist"),
    ("predict {old} {image}", "another version"),
    ("predict {no_model} {image}", "model.keras"),
    ("predict {h5} {image}", "not a run directory"),
    ("predict {run} {missing}", "does not exist"),
    ("predict {run} {image} --out {root}", "is a folder"),
    ("predict {run} {image} --shard 5/4", "--shard"),
    ("predict {run} {image} --format xml", "--format"),
    ("predict {run} {image} --skip-done", "--skip-done"),
    ("predict {run} {image} --out {root}/p.json --skip-done", "--skip-done"),
    ("predict {run} {image} --threshold -1", "--threshold"),
    # visualize-layers
    ("visualize-layers {missing} {image} --out {root}/v", "does not exist"),
    ("visualize-layers {old} {image} --out {root}/v", "another version"),
    ("visualize-layers {no_model} {image} --out {root}/v", "model.keras"),
    ("visualize-layers {run} --out {root}/v", "no images"),
    ("visualize-layers {run} {missing} --out {root}/v", "does-not-exist"),
    ("visualize-layers {run} {image} --out {txt}", "not a folder"),
    ("visualize-layers {run} {image} --out {root}/v --layer nope", "nope"),
    ("visualize-layers {run} {image} --out {root}/v --layers everything", "--layers"),
    ("visualize-layers {run} --contrast --data {other} --out {root}/v", "CAT"),
    ("visualize-layers {run} --contrast --data {txt} --out {root}/v", "not an HDF5 dataset"),
    ("visualize-layers {run} --contrast --out {root}/v", "--data"),
]


@pytest.mark.parametrize("command, fragment", WRONG, ids=[w[0].split(" {", 1)[0] + ":" + w[1]
                                                         for w in WRONG])
def test_wrong_arguments_are_one_line_and_exit_2(bad, command, fragment):
    args = [part.format(**bad) for part in command.split()]
    result = runner.invoke(app, args)
    line = one_error_line(result)
    assert fragment in line, line


def test_wrong_arguments_leave_no_file_behind(bad):
    """None of the refused commands above wrote a file (train may leave an empty --out
    folder: it creates it before it has read the data)."""
    fixtures = {"old_run", "no_model_run", "notes.txt", "image.jpeg", "other_classes.h5",
                "other_folder"}
    left = [p for p in bad["root"].iterdir() if p.name not in fixtures]
    assert all(p.is_dir() and not any(p.iterdir()) for p in left), left


def test_debug_shows_the_traceback_instead(bad):
    result = runner.invoke(app, ["--debug", "predict", str(bad["old"]), str(bad["image"])])
    assert result.exit_code != 0
    assert isinstance(result.exception, RunError)
    assert "another version" in str(result.exception)
    result = runner.invoke(app, ["--debug", "prepare", str(bad["folder"]), "--out",
                                 str(bad["h5"])])
    assert isinstance(result.exception, UsageError)


def test_debug_traceback_in_a_real_process(bad):
    proc = subprocess.run([sys.executable, "-m", "xrayfeat", "--debug", "prepare",
                           str(bad["missing"]), "--out", str(bad["root"] / "x.h5")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.returncode != 2
    assert "Traceback" in proc.stderr and "does not exist" in proc.stderr
    plain = subprocess.run([sys.executable, "-m", "xrayfeat", "prepare", str(bad["missing"]),
                            "--out", str(bad["root"] / "x.h5")],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert [line for line in plain.stderr.splitlines() if line.strip()] == [
        f"error: {bad['missing']} does not exist"]


# --------------------------------------------------------------------------- damaged weights

@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, trained_run) -> Path:
    """The trained run with a NaN in its last layer's bias: every probability is NaN."""
    from xrayfeat.runs import load_run

    run = tmp_path_factory.mktemp("nan") / "run"
    shutil.copytree(trained_run, run)
    model = load_run(run).load_model()
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([kernel, np.full_like(bias, np.nan)])
    model.save(run / "model.keras")
    return run


def test_a_model_that_outputs_nan_gives_error_rows_not_normal(nan_run, examples_dir, tmp_path):
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(nan_run), str(examples_dir / "val"), "--out",
                                 str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["label"] == "" and "not a number" in r["error"] for r in rows)
    assert "NORMAL: 0" in result.stderr
    strict = runner.invoke(app, ["predict", str(nan_run), str(examples_dir / "val"), "--out",
                                 str(tmp_path / "s.csv"), "--workers", "1", "--strict"])
    assert strict.exit_code == 1


def test_evaluating_a_model_that_outputs_nan_is_one_line(nan_run, examples_h5):
    result = runner.invoke(app, ["evaluate", str(nan_run), str(examples_h5)])
    assert result.exit_code == 2
    assert "NaN or infinite" in one_error_line(result)


def test_visualizing_a_model_that_outputs_nan_is_one_line(nan_run, examples_dir, tmp_path):
    image = next((examples_dir / "val").rglob("*.jpeg"))
    result = runner.invoke(app, ["visualize-layers", str(nan_run), str(image), "--out",
                                 str(tmp_path / "v")])
    assert result.exit_code == 2
    assert "not a number" in one_error_line(result)


# --------------------------------------------------------------------------- CSV safety

def test_csv_cells_that_a_spreadsheet_would_run_are_defused_and_read_back():
    from xrayfeat.csvout import csv_text, read_cell

    hostile = ["=HYPERLINK(\"http://x\")", "+1", "-2+3.jpeg", "@SUM(A1)", "'quoted",
               "a\rb.jpeg", "plain.jpeg"]
    text = csv_text([{"path": h, "p": -0.25} for h in hostile], ["path", "p"])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [read_cell(r["path"]) for r in rows] == hostile  # exact round trip, \r included
    for row in rows:
        assert not row["path"].startswith(("=", "+", "-", "@"))
    assert all(r["p"] == "-0.25" for r in rows)  # numbers stay numbers


def test_predict_csv_defuses_formulas_and_skip_done_reads_its_own_output(trained_run,
                                                                          tmp_path,
                                                                          monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=cmd.jpeg", "-2+3.jpeg", "@x.jpeg", "car\rriage.jpeg", "ok.jpeg"]
    for k, name in enumerate(names):
        cv2.imwrite(str(folder / name), make_synthetic_xray(96, seed=k))
    monkeypatch.chdir(folder)  # relative paths: the path cells begin with the names
    out = tmp_path / "p.csv"
    args = ["predict", str(trained_run), "--out", str(out), "--workers", "1", "--skip-done",
            "--", *names]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    with open(out, newline="", encoding="utf-8") as fh:  # keep the \r inside a name
        rows = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in rows) == sorted(("'" + n if n[0] in "=-@" else n)
                                                     for n in names)
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "5 file(s) already in" in again.stderr
    with open(out, newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 5


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--workers", "-1"], "--workers must be at least 1"),
])
def test_predict_option_ranges_are_one_line(trained_run, examples_dir, tmp_path, args, message):
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(trained_run), str(examples_dir / "val"),
                                 "--out", str(out), *args])
    assert result.exit_code == 2
    assert message in one_error_line(result)
    assert not out.exists()


def test_prepare_refuses_a_stored_size_no_run_accepts(tmp_path, examples_dir):
    result = runner.invoke(app, ["prepare", str(examples_dir), "--out", str(tmp_path / "d.h5"),
                                 "--size", "5000"])
    assert result.exit_code == 2
    assert "--size must be between 32 and 4096" in one_error_line(result)


def test_escape_sequences_in_file_names_never_reach_the_terminal_raw(tmp_path, examples_dir):
    src = tmp_path / "src"
    shutil.copytree(examples_dir / "train", src)
    bad = src / "NORMAL" / "\x1b]0;pwned\x07\x1b[31mred.jpeg"
    bad.write_bytes(b"not an image")
    result = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "d.h5"),
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    # Shown as escapes (the table may fold the name at any width: check the pieces).
    assert "\\x1b" in result.stdout and "pwned" in result.stdout


# --------------------------------------------------------------------------- malformed datasets

def _damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as h5:
        damage(h5)
    return dst


def _replace(name, data):
    def damage(h5):
        del h5[name]
        h5.create_dataset(name, data=data)
    return damage


def _set_attr(key, value):
    def damage(h5):
        if value is None:
            del h5.attrs[key]
        else:
            h5.attrs[key] = value
    return damage


def _external(tmp_path):
    def damage(h5):
        other = tmp_path / "elsewhere.h5"
        with h5py.File(other, "w") as o:
            o.create_dataset("images", data=h5["images"][:])
        del h5["images"]
        h5["images"] = h5py.ExternalLink(str(other), "images")
    return damage


def _external_storage(tmp_path):
    def damage(h5):
        raw = tmp_path / "raw.bin"
        images = h5["images"][:]
        images.tofile(raw)
        del h5["images"]
        h5.create_dataset("images", shape=images.shape, dtype=images.dtype,
                          external=[(str(raw), 0, images.nbytes)])
    return damage


MALFORMED = {
    "classes not JSON": lambda tmp: _set_attr("classes", "NORMAL,PNEUMONIA"),
    "classes not strings": lambda tmp: _set_attr("classes", "[1, 2]"),
    "size missing": lambda tmp: _set_attr("size", None),
    "split as int": lambda tmp: lambda h5: _replace("split", np.zeros(len(h5["labels"]),
                                                                       np.int64))(h5),
    "fewer image rows": lambda tmp: lambda h5: _replace("images", h5["images"][:-2])(h5),
    "image shape != size": lambda tmp: lambda h5: _replace(
        "images", np.zeros((len(h5["labels"]), 8, 8), np.uint8))(h5),
    "label 99": lambda tmp: lambda h5: _replace("labels", np.full(len(h5["labels"]), 99,
                                                                  np.int32))(h5),
    "label -1": lambda tmp: lambda h5: _replace("labels", np.full(len(h5["labels"]), -1,
                                                                  np.int32))(h5),
    "float64 images": lambda tmp: lambda h5: _replace("images",
                                                      h5["images"][:].astype(np.float64))(h5),
    "4-D images": lambda tmp: lambda h5: _replace("images", h5["images"][:][..., None])(h5),
    "float labels": lambda tmp: lambda h5: _replace("labels",
                                                    h5["labels"][:].astype(np.float32))(h5),
    "external link": _external,
    "external storage": _external_storage,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_datasets_are_one_line_errors(examples_h5, tmp_path, case):
    bad_file = _damaged_copy(examples_h5, tmp_path / "bad.h5", MALFORMED[case](tmp_path))
    for command in (["evaluate", str(examples_h5.parent / "run"), str(bad_file)],
                    ["train", str(bad_file), "--out", str(tmp_path / "run"), "--epochs", "1"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (case, command[0], result.output)
        assert "not a valid xrayfeat dataset" in one_error_line(result), case
    assert not (tmp_path / "run").exists()


def test_a_fifo_named_like_a_dataset_is_refused_without_hanging(trained_run, tmp_path):
    fifo = tmp_path / "data.h5"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "xrayfeat", "evaluate", str(trained_run),
                           str(fifo)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not a regular file" in proc.stderr


# --------------------------------------------------------------------------- names not UTF-8

@pytest.fixture
def undecodable_folder(tmp_path) -> Path:
    """A class folder holding a radiograph whose file name is not valid UTF-8."""
    folder = tmp_path / "in"
    for cls, opacity in (("NORMAL", False), ("PNEUMONIA", True)):
        (folder / cls).mkdir(parents=True)
        for k in range(2):
            cv2.imwrite(str(folder / cls / f"ok{k}.jpeg"), make_synthetic_xray(96, seed=k,
                                                                              opacity=opacity))
    name = os.fsdecode(b"\xff\xfe.jpeg")  # lone surrogates in Python
    cv2.imwrite(str(folder / "NORMAL" / "tmp.jpeg"), make_synthetic_xray(96, seed=9))
    os.rename(folder / "NORMAL" / "tmp.jpeg", folder / "NORMAL" / name)
    return folder


def test_a_name_that_is_not_utf8_loses_no_report(trained_run, undecodable_folder, tmp_path):
    out = tmp_path / "p.csv"
    for _ in range(2):  # the second run resumes from the first's output
        result = runner.invoke(app, ["predict", str(trained_run), str(undecodable_folder),
                                     "--out", str(out), "--skip-done", "--workers", "1"])
        assert result.exit_code == 0, result.output
    assert "5 file(s) already in" in result.stderr
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        paths = [r["path"] for r in csv.DictReader(fh)]
    assert len(paths) == 5 and any(os.fsencode(p).endswith(b"\xff\xfe.jpeg") for p in paths)
    stdout = runner.invoke(app, ["predict", str(trained_run), str(undecodable_folder),
                                 "--workers", "1"])
    assert stdout.exit_code == 0, stdout.output
    evaluate_out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", str(trained_run), str(undecodable_folder),
                                 "--out", str(evaluate_out), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert (evaluate_out / "predictions.csv").is_file()
    image = next(p for p in (undecodable_folder / "NORMAL").iterdir()
                 if os.fsencode(p.name).startswith(b"\xff"))
    result = runner.invoke(app, ["visualize-layers", str(trained_run), str(image), "--out",
                                 str(tmp_path / "viz"), "--layer", "block1_conv1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "viz" / "index.html").is_file()


@pytest.mark.parametrize("shape", [(64, 64, 1), (32, 32, 3)])
def test_a_model_whose_input_differs_from_its_config_is_one_line(trained_run, examples_dir,
                                                                 tmp_path, shape):
    import keras

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    inputs = keras.Input(shape, name="image")
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(run / "model.keras")
    result = runner.invoke(app, ["predict", str(run), str(examples_dir / "val"), "--workers", "1"])
    assert result.exit_code == 2
    assert "the run is inconsistent" in one_error_line(result)


# --------------------------------------------------------------------------- memory while refusing

BUDGET = 8_000_000  # pixels: a uint8 image at the budget is 8 MB

_MEASURE = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from xrayfeat.errors import ImageReadError
from xrayfeat.imaging import read_radiograph

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))

for warm in sys.argv[3].split(","):  # codecs and pydicom's handlers loaded before measuring
    read_radiograph(warm)
out = {}
for path in sys.argv[4:]:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak (VmHWM) restarts from the current size
    before = status("VmRSS:")
    try:
        read_radiograph(path, max_pixels=int(sys.argv[1]))
        error = None
    except ImageReadError as exc:
        error = str(exc)
    out[path] = {"extra_kib": status("VmHWM:") - before, "error": error}
print(json.dumps(out))
"""


def _over_budget_files(folder: Path, example: Path) -> dict[str, Path]:
    """One file per way past the pixel budget that a header can hide."""
    pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

    from conftest import dicom_dataset

    files = {}
    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    files["png declaring 400 MP"] = folder / "bomb.png"
    files["png declaring 400 MP"].write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100_000)) + _png_chunk(b"IEND", b""))
    jpeg = bytearray(example.read_bytes())
    sof = max(jpeg.find(bytes([0xFF, m])) for m in (0xC0, 0xC2))
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 9000, 9000)
    files["jpeg declaring 81 MP"] = folder / "bomb.jpeg"
    files["jpeg declaring 81 MP"].write_bytes(bytes(jpeg))
    entries = [(256, 3, 1, 100), (257, 3, 1, 100), (256, 3, 1, 8000)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHIHH", tag, typ, count, value, 0) for tag, typ, count, value in entries)
    files["tiff declaring its width twice"] = folder / "twice.tiff"
    files["tiff declaring its width twice"].write_bytes(
        b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + b"\0" * 300_000)

    def dicom(name: str, frames: int, side: int, pixels: bytes, syntax=None) -> None:
        ds = dicom_dataset()
        ds.Modality, ds.Rows, ds.Columns = "CR", side, side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if syntax is not None:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = pixels
        if syntax == JPEGBaseline8Bit:
            ds["PixelData"].VR = "OB"
        files[name] = folder / f"{len(files)}.dcm"
        ds.save_as(files[name], enforce_file_format=True)

    # 20 uncompressed frames of 1000 x 1000: a 20 MB file declaring 20 MP (reading it whole
    # before looking at the header would already cost 2.5x the budget).
    dicom("multi-frame dicom, 20 MP", 20, 1000, np.zeros(20 * 1000 * 1000, np.uint8).tobytes())
    dicom("deflated dicom inflating to 16 MP", 1, 4000,
          np.zeros(4000 * 4000, np.uint8).tobytes(), DeflatedExplicitVRLittleEndian)
    ok, frame = cv2.imencode(".jpg", np.full((6000, 6000), 128, np.uint8))
    dicom("dicom 64 x 64 holding a 36 MP jpeg", 1, 64, encapsulate([frame.tobytes()]),
          JPEGBaseline8Bit)
    return files


def test_refusing_an_over_budget_file_peaks_under_twice_the_budget(tmp_path, example_images):
    """Every over-budget file is refused from what it declares, before it is decoded or
    inflated, and before more of it is read than its header: the extra peak memory of the
    refusal stays under twice the budget's own size (measured in a fresh process)."""
    files = _over_budget_files(tmp_path, example_images[0])
    warm = [str(example_images[0]),
            str(write_dicom_file(tmp_path / "warm.dcm", np.zeros((64, 64), np.uint16)))]
    ok, png = cv2.imencode(".png", np.zeros((64, 64), np.uint8))
    (tmp_path / "warm.png").write_bytes(png.tobytes())
    warm.append(str(tmp_path / "warm.png"))
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(BUDGET), str(Path(__file__).parent.parent),
         ",".join(warm), *map(str, files.values())],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, path in files.items():
        result = measured[str(path)]
        assert result["error"], f"{name} was not refused"
        assert result["extra_kib"] * 1024 < 2 * BUDGET, (name, result)
