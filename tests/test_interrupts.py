"""Faults: Ctrl-C, kill -9, a full disk and a read-only folder, in real processes.

``prepare``, ``train`` and ``predict`` run as subprocesses (``python -m xrayfeat``) and get
SIGINT or SIGKILL at a random (seeded) moment after they have started writing. Then:
the previous output is intact, nothing partial is under the final name, temporary files
are gone after SIGINT (exit 130), and ``train --resume`` / ``predict --skip-done`` finish
the job with the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import pytest
from typer.testing import CliRunner

from conftest import make_class_folder_at, make_synthetic_xray
from xrayfeat.cli import app
from xrayfeat.config import TrainConfig
from xrayfeat.dataset import open_dataset, prepare_dataset
from xrayfeat.prediction import predict
from xrayfeat.runs import load_model_safely, load_run
from xrayfeat.training import train

runner = CliRunner()
# Epochs of ~0.2 s on 2 cores: eight leave seconds of work after the first is saved, so a
# signal sent up to 0.4 s later lands in training even on a machine several times faster.
TRAIN_ARGS = {"input_size": 32, "epochs": 8, "batch_size": 4, "width": 0.25}
#: Early stopping off, so the run trains all its epochs whatever its dropout masks draw (the
#: examples' small validation split can reach AUC 1.0 in the first epoch); a config file's
#: setting, as the command line has no flag for it.
NO_EARLY_STOP = {"early_stopping_patience": 100}


# --------------------------------------------------------------------------- helpers

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(folder: Path) -> list[str]:
    """Hidden write-then-rename temporaries (``.NAME.xxxx.tmp...``) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def start(args: list[str], logs: Path) -> subprocess.Popen:
    """``python -m xrayfeat ARGS`` with stdout/stderr to files (a full pipe would block it)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "xrayfeat", *args],
                            stdout=open(logs / "stdout.txt", "wb"),
                            stderr=open(logs / "stderr.txt", "wb"),
                            stdin=subprocess.DEVNULL, env=env, preexec_fn=_ctrl_c_reaches_it)


def _ctrl_c_reaches_it() -> None:
    """Undo an inherited "ignore SIGINT" in the child (a test suite started in the
    background by a non-interactive shell, as CI may be), as a terminal user has it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll ``condition`` until true; fail if the process exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if condition():
                return
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before the marker")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for the marker")


def interrupt(proc: subprocess.Popen, sig: int, delay: float, logs: Path) -> int:
    """Send ``sig`` after ``delay`` seconds and return the exit status (nothing hangs)."""
    time.sleep(delay)
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command did not stop after the signal")
    if sig == signal.SIGINT:
        stderr = (logs / "stderr.txt").read_text(errors="replace")
        assert code == 130, (code, stderr[-2000:])
        assert "Traceback" not in stderr and "interrupted" in stderr
    else:
        assert code == -signal.SIGKILL, code
    return code


SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGKILL, id="SIGKILL")]


# --------------------------------------------------------------------------- prepare

@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """400 synthetic radiographs (320 px): 1.5-4 s of prepare with one worker."""
    root = tmp_path_factory.mktemp("big") / "src"
    for c, opacity in (("NORMAL", False), ("PNEUMONIA", True)):
        (root / c).mkdir(parents=True)
        for i in range(200):
            cv2.imwrite(str(root / c / f"IM-{i:04d}-{c}.jpeg"),
                        make_synthetic_xray(320, seed=i, opacity=opacity))
    return root


@pytest.fixture(scope="module")
def big_folder_size(big_folder, tmp_path_factory) -> int:
    """Bytes of the finished dataset of ``big_folder``: interrupts aim at a share of it."""
    out = tmp_path_factory.mktemp("big_size") / "data.h5"
    prepare_dataset(big_folder, out, workers=1)
    return out.stat().st_size


