"""audit: nuisance transforms, and finding a shortcut in a model built to use one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from xrayfeat.audit import TRANSFORMS, audit_run
from xrayfeat.cli import app


def test_transforms_keep_shape_and_type_and_are_deterministic():
    image = np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)
    for name, (description, transform) in TRANSFORMS.items():
        out = transform(image)
        assert out.shape == image.shape and out.dtype == np.uint8, name
        np.testing.assert_array_equal(out, transform(image), err_msg=name)
        assert description
    assert TRANSFORMS["brighter"][1](image).mean() > image.mean()
    assert (TRANSFORMS["black_frame"][1](image)[0] == 0).all()
    assert TRANSFORMS["blur"][1](image).std() < image.std()


def _brightness_run(tmp_path: Path, size: int) -> Path:
    """A run whose model reads nothing but mean brightness: P(PNEUMONIA) rises with it."""
    import keras

    from xrayfeat.runs import RUN_FORMAT

    inputs = keras.Input((size, size, 1), name="image")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="mean")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("predictions").set_weights([np.array([[-15.0, 15.0]]),
                                                np.array([7.5, -7.5])])
    run = tmp_path / "shortcut_run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({
        "format": RUN_FORMAT, "classes": ["NORMAL", "PNEUMONIA"],
        "preprocess": {"size": size, "roi": True}, "train": {}}))
    (run / "validation.json").write_text(json.dumps({"threshold": 0.5}))
    return run


def test_audit_finds_the_brightness_shortcut_of_a_model_built_to_use_it(examples_h5, tmp_path):
    from xrayfeat.dataset import open_dataset

    run = _brightness_run(tmp_path, open_dataset(examples_h5).size)
    result = audit_run(run, examples_h5, split="val", out=tmp_path / "audit")
    shift = {(r.transform, r.class_name): r.mean_shift for r in result.rows}
    for cls in ("NORMAL", "PNEUMONIA"):
        assert shift["brighter", cls] > 0.05 and shift["darker", cls] < -0.05
        # Transforms that keep the mean brightness barely move it.
        for name in ("noise", "marker", "blur", "sharpen"):
            assert abs(shift[name, cls]) < abs(shift["brighter", cls]) / 3, name
    top = {r.transform for r in result.largest(4)}
    assert top & {"brighter", "darker"}
    # Every file is written and the JSON holds every row.
    assert sorted(Path(f).name for f in result.files) == ["audit.csv", "audit.json", "audit.png"]
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert len(saved["rows"]) == len(result.rows) == 2 * len(TRANSFORMS)


def test_audit_cli_on_a_trained_run_prints_one_json_object(trained_run, examples_h5):
    result = CliRunner().invoke(app, ["audit", str(trained_run), str(examples_h5), "--json",
                                      "--limit", "6"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 6 and report["split"] == "val"
    assert {r["transform"] for r in report["rows"]} == set(TRANSFORMS)
    for row in report["rows"]:
        assert row["ci_low"] <= row["mean_shift"] <= row["ci_high"] or row["n"] == 1
        assert 0.0 <= row["flipped"] <= 1.0


@pytest.mark.parametrize("args, message", [
    (["--split", "nope"], "'nope' is not one of 'train', 'val', 'test'"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_audit_bad_arguments_are_one_line_errors(trained_run, examples_h5, args, message):
    result = CliRunner().invoke(app, ["audit", str(trained_run), str(examples_h5), *args])
    assert result.exit_code == 2
    assert message in result.output
