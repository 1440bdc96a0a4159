"""Prediction benchmark: files/s end to end, forward-pass GFLOP/s, and memory vs N.

In one run, on the same machine:
- ``xrayfeat predict RUN FOLDER --out preds.csv`` as a subprocess on N and 4N files, with
  its peak memory (the parent's and each decoding worker's high-water mark);
- the loop notebooks use on the same N files: load the model once, then for each file
  ``cv2.imread`` + resize + ``model.predict`` on one image;
- the forward pass alone on in-memory batches, in GFLOP/s against a NumPy float32 matrix
  multiply measured in the same run;
- that forward pass in Keras against ONNX Runtime running the same run exported by
  ``xrayfeat export --format onnx`` (with the ``export`` extra).

    python bench/predict.py --run RUN [--n 500] [--source ../shared/data/kermany_224/train]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from train import matmul_peak  # noqa: E402

# Runs `xrayfeat predict` in this child and reports peak RSS of itself and its workers.
_CHILD = r"""
import resource, sys, threading, os, glob
from xrayfeat.cli import main
peak_workers = {}
def watch():
    import time
    while True:
        for status in glob.glob('/proc/[0-9]*/status'):
            try:
                text = open(status).read()
            except OSError:
                continue
            if f'PPid:\t{os.getpid()}\n' in text:
                for line in text.splitlines():
                    if line.startswith('VmHWM:'):
                        pid = status.split('/')[2]
                        peak_workers[pid] = max(peak_workers.get(pid, 0), int(line.split()[1]))
        time.sleep(0.2)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ['xrayfeat'] + sys.argv[1:]
try:
    main()
except SystemExit as e:
    code = e.code
