"""Training-speed benchmark: images/s and achieved GFLOP/s of the default model.

Measured in one run, on the same machine, so the ratios mean something even when the
absolute numbers drift:
- the machine's practical peak: a NumPy float32 matrix multiply, measured before and after
  the models (the higher of the two is used, so a slow moment cannot flatter the ratios);
- a plain ``model.fit`` on in-memory NumPy arrays (same model, same batch size, float32);
- xrayfeat's own training pipeline (seeded order, augmentation, class weights) in the
  default precision (``auto``: bfloat16 on CPUs with native bfloat16), fed from tensors
  already in memory, from the HDF5 file (held in RAM), and streamed from the HDF5 file (as
  for a dataset larger than the memory budget); and the same pipeline in float32.

Each variant runs in a fresh Python process as one ``fit`` call of ``--epochs + 1`` epochs,
timed per epoch by a callback; the first epoch (tracing, warm-up) is dropped. Variants are
interleaved over ``--rounds`` rounds and the median epoch of all rounds is reported. That
is how ``xrayfeat train`` runs (one process, one ``fit``). Two things this avoids, both
measured on this VM: calling ``fit`` again on a model made the later calls take a
near-constant 10.24 s per 32 steps (CPU half idle), a slowdown training never meets; and
in one process, identical pipelines timed one after another differed by 10 %.

FLOPs are counted from the layers (xrayfeat.model.forward_flops); a training step is
counted as 3x the forward pass (forward, plus backward for activations and weights).

    xrayfeat prepare ../shared/data/kermany_224/train --out data/k224.h5
    python bench/train.py --data data/k224.h5 [--images 1024] [--input-size 96]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def matmul_peak(n: int = 2048, reps: int = 8) -> float:
    """GFLOP/s of a float32 n x n matrix multiply (best of ``reps``)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def make_subset(src: Path, n: int, out: Path) -> Path:
    """A prepared dataset with ``n`` train rows of ``src`` (both classes) and 128 val rows."""
    import h5py

    with h5py.File(src, "r") as h5in, h5py.File(out, "w") as h5out:
        split = h5in["split"].asstr()[:]
        # Evenly spaced rows: the file is ordered by class, so a prefix would be one class.
        train_all, val_all = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
        train_rows = train_all[np.linspace(0, len(train_all) - 1, n).astype(int)]
        val_rows = val_all[np.linspace(0, len(val_all) - 1, min(128, len(val_all))).astype(int)]
        rows = np.sort(np.concatenate([train_rows, val_rows]))
        for name, ds in h5in.items():
            data = ds[:][rows] if name != "images" else np.stack([ds[r] for r in rows])
            kw = {"chunks": (1, *ds.shape[1:]), "compression": "gzip",
                  "compression_opts": 1} if name == "images" else {}
            h5out.create_dataset(name, data=data, dtype=ds.dtype, **kw)
        for key, value in h5in.attrs.items():
            h5out.attrs[key] = value
    return out


