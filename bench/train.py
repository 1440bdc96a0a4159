"""Training-speed benchmark: images/s and achieved GFLOP/s of the default model.

Measured in one run, on the same machine, so the ratios mean something even when the
absolute numbers drift:
- the machine's practical peak: a NumPy float32 matrix multiply;
- a plain ``model.fit`` on in-memory NumPy arrays (same model, same batch size);
- xrayfeat's own training pipeline (seeded order, augmentation, class weights) fed from
  tensors already in memory, from the HDF5 file (held in RAM), and streamed from the
  HDF5 file (as for a dataset larger than the memory budget).

FLOPs are counted from the layers (xrayfeat.model.forward_flops); a training step is
counted as 3x the forward pass (forward, plus backward for activations and weights).

    xrayfeat prepare ../shared/data/kermany_224/train --out data/k224.h5
    python bench/train.py --data data/k224.h5 [--images 1024] [--input-size 96]
"""

from __future__ import annotations

import argparse
import os
import platform
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


def time_epochs(model, dataset, steps: int, epochs: int = 2) -> float:
    """Seconds per epoch of ``model.fit`` (first epoch excluded: tracing and warm-up)."""
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    t = time.perf_counter()
    model.fit(dataset, epochs=epochs, steps_per_epoch=steps, verbose=0, shuffle=False)
    return (time.perf_counter() - t) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="a dataset from 'xrayfeat prepare' (224 px), e.g. of "
                             "../shared/data/kermany_224/train")
    parser.add_argument("--images", type=int, default=1024, help="train images per epoch")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per variant")
    parser.add_argument("--policy", default="float32",
                        help="Keras dtype policy to try, e.g. mixed_bfloat16 (not the default "
                             "recipe: an experiment for CPUs with AVX512_BF16)")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(args.policy)

    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import load_split, open_dataset
    from xrayfeat.model import build_minivggnet, forward_flops
    from xrayfeat.training import class_weights, make_train_dataset, pipeline_from_arrays

    config = TrainConfig(epochs=1000)
    if args.input_size:
        config.input_size = args.input_size
    tmp = Path(tempfile.mkdtemp())
    data = make_subset(args.data, args.images, tmp / "subset.h5")
    info = open_dataset(data)
    arrays = load_split(data, "train")
    n = len(arrays.labels)
    steps = int(np.ceil(n / config.batch_size))
    weights = class_weights(arrays.labels, 2)

    def fresh_model():
        keras.utils.set_random_seed(0)
        model = build_minivggnet(2, input_size=config.input_size, stored_size=info.size)
        model.compile(optimizer=keras.optimizers.AdamW(config.lr, weight_decay=config.weight_decay),
                      loss=keras.losses.CategoricalCrossentropy())
        return model

    flops_per_image = 3 * forward_flops(fresh_model())
    peak = matmul_peak()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, tensorflow {tf.__version__}, "
          f"numpy {np.__version__}")
    print(f"model: MiniVGGNet, input {config.input_size} px from {info.size} px stored images, "
          f"batch {config.batch_size}, dtype policy {args.policy}; "
          f"{flops_per_image / 1e9:.3f} GFLOP per training image")
    print(f"{n} train images per epoch, {args.epochs} timed epochs per variant")
    print(f"numpy float32 matmul peak: {peak:.1f} GFLOP/s")

    results = {}
    # Baseline: plain fit on in-memory NumPy arrays, no augmentation, no weights.
    x = arrays.images[..., None].astype(np.float32)
    y = keras.utils.to_categorical(arrays.labels, 2)
    model = fresh_model()
    model.fit(x, y, batch_size=config.batch_size, epochs=1, verbose=0)
    t = time.perf_counter()
    model.fit(x, y, batch_size=config.batch_size, epochs=args.epochs, verbose=0)
    results["plain fit, NumPy arrays in memory"] = (time.perf_counter() - t) / args.epochs

    # xrayfeat's pipeline, from tensors already in memory (no file at all).
    images_t, labels_t = tf.constant(arrays.images), tf.constant(arrays.labels, tf.int32)
    mem_ds, _ = pipeline_from_arrays(images_t, labels_t, config, 0, weights, 2)
    results["xrayfeat pipeline, tensors in memory"] = time_epochs(fresh_model(), mem_ds, steps,
                                                                  args.epochs)
    # xrayfeat's pipeline from the HDF5 file, held in RAM (the default for a dataset that fits):
    # reading the file is part of what is timed here, once, before the first epoch.
    t = time.perf_counter()
    h5_ds, _ = make_train_dataset(info, config, 0, weights, 2)
    load_seconds = time.perf_counter() - t
    results["xrayfeat pipeline, HDF5 file (in RAM)"] = time_epochs(fresh_model(), h5_ds, steps,
                                                                   args.epochs)
    # Streamed from disk, as for a dataset over the memory budget.
    config.memory_budget_mb = 0
    stream_ds, _ = make_train_dataset(info, config, 0, weights, 2)
    results["xrayfeat pipeline, HDF5 file (streamed)"] = time_epochs(fresh_model(), stream_ds,
                                                                     steps, args.epochs)

    print(f"reading the HDF5 file into RAM: {load_seconds:.2f} s for {n} images "
          f"(once per training run)")
    base = results["xrayfeat pipeline, tensors in memory"]
    print(f"\n{'variant':<44} {'s/epoch':>8} {'img/s':>7} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'vs tensors':>10}")
    for name, seconds in results.items():
        rate = n / seconds
        gflops = rate * flops_per_image / 1e9
        print(f"{name:<44} {seconds:8.1f} {rate:7.1f} {gflops:8.1f} {100 * gflops / peak:6.1f}% "
              f"{seconds / base:9.3f}x")


if __name__ == "__main__":
    main()