@pytest.mark.parametrize("sig", SIGNALS)
def test_interrupted_prepare_keeps_the_previous_dataset(tmp_path, big_folder, big_folder_size,
                                                        sig):
    out = tmp_path / "data.h5"
    prepare_dataset(make_class_folder_at(tmp_path / "small", n_per_class=6, size=64), out,
                    workers=1, val_fraction=0.5)
    previous = sha256(out)
    logs = tmp_path / "logs"
    proc = start(["prepare", str(big_folder), "--out", str(out), "--overwrite",
                  "--workers", "1"], logs)
    # The signal goes when the temporary holds a random (seeded) 10-40 % of the finished
    # dataset: mid-write however fast the machine (a fixed delay once landed after the end).
    written = big_folder_size * random.Random(f"prepare-{sig}").uniform(0.1, 0.4)
    wait_until(lambda: any(p.stat().st_size > written for p in tmp_path.iterdir()
                           if p.name.startswith(".data.h5.")), proc)
    interrupt(proc, sig, 0.0, logs)

    assert sha256(out) == previous  # the previous version, byte for byte
    assert open_dataset(out).split_counts == {"train": 6, "val": 6}
    left = temporaries(tmp_path)
    if sig == signal.SIGINT:
        assert left == []
    else:  # a kill cannot clean up, but its leftovers are hidden temporaries only
        assert all(name.startswith(".data.h5.") for name in left), left

    if sig == signal.SIGKILL:  # the next run finishes, and removes the killed run's leftovers
        result = prepare_dataset(big_folder, out, workers=1, overwrite=True)
        assert sum(sum(c.values()) for c in result.counts.values()) == 400
        assert temporaries(tmp_path) == []


def _spawned_workers(parent: int) -> list[int]:
    """Process ids of the multiprocessing workers ``parent`` spawned (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def test_a_killed_worker_costs_only_its_own_chunk(tmp_path, big_folder, big_folder_size):
    """kill -9 of one decoding worker (what the OOM killer or a decoder segfault does):
    the run notices at once, reruns the lost chunks, and finishes with every image."""
    out = tmp_path / "data.h5"
    logs = tmp_path / "logs"
    proc = start(["prepare", str(big_folder), "--out", str(out), "--workers", "2", "--isolate"],
                 logs)
    # Mid-run: a tenth of the dataset written, both workers busy with chunks in flight.
    wait_until(lambda: any(p.stat().st_size > big_folder_size // 10 for p in tmp_path.iterdir()
                           if p.name.startswith(".data.h5.") and ".tmp" in p.name), proc)
    victim = _spawned_workers(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("prepare hung after a worker was killed")
    stderr = (logs / "stderr.txt").read_text(errors="replace")
    assert code == 0, stderr[-2000:]
    assert time.monotonic() - killed_at < 60
    with h5py.File(out) as h5:
        assert len(h5["labels"]) == 400  # the lost chunks were prepared again
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------- train

@pytest.fixture(scope="module")
def reference_history(examples_h5, tmp_path_factory) -> list[dict]:
    """An uninterrupted run with the settings the interrupted ones use."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return train(examples_h5, out, TrainConfig(**TRAIN_ARGS, **NO_EARLY_STOP)).history


def _history_csv(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _check_run_consistent(run: Path) -> int:
    """Every file under its final name is complete; returns the finished epochs."""
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] >= 1
    assert len(state["history"]) == state["epoch"]
    rows = _history_csv(run)
    assert len(rows) in (state["epoch"], state["epoch"] + 1)  # state.json is written last
    assert json.loads((run / "config.json").read_text())["classes"] == ["NORMAL", "PNEUMONIA"]
    for name in ("model.keras", "last.keras"):
        load_model_safely(run / name)  # a whole model, never half a zip
    return state["epoch"]