def time_epochs(model, data, epochs: int, **fit_args) -> list[float]:
    """Seconds of each epoch of one ``model.fit`` over ``epochs + 1`` epochs, the first
    (tracing and warm-up) excluded."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t0)

    timer = EpochTimer()
    model.fit(data, epochs=epochs + 1, verbose=0, shuffle=False, callbacks=[timer], **fit_args)
    return timer.seconds[1:]


VARIANTS = ("plain fit", "tensors", "HDF5 in RAM", "HDF5 streamed", "tensors, float32")


def run_variant(variant: str, data: Path, epochs: int, input_size: int | None) -> list[float]:
    """Seconds of each timed epoch of one variant (runs in its own process)."""
    import keras
    import tensorflow as tf

    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import load_split, open_dataset
    from xrayfeat.model import build_minivggnet, resolve_precision
    from xrayfeat.pipeline import make_train_dataset, pipeline_from_arrays
    from xrayfeat.training import class_weights

    config = TrainConfig(epochs=epochs + 1)
    if input_size:
        config.input_size = input_size
    precision = resolve_precision(config.precision)
    if variant in ("plain fit", "tensors, float32"):
        precision = "float32"
    info = open_dataset(data)
    arrays = load_split(data, "train")
    steps = int(np.ceil(len(arrays.labels) / config.batch_size))
    weights = class_weights(arrays.labels, 2)
    keras.utils.set_random_seed(0)
    model = build_minivggnet(2, input_size=config.input_size, stored_size=info.size,
                             precision=precision)
    model.compile(optimizer=keras.optimizers.AdamW(config.lr, weight_decay=config.weight_decay),
                  loss=keras.losses.CategoricalCrossentropy())
    if variant == "plain fit":  # in-memory NumPy arrays, no augmentation, no weights
        x = arrays.images[..., None].astype(np.float32)
        y = keras.utils.to_categorical(arrays.labels, 2)
        return time_epochs(model, x, epochs, y=y, batch_size=config.batch_size)
    if variant in ("tensors", "tensors, float32"):  # no file at all
        dataset, _ = pipeline_from_arrays(tf.constant(arrays.images),
                                          tf.constant(arrays.labels, tf.int32),
                                          config, 0, weights, 2)
    else:  # the HDF5 file, read into RAM (the default when it fits) or streamed from disk
        if variant == "HDF5 streamed":
            config.memory_budget_mb = 0
        dataset, _ = make_train_dataset(info, config, 0, weights, 2)
    return time_epochs(model, dataset, epochs, steps_per_epoch=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="a dataset from 'xrayfeat prepare' (224 px), e.g. of "
                             "../shared/data/kermany_224/train")
    parser.add_argument("--images", type=int, default=1024, help="train images per epoch")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all variants")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.data, args.epochs, args.input_size)))
        return

    import tensorflow as tf

    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import open_dataset
    from xrayfeat.model import build_minivggnet, forward_flops, resolve_precision

    config = TrainConfig()
    input_size = args.input_size or config.input_size
    precision = resolve_precision(config.precision)
    tmp = Path(tempfile.mkdtemp())
    data = make_subset(args.data, args.images, tmp / "subset.h5")
    n, stored = args.images, open_dataset(data).size
    flops_per_image = 3 * forward_flops(build_minivggnet(2, input_size=input_size,
                                                         stored_size=stored))
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, tensorflow {tf.__version__}, "
          f"numpy {np.__version__}")
    print(f"model: MiniVGGNet, input {input_size} px from {stored} px stored images, "
          f"batch {config.batch_size}; default precision here: {precision}; "
          f"{flops_per_image / 1e9:.3f} GFLOP per training image")
    print(f"{n} train images per epoch; {args.rounds} rounds x {args.epochs} timed epochs "
          f"per variant, each variant in its own process", flush=True)

    variants = [v for v in VARIANTS if not (v == "tensors, float32" and precision == "float32")]
    peaks = [matmul_peak()]
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            cmd = [sys.executable, __file__, "--data", str(data), "--variant", variant,
                   "--epochs", str(args.epochs)]
            if args.input_size:
                cmd += ["--input-size", str(args.input_size)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            epochs = json.loads(out.strip().splitlines()[-1])
            seconds[variant] += epochs
            print(f"  round {round_ + 1}, {variant}: "
                  f"{' '.join(f'{e:.2f}' for e in epochs)} s/epoch", flush=True)
        peaks.append(matmul_peak())
    peak = max(peaks)
    print(f"numpy float32 matmul peak: {', '.join(f'{p:.1f}' for p in peaks)} GFLOP/s "
          f"(before and after each round); using the highest, {peak:.1f}")

    label = {"plain fit": "plain fit, NumPy arrays, float32",
             "tensors": f"xrayfeat, {precision} (default), tensors in memory",
             "HDF5 in RAM": f"xrayfeat, {precision} (default), HDF5 file in RAM",
             "HDF5 streamed": f"xrayfeat, {precision} (default), HDF5 file streamed",
             "tensors, float32": "xrayfeat, float32, tensors in memory"}
    base = statistics.median(seconds["tensors"])
    print(f"\n{'variant':<48} {'s/epoch':>8} {'img/s':>7} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'vs tensors':>10}")
    for variant in variants:
        median = statistics.median(seconds[variant])
        rate = n / median
        gflops = rate * flops_per_image / 1e9
        print(f"{label[variant]:<48} {median:8.2f} {rate:7.1f} {gflops:8.1f} "
              f"{100 * gflops / peak:6.1f}% {median / base:9.3f}x")


if __name__ == "__main__":
    main()
