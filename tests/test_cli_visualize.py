"""`xrayfeat visualize-layers` through Typer's CliRunner: figures and summary for images,
class contrast over a split, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xrayfeat.cli import app

runner = CliRunner()


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:"), lines
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def image(examples_dir) -> Path:
    return examples_dir / "val" / "NORMAL" / "IM-0711-0001.jpeg"


def test_visualize_images_writes_figures_and_summary(trained_run, image, tmp_path,
                                                     monkeypatch):
    # Short relative paths: the table folds a cell longer than its share of the line, and
    # a long temporary folder must not cut the names asserted on below.
    monkeypatch.chdir(tmp_path)
    shutil.copy(image, image.name)
    out = Path("grids")
    Path("bad.jpeg").write_text("not an image")
    result = runner.invoke(app, ["visualize-layers", str(trained_run), image.name, "bad.jpeg",
                                 "--out", str(out), "--layer", "block1_conv1",
                                 "--layer", "block2_conv2", "--max-channels", "4",
                                 "--cam", "scorecam", "--filters"])
    assert result.exit_code == 0, result.output
    folder = out / image.stem
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        f"{image.stem}_d1_block1_conv1.png", f"{image.stem}_d4_block2_conv2.png",
        f"{image.stem}_gradcam.png", f"{image.stem}_scorecam.png", f"{image.stem}_overview.png"])
    assert (out / "index.html").is_file() and (out / "filters_block1_conv1.png").is_file()
    assert "IM-0711-0001" in result.stdout and "skipped" in result.stdout
    assert "bad.jpeg" in result.stdout and "index.html" in result.stdout


def test_unknown_layer_is_one_line_listing_valid_names(trained_run, image, tmp_path):
    result = runner.invoke(app, ["visualize-layers", str(trained_run), str(image),
                                 "--out", str(tmp_path / "o"), "--layer", "conv9"])
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert "conv9" in line
    for name in ("block1_conv1", "block1_relu1", "block1_bn1", "block2_pool", "block2_conv2"):
        assert name in line
    assert not (tmp_path / "o").exists()


def test_run_without_model(trained_run, image, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "config.json", run / "config.json")
    result = runner.invoke(app, ["visualize-layers", str(run), str(image),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "model.keras" in one_line_error(result)


def test_empty_image_list(trained_run, tmp_path):
    result = runner.invoke(app, ["visualize-layers", str(trained_run), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "no images" in one_line_error(result)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["visualize-layers", str(trained_run), str(empty), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "no images" in one_line_error(result)


def test_non_empty_out_needs_overwrite(trained_run, image, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.png").write_bytes(b"x")
    args = ["visualize-layers", str(trained_run), str(image), "--out", str(out),
            "--layer", "block1_conv1", "--max-channels", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--overwrite" in one_line_error(result)
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / image.stem / f"{image.stem}_gradcam.png").is_file()


@pytest.mark.parametrize("args, words", [
    (["--layers", "some"], "--layers"),
    (["--cam", "lime"], "--cam"),
    (["--class", "COVID"], "COVID"),
    (["--max-channels", "0"], "--max-channels"),
    (["--contrast"], "--data"),
    (["--data", "x.h5"], "--contrast"),
])
def test_bad_options(trained_run, image, tmp_path, args, words):
    result = runner.invoke(app, ["visualize-layers", str(trained_run), str(image),
                                 "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert words in one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_contrast(trained_run, examples_h5, tmp_path):
    out = tmp_path / "contrast"
    result = runner.invoke(app, ["visualize-layers", str(trained_run), "--data",
                                 str(examples_h5), "--split", "val", "--contrast", "--out",
                                 str(out), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "contrast_channels.csv").is_file() and (out / "contrast.json").is_file()
    assert len(list(out.glob("contrast_d*_top_PNEUMONIA_vs_NORMAL.png"))) == 4
    assert len(list(out.glob("contrast_d*_class_means.png"))) == 4
    assert "PNEUMONIA vs NORMAL" in result.stdout and "block2_conv2" in result.stdout


def test_contrast_unknown_split(trained_run, examples_h5, tmp_path):
    result = runner.invoke(app, ["visualize-layers", str(trained_run), "--data",
                                 str(examples_h5), "--split", "holdout", "--contrast",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "holdout" in one_line_error(result)
