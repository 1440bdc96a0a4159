"""xrayfeat.export: a trained run in SavedModel, ONNX and LiteRT, run in each format's own
runtime on real radiographs prepared by this package, against ``predict``."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import xrayfeat
from conftest import EXAMPLES_DIR
from xrayfeat.cli import app
from xrayfeat.errors import UsageError
from xrayfeat.export import export_run, resize_matrix

runner = CliRunner()
#: Largest probability difference accepted between a runtime and Keras (float32 rounding;
#: measured at 3e-7 or less on the default run).
TOLERANCE = 1e-5


def _run_saved_model(folder: Path, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(folder / "saved_model"))  # keep it: it owns the weights
    return loaded.serve(tf.constant(x)).numpy()


def _run_onnx(folder: Path, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed")
    session = ort.InferenceSession(str(folder / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _run_litert(folder: Path, x: np.ndarray) -> np.ndarray:
    litert = pytest.importorskip("ai_edge_litert.interpreter",
                                 reason="the 'export' extra is not installed")
    interpreter = litert.Interpreter(model_path=str(folder / "model.tflite"))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


RUNTIMES = {"saved_model": _run_saved_model, "onnx": _run_onnx, "litert": _run_litert}


@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
def test_an_exported_run_is_the_same_model_in_its_own_runtime(trained_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx", reason="the 'export' extra is not installed")
    if fmt == "litert":
        pytest.importorskip("ai_edge_litert", reason="the 'export' extra is not installed")
    out = tmp_path / fmt
    result = runner.invoke(app, ["export", str(trained_run), "--format", fmt, "--out", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == fmt
    images = sorted(EXAMPLES_DIR.rglob("*.jpeg"))
    xrayfeat.predict(trained_run, [str(EXAMPLES_DIR)], out=tmp_path / "p.csv", workers=1)
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    run = xrayfeat.load_run(trained_run)
    stored = run.prepare_images(images)[0][..., None].astype(np.float32)
    exported = RUNTIMES[fmt](out, stored)

    spec = json.loads((out / "preprocessing.json").read_text())
    threshold = spec["decision"]["threshold"]
    classes = spec["output"]["classes"]
    keras_probs = run.predict(images).probabilities
    assert np.abs(exported - keras_probs).max() < TOLERANCE
    # Youden's threshold is one validation image's own score: that image (and any other
    # within float32 rounding of it) may fall either side in another runtime.
    ties = np.abs(keras_probs[:, 1] - threshold) < TOLERANCE
    assert ties.sum() <= 1
    for path, probs, tie in zip(images, exported, ties):
        row = rows[str(path.resolve())]
        label = classes[1] if probs[1] >= threshold else classes[0]
        assert tie or label == row["label"], path
        # The CSV holds Keras' probability to 6 decimals; the runtime may differ from Keras
        # by up to TOLERANCE (above), on another CPU's kernels.
        assert probs[1] == pytest.approx(float(row["probability"]), abs=TOLERANCE + 5e-7)


def test_preprocessing_json_says_what_the_model_expects(trained_run, tmp_path):
    export_run(trained_run, tmp_path / "x", "saved_model")
    spec = json.loads((tmp_path / "x" / "preprocessing.json").read_text())
    run = xrayfeat.load_run(trained_run)
    assert spec["input"]["shape"] == [None, 224, 224, 1] and spec["input"]["range"] == [0, 255]
    assert spec["output"]["classes"] == run.classes
    assert spec["decision"]["threshold"] == run.threshold
    assert spec["preprocessing"]["resize"] == "stretch" and spec["preprocessing"]["roi"]
    assert spec["preprocessing"]["roi_algorithm_version"] >= 1
    digest = hashlib.sha256((trained_run / "model.keras").read_bytes()).hexdigest()
    assert spec["model_sha256"] == digest


def test_the_matrix_resize_is_kerass_antialiased_resize():
    import tensorflow as tf

    images = np.random.default_rng(0).uniform(0, 255, (3, 224, 224)).astype(np.float32)
    for target in (32, 64, 96):
        matrix = resize_matrix(224, target)
        ours = np.einsum("oh,bhw,pw->bop", matrix, images, matrix)
        theirs = tf.image.resize(images[..., None], (target, target), method="bilinear",
                                 antialias=True).numpy()[..., 0]
        assert np.abs(ours - theirs).max() < 1e-2  # in 0-255 grey levels


def test_export_refuses_to_replace_an_output_and_unknown_formats(trained_run, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="--overwrite"):
        export_run(trained_run, out, "saved_model")
    assert (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["export", str(trained_run), "--format", "pickle", "--out",
                                 str(tmp_path / "y")])
    assert result.exit_code == 2 and "'pickle' is not one of" in result.stderr
    assert not (tmp_path / "y").exists()
