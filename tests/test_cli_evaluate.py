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


def test_choose_threshold_applies_train_s_rule_to_these_images(trained_run, examples_h5):
    """--choose-threshold: the rule train applies to validation, applied to DATA's labelled
    images grouped by patient, with the figures at the threshold it picks."""
    import numpy as np
    import pytest

    from xrayfeat.dataset import load_split
    from xrayfeat.runs import load_run
    from xrayfeat.thresholds import choose_threshold
    from xrayfeat.tta import predict_batch

    args = ["evaluate", str(trained_run), str(examples_h5), "--bootstrap", "200",
            "--choose-threshold", "sensitivity", "--threshold-sensitivity", "0.8"]
    chosen = _json(runner.invoke(app, [*args, "--json"]))["threshold_for_these_images"]

    test = load_split(examples_h5, "test")
    prob = predict_batch(load_run(trained_run).load_model(),
                         test.images[..., None].astype(np.float32), 1)[:, 1]
    want = choose_threshold(test.labels, prob, "sensitivity", groups=test.patients,
                            min_sensitivity=0.8, n_boot=200, seed=0)
    assert chosen["threshold"] == pytest.approx(want.threshold, abs=1e-6)
    assert chosen["threshold_method"] == "sensitivity"
    assert chosen["threshold_min_sensitivity"] == 0.8
    ci = chosen["threshold_ci"]
    assert (ci["lower"], ci["upper"]) == pytest.approx(want.ci, abs=1e-6)
    called = prob >= chosen["threshold"]
    positive = test.labels == 1
    assert chosen["sensitivity"] == pytest.approx(called[positive].mean())
    assert chosen["sensitivity"] >= 0.8
    assert chosen["specificity"] == pytest.approx(1 - called[~positive].mean())
    assert chosen["n"] == len(test.labels) == 12

    text = runner.invoke(app, args)  # the terminal says what to do with it, in one line
    assert text.exit_code == 0, text.output
    assert f"predict --threshold {chosen['threshold']:.4f}" in " ".join(text.stdout.split())


def test_choose_threshold_refuses_unknown_rules_and_targets(trained_run, examples_h5):
    base = ["evaluate", str(trained_run), str(examples_h5)]
    unknown = runner.invoke(app, [*base, "--choose-threshold", "median"])
    assert unknown.exit_code == 2 and "'median' is not one of" in unknown.output
    target = runner.invoke(app, [*base, "--choose-threshold", "sensitivity",
                                 "--threshold-sensitivity", "0"])
    assert "--threshold-sensitivity must be in (0, 1]" in one_error_line(target)