@pytest.mark.parametrize("sig", SIGNALS)
def test_interrupted_train_resumes_to_the_same_history(examples_h5, tmp_path,
                                                       reference_history, sig):
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    settings = tmp_path / "settings.toml"
    settings.write_text("[train]\n" + "".join(f"{k} = {v}\n" for k, v in NO_EARLY_STOP.items()))
    proc = start(["train", str(examples_h5), "--out", str(run), "--config", str(settings),
                  *(f"--{k.replace('_', '-')}={v}" for k, v in TRAIN_ARGS.items())], logs)
    # A random (seeded) point after the first epoch has been saved: epochs take a fraction
    # of a second here, so this lands in the second or third epoch or while one is saved.
    wait_until(lambda: (run / "state.json").is_file(), proc, timeout=300)
    interrupt(proc, sig, random.Random(f"train-{sig}").uniform(0.0, 0.4), logs)

    _check_run_consistent(run)
    if sig == signal.SIGINT:
        assert temporaries(run) == [] and temporaries(tmp_path) == []
    else:
        assert all(name.startswith(".") for name in temporaries(run))

    resumed = train(examples_h5, run, TrainConfig(**TRAIN_ARGS), resume=True)
    assert temporaries(run) == []  # a killed save's leftovers went with the next save
    assert resumed.epochs_run == TRAIN_ARGS["epochs"]
    assert len(resumed.history) == len(reference_history)
    for got, want in zip(resumed.history, reference_history):
        assert got["epoch"] == want["epoch"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
        assert got["val_auc"] == pytest.approx(want["val_auc"], abs=1e-6)
    rows = _history_csv(run)
    assert [float(r["loss"]) for r in rows] == pytest.approx(
        [h["loss"] for h in reference_history], rel=1e-4)
    load_run(run).load_model()


# --------------------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def incoming(tmp_path_factory) -> Path:
    """300 small radiographs: a few seconds of predict in batches of 8."""
    folder = tmp_path_factory.mktemp("incoming") / "scans"
    folder.mkdir()
    for i in range(300):
        cv2.imwrite(str(folder / f"scan{i:04d}.png"), make_synthetic_xray(160, seed=i, noise=3))
    return folder


@pytest.fixture(scope="module")
def reference_predictions(trained_run, incoming, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("reference_predictions") / "preds.csv"
    predict(trained_run, [str(incoming)], out=out, batch_size=8, workers=1)
    return out.read_bytes()


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_predict_skip_done_resumes_to_the_same_output(trained_run, incoming, tmp_path,
                                                             reference_predictions):
    out = tmp_path / "preds.csv"
    logs = tmp_path / "logs"
    proc = start(["predict", str(trained_run), str(incoming), "--out", str(out), "--skip-done",
                  "--batch-size", "8", "--workers", "1"], logs)
    wait_until(lambda: _lines(out) >= 1 + 8, proc)  # the header and a first batch
    interrupt(proc, signal.SIGKILL, random.Random("predict-kill").uniform(0.0, 1.0), logs)
    done = _lines(out) - 1
    assert 8 <= done < 300, done  # killed mid-way, with whole batches in the journal

    summary = predict(trained_run, [str(incoming)], out=out, skip_done=True, batch_size=8,
                      workers=1)
    assert summary.skipped_done == done
    assert out.read_bytes() == reference_predictions


def test_ctrl_c_in_predict_keeps_the_previous_output(trained_run, incoming, tmp_path):
    sig = signal.SIGINT
    out = tmp_path / "preds.csv"
    out.write_text("path,label\nprevious,run\n")
    previous = sha256(out)
    logs = tmp_path / "logs"
    proc = start(["predict", str(trained_run), str(incoming), "--out", str(out),
                  "--batch-size", "8", "--workers", "1"], logs)
    wait_until(lambda: any(p.stat().st_size > 2000 for p in tmp_path.iterdir()
                           if p.name.startswith(".preds.csv.")), proc)
    interrupt(proc, sig, random.Random(f"predict-{sig}").uniform(0.0, 1.0), logs)
    assert sha256(out) == previous
    assert temporaries(tmp_path) == []


# --------------------------------------------------------------------------- full disk, read-only

@contextlib.contextmanager
def small_disk(path: Path, size: str = "256k", read_only: bool = False):
    """A tiny tmpfs at ``path`` (root only; the test is skipped where mounting fails)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _commands(disk: Path, trained_run: Path, examples_h5: Path, examples_dir: Path) -> dict:
    image = next(iter(sorted((examples_dir / "test" / "NORMAL").iterdir())))
    return {
        "prepare": ["prepare", str(examples_dir), "--out", str(disk / "data.h5"),
                    "--workers", "1"],
        "train": ["train", str(examples_h5), "--out", str(disk / "run"), "--epochs", "1",
                  "--input-size", "32", "--width", "0.25"],
        "evaluate": ["evaluate", str(trained_run), str(examples_h5), "--out",
                     str(disk / "report"), "--bootstrap", "0"],
        "predict": ["predict", str(trained_run), str(examples_dir), "--out",
                    str(disk / "preds.csv"), "--workers", "1"],
        "visualize-layers": ["visualize-layers", str(trained_run), str(image), "--out",
                             str(disk / "grids"), "--max-channels", "4"],
    }


def _partial_files(disk: Path) -> list[Path]:
    """Temporaries, and files that do not parse as what their name says."""
    bad = []
    for p in disk.rglob("*"):
        if p.name.startswith(".") or ".tmp" in p.name:
            bad.append(p)
        elif p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except ValueError:
                bad.append(p)
        elif p.suffix == ".h5":
            try:
                with h5py.File(p, "r"):
                    pass
            except OSError:
                bad.append(p)
        elif p.suffix == ".png" and cv2.imread(str(p)) is None:
            bad.append(p)
    return bad


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "predict",
                                     "visualize-layers"])
def test_full_disk_is_a_one_line_error_with_nothing_partial(tmp_path, trained_run, examples_h5,
                                                             examples_dir, command):
    with small_disk(tmp_path / "disk", size="256k") as disk:
        (disk / "filler").write_bytes(b"\0" * 254_000)  # one 4 KB page stays free
        args = _commands(disk, trained_run, examples_h5, examples_dir)[command]
        result = runner.invoke(app, args)
        line = _one_error_line(result)
        assert "No space left on device" in line and "free some space" in line
        assert _partial_files(disk) == []


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "predict",
                                     "visualize-layers"])
def test_read_only_folder_is_a_one_line_error(tmp_path, trained_run, examples_h5, examples_dir,
                                              command):
    with small_disk(tmp_path / "disk", read_only=True) as disk:
        args = _commands(disk, trained_run, examples_h5, examples_dir)[command]
        line = _one_error_line(runner.invoke(app, args))
        assert "Read-only file system" in line
        assert list(disk.iterdir()) == []


def test_full_disk_prepare_in_a_real_process_exits_2(tmp_path, examples_dir):
    """HDF5 cannot close a file on a full disk; that once crashed the interpreter at exit
    (a segfault after the error line). The exit status must be the documented 2."""
    with small_disk(tmp_path / "disk", size="1m") as disk:
        (disk / "filler").write_bytes(b"\0" * 600_000)
        proc = subprocess.run([sys.executable, "-m", "xrayfeat", "prepare", str(examples_dir),
                               "--out", str(disk / "data.h5"), "--workers", "1"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines == [f"error: cannot write {disk / 'data.h5'}: No space left on device "
                         "(free some space or write to another disk)"]
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


# --------------------------------------------------------------------------- output locks

HOLD_LOCK = """
import sys, time
from xrayfeat.atomic import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def lock_holder():
    """Start a real process that holds the output lock on a path until killed."""
    procs = []

    def hold(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_writer_of_the_same_output_is_refused(lock_holder, trained_run, examples_h5,
                                                       examples_dir, tmp_path):
    from typer.testing import CliRunner

    from xrayfeat.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    holder = lock_holder(run)
    result = runner.invoke(app, ["train", str(examples_h5), "--out", str(run), "--epochs", "1"])
    assert result.exit_code == 2
    assert "being written by another xrayfeat command" in result.output
    assert not run.exists()
    preds = tmp_path / "p.csv"
    lock_holder(preds)
    result = runner.invoke(app, ["predict", str(trained_run), str(examples_dir / "val"),
                                 "--out", str(preds), "--skip-done", "--workers", "1"])
    assert result.exit_code == 2 and not preds.exists()
    # A killed holder releases its lock: the kernel drops it with the process.
    holder.kill()
    holder.wait()
    result = runner.invoke(app, ["train", str(examples_h5), "--out", str(run), "--epochs", "1",
                                 "--input-size", "32", "--width", "0.25"])
    assert result.exit_code == 0, result.output
    assert (run / "model.keras").is_file()
    assert not (tmp_path / ".run.lock").exists()  # the lock file goes with the lock


def test_a_ctrl_c_python_dropped_still_keeps_the_previous_output(tmp_path):
    """Python drops a KeyboardInterrupt raised inside a ``__del__``; the handler the
    commands install also sets a flag, and no output is put in place once it is set."""
    from xrayfeat.atomic import INTERRUPTED, atomic_output

    out = tmp_path / "result.txt"
    out.write_text("previous")
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_output(out) as tmp:
                tmp.write_text("new")
                INTERRUPTED.set()  # what the handler does before raising (dropped here)
    finally:
        INTERRUPTED.clear()
    assert out.read_text() == "previous"
    assert temporaries(tmp_path) == []
