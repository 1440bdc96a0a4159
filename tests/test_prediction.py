"""predict: every file gets one row, stable order, formats, shards, --skip-done, errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import EXAMPLES_DIR
from xrayfeat.cli import app
from xrayfeat.errors import UsageError
from xrayfeat.prediction import columns, expand_inputs, in_shard, parse_shard, predict

runner = CliRunner()


@pytest.fixture()
def mixed_folder(tmp_path) -> Path:
    """Six real radiographs (one with spaces and non-ASCII in its name), a broken file and
    a text file that claims to be a JPEG, in nested folders."""
    folder = tmp_path / "incoming"
    sources = sorted((EXAMPLES_DIR / "test").rglob("*.jpeg"))[:6]
    for i, src in enumerate(sources):
        name = f"radiographie n°{i}.jpeg" if i == 0 else src.name
        dest = folder / ("nested" if i % 2 else "") / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (folder / "broken.jpeg").write_bytes(sources[0].read_bytes()[:400])
    (folder / "notes.JPG").write_text("not an image")
    (folder / "README.txt").write_text("ignored: not an image extension")
    return folder


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_every_file_gets_one_row_in_stable_order(trained_run, mixed_folder, tmp_path):
    out = tmp_path / "preds.csv"
    summary = predict(trained_run, [str(mixed_folder)], out=out, workers=1)
    rows = _read_csv(out)
    assert list(rows[0]) == columns(["NORMAL", "PNEUMONIA"])
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert len(rows) == 8 and summary.predicted == 6 and summary.errors == 2
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert "truncated" in errors["broken.jpeg"]
    assert "not an image" in errors["notes.JPG"]
    for row in rows:
        if not row["error"]:
            p = float(row["probability"])
            assert row["label"] == ("PNEUMONIA" if p >= float(row["threshold"]) else "NORMAL")
            assert float(row["prob_NORMAL"]) + float(row["prob_PNEUMONIA"]) == pytest.approx(
                1, abs=1e-4)


def test_jsonl_and_json_formats_from_extension(trained_run, mixed_folder, tmp_path):
    predict(trained_run, [str(mixed_folder)], out=tmp_path / "p.jsonl", workers=1)
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all("path" in json.loads(line) for line in lines)
    predict(trained_run, [str(mixed_folder)], out=tmp_path / "p.json", workers=1)
    assert len(json.loads((tmp_path / "p.json").read_text())) == 8


def test_same_labels_as_evaluate_on_the_same_folder(trained_run, tmp_path):
    """One preprocessing path: predict and evaluate agree file by file."""
    from xrayfeat.evaluation import evaluate_runs

    out = tmp_path / "p.csv"
    predict(trained_run, [str(EXAMPLES_DIR / "test")], out=out, workers=1)
    predicted = {r["path"]: r["label"] for r in _read_csv(out)}
    evaluate_runs([trained_run], EXAMPLES_DIR, split="test", out=tmp_path / "ev", n_boot=0)
    evaluated = {r["path"]: r["predicted_label"] for r in _read_csv(tmp_path / "ev" / "predictions.csv")}
    assert predicted == evaluated


def test_shards_are_disjoint_and_cover_everything(mixed_folder):
    paths = expand_inputs([str(mixed_folder)])
    shards = [[p for p in paths if in_shard(p, (i, 3))] for i in (1, 2, 3)]
    assert sorted(sum(shards, []), key=str) == paths
    assert sum(len(s) for s in shards) == len(set(map(str, sum(shards, []))))
    with pytest.raises(UsageError):
        parse_shard("0/3")
    with pytest.raises(UsageError):
        parse_shard("two/3")


def test_globs_files_and_folders_mix(mixed_folder):
    paths = expand_inputs([str(mixed_folder / "nested"), str(mixed_folder / "*.jpeg"),
                           str(mixed_folder / "broken.jpeg")])
    names = [p.name for p in paths]
    assert len(names) == len(set(paths))  # no duplicates
    assert "broken.jpeg" in names
    with pytest.raises(UsageError, match="matches no file"):
        expand_inputs([str(mixed_folder / "nope*.png")])


def test_skip_done_resumes_to_the_same_output(trained_run, mixed_folder, tmp_path):
    full = tmp_path / "full.csv"
    predict(trained_run, [str(mixed_folder)], out=full, workers=1)
    part = tmp_path / "part.csv"
    # An interrupted journal: the header, the first three rows and half of the fourth.
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][:10], encoding="utf-8")
    summary = predict(trained_run, [str(mixed_folder)], out=part, skip_done=True, workers=1)
    assert summary.skipped_done == 3
    assert part.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")


def test_the_summary_names_its_output_on_one_line_however_long_the_path(trained_run,
                                                                          mixed_folder,
                                                                          tmp_path):
    # Off a terminal lines are drawn 240 columns wide: a longer path must not be wrapped
    # in the middle of a message a script or a log search reads.
    deep = tmp_path.joinpath(*[f"folder-{k:02d}-of-a-hospital-export" for k in range(8)])
    deep.mkdir(parents=True)
    out = deep / "p.csv"
    assert len(str(out)) > 260
    for _ in range(2):  # the second run finds every file already done
        result = runner.invoke(app, ["predict", str(trained_run), str(mixed_folder),
                                     "--out", str(out), "--skip-done", "--workers", "1"])
        assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert any(line.startswith("predicted 0 file(s)") and line.endswith(f"-> {out}")
               for line in lines), lines
    assert any(line.endswith(f"already in {out} were skipped") for line in lines), lines


def test_cli_exit_codes_and_strict(trained_run, mixed_folder, tmp_path):
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(trained_run), str(mixed_folder), "--out",
                                 str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "could not be read" in result.output
    strict = runner.invoke(app, ["predict", str(trained_run), str(mixed_folder), "--out",
                                 str(tmp_path / "s.csv"), "--strict", "--workers", "1"])
    assert strict.exit_code == 1
    missing = runner.invoke(app, ["predict", str(tmp_path / "norun"), str(mixed_folder)])
    assert missing.exit_code == 2
    assert "does not exist" in missing.output and "Traceback" not in missing.output


@pytest.mark.parametrize("args", [[], ["--out", "-"]])
def test_without_out_every_row_goes_to_stdout_as_csv(trained_run, args):
    """Off a terminal (a pipe, a script, CliRunner) rows are CSV on stdout, whole: no table,
    so nothing depends on the terminal's width."""
    result = runner.invoke(app, ["predict", str(trained_run), str(EXAMPLES_DIR / "val"),
                                 "--workers", "1", *args])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 12
    assert {Path(r["path"]).parent.name for r in rows} == {"NORMAL", "PNEUMONIA"}
    assert all(Path(r["path"]).is_file() for r in rows)  # full paths, never cut
    assert "predicted 12 file(s)" in result.stderr


