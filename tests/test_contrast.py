"""xrayfeat.contrast: the streaming class contrast over a split."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from figure_checks import assert_nonblank_png, linked_files, pngs_under
from xrayfeat.contrast import _LayerSums, class_contrast, cohens_d
from xrayfeat.errors import DatasetError, UsageError
from xrayfeat.layers import ActivationModel

CONV_NAMES = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2"]


# --------------------------------------------------------------------------- class contrast

def test_layer_sums_match_direct_statistics_for_n_classes():
    """Streaming sums give the same Cohen's d as the textbook formula, in any batching,
    for 3 classes compared one against the rest."""
    rng = np.random.default_rng(3)
    acts = rng.gamma(2.0, 1.0, (40, 4, 5, 6))
    labels = rng.integers(0, 3, 40)
    acts[labels == 2, ..., 1] += 1.5  # channel 1 answers class 2
    sums = _LayerSums((4, 5, 6), 3)
    for start in range(0, 40, 7):
        sums.update(acts[start : start + 7], labels[start : start + 7])
    means = acts.mean(axis=(1, 2))
    for k in range(3):
        a, b = means[labels == k], means[labels != k]
        n_a, mean_a, sd_a, map_a = sums.group([k])
        n_b, mean_b, sd_b, map_b = sums.group([j for j in range(3) if j != k])
        assert (n_a, n_b) == (len(a), len(b))
        np.testing.assert_allclose(sd_a, a.std(axis=0, ddof=1), rtol=1e-9)
        np.testing.assert_allclose(map_b, acts[labels != k].mean(axis=0), rtol=1e-9)
        pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1))
                         / (len(a) + len(b) - 2))
        np.testing.assert_allclose(cohens_d(n_a, mean_a, sd_a, n_b, mean_b, sd_b),
                                   (a.mean(0) - b.mean(0)) / pooled, rtol=1e-9)
    _, m2, s2, _ = sums.group([2])
    _, mr, sr, _ = sums.group([0, 1])
    d = cohens_d(int((labels == 2).sum()), m2, s2, int((labels != 2).sum()), mr, sr)
    assert int(np.argmax(np.abs(d))) == 1 and d[1] > 2


def test_class_contrast_on_a_split(trained_run, examples_h5, tmp_path):
    import h5py

    from xrayfeat.runs import load_run

    out = tmp_path / "contrast"
    result = class_contrast(trained_run, examples_h5, "val", out, top_k=3, batch_size=5)
    assert result.comparisons == [("PNEUMONIA", "NORMAL")]
    assert sum(result.counts.values()) > 4 and min(result.counts.values()) >= 2
    assert [info.name for info in result.layers] == CONV_NAMES
    names = {p.name for p in result.figures}
    for depth, layer in enumerate(CONV_NAMES, start=1):
        assert f"contrast_d{depth}_{layer}_class_means.png" in names
        assert f"contrast_d{depth}_{layer}_top_PNEUMONIA_vs_NORMAL.png" in names
    for path in result.figures:
        assert_nonblank_png(path)
    assert linked_files(result.index) >= pngs_under(out) | {result.table.resolve(),
                                                            result.summary.resolve()}

    with result.table.open() as fh:
        rows = list(csv.DictReader(fh))
    widths = {info.name: info.shape[-1] for info in result.layers}
    assert len(rows) == sum(widths.values())  # every channel of every conv layer, ranked
    by_layer: dict[str, list[dict]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], []).append(row)
    for layer, layer_rows in by_layer.items():
        assert [int(r["rank"]) for r in layer_rows] == list(range(1, widths[layer] + 1))
        effects = [abs(float(r["cohens_d"])) for r in layer_rows]
        assert effects == sorted(effects, reverse=True)
        assert sorted(int(r["channel"]) for r in layer_rows) == list(range(widths[layer]))

    summary = json.loads(result.summary.read_text())
    assert summary["split"] == "val" and summary["top_k"] == 3
    assert len(summary["top"]) == 3 * len(CONV_NAMES)
    assert {"channel", "cohens_d", "rank", "layer"} <= set(summary["top"][0])

    # The streamed statistics equal a direct computation over the whole split at once.
    model = load_run(trained_run).load_model()
    with h5py.File(examples_h5, "r") as h5:
        mask = h5["split"].asstr()[:] == "val"
        x = h5["images"][:][mask][..., None].astype(np.float32)
        y = h5["labels"][:][mask]
    relu = ActivationModel(model, ["block2_relu2"])(x)[0]["block2_relu2"].mean(axis=(1, 2))
    a, b = relu[y == 1], relu[y == 0]
    pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1))
                     / (len(a) + len(b) - 2))
    direct = np.divide(a.mean(0) - b.mean(0), pooled, out=np.zeros(a.shape[1]),
                       where=pooled > 1e-12)
    streamed = {int(r["channel"]): float(r["cohens_d"]) for r in by_layer["block2_conv2"]}
    np.testing.assert_allclose([streamed[c] for c in range(len(direct))], direct, atol=2e-4)


def test_class_contrast_errors(trained_run, examples_h5, tmp_path):
    with pytest.raises(DatasetError, match="no 'nope' images"):
        class_contrast(trained_run, examples_h5, "nope", tmp_path / "a")
    with pytest.raises(UsageError, match="does not exist"):
        class_contrast(trained_run, tmp_path / "missing.h5", "val", tmp_path / "b")
    out = tmp_path / "c"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(UsageError, match="not empty"):
        class_contrast(trained_run, examples_h5, "val", out)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

