"""The training step's kernels one at a time, oneDNN's against XLA's, at MiniVGGNet's
shapes (batch 32, the default before batch 64, kept so the logs compare; 64 px input;
float32 or, with ``--precision bfloat16``, bfloat16 as the default recipe computes on CPUs
with AVX512_BF16 or AMX).

Which kernel each part of the step should run on (``xrayfeat.fused_kernels``) is decided
here: every convolution (forward with bias and ReLU, input gradient, weight gradient), the
convolutional batch norm (training) and every dense-layer product, each timed as
TensorFlow runs it (oneDNN's kernels, as ``import xrayfeat`` sets) and compiled by XLA
(``jit_compile=True``), interleaved over rounds, best of ``--reps`` calls per round, median
over rounds. Prints each one's milliseconds and GFLOP/s, XLA's time as a ratio to oneDNN's
in the same run, and TensorFlow's matmul peak in the same precision before and after, for
scale. In bfloat16 the batch norm is timed twice: as ``xrayfeat.fused_kernels`` runs it
(the activations cast to float32 for the fused kernel and its output cast back, as Keras
computes the statistics) and on the bfloat16 activations directly (the fused kernel takes
them, keeping its statistics in float32), to see what the casts cost.

    python bench/kernels.py [--rounds 5] [--reps 5] [--precision float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics

import xrayfeat  # noqa: F401  (turns TensorFlow's oneDNN kernels on before TF loads)
from train import best_seconds, tf_matmul_peak  # bench/train.py: the same peak, the same timer

#: (name, input shape NHWC, output channels) of the MiniVGGNet's convolutions at 64 px
CONVOLUTIONS = (("block1_conv1", (32, 64, 64, 1), 32), ("block1_conv2", (32, 64, 64, 32), 32),
                ("block2_conv1", (32, 32, 32, 32), 64), ("block2_conv2", (32, 32, 32, 64), 64))
#: the dense layer: batch, inputs (16 x 16 x 64 after two poolings), units
DENSE = (32, 16384, 512)


def cases(precision: str = "float32"):
    """(name, FLOPs, eager function) for every kernel of the step timed here, its tensors in
    ``precision``."""
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(0)

    def normal(shape):  # normal samples in the step's precision
        return tf.cast(generator.normal(shape), precision)

    for name, shape, filters in CONVOLUTIONS:
        x = normal(shape)
        kernel = normal((3, 3, shape[-1], filters))
        bias = normal((filters,))
        dy = normal(shape[:3] + (filters,))
        flops = 2 * shape[0] * shape[1] * shape[2] * 9 * shape[-1] * filters
        yield (f"{name} forward + bias + ReLU", flops,
               lambda x=x, k=kernel, b=bias: tf.nn.relu(tf.nn.bias_add(
                   tf.nn.conv2d(x, k, 1, "SAME"), b)))
        if shape[-1] > 1:  # the first layer's input gradient is never computed
            yield (f"{name} input gradient", flops,
                   lambda x=x, k=kernel, dy=dy: tf.raw_ops.Conv2DBackpropInput(
                       input_sizes=tf.shape(x), filter=k, out_backprop=dy,
                       strides=[1, 1, 1, 1], padding="SAME"))
        yield (f"{name} weight gradient", flops,
               lambda x=x, dy=dy, s=(3, 3, shape[-1], filters): tf.raw_ops.Conv2DBackpropFilter(
                   input=x, filter_sizes=s, out_backprop=dy, strides=[1, 1, 1, 1],
                   padding="SAME"))
    for name, shape in (("block1 batch norm", (32, 64, 64, 32)),
                        ("block2 batch norm", (32, 32, 32, 64))):
        x, dy = normal(shape), normal(shape)
        gamma, beta = tf.ones(shape[-1:]), tf.zeros(shape[-1:])  # float32, as the layer's

        def fused(x, gamma, beta):  # training: the batch's statistics
            return tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=1e-3,
                                                    data_format="NHWC", is_training=True)[0]

        def cast_fused(x, gamma, beta):  # what xrayfeat.fused_kernels does in bfloat16
            return tf.cast(fused(tf.cast(x, tf.float32), gamma, beta), x.dtype)

        variants = [("", fused)] if precision == "float32" else [
            (" (float32 casts)", cast_fused), (" (bfloat16 in and out)", fused)]
        for suffix, normalize in variants:
            def normalized(x=x, gamma=gamma, beta=beta, normalize=normalize):
                return normalize(x, gamma, beta)

            def gradients(x=x, dy=dy, gamma=gamma, beta=beta, normalize=normalize):
                with tf.GradientTape() as tape:
                    tape.watch([x, gamma, beta])
                    y = normalize(x, gamma, beta)
                return tape.gradient(y, [x, gamma, beta], output_gradients=dy)[0]

            flops = 0  # memory-bound: no FLOP rate
            yield f"{name} forward{suffix}", flops, normalized
            yield f"{name} forward + backward{suffix}", flops, gradients
    batch, inputs, units = DENSE
    x, w = normal((batch, inputs)), normal((inputs, units))
    b, dy = normal((units,)), normal((batch, units))
    flops = 2 * batch * inputs * units
    yield ("fc1 forward + bias + ReLU", flops,
           lambda: tf.nn.relu(tf.nn.bias_add(tf.matmul(x, w), b)))
    yield "fc1 input gradient", flops, lambda: tf.matmul(dy, w, transpose_b=True)
    yield "fc1 weight gradient", flops, lambda: tf.matmul(x, dy, transpose_a=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    import tensorflow as tf

    from xrayfeat.runs import tensorflow_kernels

    peak = tf_matmul_peak(args.precision)
    print(f"TensorFlow {tf.__version__}, CPU kernels: {tensorflow_kernels()}; TensorFlow's "
          f"{args.precision} matmul peak {peak:.1f} GFLOP/s; best of {args.reps} calls, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'kernel':<52} {'oneDNN ms':>9} {'GFLOP/s':>8} {'XLA ms':>8} {'GFLOP/s':>8} "
          f"{'XLA / oneDNN':>12}")
    for name, flops, function in cases(args.precision):
        timed = {"oneDNN": tf.function(function), "XLA": tf.function(function, jit_compile=True)}
        for compiled in timed.values():
            compiled()  # trace and compile outside the timing
        seconds: dict[str, list[float]] = {k: [] for k in timed}
        for _ in range(args.rounds):
            for kind, compiled in timed.items():
                seconds[kind].append(best_seconds(lambda: compiled().numpy(), args.reps))
        onednn, xla = (statistics.median(seconds[k]) for k in ("oneDNN", "XLA"))
        rates = [f"{flops / t / 1e9:8.1f}" if flops else f"{'-':>8}" for t in (onednn, xla)]
        print(f"{name:<52} {1e3 * onednn:9.2f} {rates[0]} {1e3 * xla:8.2f} {rates[1]} "
              f"{xla / onednn:11.3f}x", flush=True)
    print(f"TensorFlow's {args.precision} matmul peak after: "
          f"{tf_matmul_peak(args.precision):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