def test_stdout_takes_every_format(trained_run):
    jsonl = runner.invoke(app, ["predict", str(trained_run), str(EXAMPLES_DIR / "val"),
                                "--workers", "1", "--format", "jsonl"])
    assert len([json.loads(line)["label"] for line in jsonl.stdout.splitlines()]) == 12
    whole = runner.invoke(app, ["predict", str(trained_run), str(EXAMPLES_DIR / "val"),
                                "--workers", "1", "--format", "json", "--out", "-"])
    assert len(json.loads(whole.stdout)) == 12


def test_gradcam_overlays_one_per_readable_input(trained_run, mixed_folder, tmp_path):
    cams = tmp_path / "cams"
    predict(trained_run, [str(mixed_folder)], out=tmp_path / "p.csv", gradcam_dir=cams,
            workers=1, batch_size=4)
    written = sorted(p.name for p in cams.iterdir())
    assert len(written) == 6 and all(n.endswith("_gradcam.png") for n in written)


def test_a_padded_run_is_seen_padded_by_predict(tmp_path):
    """--resize pad travels from the dataset into the run, and predict pads raw files the
    same way: its probabilities equal evaluate's on the stored (padded) images."""
    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import prepare_dataset
    from xrayfeat.evaluation import evaluate_runs
    from xrayfeat.preprocessing import PreprocessSettings
    from xrayfeat.runs import load_run
    from xrayfeat.training import train

    data = tmp_path / "pad.h5"
    prepare_dataset(EXAMPLES_DIR, data, settings=PreprocessSettings(resize="pad"), workers=1,
                    val_fraction=0.25, seed=1)
    run = tmp_path / "run"
    train(data, run, TrainConfig(input_size=32, epochs=1, batch_size=16, width=0.25))
    assert load_run(run).preprocess.resize == "pad"
    predict(run, [str(EXAMPLES_DIR / "test")], out=tmp_path / "p.csv", workers=1)
    predicted = {r["path"]: float(r["probability"]) for r in _read_csv(tmp_path / "p.csv")}
    evaluate_runs([run], data, split="test", out=tmp_path / "ev", n_boot=0)
    stored = {r["path"]: float(r["probability"])
              for r in _read_csv(tmp_path / "ev" / "predictions.csv")}
    assert len(stored) == len(predicted) > 0
    for path, p in stored.items():
        assert predicted[str(Path(path).resolve())] == pytest.approx(p, abs=1e-5), path
