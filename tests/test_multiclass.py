"""N classes from the data: a synthetic three-class folder through every command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_synthetic_xray, one_error_line, write_image
from xrayfeat.cli import app
from xrayfeat.dataset import find_labelled_files, open_dataset, prepare_dataset

runner = CliRunner()
CLASSES = ("COVID", "NORMAL", "Viral Pneumonia")  # NORMAL is not first alphabetically


def _image(class_name: str, seed: int) -> np.ndarray:
    """NORMAL plain; COVID a bright patch low in the left lung; Viral Pneumonia high right."""
    image = make_synthetic_xray(96, seed=seed)
    if class_name == "COVID":
        cv2.circle(image, (30, 60), 9, 235, -1)
    elif class_name == "Viral Pneumonia":
        cv2.circle(image, (66, 34), 9, 235, -1)
    return image


@pytest.fixture(scope="module")
def three_class(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(folder, prepared dataset, trained run) for three classes, one folder name with a space."""
    root = tmp_path_factory.mktemp("three")
    folder = root / "src"
    pid = 0
    for split, count in (("train", 24), ("test", 5)):
        for name in CLASSES:
            for _ in range(count):
                pid += 1
                write_image(folder / split / name / f"patient{pid}.png", _image(name, pid))
    data = root / "three.h5"
    prepare_dataset(folder, data, workers=1, val_fraction=0.25, seed=0)
    from xrayfeat.config import TrainConfig
    from xrayfeat.training import train

    run = root / "run"
    train(data, run, TrainConfig(input_size=32, epochs=3, batch_size=16, width=0.5))
    return folder, data, run


def test_classes_come_from_the_folders_normal_first(three_class):
    _, data, run = three_class
    info = open_dataset(data)
    assert info.classes == ["NORMAL", "COVID", "Viral Pneumonia"]
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == info.classes
    assert len(config["class_weights"]) == 3
    validation = json.loads((run / "validation.json").read_text())
    assert validation["threshold"] is None  # argmax decides for N > 2
    assert "macro" in validation["metrics"]  # checkpointed on macro one-vs-rest AUC


def test_evaluate_reports_per_class_and_averages(three_class, tmp_path):
    _, data, run = three_class
    result = runner.invoke(app, ["evaluate", str(run), str(data), "--json", "--out",
                                 str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["per_class"]) == set(CLASSES)
    for name in CLASSES:
        for key in ("sensitivity", "specificity", "roc_auc", "pr_auc"):
            assert key in report["per_class"][name]
    assert "roc_auc" in report["macro"] and "roc_auc" in report["weighted"]
    assert np.array(report["confusion_matrix"]).shape == (3, 3)
    assert np.array(report["confusion_matrix"]).sum() == report["n"] == 15
    assert (tmp_path / "roc_per_class.png").is_file() and (tmp_path / "confusion.png").is_file()


def test_choose_threshold_is_refused_for_more_than_two_classes(three_class):
    _, data, run = three_class
    result = runner.invoke(app, ["evaluate", str(run), str(data), "--choose-threshold",
                                 "youden"])
    assert "--choose-threshold needs binary runs" in one_error_line(result)


def test_predict_has_a_probability_column_per_class(three_class, tmp_path):
    folder, _, run = three_class
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(run), str(folder / "test"), "--out", str(out),
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 15
    for row in rows:
        probs = {c: float(row[f"prob_{c}"]) for c in ("NORMAL", "COVID", "Viral Pneumonia")}
        assert sum(probs.values()) == pytest.approx(1, abs=1e-4)
        assert row["label"] == max(probs, key=probs.get)  # argmax
        assert float(row["probability"]) == pytest.approx(probs[row["label"]], abs=1e-6)


def test_gradcam_for_any_class_by_name(three_class, tmp_path):
    folder, _, run = three_class
    image = next((folder / "test" / "COVID").iterdir())
    result = runner.invoke(app, ["visualize-layers", str(run), str(image), "--out",
                                 str(tmp_path / "viz"), "--class", "Viral Pneumonia"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "viz").rglob("*gradcam*.png"))
    bad = runner.invoke(app, ["visualize-layers", str(run), str(image), "--out",
                              str(tmp_path / "viz2"), "--class", "BACTERIA"])
    assert bad.exit_code == 2


def test_kermany_subtype_labels_from_file_names(tmp_path):
    folder = tmp_path / "kermany"
    names = {"NORMAL": ["IM-0001-0001.jpeg", "NORMAL2-IM-0002-0001.jpeg"],
             "PNEUMONIA": ["person1_bacteria_1.jpeg", "person2_virus_7.jpeg",
                           "person3_bacteria_9.jpeg"]}
    for class_name, files in names.items():
        for k, name in enumerate(files):
            write_image(folder / class_name / name, make_synthetic_xray(64, seed=k))
    files, classes, _ = find_labelled_files(folder, "kermany-subtype")
    assert classes == ["NORMAL", "BACTERIA", "VIRUS"]
    by_name = {f.path.name: f.class_name for f in files}
    assert by_name["person2_virus_7.jpeg"] == "VIRUS"
    assert by_name["person3_bacteria_9.jpeg"] == "BACTERIA"
    assert by_name["NORMAL2-IM-0002-0001.jpeg"] == "NORMAL"
