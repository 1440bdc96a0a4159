"""Safety: a run directory is data (loading one never runs code from it), damaged runs are
one-line errors, and file names derived from input names never escape the output folder."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import cv2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import make_synthetic_xray, one_error_line
from xrayfeat.filenames import MAX_STEM_BYTES, inside, safe_stem, unique_stems
from xrayfeat.cli import app
from xrayfeat.errors import RunError
from xrayfeat.runs import load_run

runner = CliRunner()


def copy_run(trained_run: Path, dest: Path) -> Path:
    shutil.copytree(trained_run, dest)
    return dest


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), make_synthetic_xray(96, seed=1))
    return path


# --------------------------------------------------------------------------- safe mode

def _lambda_model(marker: Path):
    """A small model whose Lambda layer would create ``marker`` if its code ever ran."""
    import keras

    where = str(marker)  # a closure cell Keras can serialise with the bytecode
    inputs = keras.Input((224, 224, 1))
    x = keras.layers.Lambda(lambda t: (open(where, "w").close(), t)[1], name="evil")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def test_lambda_layer_in_model_keras_is_refused_without_running_it(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    marker = tmp_path / "code_ran"
    _lambda_model(marker).save(run / "model.keras")
    marker.unlink(missing_ok=True)  # building and saving the model ran the lambda once
    with zipfile.ZipFile(run / "model.keras") as z:  # the crafted file really holds a Lambda
        assert "Lambda" in z.read("config.json").decode()

    with pytest.raises(RunError, match="Lambda.*safe mode"):
        load_run(run).load_model()
    assert not marker.exists()

    result = runner.invoke(app, ["predict", str(run), str(_image(tmp_path)), "--workers", "1"])
    line = one_error_line(result)
    assert "Lambda" in line and "safe mode" in line
    assert not marker.exists()
    for command in (["evaluate", str(run), str(tmp_path / "img.png")],
                    ["visualize-layers", str(run), str(tmp_path / "img.png"),
                     "--out", str(tmp_path / "viz")]):
        result = runner.invoke(app, command)
        assert "Lambda" in one_error_line(result)
    assert not marker.exists()


def _rewrite_config(src: Path, dest: Path, edit) -> None:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dest, "w") as out:
        for name in z.namelist():
            data = z.read(name)
            if name == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            out.writestr(name, data)


@pytest.mark.parametrize("gadget", ["os.system", "builtins.function"])
def test_model_config_naming_foreign_code_is_refused(trained_run, tmp_path, gadget):
    """A hand-crafted config.json inside model.keras that names a Python callable outside
    Keras (``os.system``; a Lambda whose function is a builtin) is refused, not imported."""
    run = copy_run(trained_run, tmp_path / "run")
    marker = tmp_path / "code_ran"

    def edit(config):
        layers = config["config"]["layers"]
        victim = next(i for i, layer in enumerate(layers) if layer["class_name"] == "Rescaling")
        inbound = layers[victim].get("inbound_nodes", [])
        if gadget == "os.system":
            layers[victim] = {"module": "os", "class_name": "system", "registered_name": None,
                              "config": {"command": f"touch {marker}"}, "name": "rescale",
                              "inbound_nodes": inbound}
        else:
            layers[victim] = {"module": "keras.layers", "class_name": "Lambda",
                              "registered_name": None, "name": "rescale",
                              "inbound_nodes": inbound,
                              "config": {"name": "rescale", "arguments": {},
                                         "function": {"module": "builtins",
                                                      "class_name": "function",
                                                      "config": "exec",
                                                      "registered_name": "function"}}}

    _rewrite_config(trained_run / "model.keras", run / "model.keras", edit)
    with pytest.raises(RunError, match="safe mode") as info:
        load_run(run).load_model()
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_model_keras_that_is_not_a_model_is_a_one_line_error(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "model.keras").write_bytes(b"PK\x03\x04 this is not a zip archive")
    result = runner.invoke(app, ["predict", str(run), str(_image(tmp_path)), "--workers", "1"])
    assert "cannot load" in one_error_line(result)


def test_run_directory_contents_are_never_unpickled(repo_root):
    """No pickle, no eval: the package reads runs with JSON and Keras' safe mode only."""
    for path in (repo_root / "xrayfeat").glob("*.py"):
        text = path.read_text()
        for banned in ("import pickle", "pickle.load", "allow_pickle=True", "joblib",
                       "eval(", "exec(", "safe_mode=False"):
            assert banned not in text, f"{path.name}: {banned}"