print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
      sorted(v // 1024 for v in peak_workers.values()), file=sys.stderr)
"""


def link_folder(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        (folder / f"{i:05d}_{f.name}").symlink_to(f.resolve())
    return folder


def run_predict(run: Path, folder: Path, out: Path) -> tuple[float, int, list[int]]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, "predict", str(run), str(folder),
                           "--out", str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK")][-1]
    parent = int(line.split()[1])
    workers = [int(v) for v in line.split("[", 1)[1].rstrip("]").split(",") if v.strip()]
    return seconds, parent, workers


def notebook_loop(run: Path, files: list[Path]) -> float:
    """What a notebook does: one image at a time through model.predict."""
    import cv2

    from xrayfeat.runs import load_run

    t = time.perf_counter()
    r = load_run(run)
    model = r.load_model()
    size = r.preprocess.size
    for f in files:
        gray = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        x = cv2.resize(gray, (size, size)).astype(np.float32)[None, ..., None]
        model.predict(x, verbose=0)
    return time.perf_counter() - t


def forward_gflops(run: Path, batch: int = 64, reps: int = 5) -> tuple[float, float]:
    import tensorflow as tf

    from xrayfeat.model import forward_flops
    from xrayfeat.runs import load_run

    model = load_run(run).load_model()
    size = model.input_shape[1]
    x = tf.constant(np.random.default_rng(0).integers(0, 255, (batch, size, size, 1)),
                    tf.float32)
    model.predict_on_batch(x)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        model.predict_on_batch(x)
        best = min(best, time.perf_counter() - t)
    rate = batch / best
    return rate, rate * forward_flops(model) / 1e9


def backend_rates(run: Path, batch: int = 32, rounds: int = 7) -> dict:
    """Images/s of the forward pass on the same in-memory batches of stored images: Keras
    (what predict uses) against ONNX Runtime on the run exported with ``xrayfeat export``,
    interleaved rounds, medians; and the largest probability difference."""
    import onnxruntime as ort

    from xrayfeat.export import export_run
    from xrayfeat.runs import load_run

    model = load_run(run).load_model()
    size = model.input_shape[1]
    x = np.random.default_rng(0).integers(0, 255, (batch, size, size, 1)).astype(np.float32)
    folder = Path(tempfile.mkdtemp()) / "onnx"
    export_run(run, folder, "onnx")
    options = ort.SessionOptions()
    session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    contenders = {"keras": lambda: np.asarray(model.predict_on_batch(x)),
                  "onnxruntime": lambda: session.run(None, {name: x})[0]}
    outputs = {k: f() for k, f in contenders.items()}  # warm-up
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for key, forward in contenders.items():
            t = time.perf_counter()
            forward()
            times[key].append(time.perf_counter() - t)
    rates = {k: batch / float(np.median(v)) for k, v in times.items()}
    return {"rates": rates, "max_diff": float(np.abs(outputs["keras"] - outputs["onnxruntime"]).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--backends-only", action="store_true",
                        help="only the Keras vs ONNX Runtime forward-pass comparison")
    parser.add_argument("--source", type=Path,
                        default=ROOT.parent / "shared/data/kermany_224/train")
    args = parser.parse_args()
    try:
        backends = backend_rates(args.run)
    except ImportError:
        backends = None  # the export extra is not installed
    if backends:
        keras_rate, onnx_rate = backends["rates"]["keras"], backends["rates"]["onnxruntime"]
        print(f"forward pass, batches of 32 stored images, median of 7 interleaved rounds: "
              f"keras {keras_rate:.0f} img/s, onnxruntime {onnx_rate:.0f} img/s "
              f"({onnx_rate / keras_rate:.2f}x); largest probability difference "
              f"{backends['max_diff']:.1e}")
    else:
        print("onnxruntime not installed (pip install 'xrayfeat[export]'): no backend comparison")
    if args.backends_only:
        return
    files = sorted(args.source.rglob("*.jpeg"))
    if len(files) < 4 * args.n:
        sys.exit(f"need {4 * args.n} images in {args.source}, found {len(files)}")
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))[: 4 * args.n]]
    tmp = Path(tempfile.mkdtemp())
    small = link_folder(files[: args.n], tmp / "n")
    large = link_folder(files, tmp / "4n")

    peak = matmul_peak()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores; run {args.run}")
    print(f"numpy float32 matmul peak: {peak:.1f} GFLOP/s")
    img_s, gflops = forward_gflops(args.run)
    print(f"forward pass, batches of 64 in memory: {img_s:.0f} img/s, {gflops:.1f} GFLOP/s = "
          f"{100 * gflops / peak:.0f}% of the matmul peak")

    s_n, parent_n, workers_n = run_predict(args.run, small, tmp / "n.csv")
    s_4n, parent_4n, workers_4n = run_predict(args.run, large, tmp / "4n.csv")
    loop = notebook_loop(args.run, files[: args.n])
    print(f"\n{'':<34} {'files':>6} {'s':>7} {'files/s':>8} {'parent MB':>10} {'workers MB':>12}")
    print(f"{'per-image notebook loop':<34} {args.n:>6} {loop:7.1f} {args.n / loop:8.1f}")
    print(f"{'xrayfeat predict':<34} {args.n:>6} {s_n:7.1f} {args.n / s_n:8.1f} {parent_n:>10} "
          f"{'+'.join(map(str, workers_n)):>12}")
    print(f"{'xrayfeat predict':<34} {4 * args.n:>6} {s_4n:7.1f} {4 * args.n / s_4n:8.1f} "
          f"{parent_4n:>10} {'+'.join(map(str, workers_4n)):>12}")
    total_n, total_4n = parent_n + sum(workers_n), parent_4n + sum(workers_4n)
    print(f"\nspeed-up vs the per-image loop (N files, start-up included): {loop / s_n:.1f}x; "
          f"at 4N: {(4 * args.n / s_4n) / (args.n / loop):.1f}x")
    print(f"peak memory 4N vs N: parent {100 * (parent_4n / parent_n - 1):+.1f}%, "
          f"parent+workers {100 * (total_4n / total_n - 1):+.1f}%")


if __name__ == "__main__":
    main()
