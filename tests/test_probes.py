"""Depth probes (`visualize-layers --probe`): pooling, probed layers, patient-grouped folds,
the probe on a synthetic set whose classes differ only in a bright blob (clearly above
chance at depth; near chance on shuffled labels), and the command's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_class_folder_at
from xrayfeat.cli import app
from xrayfeat.errors import DatasetError, UsageError
from xrayfeat.probes import (
    depth_probes,
    extract_features,
    feature_size,
    grouped_folds,
    pool_features,
    probe_auc,
    probe_points,
    random_baseline,
)

runner = CliRunner()


# --------------------------------------------------------------------------- units

def test_pool_features_global_grid_and_vectors():
    acts = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    avg = pool_features(acts, "avg")
    assert avg.shape == (2, 3) and avg.dtype == np.float32
    np.testing.assert_allclose(avg, acts.mean(axis=(1, 2)))
    np.testing.assert_allclose(pool_features(acts, "max"), acts.max(axis=(1, 2)))
    grid = pool_features(acts, "avg", grid=2)
    assert grid.shape == (2, 2 * 2 * 3) == (2, feature_size((4, 4, 3), 2))
    np.testing.assert_allclose(grid[:, :3], acts[:, :2, :2].mean(axis=(1, 2)))  # top-left cell
    np.testing.assert_allclose(grid[:, -3:], acts[:, 2:, 2:].mean(axis=(1, 2)))  # bottom-right
    # a grid finer than the map still gives non-empty (overlapping) cells
    assert np.isfinite(pool_features(acts[:, :3, :3], "max", grid=4)).all()
    vec = np.ones((2, 7))
    assert pool_features(vec, "max", grid=3).shape == (2, 7) == (2, feature_size((7,), 3))


def test_probe_points_cover_every_depth_and_skip_identities():
    from xrayfeat.model import build_minivggnet

    model = build_minivggnet(3, input_size=32, stored_size=48, width=0.25)
    points = probe_points(model)
    names = [p.name for p in points]
    assert names[0] == "rescale" and points[0].depth == 0 and points[0].kind == "input"
    assert points[0].shape == (32, 32, 1)
    assert not any("dropout" in n or "_bn" in n for n in names) and "flatten" not in names
    assert "resize" not in names and "image" not in names
    depth = {p.name: p.depth for p in points}
    assert depth["block1_conv1"] == depth["block1_relu1"] == 1
    assert depth["block2_conv2"] == depth["block2_pool"] == 4
    assert depth["fc1"] == depth["fc1_relu"] == 5
    assert names[-1] == "predictions" and depth["predictions"] == 6
    kinds = {p.name: p.kind for p in points}
    assert kinds["predictions"] == "output" and kinds["fc1"] == "dense"
    assert kinds["block1_pool"] == "pooling" and kinds["block2_relu1"] == "activation"


def test_random_baseline_is_the_same_architecture_with_reproducible_weights():
    from xrayfeat.model import build_minivggnet

    model = build_minivggnet(2, input_size=32, width=0.25)
    a, b = random_baseline(model, seed=3), random_baseline(model, seed=3)
    assert [l.name for l in a.layers] == [l.name for l in model.layers]
    w_model, w_a, w_b = (m.get_layer("block1_conv1").get_weights()[0] for m in (model, a, b))
    np.testing.assert_array_equal(w_a, w_b)
    assert not np.allclose(w_a, w_model)


def test_grouped_folds_keep_patients_together():
    groups = np.repeat(np.arange(30), 2)  # two images a patient
    labels = (np.arange(30) % 2).repeat(2)
    folds, notes = grouped_folds(labels, groups, 5, seed=1)
    assert len(folds) == 5 and not notes
    seen = np.zeros(len(labels), int)
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert set(labels[test]) == {0, 1}
        seen[test] += 1
    assert (seen == 1).all()
    # three patients a class: three folds, said in a note
    few = np.arange(6)
    folds, notes = grouped_folds(few % 2, few, 5)
    assert len(folds) == 3 and "3 folds" in notes[0]
    with pytest.raises(DatasetError, match="one class"):
        grouped_folds(np.zeros(8, int), np.arange(8))
    with pytest.raises(DatasetError, match="too few patients"):
        grouped_folds(np.array([0, 1, 1, 1]), np.array([0, 1, 2, 3]))


def test_probe_auc_separable_and_three_classes():
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    x = rng.normal(size=(90, 4))
    x[:, 0] += 3 * labels  # class information in one feature
    folds, _ = grouped_folds(labels, np.arange(90), 3)
    aucs, unconverged = probe_auc(x, labels, folds)
    assert len(aucs) == 3 and aucs.min() > 0.9 and unconverged == 0
    aucs, _ = probe_auc(rng.normal(size=(90, 4)), labels, folds)
    assert abs(aucs.mean() - 0.5) < 0.2


# --------------------------------------------------------------------------- synthetic blob

@pytest.fixture(scope="module")
def blob_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 32 px MiniVGGNet trained on synthetic radiographs whose classes differ only in a
    bright blob in one lung (conftest's opacity), and its dataset (60 val images)."""
    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import prepare_dataset
    from xrayfeat.preprocessing import PreprocessSettings
    from xrayfeat.training import train

    root = tmp_path_factory.mktemp("blob")
    src = make_class_folder_at(root / "src", splits={"train": 40, "val": 30}, size=64, seed=500)
    data = root / "blob.h5"
    prepare_dataset(src, data, settings=PreprocessSettings(size=64), workers=1)
    run = root / "run"
    train(data, run, TrainConfig(input_size=32, epochs=4, batch_size=16, width=0.5,
                                 augment=False))
    return run, data


