"""Test-time augmentation: deterministic views, averaged, through predict and evaluate."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_error_line
from xrayfeat.cli import app
from xrayfeat.tta import MAX_VIEWS, VIEWS, predict_batch, warp


def test_views_are_small_and_the_first_is_the_image_itself():
    images = np.random.default_rng(0).uniform(0, 255, (3, 40, 40, 1)).astype(np.float32)
    np.testing.assert_allclose(warp(images, VIEWS[0]), images, atol=1e-4)
    for view in VIEWS:
        shift_x, shift_y, zoom, degrees = view
        assert abs(shift_x) <= 0.06 and abs(shift_y) <= 0.06  # inside training's range
        assert 0.9 <= zoom <= 1.1 and abs(degrees) <= 7
    shifted = warp(images, (0.25, 0.0, 1.0, 0.0))
    np.testing.assert_allclose(shifted[:, :, 10:], images[:, :, :30], atol=1e-3)
    assert (shifted[:, :, :10] == 0).all()  # black fill, as in training


def test_tta_is_the_mean_over_views_and_deterministic(trained_run, examples_h5):
    from xrayfeat.dataset import load_split
    from xrayfeat.runs import load_run

    model = load_run(trained_run).load_model()
    x = load_split(examples_h5, "val").images[:6, ..., None].astype(np.float32)
    plain = predict_batch(model, x, 1)
    np.testing.assert_allclose(plain, model.predict_on_batch(x), rtol=1e-6)
    five = predict_batch(model, x, 5)
    by_hand = np.mean([model.predict_on_batch(warp(x, v)) for v in VIEWS[:5]], axis=0)
    np.testing.assert_allclose(five, by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(five, predict_batch(model, x, 5))
    np.testing.assert_allclose(five.sum(axis=1), 1.0, rtol=1e-5)


def test_predict_and_evaluate_take_tta(trained_run, examples_h5, examples_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "preds.csv"
    result = runner.invoke(app, ["predict", str(trained_run), str(examples_dir / "test"),
                                 "--out", str(out), "--tta", "3", "--workers", "1"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(not r["error"] for r in rows)
    plain = tmp_path / "plain.csv"
    runner.invoke(app, ["predict", str(trained_run), str(examples_dir / "test"), "--out",
                        str(plain), "--workers", "1"])
    with open(plain, newline="") as fh:
        base = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [r["path"] for r in base]
    assert any(r["probability"] != b["probability"] for r, b in zip(rows, base))
    result = runner.invoke(app, ["evaluate", str(trained_run), str(examples_h5), "--split",
                                 "test", "--tta", "3", "--json", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["accuracy"] <= 1.0


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("value", ["0", str(MAX_VIEWS + 1)])
def test_tta_out_of_range_is_a_one_line_error(trained_run, examples_dir, command, value):
    result = CliRunner().invoke(app, [command, str(trained_run), str(examples_dir / "test"),
                                      "--tta", value])
    assert result.exit_code == 2
    assert "--tta must be between 1" in one_error_line(result)
