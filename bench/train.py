"""Training-speed benchmark: images/s and achieved GFLOP/s of the default model.

Measured in one run, on the same machine, so the ratios mean something even when the
absolute numbers drift:
- the limit each step runs against: TensorFlow's own 2048 x 2048 matrix multiply
  in the step's own precision (bfloat16 where the CPU has it natively, else float32), best
  of 20 warm repetitions, measured before and after every round (the highest is used, so
  a slow moment cannot flatter the ratios); NumPy's float32 rate is printed beside it;
- a plain ``model.fit`` on in-memory NumPy arrays (same model, same batch size, float32);
- xrayfeat's own training pipeline (seeded order, augmentation, class weights) in the
  default precision (``auto``: bfloat16 on CPUs with AVX512_BF16 or AMX; ``--precision``
  chooses another, as ``xrayfeat train --precision`` does), fed from tensors
  already in memory, from the HDF5 file (held in RAM), and streamed from the HDF5 file (as
  for a dataset larger than the memory budget); and the same pipeline in float32.

Each variant runs in a fresh Python process as one ``fit`` call of ``--epochs + 1`` epochs,
timed per epoch by a callback; the first epoch (tracing, warm-up) is dropped. Variants are
interleaved over ``--rounds`` rounds and the median epoch of all rounds is reported. That
is how ``xrayfeat train`` runs (one process, one ``fit``). Two things this avoids, both
measured on this VM: calling ``fit`` again on a model made the later calls take a
near-constant 10.24 s per 32 steps (CPU half idle), a slowdown training never meets; and
in one process, identical pipelines timed one after another differed by 10 %.

The xrayfeat variants run as ``xrayfeat train`` does by default: the fused batch norm and
one-pass AdamW (``fused_kernels``, xrayfeat.fused_kernels) and the acquisition
augmentations. ``--profile`` adds the step with Keras' own batch norm and AdamW instead
(``fused_kernels = false``), the step with only the batch norm fused (what the one-pass
AdamW update saves), the augmentation in TensorFlow's image ops instead of OpenCV's (the
implementation before, xrayfeat.pipeline.augment_with_tensorflow_ops), and timed ablations
of the default step (tensors in memory), each with one part removed: the acquisition
augmentations, all augmentation, augmentation and the in-model resize, batch norm,
dropout, Adam (plain SGD), one host round trip per step (``steps_per_execution`` 8); the
step with TensorFlow's oneDNN kernels forced on or off (``TF_ENABLE_ONEDNN_OPTS``, which
xrayfeat sets to 1 on x86-64), with the input pipeline on one thread, with OpenCV's own
thread pool off (the augmentation's warps on the map's thread alone), with one inter-op
thread, and with the convolutions' weight gradients by XLA (candidates, not defaults); and
the forward pass alone. What an ablation saves against the default step is what that part
costs.

FLOPs are counted from the layers (xrayfeat.model.forward_flops); a training step is
counted as 3x the forward pass (forward, plus backward for activations and weights).

    xrayfeat prepare ../shared/data/kermany_224/train --out data/k224.h5
    python bench/train.py --data data/k224.h5 [--images 1024] [--input-size 96] [--profile]
        [--precision auto|float32|bfloat16]
        [--only VARIANT ...]
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

# Before TensorFlow: xrayfeat chooses its CPU kernels (oneDNN on x86-64), so the peak and
# every variant run on the kernels ``xrayfeat train`` uses.
import xrayfeat  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent.parent


def best_seconds(call, reps: int) -> float:
    """The fastest of ``reps`` timed calls of ``call`` (after one untimed warm-up call)."""
    call()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 2048, reps: int = 8) -> float:
    """GFLOP/s of a NumPy float32 n x n matrix multiply (best of ``reps``)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    return 2 * n**3 / best_seconds(lambda: a @ a, reps) / 1e9