# --------------------------------------------------------------------------- damaged runs

def _damage(run: Path, name: str) -> None:
    config_path, validation_path = run / "config.json", run / "validation.json"
    config = json.loads(config_path.read_text())
    if name == "not_a_dict":
        config = ["NORMAL", "PNEUMONIA"]
    elif name == "no_classes":
        del config["classes"]
    elif name == "one_class":
        config["classes"] = ["NORMAL"]
    elif name == "model_classes_differ":
        config["classes"] = ["A", "B", "C"]
    elif name == "roi_settings_unknown_key":
        config["preprocess"]["roi_settings"]["__class__"] = 1
    elif name == "size_negative":
        config["preprocess"]["size"] = -5
    elif name == "size_text":
        config["preprocess"]["size"] = "224; rm -rf /"
    elif name == "threshold_text":
        validation_path.write_text(json.dumps({"threshold": "high"}))
    elif name == "config_not_json":
        config_path.write_text("{not json")
        return
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("damage", [
    "not_a_dict", "no_classes", "one_class", "model_classes_differ", "roi_settings_unknown_key",
    "size_negative", "size_text", "threshold_text", "config_not_json"])
def test_damaged_run_directory_is_a_one_line_error(trained_run, tmp_path, damage):
    run = copy_run(trained_run, tmp_path / "run")
    _damage(run, damage)
    result = runner.invoke(app, ["predict", str(run), str(_image(tmp_path)), "--workers", "1"])
    line = one_error_line(result)
    assert str(run) in line
    assert "retrain" in line or "restore" in line or "cannot read" in line


# --------------------------------------------------------------------------- file names

_path_text = st.lists(
    st.one_of(st.text(st.characters(codec="utf-8"), max_size=12),
              st.sampled_from(["/", "\\", ".", "..", "../", "..\\", "\n", "-", "~", "\u202e",
                               "\0", ":", " ", "CON", ".png", "x" * 120])),
    max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_path_text, min_size=1, max_size=6))
def test_file_names_from_any_input_path_stay_inside_the_output_folder(tmp_path_factory, paths):
    out = tmp_path_factory.getbasetemp() / "names_out"
    out.mkdir(exist_ok=True)
    stems = unique_stems(paths)
    assert len({s.casefold() for s in stems}) == len(stems)  # no two inputs share a file
    for path, stem in zip(paths, stems):
        assert stem == stem.strip() and stem not in ("", ".", "..")
        assert not stem.startswith((".", "-"))
        assert "/" not in stem and "\\" not in stem and "\0" not in stem
        assert len(safe_stem(path).encode()) <= MAX_STEM_BYTES
        for suffix in ("_gradcam.png", "_d4_block2_conv2.png", ""):
            name = stem + suffix
            assert len(name.encode()) <= 255
            target = inside(out, name)  # raises if the name would leave ``out``
            assert target.resolve().parent == out.resolve()


HOSTILE_NAMES = [
    "..jpeg", "...jpeg", "-rf.jpeg", "a\\..\\..\\escape.jpeg", "line\nbreak.jpeg",
    "name with spaces.jpeg", "肺 radiographie n°1.jpeg", "\u202egpj.exe.jpeg", "CON.jpeg",
    "[bold]markup[red].jpeg", "x" * 200 + ".jpeg", "UPPER.JPEG", "upper.jpeg",
]
VISUALIZED = ["..jpeg", "a\\..\\..\\escape.jpeg", "UPPER.JPEG", "upper.jpeg"]  # ~1 s each


