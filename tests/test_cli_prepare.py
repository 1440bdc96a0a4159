"""The command line: `xrayfeat prepare` through Typer's CliRunner, help without TensorFlow,
--version."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import pytest
import typer.main
from typer.testing import CliRunner

from xrayfeat.version import __version__
from xrayfeat.cli import app

runner = CliRunner()


def command_names() -> list[str]:
    return list(typer.main.get_command(app).commands)


def one_line_error(result) -> str:
    """The CLI's error: one line on stderr starting with 'error:' (a progress bar may precede
    it), no traceback."""
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines
    assert "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------- prepare

def test_prepare_writes_dataset_and_summary(tmp_path, class_folder):
    out = tmp_path / "data.h5"
    result = runner.invoke(app, ["prepare", str(class_folder), "--out", str(out),
                                 "--workers", "1", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    with h5py.File(out, "r") as h5:
        assert h5["images"].shape == (24, 64, 64)
        assert json.loads(h5.attrs["classes"]) == ["NORMAL", "PNEUMONIA"]
    # Results on stdout: the per-split table names both classes and the val cut.
    assert "NORMAL" in result.stdout and "PNEUMONIA" in result.stdout
    assert "train" in result.stdout and "val" in result.stdout
    assert "error" not in result.stderr


def test_prepare_examples_no_roi(tmp_path, examples_dir):
    out = tmp_path / "ex.h5"
    result = runner.invoke(app, ["prepare", str(examples_dir), "-o", str(out), "--no-roi",
                                 "--workers", "1", "--seed", "7", "--val-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as h5:
        assert h5["images"].shape == (60, 224, 224)
        assert not h5.attrs["roi"]
        assert (h5["roi"][()] == [0, 0, 224, 224]).all()


def test_prepare_skips_bad_file_and_lists_it(tmp_path, class_folder):
    bad = class_folder / "NORMAL" / "IM-8000-0001.jpeg"
    bad.write_text("not an image")
    out = tmp_path / "data.h5"
    result = runner.invoke(app, ["prepare", str(class_folder), "--out", str(out),
                                 "--workers", "1", "--size", "48"])
    assert result.exit_code == 0, result.output
    assert "1 skipped" in result.stdout
    assert "IM-8000-0001" in result.stdout and "not an image" in result.stdout
    with h5py.File(out, "r") as h5:
        assert h5["images"].shape[0] == 24


def test_prepare_strict_stops_with_exit_1(tmp_path, class_folder):
    (class_folder / "PNEUMONIA" / "person8001_virus_1.jpeg").write_bytes(b"")
    out = tmp_path / "data.h5"
    result = runner.invoke(app, ["prepare", str(class_folder), "--out", str(out),
                                 "--workers", "1", "--strict"])
    assert result.exit_code == 1, result.output
    line = one_line_error(result)
    assert "person8001_virus_1.jpeg" in line and "empty" in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_prepare_missing_src(tmp_path):
    out = tmp_path / "data.h5"
    result = runner.invoke(app, ["prepare", str(tmp_path / "nope"), "--out", str(out)])
    assert result.exit_code == 2
    assert "does not exist" in one_line_error(result)
    assert not out.exists()


def test_prepare_empty_src(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["prepare", str(tmp_path / "empty"), "--out",
                                 str(tmp_path / "data.h5")])
    assert result.exit_code == 2
    assert "no images" in one_line_error(result)


def test_prepare_single_class(make_class_folder, tmp_path):
    src = make_class_folder("one", n_per_class=2, size=64, classes=("NORMAL",))
    result = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "data.h5")])
    assert result.exit_code == 2
    assert "one class" in one_line_error(result)


def test_prepare_one_image_per_class_says_what_validation_needs(make_class_folder, tmp_path):
    src = make_class_folder("tiny", n_per_class=1, size=64)
    result = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "data.h5"),
                                 "--workers", "1"])
    assert result.exit_code == 2
    message = one_line_error(result)
    assert "at least 2 patients of every class" in message and "NORMAL" in message
    assert not (tmp_path / "data.h5").exists()


@pytest.mark.parametrize("n", [2, 6])
def test_small_folders_prepare_with_every_class_on_both_sides(make_class_folder, tmp_path, n):
    import h5py

    src = make_class_folder(f"small{n}", n_per_class=n, size=64)
    out = tmp_path / "data.h5"
    result = runner.invoke(app, ["prepare", str(src), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as h5:
        split, labels = h5["split"].asstr()[:], h5["labels"][:]
        patients = h5["patient"].asstr()[:]
    for name in ("train", "val"):
        assert set(labels[split == name]) == {0, 1}, name
    assert not set(patients[split == "train"]) & set(patients[split == "val"])


def test_the_kaggle_zips_nested_folder_gets_a_hint(make_class_folder, tmp_path):
    outer = tmp_path / "chest_xray"
    make_class_folder(str(outer / "chest_xray"), splits={"train": 2, "test": 1}, size=64)
    (outer / "__MACOSX" / "chest_xray").mkdir(parents=True)
    (outer / "__MACOSX" / "chest_xray" / "._IM-0001.jpeg").write_bytes(b"\x00\x05")
    result = runner.invoke(app, ["prepare", str(outer), "--out", str(tmp_path / "data.h5")])
    assert result.exit_code == 2
    assert f"point at {outer / 'chest_xray'}" in one_line_error(result)


def test_prepare_refuses_existing_output_unless_overwrite(tmp_path, class_folder):
    out = tmp_path / "data.h5"
    out.write_bytes(b"keep me")
    args = ["prepare", str(class_folder), "--out", str(out), "--workers", "1", "--size", "40"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--overwrite" in one_line_error(result)
    assert out.read_bytes() == b"keep me"
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as h5:
        assert h5["images"].shape == (24, 40, 40)


def test_prepare_bad_option_values(tmp_path, class_folder):
    out = str(tmp_path / "data.h5")
    result = runner.invoke(app, ["prepare", str(class_folder), "--out", out, "--labels", "x"])
    assert result.exit_code == 2 and "--labels" in one_line_error(result)
    result = runner.invoke(app, ["prepare", str(class_folder), "--out", out, "--size", "8"])
    assert result.exit_code == 2 and "--size" in one_line_error(result)
    result = runner.invoke(app, ["prepare", str(class_folder)])  # --out is required
    assert result.exit_code == 2


def test_debug_shows_the_exception(tmp_path):
    result = runner.invoke(app, ["--debug", "prepare", str(tmp_path / "nope"),
                                 "--out", str(tmp_path / "x.h5")])
    assert result.exit_code != 0
    assert result.exception is not None and "does not exist" in str(result.exception)


# --------------------------------------------------------------------------- help, version

def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"xrayfeat {__version__}"


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ["prepare", "train", "evaluate", "predict", "visualize-layers"]:
        assert name in command_names()
        assert name in result.stdout


@pytest.mark.parametrize("name", ["prepare", "train", "evaluate", "predict",
                                  "visualize-layers"])
def test_command_help(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout


def test_train_help_shows_the_defaults_the_code_uses():
    from xrayfeat.config import TrainConfig

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    defaults = TrainConfig()
    for option, value in (("--input-size", defaults.input_size), ("--epochs", defaults.epochs),
                          ("--precision", defaults.precision)):
        line = next(line for line in result.stdout.splitlines() if option in line)
        assert f"[default: {value}]" in line, line


def test_train_refuses_an_unknown_precision_in_one_line(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "run"),
                                 "--precision", "float16"])
    assert result.exit_code == 2
    assert "--precision" in one_line_error(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_an_error_off_a_terminal_is_exactly_one_line(tmp_path, command):
    # Piped or logged stderr (not a terminal) must not get a blank progress frame first.
    missing = tmp_path / "missing"
    proc = subprocess.run([sys.executable, "-m", "xrayfeat", command, str(missing), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {missing} does not exist"], proc.stderr


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "xrayfeat", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "prepare" in proc.stdout and "visualize-layers" in proc.stdout


HELP_WITHOUT_TENSORFLOW = r"""
import json, sys
from typer.testing import CliRunner
import typer.main
import xrayfeat.cli
after_import = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
app = xrayfeat.cli.app
runner = CliRunner()
names = list(typer.main.get_command(app).commands)
codes = {"--help": runner.invoke(app, ["--help"]).exit_code,
         "--version": runner.invoke(app, ["--version"]).exit_code}
for name in names:
    codes[name] = runner.invoke(app, [name, "--help"]).exit_code
after_help = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
runner.invoke(app, ["prepare", sys.argv[1], "--out", sys.argv[2], "--workers", "1",
                    "--size", "40"])
after_prepare = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
print(json.dumps({"names": names, "codes": codes, "after_import": after_import,
                  "after_help": after_help, "after_prepare": after_prepare}))
"""


def test_help_and_prepare_do_not_import_tensorflow(tmp_path, class_folder):
    out = tmp_path / "data.h5"
    proc = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TENSORFLOW, str(class_folder), str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "prepare" in report["names"] and len(report["names"]) >= 5
    assert set(report["codes"].values()) == {0}, report["codes"]
    assert report["after_import"] == []
    assert report["after_help"] == [], "xrayfeat --help / CMD --help imported TensorFlow"
    assert report["after_prepare"] == [], "xrayfeat prepare imported TensorFlow"
    assert out.is_file()