def tf_matmul_peak(precision: str, n: int = 2048, reps: int = 20) -> float:
    """GFLOP/s of TensorFlow's n x n matrix multiply in ``precision``, the best
    of ``reps`` warm repetitions: the limit a training step in that precision runs against
    (bfloat16 on AMX is several times the float32 rate, so a float32 peak would flatter a
    bfloat16 step)."""
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    a = tf.cast(tf.random.stateless_uniform((n, n), seed=(0, 0)), dtype)
    matmul = tf.function(lambda x: tf.reduce_sum(tf.matmul(x, x)[:1, :1]))
    for _ in range(2):  # warm-up (with best_seconds' own): oneDNN picks and caches its
        matmul(a).numpy()  # kernel, and AMX needs a start
    return 2 * n**3 / best_seconds(lambda: matmul(a).numpy(), reps) / 1e9


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
#: Timed ablations (``--profile``): each removes one part of the fused step, tensors in
#: memory, so its saving is that part's cost.
PROFILE = ("Keras' own batch norm and Adam", "fused batch norm, Keras' AdamW",
           "augmentation in TensorFlow's ops", "no acquisition augmentation", "no augmentation",
           "no augmentation, no resize",
           "tf.data on one thread", "OpenCV on one thread", "one inter-op thread",
           "XLA weight gradients",
           "oneDNN weight gradients", "batch 32", "batch 64", "batch 128", "batch 256",
           "oneDNN on", "oneDNN off", "no batch norm", "no dropout",
           "SGD optimizer", "steps_per_execution 8", "resize as matrix products",
           "resize in the pipeline", "dropout from 8-bit draws",
           "forward only")


#: Variants that force TensorFlow's oneDNN kernels on or off (xrayfeat turns them on on
#: every x86-64 CPU; TensorFlow alone only on those with AVX512_VNNI, AVX512_BF16 or AMX).
ONEDNN = {"oneDNN on": "1", "oneDNN off": "0"}


