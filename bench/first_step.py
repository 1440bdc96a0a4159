"""The first steps of ``fit``: the optimizer built before ``fit`` (``xrayfeat.training.
build_optimizer``, what ``train`` does) against built inside the first step, as Keras
leaves it.

Built inside the step, the optimizer creates its variables during the first trace of the
training step, and TensorFlow traces a function that creates variables a second time. Each
round runs both variants in fresh processes, one after the other (the trace caches live in
the process): the default MiniVGGNet in the default precision, fused as ``train`` fuses
it, fitted for two steps of 128 stored 224 px images. The table gives each variant's median
seconds for that ``fit`` call (tracing, graph optimisation and XLA compiles included), how
many times it traced the step, and the ratio against Keras' own order.

    python bench/first_step.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("built in the first step (Keras)", "built before fit (train)")


def one_fit(prebuilt: bool) -> dict:
    """Time ``fit``'s first two steps in this (fresh) process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np
    import tensorflow as tf

    from xrayfeat.config import TrainConfig
    from xrayfeat.fused_kernels import fuse_training_step
    from xrayfeat.model import build_minivggnet, resolve_precision
    from xrayfeat.training import build_optimizer

    config = TrainConfig()
    keras.utils.set_random_seed(config.seed)
    model = build_minivggnet(2, input_size=config.input_size, stored_size=224,
                             precision=resolve_precision(config.precision))
    model.compile(optimizer=keras.optimizers.AdamW(config.lr,
                                                   weight_decay=config.weight_decay),
                  loss=keras.losses.CategoricalCrossentropy())
    fuse_training_step(model, xla_weight_gradients=config.xla_weight_gradients,
                       byte_dropout=config.byte_dropout)
    if prebuilt:
        build_optimizer(model)
    traces = []
    train_step = model.train_step
    model.train_step = lambda data: (traces.append(1), train_step(data))[1]
    rng = np.random.default_rng(0)
    n = 2 * config.batch_size
    images = rng.uniform(0, 255, (n, 224, 224, 1)).astype(np.float32)
    labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(config.batch_size)
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0)
    return {"seconds": time.perf_counter() - start, "traces": len(traces)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=("0", "1"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_fit(args.child == "1")))
        return
    print(f"machine: {platform.node() or 'unknown'}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_ in range(1, args.rounds + 1):
        for prebuilt, name in enumerate(VARIANTS):
            out = subprocess.run([sys.executable, __file__, "--child", str(prebuilt)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(result)
            print(f"round {round_}: {name}: {result['seconds']:.2f} s, "
                  f"{result['traces']} trace(s)", flush=True)
    base = statistics.median(r["seconds"] for r in results[VARIANTS[0]])
    print(f"\n{'optimizer':<34} {'fit, 2 steps (median)':>22} {'traces':>7} {'vs Keras':>9}")
    for name in VARIANTS:
        seconds = statistics.median(r["seconds"] for r in results[name])
        traces = "/".join(sorted({str(r["traces"]) for r in results[name]}))
        print(f"{name:<34} {seconds:>20.2f} s {traces:>7} {seconds / base:>8.3f}x")


if __name__ == "__main__":
    main()
