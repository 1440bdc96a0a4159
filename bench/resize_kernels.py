"""The model's 224 -> 64 px antialiased resize, timed alone: Keras' ``Resizing`` layer
(TensorFlow's ``ScaleAndTranslate``, what training runs) against the same resize as two
matrix products (the layer ``xrayfeat.export.deployable`` puts in its place, what exported
models run).

It tells whether the resize is worth moving or rewriting for training speed: one batch of
the default step (32 images) against the step's ~500 ms.

    python bench/resize_kernels.py [--batch 32] [--source 224] [--target 64] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import xrayfeat  # noqa: E402,F401  (before TensorFlow: the CPU kernels training uses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--source", type=int, default=224)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from xrayfeat.export import deployable
    from xrayfeat.runs import tensorflow_kernels

    images = tf.constant(np.random.default_rng(0).uniform(
        0, 255, (args.batch, args.source, args.source, 1)).astype(np.float32))
    inputs = keras.Input((args.source, args.source, 1))
    resize = keras.Model(inputs, keras.layers.Resizing(
        args.target, args.target, interpolation="bilinear", antialias=True)(inputs))
    exported = deployable(resize)  # the same resize as two matrix products
    kernels = {"Resizing layer (ScaleAndTranslate)": tf.function(lambda x: resize(x)),
               "two matrix products (export)": tf.function(lambda x: exported(x))}
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, tensorflow {tf.__version__} "
          f"({tensorflow_kernels()} kernels); "
          f"{args.batch} images {args.source} -> {args.target} px, best and median of "
          f"{args.reps} after a warm-up")
    best = {}
    for name, kernel in kernels.items():
        kernel(images)
        seconds = []
        for _ in range(args.reps):
            start = time.perf_counter()
            kernel(images).numpy()
            seconds.append(time.perf_counter() - start)
        best[name] = min(seconds)
        print(f"{name:<36} best {1e3 * min(seconds):6.1f} ms, median "
              f"{1e3 * float(np.median(seconds)):6.1f} ms")
    names = list(kernels)
    difference = tf.reduce_max(tf.abs(kernels[names[0]](images) - kernels[names[1]](images)))
    print(f"matrix form / layer: {best[names[1]] / best[names[0]]:.2f}x the time; largest "
          f"difference {float(difference):.2g} (of 255)")


if __name__ == "__main__":
    main()
