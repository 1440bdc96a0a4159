"""ensemble: several runs averaged into one ordinary run that every command reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_error_line
from xrayfeat.cli import app


@pytest.fixture(scope="module")
def second_run(trained_run, tmp_path_factory) -> Path:
    """Another seed of the same tiny recipe, on the same prepared dataset."""
    from xrayfeat.config import TrainConfig
    from xrayfeat.training import train

    run = tmp_path_factory.mktemp("second") / "run"
    train(trained_run.parent / "examples.h5", run,
          TrainConfig(input_size=32, epochs=2, batch_size=16, width=0.5, seed=7))
    return run


@pytest.fixture(scope="module")
def ensemble_run(trained_run, second_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "run"
    result = CliRunner().invoke(app, ["ensemble", str(trained_run), str(second_run),
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_ensemble_loads_safely_and_equals_the_mean_of_its_members(
        ensemble_run, trained_run, second_run, examples_h5):
    from xrayfeat.dataset import load_split
    from xrayfeat.runs import load_model_safely, load_run

    model = load_model_safely(ensemble_run / "model.keras")  # safe_mode: no code inside
    x = load_split(examples_h5, "val").images[..., None].astype(np.float32)
    members = [load_run(r).load_model().predict_on_batch(x) for r in (trained_run, second_run)]
    np.testing.assert_allclose(model.predict_on_batch(x), np.mean(members, axis=0),
                               rtol=1e-5, atol=1e-6)
    run = load_run(ensemble_run)
    assert run.classes == ["NORMAL", "PNEUMONIA"]
    validation = json.loads((ensemble_run / "validation.json").read_text())
    assert 0.0 <= run.threshold <= 1.0
    assert validation["threshold_ci"]["lower"] <= validation["threshold_ci"]["upper"]
    config = json.loads((ensemble_run / "config.json").read_text())
    assert len(config["ensemble"]["members"]) == 2
    assert len(config["ensemble"]["member_model_sha256"][0]) == 64


def test_every_command_reads_an_ensemble(ensemble_run, examples_h5, examples_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(ensemble_run), str(examples_dir / "test"),
                                 "--out", str(tmp_path / "p.csv"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(ensemble_run), str(examples_h5), "--json",
                                 "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    image = next((examples_dir / "test").rglob("*.jpeg"))
    result = runner.invoke(app, ["visualize-layers", str(ensemble_run), str(image), "--out",
                                 str(tmp_path / "grids")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "grids").rglob("*gradcam*.png"))
    result = runner.invoke(app, ["audit", str(ensemble_run), str(examples_h5), "--limit", "4",
                                 "--json"])
    assert result.exit_code == 0, result.output


def test_ensemble_gradcam_is_the_mean_of_its_members_maps(ensemble_run, examples_h5):
    from xrayfeat.cams import cam_layers, gradcam_maps
    from xrayfeat.dataset import load_split
    from xrayfeat.runs import load_run

    model = load_run(ensemble_run).load_model()
    assert cam_layers(model) == ["member1_block2_conv2", "member2_block2_conv2"]
    x = load_split(examples_h5, "val").images[:3, ..., None].astype(np.float32)
    cams = gradcam_maps(model, x, [1, 1, 1])
    assert cams.shape == x.shape[:3] and 0.0 <= cams.min() and cams.max() <= 1.0


def test_ensemble_refusals_are_one_line_errors(trained_run, second_run, ensemble_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["ensemble", str(trained_run), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "at least two runs" in one_error_line(result)
    result = runner.invoke(app, ["ensemble", str(trained_run), str(trained_run), "--out",
                                 str(tmp_path / "e")])
    assert result.exit_code == 2 and "named twice" in one_error_line(result)
    result = runner.invoke(app, ["ensemble", str(trained_run), str(second_run), "--out",
                                 str(ensemble_run)])
    assert result.exit_code == 2 and "--overwrite" in one_error_line(result)
    # A member trained on other data: the validation splits would not agree.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.keras", "validation.json"):
        (other / name).write_bytes((second_run / name).read_bytes())
    config = json.loads((second_run / "config.json").read_text())
    config["data"]["sha256"] = "0" * 64
    (other / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["ensemble", str(trained_run), str(other), "--out",
                                 str(tmp_path / "e")])
    assert result.exit_code == 2 and "different data" in one_error_line(result)
    assert not (tmp_path / "e").exists()
