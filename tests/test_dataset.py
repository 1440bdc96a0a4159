"""xrayfeat.dataset: finding labelled images, patient ids, grouped splits, and prepare to
HDF5 (real files on disk, real HDF5 files, no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from xrayfeat.version import __version__
from xrayfeat.dataset import (
    find_labelled_files,
    iter_image_files,
    open_dataset,
    patient_id,
    prepare_dataset,
)
from xrayfeat.errors import (
    EXIT_FAILURES,
    EXIT_USAGE,
    DatasetError,
    ImageReadError,
    UsageError,
)
from xrayfeat.preprocessing import PreprocessSettings, prepare_file

SCHEMA = {  # name -> (shape after N, dtype kind)
    "images": ("SS", "u"),
    "labels": ((), "i"),
    "split": ((), "O"),
    "path": ((), "O"),
    "patient": ((), "O"),
    "roi": ((4,), "i"),
    "source_shape": ((2,), "i"),
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files that a failed or interrupted run must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def read_column(h5: h5py.File, name: str) -> list:
    return [v.decode() if isinstance(v, bytes) else v for v in h5[name][()]]


def patients_by_split(h5: h5py.File) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for split, patient in zip(read_column(h5, "split"), read_column(h5, "patient")):
        out.setdefault(split, set()).add(patient)
    return out


# --------------------------------------------------------------------------- patient ids

@pytest.mark.parametrize(
    "name, expected",
    [
        ("person1234_bacteria_3167.jpeg", "1234"),
        ("person1_virus_6.jpeg", "1"),
        ("PERSON77_BACTERIA_1.JPEG", "77"),
        ("IM-0115-0001.jpeg", "0115"),
        ("NORMAL2-IM-0115-0001.jpeg", "0115"),
        ("IM-0117-0001-0002.jpeg", "0117"),
        ("scan_0042.png", "scan_0042"),  # unknown pattern: the file stem
        ("XIM-0115-0001.jpeg", "XIM-0115-0001"),  # IM- must start the name or follow '-'
    ],
)
def test_patient_id(name, expected):
    assert patient_id(name) == expected


# --------------------------------------------------------------------------- finding files

def test_iter_image_files_skips_hidden_and_survives_symlink_loops(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden_dir").mkdir()
    (root / "a.jpeg").write_bytes(b"x")
    (root / "sub" / "b.PNG").write_bytes(b"x")
    (root / "sub" / "noext").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    (root / ".DS_Store").write_bytes(b"x")
    (root / "._a.jpeg").write_bytes(b"x")  # macOS resource fork
    (root / ".hidden_dir" / "c.jpeg").write_bytes(b"x")
    os.symlink(root, root / "sub" / "loop")  # a loop back to the top
    os.symlink(root / "sub", root / "sub_again")  # a second link to a seen folder
    found = {str(p.relative_to(root)): considered for p, considered in iter_image_files(root)}
    assert found == {"a.jpeg": True, "notes.txt": False, "sub/b.PNG": True,
                     "sub/noext": True}


def test_find_labelled_files_flat_layout_case_insensitive_normal(tmp_path, make_class_folder):
    src = make_class_folder("flat", n_per_class=3, classes=("Pneumonia", "normal"))
    (src / "normal" / "deeper" / "more").mkdir(parents=True)
    nested = next((src / "normal").glob("*.jpeg"))
    (src / "normal" / "deeper" / "more" / "IM-9999-0001.jpeg").write_bytes(nested.read_bytes())
    (src / "normal" / "readme.txt").write_text("x")
    (src / ".git").mkdir()
    (src / ".git" / "IM-1-1.jpeg").write_bytes(nested.read_bytes())
    files, classes, ignored = find_labelled_files(src)
    assert classes == ["normal", "Pneumonia"]  # NORMAL is label 0 whatever its case
    assert ignored == 1
    assert len(files) == 7  # recursive: the nested image is found
    assert {f.split for f in files} == {None}
    assert sorted({f.class_name for f in files}) == ["Pneumonia", "normal"]
    assert any(f.patient == "9999" for f in files)


def test_find_labelled_files_split_layout_merges_class_case(make_class_folder):
    make_class_folder("src", splits={"train": 3}, classes=("NORMAL", "PNEUMONIA"), size=64)
    src = make_class_folder("src", splits={"TEST": 2}, classes=("Normal", "pneumonia"), size=64)
    files, classes, _ = find_labelled_files(src)
    # One class per case-folded name (spelled as first seen), NORMAL still label 0.
    assert [c.upper() for c in classes] == ["NORMAL", "PNEUMONIA"]
    assert len({f.class_name for f in files}) == 2
    assert sorted({f.split for f in files}) == ["test", "train"]
    assert sum(f.split == "test" for f in files) == 4


def test_class_order_normal_first_then_alphabetical(tmp_path, make_class_folder):
    src = make_class_folder(n_per_class=1, size=64, classes=("virus", "Bacteria", "NORMAL"))
    _, classes, _ = find_labelled_files(src)
    assert classes == ["NORMAL", "Bacteria", "virus"]


def test_find_labelled_files_errors(tmp_path, make_class_folder):
    with pytest.raises(UsageError, match="does not exist"):
        find_labelled_files(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        find_labelled_files(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        find_labelled_files(tmp_path / "empty")
    one = make_class_folder("one", n_per_class=2, size=64, classes=("NORMAL",))
    with pytest.raises(DatasetError, match="only one class"):
        find_labelled_files(one)
    with pytest.raises(UsageError, match="--labels"):
        find_labelled_files(one, label_mode="nonsense")


def test_kermany_subtype_labels(examples_dir):
    files, classes, _ = find_labelled_files(examples_dir, label_mode="kermany-subtype")
    assert classes == ["NORMAL", "BACTERIA", "VIRUS"]
    for f in files:
        if "virus" in f.path.name:
            assert f.class_name == "VIRUS"


# --------------------------------------------------------------------------- prepare

def test_prepare_examples_schema_and_content(tmp_path, examples_dir):
    out = tmp_path / "data" / "kermany.h5"  # the folder is created
    result = prepare_dataset(examples_dir, out, workers=2)
    assert out.is_file() and result.out == out
    assert result.classes == ["NORMAL", "PNEUMONIA"]
    assert result.skipped == [] and result.ignored == 0
    assert result.val_cut_from_train
    n = sum(sum(c.values()) for c in result.counts.values())
    assert n == 60
    assert result.counts["test"] == {"NORMAL": 6, "PNEUMONIA": 6}
    assert sum(result.counts["train"].values()) + sum(result.counts["val"].values()) == 48
    with h5py.File(out, "r") as h5:
        for name, (tail, kind) in SCHEMA.items():
            ds = h5[name]
            tail = (224, 224) if tail == "SS" else tail
            assert ds.shape == (n, *tail), name
            assert ds.dtype.kind == kind, (name, ds.dtype)
            assert ds.chunks is not None, name
        assert h5["images"].dtype == np.uint8
        assert h5["images"].compression == "gzip"
        assert json.loads(h5.attrs["classes"]) == ["NORMAL", "PNEUMONIA"]
        assert int(h5.attrs["size"]) == 224
        assert bool(h5.attrs["roi"]) is True
        roi_settings = json.loads(h5.attrs["roi_settings"])
        assert {"margin", "min_cover", "fallback_fraction"} <= set(roi_settings)
        assert h5.attrs["xrayfeat_version"] == __version__
        assert h5.attrs["label_mode"] == "folders"

        paths = read_column(h5, "path")
        labels = h5["labels"][()]
        splits = read_column(h5, "split")
        assert set(splits) == {"train", "val", "test"}
        assert sorted(paths) == sorted(str(p) for p in examples_dir.rglob("*.jpeg"))
        for path, label in zip(paths, labels):
            assert label == (0 if "/NORMAL/" in path else 1)
        for path, split in zip(paths, splits):
            if "/test/" in path:
                assert split == "test"
        assert (h5["source_shape"][()] == 224).all()
        roi = h5["roi"][()]
        assert (roi[:, 0] < roi[:, 2]).all() and (roi[:, 1] < roi[:, 3]).all()
        assert (roi >= 0).all() and (roi <= 224).all()
        groups = patients_by_split(h5)
        assert not groups["train"] & groups["val"]
        assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
        # The stored image is exactly what the one preprocessing function gives.
        k = 7
        prepared = prepare_file(paths[k], PreprocessSettings())
        np.testing.assert_array_equal(h5["images"][k], prepared.image)
        assert tuple(h5["roi"][k]) == prepared.roi.as_tuple()
    assert leftovers(out.parent) == []


def test_prepare_is_deterministic_across_worker_counts_and_pools(tmp_path, class_folder):
    one = prepare_dataset(class_folder, tmp_path / "one.h5", workers=1, seed=3)
    for pool in ("thread", "process"):
        two = prepare_dataset(class_folder, tmp_path / f"{pool}.h5", workers=2, seed=3,
                              pool=pool)
        assert one.counts == two.counts
        with h5py.File(one.out, "r") as a, h5py.File(two.out, "r") as b:
            for name in SCHEMA:
                np.testing.assert_array_equal(a[name][()], b[name][()])
            assert b["images"].compression == "gzip"  # readable by any HDF5 tool


def test_prepare_synthetic_size_and_no_roi(tmp_path, class_folder):
    result = prepare_dataset(
        class_folder, tmp_path / "s.h5", settings=PreprocessSettings(size=48, roi=False),
        workers=1, val_fraction=0.25,
    )
    assert set(result.counts) == {"train", "val"}
    with h5py.File(result.out, "r") as h5:
        assert h5["images"].shape == (24, 48, 48)
        assert int(h5.attrs["size"]) == 48 and not h5.attrs["roi"]
        assert (h5["roi"][()] == [0, 0, 96, 96]).all()  # no crop: the whole source
        assert (h5["source_shape"][()] == [96, 96]).all()
        # The two classes are distinguishable: the opacity brightens PNEUMONIA's left lung.
        images = h5["images"][()].astype(float)
        labels = h5["labels"][()]
        lung = images[:, 26:34, 12:20].mean(axis=(1, 2))
        assert lung[labels == 1].min() > lung[labels == 0].max()


def test_prepare_mixed_formats(tmp_path, make_class_folder, synthetic_xray, write_dicom):
    src = make_class_folder(n_per_class=10, size=64)
    sixteen = (synthetic_xray(80, seed=11).astype(np.uint16) * 10 + 1000)
    assert cv2.imwrite(str(src / "NORMAL" / "IM-5000-0001.png"), sixteen)
    write_dicom(src / "PNEUMONIA" / "person5001_virus_1", synthetic_xray(72, seed=12) * 8,
                photometric="MONOCHROME1")
    result = prepare_dataset(src, tmp_path / "m.h5", workers=1)
    assert result.skipped == []
    with h5py.File(result.out, "r") as h5:
        paths = read_column(h5, "path")
        shapes = {Path(p).name: tuple(s) for p, s in zip(paths, h5["source_shape"][()])}
        assert shapes["IM-5000-0001.png"] == (80, 80)
        assert shapes["person5001_virus_1"] == (72, 72)
        k = paths.index(str(src / "NORMAL" / "IM-5000-0001.png"))
        assert h5["images"][k].max() > 200  # 16-bit scaled by its range, not truncated


def test_bad_file_is_skipped_and_listed(tmp_path, class_folder, example_images):
    bad = class_folder / "PNEUMONIA" / "person9001_bacteria_1.jpeg"
    bad.write_text("not an image")
    cut = class_folder / "NORMAL" / "IM-9002-0001.jpeg"
    data = example_images[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (class_folder / "NORMAL" / "folder.jpeg").mkdir()  # a directory named like an image
    result = prepare_dataset(class_folder, tmp_path / "out.h5", workers=1)
    reasons = dict(result.skipped)
    assert set(reasons) == {str(bad), str(cut)}
    assert "not an image" in reasons[str(bad)]
    assert "truncated" in reasons[str(cut)]
    with h5py.File(result.out, "r") as h5:
        assert h5["images"].shape[0] == 24
        assert str(bad) not in read_column(h5, "path")


def test_strict_stops_at_first_bad_file_and_writes_nothing(tmp_path, class_folder):
    (class_folder / "NORMAL" / "IM-9003-0001.jpeg").write_text("not an image")
    out = tmp_path / "out.h5"
    with pytest.raises(ImageReadError, match="IM-9003-0001.jpeg.*--strict") as info:
        prepare_dataset(class_folder, out, strict=True, workers=2)
    assert info.value.exit_code == EXIT_FAILURES
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_refused_unless_overwrite(tmp_path, class_folder):
    out = tmp_path / "out.h5"
    out.write_bytes(b"previous")
    with pytest.raises(UsageError, match="--overwrite") as info:
        prepare_dataset(class_folder, out, workers=1)
    assert info.value.exit_code == EXIT_USAGE
    assert out.read_bytes() == b"previous"
    prepare_dataset(class_folder, out, workers=1, overwrite=True)
    with h5py.File(out, "r") as h5:
        assert h5["images"].shape[0] == 24
    folder = tmp_path / "a_folder.h5"
    folder.mkdir()
    with pytest.raises(UsageError, match="folder"):
        prepare_dataset(class_folder, folder, workers=1, overwrite=True)


def test_failed_run_keeps_previous_dataset(tmp_path, class_folder):
    out = tmp_path / "out.h5"
    prepare_dataset(class_folder, out, workers=1)
    before = digest(out)
    (class_folder / "NORMAL" / "IM-9004-0001.jpeg").write_bytes(b"\xff\xd8\xffgarbage")
    with pytest.raises(ImageReadError):
        prepare_dataset(class_folder, out, workers=1, overwrite=True, strict=True)
    assert digest(out) == before and leftovers(tmp_path) == []


def test_interrupted_run_keeps_previous_dataset(tmp_path, class_folder):
    out = tmp_path / "out.h5"
    prepare_dataset(class_folder, out, workers=1)
    before = digest(out)
    seen = []

    def interrupt(n):
        seen.append(n)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(class_folder, out, workers=2, overwrite=True, on_progress=interrupt)
    assert digest(out) == before and leftovers(tmp_path) == []
    with h5py.File(out, "r") as h5:  # still a complete, readable dataset
        assert h5["images"].shape[0] == 24


def test_prepare_errors_on_unusable_sources(tmp_path, make_class_folder):
    out = tmp_path / "out.h5"
    with pytest.raises(UsageError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images") as info:
        prepare_dataset(tmp_path / "empty", out)
    assert info.value.exit_code == EXIT_USAGE
    one = make_class_folder("one", n_per_class=3, size=64, classes=("PNEUMONIA",))
    with pytest.raises(DatasetError, match="only one class"):
        prepare_dataset(one, out)
    unreadable = tmp_path / "unreadable"
    for name in ("NORMAL", "PNEUMONIA"):
        for k in range(12):
            (unreadable / name).mkdir(parents=True, exist_ok=True)
            (unreadable / name / f"person{k}{name}_x.jpeg").write_text("x")
    with pytest.raises(DatasetError, match="could be read"):
        prepare_dataset(unreadable, out, workers=1)
    with pytest.raises(UsageError, match="--size"):
        prepare_dataset(make_class_folder("ok", n_per_class=1, size=64), out,
                        settings=PreprocessSettings(size=16))
    assert not out.exists() and leftovers(tmp_path) == []


def test_streamed_batches_are_the_in_memory_batches_in_the_same_order(examples_h5):
    from xrayfeat.dataset import iter_split, load_split

    whole = load_split(examples_h5, "train")
    order = np.random.default_rng(3).permutation(len(whole.labels))
    batches = list(iter_split(examples_h5, "train", 7, order=order))
    assert [len(labels) for _, labels in batches][:-1] == [7] * (len(batches) - 1)
    np.testing.assert_array_equal(np.concatenate([b for b, _ in batches]), whole.images[order])
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in batches]),
                                  whole.labels[order])
    # Without an order: file order, read a slab at a time where rows are consecutive.
    in_file_order = np.concatenate([b for b, _ in iter_split(examples_h5, "train", 5)])
    np.testing.assert_array_equal(in_file_order, whole.images)


def test_each_split_reads_exactly_its_own_rows_in_file_order(examples_h5):
    """Runs of consecutive rows and scattered rows alike: each split's images are the file's
    rows of that split, row for row, whatever mix of runs the read takes."""
    from xrayfeat.dataset import _read_rows, load_split

    with h5py.File(examples_h5, "r") as h5:
        stored, splits = h5["images"][:], np.array(read_column(h5, "split"))
        scattered = 0
        for split in np.unique(splits):
            rows = np.flatnonzero(splits == split)
            scattered += bool(np.any(np.diff(rows) > 1))
            np.testing.assert_array_equal(load_split(examples_h5, str(split)).images,
                                          stored[rows])
        assert scattered, "no split of the fixture has rows apart: nothing tested"
        # Runs, single rows, a row repeated, rows backwards, and none at all.
        rows = np.array([3, 4, 5, 9, 0, 1, 1, 8, 7, 2])
        np.testing.assert_array_equal(_read_rows(h5["images"], rows), stored[rows])
        assert _read_rows(h5["images"], np.array([], np.int64)).shape == (0, *stored.shape[1:])


# --------------------------------------------------------------------------- --resize

def test_letterbox_keeps_the_aspect_ratio_and_fills_with_the_background():
    from xrayfeat.preprocessing import letterbox

    wide = np.full((40, 100), 30, np.uint8)
    wide[10:30, 40:60] = 200  # a square object must stay square
    square = letterbox(wide)
    assert square.shape == (100, 100)
    assert (square[:30] == 30).all() and (square[70:] == 30).all()  # background, not black
    ys, xs = np.nonzero(square == 200)
    assert np.ptp(ys) == np.ptp(xs) == 19
    assert letterbox(square) is square  # already square: untouched


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_prepare_records_the_resize_mode(tmp_path, synthetic_xray, resize):
    src = tmp_path / "src"
    for cls in ("NORMAL", "PNEUMONIA"):
        (src / cls).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(src / cls / f"{cls}-{i}.png"), synthetic_xray((120, 200), seed=i))
    out = tmp_path / f"{resize}.h5"
    prepare_dataset(src, out, settings=PreprocessSettings(size=64, roi=False, resize=resize),
                    workers=1, val_fraction=0.3)
    assert open_dataset(out).resize == resize
    with h5py.File(out, "r") as h5:
        assert h5.attrs["resize"] == resize
        first = h5["images"][0]
    # A 120 x 200 source padded to a square has a background band top and bottom.
    band = np.abs(first[:8].astype(int) - first[:8].mean()).max()
    assert (band <= 2) == (resize == "pad")


def test_an_unknown_resize_mode_is_refused(tmp_path, class_folder):
    with pytest.raises(UsageError, match="--resize must be one of stretch, pad"):
        prepare_dataset(class_folder, tmp_path / "x.h5",
                        settings=PreprocessSettings(resize="crop"), workers=1)


def test_a_dataset_with_an_unknown_resize_attribute_is_refused(tmp_path, class_folder):
    out = tmp_path / "d.h5"
    prepare_dataset(class_folder, out, settings=PreprocessSettings(size=48), workers=1)
    with h5py.File(out, "a") as h5:
        h5.attrs["resize"] = "squash"
    with pytest.raises(DatasetError, match="'resize' must be one of"):
        open_dataset(out)