@pytest.fixture()
def hostile_names_folder(tmp_path) -> Path:
    """Readable radiographs whose names try to escape, hide, inject markup or collide."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    for i, name in enumerate(HOSTILE_NAMES):
        cv2.imwrite(str(folder / "tmp.jpeg"), make_synthetic_xray(96, seed=i))
        os.replace(folder / "tmp.jpeg", folder / name)
    return folder


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_gradcam_and_layer_outputs_stay_inside_their_folders(trained_run, tmp_path,
                                                             hostile_names_folder):
    before = _all_files(tmp_path)
    cams = tmp_path / "cams"
    # Hidden files are skipped in folder walks: name the two dot-files explicitly.
    dot_files = [str(hostile_names_folder / n) for n in HOSTILE_NAMES if n.startswith(".")]
    result = runner.invoke(app, ["predict", str(trained_run), str(hostile_names_folder),
                                 *dot_files, "--out", str(tmp_path / "preds.csv"),
                                 "--gradcam", str(cams), "--workers", "1"])
    assert result.exit_code == 0, result.output
    written = sorted(cams.iterdir())
    assert len(written) == len(HOSTILE_NAMES)  # one each, none overwrote another
    assert all(p.is_file() and p.parent == cams and not p.name.startswith((".", "-"))
               for p in written)

    viz = tmp_path / "viz"
    some = [str(hostile_names_folder / n) for n in VISUALIZED]  # one folder of figures each
    result = runner.invoke(app, ["visualize-layers", str(trained_run), *some, "--out", str(viz),
                                 "--layer", "block1_conv1", "--max-channels", "4"])
    assert result.exit_code == 0, result.output
    folders = [p for p in viz.iterdir() if p.is_dir()]
    assert len(folders) == len(VISUALIZED)
    for p in viz.rglob("*"):
        assert p.resolve().is_relative_to(viz.resolve()), p

    new = _all_files(tmp_path) - before
    allowed = (cams, viz, tmp_path / "preds.csv")
    assert all(any(p == a or a in p.parents for a in allowed) for p in new), sorted(
        p for p in new if not any(p == a or a in p.parents for a in allowed))


def test_a_planted_symlink_in_the_output_folder_is_not_followed(trained_run, tmp_path):
    """Writing into a folder that holds a symlink named like an output never writes through
    it to the file it points at."""
    image = _image(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cams = tmp_path / "cams"
    cams.mkdir()
    (cams / "img_gradcam.png").symlink_to(victim)
    runner.invoke(app, ["predict", str(trained_run), str(image), "--out",
                        str(tmp_path / "p.csv"), "--gradcam", str(cams), "--workers", "1"])
    assert victim.read_text() == "precious"

    viz = tmp_path / "viz"
    outside = tmp_path / "outside"
    outside.mkdir()
    viz.mkdir()
    (viz / "img").symlink_to(outside, target_is_directory=True)
    runner.invoke(app, ["visualize-layers", str(trained_run), str(image), "--out", str(viz),
                        "--overwrite", "--layer", "block1_conv1", "--max-channels", "4"])
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- leftovers of kills

def test_temporaries_of_dead_processes_are_removed_and_nothing_else(tmp_path):
    import subprocess
    import sys

    from xrayfeat.atomic import _owner, remove_stale_temporaries, temporary_sibling

    host = _owner().rsplit("-", 1)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    final = tmp_path / "data.h5"
    final.write_bytes(b"the user's dataset")
    stale_file = tmp_path / f".data.h5.{host}-{dead.pid}.ab12.tmp.h5"
    stale_dir = tmp_path / f".data.h5.{host}-{dead.pid}.cd34.tmp.new"
    backup = tmp_path / f".data.h5.{host}-{dead.pid}.ef56.tmp.previous"  # maybe the only copy
    other_host = tmp_path / f".data.h5.someotherhost-{dead.pid}.gh78.tmp.h5"
    not_ours = tmp_path / f".data.h5.{host}-{dead.pid}.notes.txt"  # no .tmp: not a temporary
    for path in (stale_file, backup, other_host, not_ours):
        path.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "data.h5").write_bytes(b"x" * 1000)
    live = temporary_sibling(final, ".h5")  # this (live) process's own temporary

    removed = remove_stale_temporaries(tmp_path)

    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert not stale_file.exists() and not stale_dir.exists()
    for kept in (final, backup, other_host, not_ours, live):
        assert kept.exists(), kept
    assert final.read_bytes() == b"the user's dataset"


def test_outputs_get_the_umask_permissions_and_reading_the_umask_leaves_it_alone(tmp_path):
    import stat

    from xrayfeat.atomic import atomic_output, current_umask
    from xrayfeat.figures import atomic_savefig, plt

    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # reading it did not change it
        with atomic_output(tmp_path / "table.csv") as tmp:
            tmp.write_text("a,b\n")
        atomic_savefig(plt.figure(), tmp_path / "figure.png")
    finally:
        os.umask(previous)
    for name in ("table.csv", "figure.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("directory", [False, True])
def test_ctrl_c_while_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch, directory):
    """KeyboardInterrupt lands between mkstemp and the caller learning the name (here: as
    the umask is read): the half-made temporary goes, the previous output stays."""
    from xrayfeat import atomic

    final = tmp_path / "run"
    final.mkdir() if directory else final.write_text("previous")

    def ctrl_c() -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "current_umask", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_output(final, directory=directory):
            pytest.fail("the body must not run")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert final.is_dir() if directory else final.read_text() == "previous"
