"""xrayfeat.api: the Python API a notebook uses, on a real trained run and real radiographs.

Its answers must be the commands' answers: the same probabilities as ``predict``, the same
decision as every command for a probability exactly at the threshold, arrays of the shapes
documented.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import xrayfeat
from conftest import EXAMPLES_DIR
from xrayfeat.cli import app
from xrayfeat.errors import ImageReadError, UsageError
from xrayfeat.imaging import read_radiograph

README = Path(__file__).resolve().parent.parent / "README.md"
runner = CliRunner()


@pytest.fixture(scope="module")
def images() -> list[Path]:
    return sorted((EXAMPLES_DIR / "test").rglob("*.jpeg"))[:4]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_the_package_exports_the_api_lazily():
    assert set(xrayfeat.__all__) >= {"load_run", "prepare", "train", "evaluate", "predict", "Run"}
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", xrayfeat.__version__)
    with pytest.raises(AttributeError):
        xrayfeat.no_such_thing  # noqa: B018


def test_predict_on_paths_equals_the_predict_command(trained_run, images, tmp_path):
    run = xrayfeat.load_run(trained_run)
    result = run.predict(images)
    assert result.probabilities.shape == (len(images), 2)
    assert result.images.shape == (len(images), 224, 224) and result.images.dtype == np.uint8
    assert len(result.rois) == len(images) and result.threshold == run.threshold
    xrayfeat.predict(trained_run, [str(p) for p in images], out=tmp_path / "p.csv", workers=1)
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "p.csv")}
    for i, path in enumerate(images):
        row = rows[path.name]
        assert result.labels[i] == row["label"]
        assert result.probability[i] == pytest.approx(float(row["probability"]), abs=1e-6)
        assert (result.rois[i].x0, result.rois[i].y1) == (int(row["roi_x0"]), int(row["roi_y1"]))


def test_predict_on_arrays_equals_predict_on_files(trained_run, images):
    run = xrayfeat.load_run(trained_run)
    arrays = [read_radiograph(p)[0] for p in images]
    from_files, from_arrays = run.predict(images), run.predict(arrays)
    np.testing.assert_allclose(from_arrays.probabilities, from_files.probabilities, atol=1e-6)
    # A colour array, and a 16-bit one (scaled by its range: the same picture when the
    # 8-bit one spans 0-255), are read as the grayscale picture.
    full = arrays[0].copy()
    full[0, :2] = (0, 255)
    colour = np.repeat(full[..., None], 3, axis=2)
    deep = full.astype(np.uint16) * 257
    np.testing.assert_allclose(run.predict([colour, deep]).probabilities,
                               run.predict([full, full]).probabilities, atol=1e-6)


def test_gradcam_and_activations_return_arrays(trained_run, images):
    run = xrayfeat.load_run(trained_run)
    maps = run.gradcam(images[:2])
    assert maps.shape == (2, 224, 224) and maps.dtype == np.float32
    assert 0 <= maps.min() and maps.max() <= 1
    normal = run.gradcam(images[:2], class_="normal")  # a name, any case
    assert normal.shape == maps.shape
    acts = run.activations(images[:2])
    convs = [n for n in acts]
    assert convs == ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2"]
    assert all(a.shape[0] == 2 and a.ndim == 4 for a in acts.values())
    one = run.activations(images[:1], ["block2_conv2"])
    np.testing.assert_allclose(one["block2_conv2"][0], acts["block2_conv2"][0], atol=1e-5)


def test_api_errors_are_the_commands_errors(trained_run, tmp_path):
    run = xrayfeat.load_run(trained_run)
    with pytest.raises(UsageError, match="no layer named nope"):
        run.activations([EXAMPLES_DIR / "test" / "NORMAL" / "x.jpeg"], ["nope"])
    with pytest.raises(UsageError, match="unknown class"):
        run.gradcam([np.zeros((64, 64), np.uint8)], class_="CAT")
    with pytest.raises(UsageError, match="2-D"):
        run.predict([np.zeros(5)])
    with pytest.raises(ImageReadError, match="missing.jpeg"):
        run.predict([tmp_path / "missing.jpeg"])


def test_prepare_train_and_evaluate_take_the_commands_options(tmp_path):
    data = tmp_path / "d.h5"
    prepared = xrayfeat.prepare(EXAMPLES_DIR, data, size=64, resize="pad", val_fraction=0.25,
                                seed=1, workers=1)
    assert prepared.out == data and set(prepared.counts) == {"train", "val", "test"}
    result = xrayfeat.train(data, tmp_path / "run", epochs=1, input_size=32, width=0.25,
                            batch_size=16)
    assert result.epochs_run == 1
    with pytest.raises(UsageError, match="epochs"):
        xrayfeat.train(data, tmp_path / "bad", epochs=0)
    report = xrayfeat.load_run(tmp_path / "run").evaluate(data, split="test", n_boot=0)
    assert 0 <= next(iter(report.reports.values()))["accuracy"] <= 1


# --------------------------------------------------------------------------- one decision rule

@pytest.fixture(scope="module")
def constant_run(tmp_path_factory, trained_run) -> tuple[Path, float]:
    """The trained run with a zero last-layer kernel: every image gets the same
    probability, whatever the batch, so a threshold can sit exactly on it."""
    from xrayfeat.runs import load_run

    run = tmp_path_factory.mktemp("constant") / "run"
    shutil.copytree(trained_run, run)
    model = load_run(run).load_model()
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([np.zeros_like(kernel),
                                                np.array([0.0, 0.3], bias.dtype)])
    model.save(run / "model.keras")
    probability = float(xrayfeat.load_run(run).predict(
        [next((EXAMPLES_DIR / "test").rglob("*.jpeg"))]).probabilities[0, 1])
    return run, probability


@pytest.mark.parametrize("offset, expected", [(0, "PNEUMONIA"), (1, "NORMAL")],
                         ids=["at the threshold", "one step above"])
def test_every_path_decides_a_probability_at_the_threshold_alike(constant_run, tmp_path,
                                                                   offset, expected):
    """``prob >= threshold``, the same in predict, evaluate, visualize-layers and the API."""
    run, probability = constant_run
    threshold = float(np.nextafter(probability, 2)) if offset else probability
    validation = json.loads((run / "validation.json").read_text())
    validation["threshold"] = threshold
    (run / "validation.json").write_text(json.dumps(validation))
    folder = EXAMPLES_DIR / "test"

    api = xrayfeat.load_run(run).predict(sorted(folder.rglob("*.jpeg")))
    assert set(api.labels) == {expected}
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(run), str(folder), "--out", str(out),
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert {r["label"] for r in _rows(out)} == {expected}
    result = runner.invoke(app, ["evaluate", str(run), str(folder), "--out",
                                 str(tmp_path / "ev"), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert {r["predicted_label"] for r in _rows(tmp_path / "ev" / "predictions.csv")} == {expected}
    image = next(folder.rglob("*.jpeg"))
    result = runner.invoke(app, ["visualize-layers", str(run), str(image), "--out",
                                 str(tmp_path / "v"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"][0]["predicted"] == expected


# --------------------------------------------------------------------------- README example

def test_the_readme_notebook_example_runs(trained_run, monkeypatch):
    """The README's Python example, run as written, on a real run."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- notebook example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README has no notebook example"
    code = block.group(1).replace('"runs/mvgg"', repr(str(trained_run)))
    monkeypatch.chdir(README.parent)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["prediction"].labels
