"""xrayfeat.visualize: the per-image figures of a real trained run (layers through
xrayfeat.layers' one multi-output extractor)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from figure_checks import assert_nonblank_png, linked_files, pngs_under
from xrayfeat import visualize
from xrayfeat.errors import ImageReadError, RunError, UsageError
from xrayfeat.layers import ActivationModel
from xrayfeat.visualize import visualize_images

CONV_NAMES = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2"]

@pytest.fixture(scope="module")
def test_images(examples_dir) -> list[Path]:
    return [examples_dir / "test" / "NORMAL" / "IM-0670-0001.jpeg",
            examples_dir / "test" / "PNEUMONIA" / "person65_bacteria_322.jpeg"]


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