def without(model, kinds: tuple):
    """A copy of ``model`` with every layer of ``kinds`` replaced by a pass-through."""
    import keras

    class Skip(keras.layers.Layer):  # keras.layers.Identity refuses the graph's mask=
        def call(self, inputs, training=None, mask=None):
            return inputs

    def clone(layer):
        if isinstance(layer, kinds):
            return Skip(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def run_variant(variant: str, data: Path, epochs: int, input_size: int | None,
                precision: str) -> list[float]:
    """Seconds of each timed epoch of one variant (runs in its own process)."""
    import cv2
    import keras
    import tensorflow as tf

    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import load_split, open_dataset
    from xrayfeat.fused_kernels import fuse_batch_norm, fuse_training_step
    from xrayfeat.model import build_minivggnet, resolve_precision
    from xrayfeat.pipeline import make_train_dataset, pipeline_from_arrays
    from xrayfeat.training import class_weights

    if variant == "one inter-op thread":  # ops one at a time, each on both cores
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if variant == "OpenCV on one thread":  # the augmentation's warps without OpenCV's pool
        cv2.setNumThreads(1)
    config = TrainConfig(epochs=epochs + 1, precision=precision)
    if input_size:
        config.input_size = input_size
    precision = resolve_precision(config.precision)
    if variant in ("plain fit", "tensors, float32"):
        precision = "float32"
    info = open_dataset(data)
    arrays = load_split(data, "train")
    images, stored = arrays.images, info.size
    if variant.startswith("no augmentation"):
        config.augment = False
    if variant == "augmentation in TensorFlow's ops":  # the implementation before OpenCV's
        import xrayfeat.pipeline as pipeline

        def augment_batch(x, seeds, config):
            params = pipeline.augmentation_parameters(tf.shape(x)[0], tf.shape(x)[1], seeds,
                                                      config)
            return pipeline.augment_with_tensorflow_ops(x, params, config)

        pipeline.augment_batch = augment_batch  # what the input pipeline calls
    if variant == "resize in the pipeline":  # the model's resize op, after the augmentation
        import xrayfeat.pipeline as pipeline

        augment = pipeline.augment_batch

        def augment_and_resize(x, seeds, config):
            return tf.image.resize(augment(x, seeds, config), (config.input_size,) * 2,
                                   antialias=True)

        pipeline.augment_batch = augment_and_resize
    if variant in ("batch 32", "batch 64", "batch 128", "batch 256"):  # other step counts
        config.batch_size = int(variant.split()[1])
    if variant == "dropout from 8-bit draws":  # four masks from each 32-bit Philox word
        config.byte_dropout = True
    if variant in ("XLA weight gradients", "oneDNN weight gradients"):
        config.xla_weight_gradients = variant == "XLA weight gradients"
    if variant == "no acquisition augmentation":  # what blur, gamma and frame cost
        config.blur, config.gamma, config.frame = 0.0, 0.0, 0.0
    if variant == "no augmentation, no resize":  # images already at the input size
        images = np.stack([cv2.resize(im, (config.input_size,) * 2, interpolation=cv2.INTER_AREA)
                           for im in images])
        stored = config.input_size
    steps = int(np.ceil(len(arrays.labels) / config.batch_size))
    weights = class_weights(arrays.labels, 2)
    keras.utils.set_random_seed(0)
    model = build_minivggnet(2, input_size=config.input_size, stored_size=stored,
                             precision=precision)
    if variant == "no batch norm":
        model = without(model, (keras.layers.BatchNormalization,))
    if variant == "no dropout":
        model = without(model, (keras.layers.Dropout,))
    if variant == "resize as matrix products":  # the export's resize, in the step
        from xrayfeat.export import matrix_resized
        model = matrix_resized(model)
    if variant == "resize in the pipeline":  # the step trains the layers after the resize
        model = keras.Model(model.get_layer("resize").output, model.output)
    optimizer = (keras.optimizers.SGD(config.lr) if variant == "SGD optimizer" else
                 keras.optimizers.AdamW(config.lr, weight_decay=config.weight_decay))
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(),
                  steps_per_execution=8 if variant == "steps_per_execution 8" else 1)
    if variant == "fused batch norm, Keras' AdamW":  # what the fused AdamW update saves
        fuse_batch_norm(model)
    elif variant not in ("plain fit", "Keras' own batch norm and Adam"):
        # as ``xrayfeat train`` does with fused_kernels = true
        fuse_training_step(model, xla_weight_gradients=config.xla_weight_gradients,
                           byte_dropout=config.byte_dropout)
    if variant == "forward only":  # inference over the same images, batch 32
        x = images[..., None].astype(np.float32)
        seconds = []
        for _ in range(epochs + 1):
            t = time.perf_counter()
            model.predict(x, batch_size=config.batch_size, verbose=0)
            seconds.append(time.perf_counter() - t)
        return seconds[1:]
    if variant == "plain fit":  # in-memory NumPy arrays, no augmentation, no weights
        x = images[..., None].astype(np.float32)
        y = keras.utils.to_categorical(arrays.labels, 2)
        return time_epochs(model, x, epochs, y=y, batch_size=config.batch_size)
    if variant in ("HDF5 in RAM", "HDF5 streamed"):  # read into RAM (the default) or streamed
        if variant == "HDF5 streamed":
            config.memory_budget_mb = 0
        dataset, _ = make_train_dataset(info, config, 0, weights, 2)
    else:  # tensors already in memory: no file at all
        dataset, _ = pipeline_from_arrays(tf.constant(images),
                                          tf.constant(arrays.labels, tf.int32),
                                          config, 0, weights, 2)
    if variant == "tf.data on one thread":  # augmentation without competing for both cores
        options = tf.data.Options()
        options.threading.private_threadpool_size = 1
        options.threading.max_intra_op_parallelism = 1
        dataset = dataset.with_options(options)
    return time_epochs(model, dataset, epochs, steps_per_epoch=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="a dataset from 'xrayfeat prepare' (224 px), e.g. of "
                             "../shared/data/kermany_224/train")
    parser.add_argument("--images", type=int, default=1024, help="train images per epoch")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="of the xrayfeat variants, as 'xrayfeat train --precision'")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all variants")
    parser.add_argument("--profile", action="store_true",
                        help="also time the ablations of the fused step (where the time goes)")
    parser.add_argument("--only", action="append", choices=VARIANTS + PROFILE, default=[],
                        help="time only these variants (repeatable; 'tensors' is always "
                             "timed, as the baseline of the ratios)")
    parser.add_argument("--variant", choices=VARIANTS + PROFILE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.data, args.epochs, args.input_size,
                                     args.precision)))
        return

    import tensorflow as tf

    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import open_dataset
    from xrayfeat.model import build_minivggnet, forward_flops, resolve_precision
    from xrayfeat.runs import tensorflow_kernels

    config = TrainConfig()
    input_size = args.input_size or config.input_size
    precision = resolve_precision(args.precision)
    tmp = Path(tempfile.mkdtemp())
    data = make_subset(args.data, args.images, tmp / "subset.h5")
    n, stored = args.images, open_dataset(data).size
    flops_per_image = 3 * forward_flops(build_minivggnet(2, input_size=input_size,
                                                         stored_size=stored))
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, tensorflow {tf.__version__}, "
          f"numpy {np.__version__}; TensorFlow's CPU kernels: {tensorflow_kernels()} "
          f"(TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')})")
    print(f"model: MiniVGGNet, input {input_size} px from {stored} px stored images, "
          f"batch {config.batch_size}; precision of the xrayfeat variants: {precision}; "
          f"{flops_per_image / 1e9:.3f} GFLOP per training image")
    print(f"{n} train images per epoch; {args.rounds} rounds x {args.epochs} timed epochs "
          f"per variant, each variant in its own process", flush=True)

    variants = [v for v in VARIANTS if not (v == "tensors, float32" and precision == "float32")]
    variants += list(PROFILE) if args.profile else []
    if args.only:
        variants = [v for v in VARIANTS + PROFILE if v in args.only or v == "tensors"]
    precisions = sorted({precision, "float32"})

    def measure_peaks() -> dict[str, float]:
        return {"numpy float32": matmul_peak(),
                **{f"tf {p}": tf_matmul_peak(p) for p in precisions}}

    peaks = [measure_peaks()]
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            cmd = [sys.executable, __file__, "--data", str(data), "--variant", variant,
                   "--epochs", str(args.epochs), "--precision", precision]
            if args.input_size:
                cmd += ["--input-size", str(args.input_size)]
            env = dict(os.environ)
            if variant in ONEDNN:  # read by TensorFlow at import, so set for the process
                env["TF_ENABLE_ONEDNN_OPTS"] = ONEDNN[variant]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                                 env=env).stdout
            epochs = json.loads(out.strip().splitlines()[-1])
            seconds[variant] += epochs
            print(f"  round {round_ + 1}, {variant}: "
                  f"{' '.join(f'{e:.2f}' for e in epochs)} s/epoch", flush=True)
        peaks.append(measure_peaks())
    # The highest of each measured before and after every round: a slow moment on a shared
    # machine cannot flatter the ratios.
    peak = {name: max(p[name] for p in peaks) for name in peaks[0]}
    for name in peak:
        print(f"{name} matmul peak: {', '.join(f'{p[name]:.1f}' for p in peaks)} GFLOP/s "
              f"(before and after each round); using the highest, {peak[name]:.1f}")

    label = {"plain fit": "plain fit, NumPy arrays, float32",
             "tensors": f"xrayfeat fused, {precision}, tensors in memory",
             "HDF5 in RAM": f"xrayfeat fused, {precision}, HDF5 file in RAM",
             "HDF5 streamed": f"xrayfeat fused, {precision}, HDF5 file streamed",
             "tensors, float32": "xrayfeat fused, float32, tensors in memory"}
    base = statistics.median(seconds["tensors"])
    own_peaks = ", ".join(f"{p}: {peak['tf ' + p]:.1f}" for p in precisions)
    print(f"\n'% peak' is against TensorFlow's matmul peak in the variant's own precision "
          f"({own_peaks} GFLOP/s)")
    print(f"{'variant':<48} {'s/epoch':>8} {'img/s':>7} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'vs tensors':>10}")
    for variant in variants:
        median = statistics.median(seconds[variant])
        rate = n / median
        own = "float32" if variant in ("plain fit", "tensors, float32") else precision
        flops = flops_per_image / 3 if variant == "forward only" else flops_per_image
        gflops = rate * flops / 1e9
        name = label.get(variant, f"  ablation: {variant}")
        print(f"{name:<48} {median:8.2f} {rate:7.1f} {gflops:8.1f} "
              f"{100 * gflops / peak['tf ' + own]:6.1f}% {median / base:9.3f}x")

if __name__ == "__main__":
    main()
