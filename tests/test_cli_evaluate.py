"""evaluate: report keys, figures, several runs, fallbacks and one-line errors."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
from typer.testing import CliRunner

from conftest import EXAMPLES_DIR, copy_moving_split, one_error_line
from xrayfeat.cli import app

runner = CliRunner()
KEYS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "balanced_accuracy",
        "roc_auc", "pr_auc", "brier", "ece", "threshold", "n", "confusion_matrix", "ci")


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_report_on_the_test_split(trained_run, examples_h5, tmp_path):
    result = runner.invoke(app, ["evaluate", str(trained_run), str(examples_h5), "--json",
                                 "--bootstrap", "200", "--out", str(tmp_path / "rep")])
    report = _json(result)
    for key in KEYS:
        assert key in report, key
    cm = report["confusion_matrix"]
    assert cm["tp"] + cm["fp"] + cm["tn"] + cm["fn"] == report["n"] == 12
    assert report["threshold"] == json.loads((trained_run / "validation.json").read_text())[
        "threshold"]
    for metric, ci in report["ci"].items():
        assert ci["lower"] <= ci["upper"], metric
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"metrics.json", "predictions.csv", "roc.png", "pr.png", "confusion.png",
            "reliability.png", "scores.png"} <= files
    for png in (tmp_path / "rep").glob("*.png"):
        assert mpimg.imread(png).std() > 0.01, png


def test_threshold_override_changes_the_decisions(trained_run, examples_h5):
    low = _json(runner.invoke(app, ["evaluate", str(trained_run), str(examples_h5), "--json",
                                    "--bootstrap", "0", "--threshold", "0"]))
    assert low["threshold"] == 0.0
    assert low["sensitivity"] == 1.0 and low["specificity"] == 0.0


def test_two_runs_side_by_side(trained_run, examples_h5, tmp_path):
    result = runner.invoke(app, ["evaluate", str(trained_run), str(trained_run),
                                 str(examples_h5), "--json", "--bootstrap", "0",
                                 "--out", str(tmp_path)])
    reports = _json(result)["runs"]
    assert len(reports) == 2
    a, b = reports.values()
    assert a["roc_auc"] == b["roc_auc"]


def test_test_split_falls_back_to_val_with_a_notice(trained_run, examples_h5, tmp_path):
    copy = copy_moving_split(examples_h5, tmp_path / "notest.h5", "test")
    result = runner.invoke(app, ["evaluate", str(trained_run), str(copy), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert "evaluating on 'val'" in result.output


def test_unreadable_files_are_listed_and_counted(trained_run, tmp_path):
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(EXAMPLES_DIR / "test", folder)
    (folder / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    result = runner.invoke(app, ["evaluate", str(trained_run), str(folder), "--json",
                                 "--bootstrap", "0"])
    report = _json(result)
    assert report["n"] == 12 and report["left_out"] == 1
    assert "broken.jpeg" in result.stderr


def test_bad_input_is_one_line_exit_2(trained_run, examples_h5, tmp_path):
    cases = [
        [str(tmp_path), str(examples_h5)],  # not a run directory
        [str(trained_run), str(examples_h5), "--split", "holdout"],  # no such split
        [str(trained_run), str(tmp_path / "missing.h5")],
    ]
    other = tmp_path / "three"
    for name in ("COVID", "NORMAL", "Viral Pneumonia"):
        (other / name).mkdir(parents=True)
        src = next((EXAMPLES_DIR / "test" / "NORMAL").glob("*.jpeg"))
        (other / name / src.name).write_bytes(src.read_bytes())
    cases.append([str(trained_run), str(other)])  # classes differ
    for args in cases:
        one_error_line(runner.invoke(app, ["evaluate", *args]))
