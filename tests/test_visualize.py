"""What the network sees (xrayfeat.visualize, with cams, layers, contrast, filenames): safe output names, Grad-CAM on a model with a known answer, the
per-image figures of a real trained run, and the streaming class contrast."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

from xrayfeat import filenames, visualize
from xrayfeat.cams import gradcam_maps, write_gradcam_overlays
from xrayfeat.contrast import _LayerSums, class_contrast, cohens_d
from xrayfeat.filenames import safe_stem, unique_stems
from xrayfeat.layers import ActivationModel
from xrayfeat.visualize import visualize_images
from xrayfeat.errors import DatasetError, ImageReadError, RunError, UsageError

CONV_NAMES = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2"]


# --------------------------------------------------------------------------- helpers

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def linked_files(index: Path) -> set[Path]:
    """Every file index.html links to, resolved, checked to lie inside its folder."""
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    root = index.parent.resolve()
    files = set()
    for href in parser.hrefs:
        target = (index.parent / unquote(href)).resolve()
        assert target.is_relative_to(root), href
        assert target.is_file(), href
        files.add(target)
    return files


def assert_nonblank_png(path: Path) -> None:
    assert path.suffix == ".png" and path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image.std()) > 10, f"{path} looks blank"


def pngs_under(folder: Path) -> set[Path]:
    return {p.resolve() for p in folder.rglob("*.png")}


@pytest.fixture(scope="module")
def test_images(examples_dir) -> list[Path]:
    return [examples_dir / "test" / "NORMAL" / "IM-0670-0001.jpeg",
            examples_dir / "test" / "PNEUMONIA" / "person65_bacteria_322.jpeg"]


# --------------------------------------------------------------------------- safe names

@pytest.mark.parametrize("name", [
    "..\u2028evil.jpeg", "../../etc/passwd", "..\\..\\evil.jpeg", "....jpeg", ".hidden.png",
    "-rf.jpeg", "a\x00b\x1f.jpeg", "\u202eexe.gpj.jpeg", "CON.jpeg", " ", "..", ".",
    "x" * 400 + ".jpeg", "é" * 300 + ".png",
])
def test_safe_stem_cannot_escape(name, tmp_path):
    stem = safe_stem(name)
    assert stem and "/" not in stem and "\\" not in stem and ".." not in stem
    assert not stem.startswith((".", "-"))
    assert all(ch.isprintable() and not ch.isspace() for ch in stem), repr(stem)
    assert len(stem.encode("utf-8")) <= filenames.MAX_STEM_BYTES
    assert (tmp_path / stem).resolve().parent == tmp_path.resolve()
    assert stem.split(".")[0].upper() != "CON"


def test_safe_stem_keeps_readable_names():
    assert safe_stem("/data/x/person1_bacteria_1.jpeg") == "person1_bacteria_1"
    assert safe_stem("Röntgen Thorax 2.png") == "Röntgen_Thorax_2"
    assert safe_stem("C:\\scans\\IM-0001.dcm") == "IM-0001"
    assert safe_stem("noextension") == "noextension"


def test_unique_stems_dedupes_with_path_hash():
    paths = ["a/img.jpeg", "b/img.jpeg", "b/IMG.png", "c/other.jpeg", "a/img.jpeg"]
    stems = unique_stems(paths)
    assert len({s.casefold() for s in stems}) == len(stems)
    assert stems[3] == "other"
    assert all(s.startswith(("img_", "IMG_")) for s in stems[:3])
    assert stems[:3] == unique_stems(paths[:3])  # stable: a hash of the path, not an order
    assert stems[4] == stems[0] + "_2"


# --------------------------------------------------------------------------- Grad-CAM

QUADRANTS = {  # name -> ((crop top, crop bottom), (crop left, crop right)) as fractions
    "top-left": ((0, 1), (0, 1)),
    "top-right": ((0, 1), (1, 0)),
    "bottom-left": ((1, 0), (0, 1)),
}


def region_model(size: int, quadrant: str | None):
    """A classifier that sees only one quadrant of its input (or, with None, all of it).

    The input is cut to the quadrant and zero-padded back (built-in layers, so tf-keras-vis
    can clone the model); a conv layer with a fixed positive kernel and a ReLU feed a dense
    layer whose class-1 weights are positive and class-0 weights zero.
    """
    import keras
    from keras import layers

    half = size // 2
    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    if quadrant is not None:
        (t, b), (l, r) = QUADRANTS[quadrant]
        crop = ((t * half, b * half), (l * half, r * half))
        x = layers.Cropping2D(crop, name="see_one_quadrant")(x)
        x = layers.ZeroPadding2D(crop, name="zero_elsewhere")(x)
    conv = layers.Conv2D(4, 3, padding="same", name="block2_conv2")
    x = conv(x)
    x = layers.Activation("relu", name="block2_relu2")(x)
    x = layers.Flatten(name="flatten")(x)
    dense = layers.Dense(2, activation="softmax", name="predictions")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    conv.set_weights([np.full((3, 3, 1, 4), 0.1, np.float32), np.zeros(4, np.float32)])
    w = np.zeros((size * size * 4, 2), np.float32)
    w[:, 1] = 0.01
    dense.set_weights([w, np.zeros(2, np.float32)])
    return model


def quadrant_mass(cam: np.ndarray) -> dict[str, float]:
    h, w = cam.shape
    total = float(cam.sum()) or 1.0
    top, bottom = cam[: h // 2], cam[h // 2 :]
    return {"top-left": float(top[:, : w // 2].sum()) / total,
            "top-right": float(top[:, w // 2 :].sum()) / total,
            "bottom-left": float(bottom[:, : w // 2].sum()) / total,
            "bottom-right": float(bottom[:, w // 2 :].sum()) / total}


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("quadrant", sorted(QUADRANTS))
def test_gradcam_finds_the_only_region_the_model_sees(quadrant, method):
    size = 32
    rng = np.random.default_rng(0)
    images = rng.uniform(60, 255, (3, size, size, 1)).astype(np.float32)  # content everywhere
    cams = gradcam_maps(region_model(size, quadrant), images, [1, 1, 1], method)
    assert cams.shape == (3, size, size) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1 and np.isclose(cams.max(), 1, atol=1e-3)
    for cam in cams:
        mass = quadrant_mass(cam)
        assert mass[quadrant] > 0.9, (quadrant, mass)  # nearly all the heat, in the right place


def test_gradcam_control_model_that_sees_everything_spreads_heat():
    size = 32
    images = np.random.default_rng(1).uniform(60, 255, (2, size, size, 1)).astype(np.float32)
    for cam in gradcam_maps(region_model(size, None), images, [1, 1]):
        mass = quadrant_mass(cam)
        assert max(mass.values()) < 0.5, mass  # the known-answer test is not trivially passed


def test_gradcam_maps_on_a_trained_run(trained_run, examples_h5):
    import h5py

    from xrayfeat.runs import load_run

    model = load_run(trained_run).load_model()
    with h5py.File(examples_h5, "r") as h5:
        x = h5["images"][:2][..., None].astype(np.float32)
    for method in ("gradcam", "gradcam++", "scorecam"):
        cams = gradcam_maps(model, x, [0, 1], method)
        assert cams.shape == (2, *x.shape[1:3])
        assert np.all((cams >= 0) & (cams <= 1)) and np.isfinite(cams).all()
    with pytest.raises(UsageError, match="unknown CAM method"):
        gradcam_maps(model, x, [0, 1], "lime")


def test_write_gradcam_overlays_api(trained_run, examples_h5, tmp_path):
    """The shared API ``predict --gradcam`` calls: predicted class, safe unique names."""
    import h5py

    from xrayfeat.runs import load_run

    model = load_run(trained_run).load_model()
    with h5py.File(examples_h5, "r") as h5:
        x = h5["images"][:3][..., None].astype(np.float32)
    paths = [Path("a/scan.jpeg"), Path("b/scan.jpeg"), Path("..\u2028evil.jpeg")]
    out = tmp_path / "cams"
    written = write_gradcam_overlays(model, paths, x, out)
    assert len(written) == 3 and len(set(written)) == 3
    for path in written:
        assert path.parent == out and path.name.endswith("_gradcam.png")
        assert_nonblank_png(path)
    assert written[2].name == "evil_gradcam.png"


# --------------------------------------------------------------------------- per image

@pytest.fixture(scope="module")
def default_result(trained_run, test_images, tmp_path_factory):
    """One default visualisation (conv layers, Grad-CAM++ too, filters), shared by tests."""
    out = tmp_path_factory.mktemp("viz") / "out"
    return visualize_images(trained_run, test_images, out, filters=True, cam_method="gradcam++",
                            max_channels=8)


def test_default_grids_are_the_conv_layers(default_result, test_images):
    r = default_result
    assert [info.name for info in r.layers] == CONV_NAMES
    assert [info.depth for info in r.layers] == [1, 2, 3, 4]
    assert len(r.images) == len(test_images) and not r.skipped
    for image, source in zip(r.images, test_images):
        assert image.stem == source.stem
        names = [p.name for _, p in image.grids]
        assert names == [f"{source.stem}_d{d}_{n}.png" for d, n in zip([1, 2, 3, 4], CONV_NAMES)]
        for path in image.files:
            assert path.resolve().is_relative_to(r.out.resolve())
    # the predicted label is exactly what `predict` would report
    assert {image.predicted for image in r.images} <= {"NORMAL", "PNEUMONIA"}


def test_overview_and_cam_files_are_real_pictures(default_result):
    for image in default_result.images:
        assert image.overview.name == f"{image.stem}_overview.png"
        assert set(image.cams) == {"gradcam", "gradcam++"}
        assert image.cams["gradcam"].name == f"{image.stem}_gradcam.png"
        assert image.cams["gradcam++"].name == f"{image.stem}_gradcampp.png"
        assert image.cam_class == image.predicted
        for path in [image.overview, *image.cams.values(), image.grids[0][1]]:
            assert_nonblank_png(path)
    assert default_result.filters.name == "filters_block1_conv1.png"
    assert_nonblank_png(default_result.filters)


def test_index_links_every_figure(default_result):
    index = default_result.index
    assert index == default_result.out / "index.html"
    linked = linked_files(index)
    assert linked == pngs_under(default_result.out)
    assert {p.resolve() for p in default_result.files if p.suffix == ".png"} == linked
    text = index.read_text(encoding="utf-8")
    for depth in (1, 2, 3, 4):
        assert f"depth {depth}" in text


def test_one_forward_pass_per_batch(trained_run, test_images, tmp_path, monkeypatch):
    """All requested layers come from one multi-output model, built once, called once per
    batch of images (not once per layer or per image)."""
    built, calls = [], []

    class Counting(ActivationModel):
        def __init__(self, model, names):
            super().__init__(model, names)
            built.append(self)

        def __call__(self, images):
            calls.append(len(images))
            return super().__call__(images)

    monkeypatch.setattr(visualize, "ActivationModel", Counting)
    images = [*test_images, test_images[0].parent / "IM-0676-0001.jpeg"]
    result = visualize_images(trained_run, images, tmp_path / "out", all_layers=True,
                              max_channels=2, batch_size=2)
    assert len(built) == 1 and calls == [2, 1]
    extractor = built[0]
    drawn = [info.name for info in result.layers]
    assert set(drawn) <= set(extractor.names)
    assert len(extractor.model.outputs) == len(extractor.names) + 1  # + the prediction
    assert len(result.images) == 3


def test_layer_selection(trained_run, test_images, tmp_path):
    everything = visualize_images(trained_run, test_images[:1], tmp_path / "all",
                                  all_layers=True, max_channels=2)
    kinds = {}
    for info in everything.layers:
        kinds.setdefault(info.kind, []).append(info.name)
    assert kinds["conv"] == CONV_NAMES
    assert len(kinds["activation"]) == 4 and len(kinds["batchnorm"]) == 4
    assert kinds["pooling"] == ["block1_pool", "block2_pool"]
    assert set(kinds) == {"conv", "activation", "batchnorm", "pooling"}
    assert len(everything.images[0].grids) == 14
    assert "block1_bn1" in {i.name for i in everything.layers if i.depth == 1}

    picked = visualize_images(trained_run, test_images[:1], tmp_path / "picked",
                              layers=["block2_conv2", "block1_pool"], max_channels=3)
    assert [info.name for info in picked.layers] == ["block1_pool", "block2_conv2"]
    stem = test_images[0].stem
    assert sorted(p.name for _, p in picked.images[0].grids) == [
        f"{stem}_d2_block1_pool.png", f"{stem}_d4_block2_conv2.png"]
    assert linked_files(picked.index) == pngs_under(tmp_path / "picked")


def test_unknown_layer_lists_valid_names(trained_run, test_images, tmp_path):
    with pytest.raises(UsageError) as exc:
        visualize_images(trained_run, test_images, tmp_path / "o", layers=["block9_conv1"])
    message = str(exc.value)
    assert "\n" not in message and "block9_conv1" in message
    for name in CONV_NAMES + ["block1_bn1", "block2_pool"]:
        assert name in message
    assert not (tmp_path / "o").exists()  # nothing written


def test_hostile_names_stay_inside_out(trained_run, test_images, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    names = ["..\u2028evil.jpeg", "a b ü.jpeg", "..\\..\\x.jpeg", "-dash.jpeg"]
    for name in names:
        shutil.copy(test_images[0], src / name)
    (src / "sub").mkdir()
    shutil.copy(test_images[1], src / "sub" / "a b ü.jpeg")  # same stem, other folder
    out = tmp_path / "out"
    inputs = [src / name for name in names] + [src / "sub" / "a b ü.jpeg"]
    result = visualize_images(trained_run, inputs, out, layers=["block1_conv1"], max_channels=2)
    assert len(result.images) == 5 and not result.skipped
    stems = [image.stem for image in result.images]
    assert len(set(stems)) == 5
    root = out.resolve()
    for path in pngs_under(out) | {result.index.resolve()}:
        assert path.is_relative_to(root)
        assert all(".." not in part for part in path.relative_to(root).parts)
    assert {p.name for p in out.iterdir()} == {*stems, "index.html"}
    assert linked_files(result.index) == pngs_under(out)
    assert not any(p.name.startswith(("..", "evil")) for p in tmp_path.iterdir())


def test_unreadable_images_are_skipped(trained_run, test_images, tmp_path):
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    missing = tmp_path / "missing.png"
    result = visualize_images(trained_run, [bad, test_images[0], missing], tmp_path / "out",
                              layers=["block1_conv1"], max_channels=2)
    assert len(result.images) == 1
    assert [p for p, _ in result.skipped] == [str(bad), str(missing)]
    assert all(reason for _, reason in result.skipped)
    assert "broken.jpeg" in result.index.read_text(encoding="utf-8")
    with pytest.raises(ImageReadError, match="none of the 2"):
        visualize_images(trained_run, [bad, missing], tmp_path / "out2")


def test_refuses_non_empty_out_without_overwrite(trained_run, test_images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="--overwrite"):
        visualize_images(trained_run, test_images[:1], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = visualize_images(trained_run, test_images[:1], out, overwrite=True,
                              layers=["block1_conv1"], max_channels=2)
    assert (out / "keep.txt").read_text() == "mine" and result.index.is_file()


def test_bad_arguments(trained_run, test_images, tmp_path):
    with pytest.raises(UsageError, match="no images"):
        visualize_images(trained_run, [], tmp_path / "a")
    with pytest.raises(UsageError, match="unknown class 'COVID'.*NORMAL, PNEUMONIA"):
        visualize_images(trained_run, test_images, tmp_path / "b", class_name="COVID")
    with pytest.raises(UsageError, match="--cam"):
        visualize_images(trained_run, test_images, tmp_path / "c", cam_method="lime")
    with pytest.raises(UsageError, match="colormap"):
        visualize_images(trained_run, test_images, tmp_path / "d", cmap="nope")
    no_model = tmp_path / "run"
    no_model.mkdir()
    shutil.copy(trained_run / "config.json", no_model / "config.json")
    with pytest.raises(RunError, match="model.keras"):
        visualize_images(no_model, test_images, tmp_path / "e")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_class_option_and_shared_scale(trained_run, test_images, tmp_path):
    result = visualize_images(trained_run, test_images, tmp_path / "out", class_name="pneumonia",
                              layers=["block2_conv1"], shared_scale=True, cmap="magma",
                              max_channels=4)
    assert all(image.cam_class == "PNEUMONIA" for image in result.images)
    assert_nonblank_png(result.images[0].grids[0][1])
    assert "shared" in result.index.read_text(encoding="utf-8")


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
