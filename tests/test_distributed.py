"""Scale-out: two MultiWorkerMirroredStrategy workers on 127.0.0.1, as real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_two_workers_train_one_run(examples_h5: Path, tmp_path: Path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    run = tmp_path / "run"
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster,
                                                     "task": {"type": "worker", "index": index}}),
                   TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "xrayfeat", "train", str(examples_h5), "--out", str(run),
             "--strategy", "multi-worker", "--epochs", "2", "--input-size", "32",
             "--batch-size", "16", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-2000:]
    # Both finished the same training; only the chief (worker 0) wrote --out.
    reports = [json.loads(out) for out, _ in results]
    assert reports[0]["epochs_run"] == reports[1]["epochs_run"] == 2
    assert reports[0]["run"] == str(run)
    assert reports[1]["run"] != str(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (run / "model.keras").is_file() and (run / "validation.json").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["strategy"] == "multi-worker"
