"""Hospital exports: patients, modalities and views from DICOM headers; labels from a table."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import dicom_dataset, make_synthetic_xray, one_error_line, write_image
from xrayfeat.cli import app
from xrayfeat.dataset import load_split, open_dataset, prepare_dataset

runner = CliRunner()
pytest.importorskip("pydicom")


def _dicom(path: Path, patient: str, modality: str = "DX", view: str = "PA",
           seed: int = 0, opacity: bool = False) -> Path:
    ds = dicom_dataset()
    ds.PatientID = patient
    ds.StudyInstanceUID = f"1.2.3.{abs(hash(patient)) % 10**6}"
    ds.SeriesInstanceUID = ds.StudyInstanceUID + ".1"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = modality, view, "CHEST"
    pixels = make_synthetic_xray(96, seed=seed, opacity=opacity).astype(np.uint16) * 16
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def hospital(tmp_path) -> Path:
    """A DICOM export: file names carry no patient. Eight patients a class, three images
    each (two PA, one AP), plus an ultrasound and a lateral view."""
    root = tmp_path / "export"
    for cls, opacity in (("NORMAL", False), ("PNEUMONIA", True)):
        for p in range(8):
            patient = f"{cls[:2]}{p:03d}"
            for k, view in enumerate(("PA", "PA", "AP")):
                _dicom(root / cls / f"img{p * 3 + k:04d}.dcm", patient, view=view,
                       seed=p * 10 + k, opacity=opacity)
    _dicom(root / "NORMAL" / "probe.dcm", "US001", modality="US")
    _dicom(root / "PNEUMONIA" / "lateral.dcm", "PN000", view="LL", opacity=True)
    return root


def test_dicom_patients_group_the_split_and_identity_is_stored(hospital, tmp_path):
    out = tmp_path / "data.h5"
    result = prepare_dataset(hospital, out, workers=1, val_fraction=0.25)
    with h5py.File(out) as h5:
        patient = h5["patient"].asstr()[:]
        split = h5["split"].asstr()[:]
        modality = h5["modality"].asstr()[:]
        view = h5["view"].asstr()[:]
        assert h5.attrs["format"] == "xrayfeat-dataset/2"
        assert set(h5["body_part"].asstr()[:]) == {"CHEST"}
        assert all(uid.startswith("1.2.3.") for uid in h5["study_uid"].asstr()[:])
    # Grouped by PatientID: three images of a patient, never in two splits.
    assert len(set(patient)) == 16 and (np.unique(patient, return_counts=True)[1] >= 3).all()
    assert not set(patient[split == "train"]) & set(patient[split == "val"])
    assert set(modality) == {"DX"} and set(view) == {"PA", "AP", "LL"}
    # The ultrasound is refused, listed, not fatal.
    reasons = dict(result.skipped)
    assert "modality US is not a radiograph" in reasons[str(hospital / "NORMAL" / "probe.dcm")]
    assert result.patients["train"] + result.patients["val"] == 16


def test_views_filter_and_any_modality(hospital, tmp_path):
    out = tmp_path / "pa.h5"
    result = runner.invoke(app, ["prepare", str(hospital), "--out", str(out), "--views", "pa",
                                 "--workers", "1", "--val-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as h5:
        assert set(h5["view"].asstr()[:]) == {"PA"}
    both = tmp_path / "any.h5"
    prepare_dataset(hospital, both, workers=1, val_fraction=0.25, any_modality=True)
    with h5py.File(both) as h5:
        assert "US" in set(h5["modality"].asstr()[:])


def _table(tmp_path: Path, rows: list[str]) -> Path:
    images = tmp_path / "imgs"
    for k in range(8):
        for cls, opacity in (("n", False), ("p", True)):
            write_image(images / f"{cls}{k}.png", make_synthetic_xray(64, seed=k,
                                                                      opacity=opacity))
    table = tmp_path / "labels.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


def test_labels_table_gives_labels_patients_and_splits(tmp_path):
    rows = ["path,label,patient,split"]
    for k in range(8):
        split = "test" if k == 7 else ""
        rows += [f"imgs/n{k}.png,normal,N{k // 2},{split}",
                 f"imgs/p{k}.png,PNEUMONIA,P{k // 2},{split}"]
    table = _table(tmp_path, rows)
    out = tmp_path / "data.h5"
    result = runner.invoke(app, ["prepare", str(tmp_path), "--labels", str(table), "--out",
                                 str(out), "--workers", "1", "--val-fraction", "0.34",
                                 "--allow-shared-patients"])
    assert result.exit_code == 0, result.output
    info = open_dataset(out)
    assert info.classes == ["normal", "PNEUMONIA"]  # NORMAL (any case) first
    test = load_split(out, "test")
    assert sorted(Path(p).name for p in test.paths) == ["n7.png", "p7.png"]
    train, val = load_split(out, "train"), load_split(out, "val")
    assert not set(train.patients) & set(val.patients)
    # N3/P3 hold image 6 (train or val) and image 7 (test): a known patient in two official
    # splits, allowed here with a warning...
    assert "2 patient(s) are in two official splits" in result.stderr
    # ...and refused without the flag.
    refused = runner.invoke(app, ["prepare", str(tmp_path), "--labels", str(table), "--out",
                                  str(tmp_path / "refused.h5"), "--workers", "1"])
    assert refused.exit_code == 2
    assert "--allow-shared-patients" in one_error_line(refused)


@pytest.mark.parametrize("row, message", [
    ("imgs/missing.png,NORMAL", "line 3: imgs/missing.png is not a file"),
    ("imgs/n1.png,", "line 3: empty label"),
    ("imgs/n1.png,NORMAL,,holdout", "line 3: split must be one of"),
])
def test_a_bad_table_row_is_named_in_one_line(tmp_path, row, message):
    table = _table(tmp_path, ["path,label,patient,split", "imgs/n0.png,NORMAL,,", row])
    result = runner.invoke(app, ["prepare", str(tmp_path), "--labels", str(table), "--out",
                                 str(tmp_path / "d.h5")])
    assert result.exit_code == 2
    assert message in one_error_line(result)


def test_a_table_without_a_label_column_is_refused(tmp_path):
    table = _table(tmp_path, ["file,diagnosis", "imgs/n0.png,NORMAL"])
    result = runner.invoke(app, ["prepare", str(tmp_path), "--labels", str(table), "--out",
                                 str(tmp_path / "d.h5")])
    assert result.exit_code == 2
    assert "no path or label column" in one_error_line(result)


def test_patient_regex_groups_other_naming_conventions(tmp_path):
    src = tmp_path / "src"
    for cls, opacity in (("NORMAL", False), ("PNEUMONIA", True)):
        for p in range(4):
            for k in range(2):
                write_image(src / cls / f"scan_{cls[0]}{p}_view{k}.png",
                            make_synthetic_xray(64, seed=p * 2 + k, opacity=opacity))
    out = tmp_path / "d.h5"
    prepare_dataset(src, out, workers=1, val_fraction=0.25,
                    patient_regex=r"scan_([A-Z]\d+)_")
    with h5py.File(out) as h5:
        patients = h5["patient"].asstr()[:]
        split = h5["split"].asstr()[:]
    assert sorted(set(patients)) == ["N0", "N1", "N2", "N3", "P0", "P1", "P2", "P3"]
    assert not set(patients[split == "train"]) & set(patients[split == "val"])
    result = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "x.h5"),
                                 "--patient-regex", "scan_(["])
    assert result.exit_code == 2 and "--patient-regex" in one_error_line(result)


def test_format_1_datasets_are_still_read(examples_h5, tmp_path):
    old = tmp_path / "v1.h5"
    with h5py.File(examples_h5) as src, h5py.File(old, "w") as dst:
        for name in ("images", "labels", "split", "path", "patient", "roi", "source_shape"):
            src.copy(name, dst)
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        dst.attrs["format"] = "xrayfeat-dataset/1"
    info = open_dataset(old)
    assert info.classes == json.loads(h5py.File(examples_h5).attrs["classes"])
    assert len(load_split(old, "val").labels) == info.split_counts["val"]