def test_blob_probe_is_above_chance_at_depth(blob_run, tmp_path):
    run, data = blob_run
    result = depth_probes(run, data, "val", tmp_path / "probes", batch_size=32)
    rows = {r.layer: r for r in result.rows}
    assert result.counts == {"NORMAL": 30, "PNEUMONIA": 30} and result.folds == 5
    assert result.patients == 60
    deep = [r for r in result.rows if r.depth >= 4]
    assert len(deep) >= 5
    assert np.mean([r.auc_mean for r in deep]) > 0.8, [(r.layer, r.auc_mean) for r in deep]
    assert rows["predictions"].auc_mean > 0.8
    assert all(r.random_auc_mean is not None for r in result.rows)
    assert all(len(r.auc_folds) == 5 and 0 <= r.auc_sd < 0.5 for r in result.rows)
    saved = json.loads(result.summary.read_text())
    assert [row["layer"] for row in saved["layers"]] == [r.layer for r in result.rows]
    first = saved["layers"][0]
    assert first["layer"] == "rescale" and first["depth"] == 0 and first["features"] == 1
    for key in ("auc_mean", "auc_sd", "random_auc_mean", "random_auc_sd", "features", "kind"):
        assert key in first
    assert "patient" in saved["cv"] and saved["pool"] == "avg"
    assert result.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in result.out.iterdir()) == ["probes.json", "probes.png"]


def test_blob_probe_on_shuffled_labels_is_near_chance(blob_run):
    from xrayfeat.runs import load_run

    run, data = blob_run
    model = load_run(run).load_model()
    layers = [p for p in probe_points(model) if p.depth >= 4]
    feats = extract_features({"trained": model}, layers, data, "val", pool="max")
    means = []  # over 5 shuffles, so that one unlucky permutation cannot decide the test
    for seed in range(5):
        shuffled = np.random.default_rng(seed).permutation(feats.labels)
        folds, _ = grouped_folds(shuffled, feats.patients, 5, seed=seed)
        means += [probe_auc(feats.features["trained"][p.name], shuffled, folds)[0].mean()
                  for p in layers]
    assert abs(np.mean(means) - 0.5) < 0.12, np.round(means, 2)
    real, _ = grouped_folds(feats.labels, feats.patients, 5, seed=7)
    assert probe_auc(feats.features["trained"]["fc1"], feats.labels, real)[0].mean() > 0.8


# --------------------------------------------------------------------------- command

def test_cli_probe_writes_table_json_and_figure(trained_run, examples_h5, tmp_path):
    out = tmp_path / "probes"
    result = runner.invoke(app, ["visualize-layers", str(trained_run), "--data",
                                 str(examples_h5), "--split", "val", "--probe", "--pool", "max",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["probes.json", "probes.png"]
    for text in ("rescale", "block2_conv2", "fc1", "predictions", "AUC trained", "AUC random"):
        assert text in result.stdout
    saved = json.loads((out / "probes.json").read_text())
    assert saved["pool"] == "max" and saved["split"] == "val"
    # a non-empty --out is refused without --overwrite, as in the other modes
    again = runner.invoke(app, ["visualize-layers", str(trained_run), "--data",
                                str(examples_h5), "--probe", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--probe"], "--probe needs --data"),
    (["--pool", "max"], "add --probe"),
    (["--probe", "--pool", "median", "--data", "x.h5"], "'median' is not one of 'avg', 'max'"),
])
def test_cli_probe_usage_errors(trained_run, tmp_path, args, message):
    result = runner.invoke(app, ["visualize-layers", str(trained_run), "--out",
                                 str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "o").exists()


def test_probe_grid_is_validated(trained_run, examples_h5, tmp_path):
    with pytest.raises(UsageError, match="--pool-grid"):
        depth_probes(trained_run, examples_h5, "val", tmp_path / "o", grid=0)
    assert not (tmp_path / "o").exists()
