"""TensorFlow's fused kernels for the training step, with the saved model left as it is.

Keras 3 writes batch normalization and AdamW as chains of small element-wise ops: a
batch-norm layer on a 64 x 64 x 32 activation runs about a dozen separate passes over it
forward and backward, and AdamW updates the 8.4 M-parameter dense kernel in about ten passes
a step, plus one for the weight decay. Here batch norm trains with TensorFlow's one kernel
(``FusedBatchNormV3``, which oneDNN accelerates) and each AdamW update, decay included, is
one XLA-compiled pass, computing the same arithmetic (BENCHMARKS.md, "Training speed", has
what each saves).

``xrayfeat train`` uses them unless ``fused_kernels = false`` (the default since three
seeds showed the held-out accuracy unchanged: BENCHMARKS.md). Both are swapped in on the
*instances* of one training process, never by a subclass, so ``model.keras`` and
``last.keras`` still hold Keras' own ``BatchNormalization`` and ``AdamW``: a saved run loads
in plain Keras, with ``safe_mode``, exactly as before, and a resumed run with the setting is
fused again by ``train``.
Inference (``training`` false) is untouched. With ``xla_weight_gradients`` the float32
convolutions also take their weight gradients from XLA's kernel on the CPUs where that was
measured faster (:func:`fuse_convolution_gradients`), again on the instances only; with
``byte_dropout`` dropout draws its masks a byte at a time (:func:`fuse_dropout`).

What is not swapped keeps Keras' ops: synchronized (multi-replica) batch norm, masked or
non-4-D inputs (the dense layer's batch norm), AMSGrad, dropout with a ``noise_shape`` or a
rate that is not a whole number of 256ths, and training under a
``tf.distribute`` strategy (``--strategy mirrored`` or ``multi-worker``).
"""

from __future__ import annotations

import types
from pathlib import Path

import keras
import tensorflow as tf

from xrayfeat.model import cpu_flags


def fuse_training_step(model: keras.Model, *, xla_weight_gradients: bool = True,
                       byte_dropout: bool = True) -> None:
    """Train ``model`` (compiled) with the fused batch norm and Adam, with XLA's
    convolution weight gradients where they pay (:func:`fuse_convolution_gradients`) unless
    ``xla_weight_gradients`` is false, and with dropout masks drawn a byte at a time
    (:func:`fuse_dropout`) unless ``byte_dropout`` is false: what ``xrayfeat train`` does
    with the settings of the same names, and what ``bench/train.py`` times."""
    fuse_batch_norm(model)
    fuse_adam(model.optimizer)
    if xla_weight_gradients:
        fuse_convolution_gradients(model)
    if byte_dropout:
        fuse_dropout(model)


def fuse_batch_norm(model: keras.Model) -> int:
    """Make each plain channels-last ``BatchNormalization`` of ``model`` train with
    ``FusedBatchNormV3``; returns how many layers were fused.

    The moving statistics are updated as Keras does (biased batch variance, the layer's
    momentum at trace time), so the weights and the saved model are Keras' own.
    """
    if tf.distribute.has_strategy():  # mirrored moving statistics: keep Keras' update
        return 0
    fused = 0
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        rank = len(layer.input.shape)
        if (rank == 4 and layer.axis in (-1, rank - 1) and not layer.synchronized
                and not layer.renorm and layer.center and layer.scale):
            keras_call = layer.call
            layer.call = types.MethodType(_fused_call(keras_call), layer)
            fused += 1
    return fused


def _fused_call(keras_call):
    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None:
            return keras_call(inputs, training=training, mask=mask)
        # Keras upcasts bfloat16 activations to float32 for the statistics. The fused kernel
        # takes bfloat16 as it is and computes in float32 inside, rounding only its output
        # and input gradient: the same bits as casting in and out (measured on a Zen 4,
        # after a full epoch) in 0.52-0.63x the time, without the two passes each way
        # (BENCHMARKS.md, "The batch norm in bfloat16").
        x = inputs if inputs.dtype == tf.bfloat16 else tf.cast(inputs, tf.float32)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
            epsilon=self.epsilon, data_format="NHWC", is_training=True)[:3]
        # The fused kernel returns the unbiased variance for the moving average; Keras
        # averages the biased one.
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        variance = variance * (n - 1.0) / n
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum
                                    + variance * (1.0 - momentum))
        return tf.cast(y, self.compute_dtype)

    return call


def fuse_dropout(model: keras.Model) -> int:
    """Make each ``Dropout`` of ``model`` whose rate is a whole number of 256ths draw its
    training mask from single bytes of Philox's 32-bit words; returns how many changed.

    Keras' dropout (``tf.nn.experimental.stateless_dropout``) spends one 32-bit Philox word
    on each unit, a uniform number in the layer's dtype compared with the rate: 6.3 M words
    a step of the default model at batch 128, the step's largest element-wise op (xprof:
    ``StatelessRandomUniformV2`` ~20 ms of a ~360 ms step on a Zen 4). Here each word
    gives four units a byte each, and a unit is kept when its byte is at least
    ``rate * 256``: kept with probability exactly ``1 - rate`` (0.25 and 0.5 are whole
    256ths) and scaled by ``1 / (1 - rate)`` as Keras scales it. The masks come from the
    layer's own seed generator, which ``train`` seeds per epoch, so a resumed run draws the
    same ones; but they are other masks than Keras' for the same seed, so a run's
    arithmetic changes (the setting ``byte_dropout``; BENCHMARKS.md has its seed rule).
    Inference is untouched, a ``noise_shape`` or another rate keeps Keras' dropout, and
    the saved model is Keras' own ``Dropout``.
    """
    if tf.distribute.has_strategy():  # keep Keras' per-replica seeding as it is
        return 0
    changed = 0
    for layer in model.layers:
        if (type(layer) is keras.layers.Dropout and layer.noise_shape is None
                and 0 < layer.rate < 1 and float(layer.rate * 256).is_integer()):
            layer.call = types.MethodType(_byte_dropout_call(layer.call), layer)
            changed += 1
    return changed


def _byte_dropout_call(keras_call):
    def call(self, inputs, training=False):
        if not training:
            return keras_call(inputs, training=training)
        # The generator's state is int64; stateless ops take an int32 seed (as Keras casts).
        seed = tf.cast(tf.math.floormod(self.seed_generator.next(), tf.int32.max - 1),
                       tf.int32)
        n = tf.size(inputs)
        words = tf.random.stateless_uniform([(n + 3) // 4], seed, minval=None, maxval=None,
                                            dtype=tf.uint32)
        draws = tf.reshape(tf.bitcast(words, tf.uint8), [-1])[:n]
        keep = tf.reshape(draws >= int(self.rate * 256), tf.shape(inputs))
        scale = tf.cast(1.0 / (1.0 - self.rate), inputs.dtype)
        return tf.where(keep, inputs * scale, tf.zeros_like(inputs))

    return call


def fuse_adam(optimizer: keras.optimizers.Optimizer) -> bool:
    """Make ``optimizer`` (Keras ``Adam`` or ``AdamW``) update each float32 variable in one
    XLA-compiled pass, decoupled weight decay included; returns whether it did.

    The formula is Keras' own, term for term (XLA may round a multiply-add differently): the
    decay ``w - w * wd * lr`` first, then ``m``, ``v`` and ``w -= m * alpha / (sqrt(v) +
    epsilon)`` with the bias-corrected ``alpha``. Keras runs the decay as a separate pass over every weight
    before the update, and the update as about ten more; on the 8.4 M-parameter dense
    kernel the decay alone took longer than TensorFlow's ``ResourceApplyAdam``
    (BENCHMARKS.md, "Training speed"). Which weights decay is still Keras' decision
    (``exclude_from_weight_decay``); the optimizer's moving average of the weights
    (``use_ema``) is still updated by Keras after the step.
    """
    if not isinstance(optimizer, keras.optimizers.Adam) or optimizer.amsgrad:
        return False
    if tf.distribute.has_strategy():  # mirrored variables: keep Keras' update
        return False
    keras_update = optimizer.update_step
    keras_decay = optimizer._apply_weight_decay

    def apply_weight_decay(self, variables):
        # float32 weights decay inside their fused update below, in the same pass
        keras_decay([v for v in variables if v.dtype != "float32"])

    def update_step(self, gradient, variable, learning_rate):
        if variable.dtype != "float32":
            return keras_update(gradient, variable, learning_rate)
        if isinstance(gradient, tf.IndexedSlices):  # sparse: decay, then Keras' update
            keras_decay([variable])
            return keras_update(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        decays = self.weight_decay is not None and self._use_weight_decay(variable)
        _adamw_step(_handle(variable), _handle(self._momentums[index]),
                    _handle(self._velocities[index]), tf.cast(gradient, tf.float32),
                    tf.cast(learning_rate, tf.float32),
                    tf.cast(self.weight_decay if decays else 0.0, tf.float32),
                    tf.cast(self.iterations + 1, tf.float32),
                    tf.cast(self.beta_1, tf.float32), tf.cast(self.beta_2, tf.float32),
                    # as Keras rounds them: 1 - beta in Python, then to float32
                    tf.cast(1 - self.beta_1, tf.float32), tf.cast(1 - self.beta_2, tf.float32),
                    tf.cast(self.epsilon, tf.float32))

    optimizer._apply_weight_decay = types.MethodType(apply_weight_decay, optimizer)
    optimizer.update_step = types.MethodType(update_step, optimizer)
    return True


@tf.function(jit_compile=True)
def _adamw_step(variable, m, v, gradient, lr, weight_decay, step, beta_1, beta_2,
                one_minus_beta_1, one_minus_beta_2, epsilon):
    """Keras' AdamW update of one variable, compiled by XLA into one pass over the weights,
    the gradient and both moments (a weight decay of 0 leaves the weights exactly as
    they are). The variables come as resource handles: a function that took the variables
    themselves would keep referring to the first model's."""
    def read(handle):
        return tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32)

    w, m_, v_ = read(variable), read(m), read(v)
    w = w - w * weight_decay * lr
    alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
    m_ = m_ + (gradient - m_) * one_minus_beta_1
    v_ = v_ + (tf.square(gradient) - v_) * one_minus_beta_2
    w = w - m_ * alpha / (tf.sqrt(v_) + epsilon)
    for handle, value in ((m, m_), (v, v_), (variable, w)):
        tf.raw_ops.AssignVariableOp(resource=handle, value=value)


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras variable or of the ``tf.Variable`` inside one."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


def xla_weight_gradients_measured_faster(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU is of the kind XLA's weight gradients were measured faster on: AVX2
    without AVX-512, where oneDNN runs its ``jit:avx2`` kernels. CPUs with AVX-512 keep
    oneDNN's: on a Zen 4 its AVX-512 weight gradients were the faster, XLA's taking 1.4-2.0x
    their time (BENCHMARKS.md)."""
    flags = cpu_flags(cpuinfo)
    return "avx2" in flags and "avx512f" not in flags


def fuse_convolution_gradients(model: keras.Model, *, measured_cpus_only: bool = True) -> int:
    """Make each plain float32 ``Conv2D`` of ``model`` with more than one input channel
    compute its weight gradient with XLA's CPU kernel; returns how many layers changed.
    Unless ``measured_cpus_only`` is false, only on the CPUs it was measured faster on
    (:func:`xla_weight_gradients_measured_faster`).

    On the 2-core AVX2 CPU this project measures on, oneDNN's backward-weights kernel
    (``jit:avx2``) ran at 48-98 GFLOP/s where its forward and input-gradient kernels ran at
    110-155, and XLA's weight gradient took 0.64-0.87x its time for the 3 x 3 layers with
    32 or 64 input channels (slower for the one-channel first layer, which is left alone);
    the default training step took 0.81x the time (BENCHMARKS.md). The forward pass and
    the input gradient stay oneDNN's, fused with the bias and ReLU as before (the same
    bits, so inference is unchanged); the weight gradient is the same sum, accumulated in
    another order (equal to ~1e-5 relative). Only layers whose convolution XLA writes the
    same way are changed: channels-last, stride 1, no dilation, one group. bfloat16 layers
    (the CPUs with AMX, where oneDNN's bfloat16 kernels are the fast ones), a visible GPU
    and a ``tf.distribute`` strategy keep TensorFlow's own gradient. As with the batch
    norm, the swap is on the layer *instances*: the saved model is Keras' own ``Conv2D``.
    """
    if tf.distribute.has_strategy() or tf.config.list_logical_devices("GPU"):
        return 0
    if measured_cpus_only and not xla_weight_gradients_measured_faster():
        return 0
    changed = 0
    for layer in model.layers:
        if (type(layer) is keras.layers.Conv2D and layer.compute_dtype == "float32"
                and layer.data_format == "channels_last" and layer.groups == 1
                and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
                and layer.kernel.shape[2] > 1):
            layer.convolution_op = types.MethodType(_convolution_op(layer.padding.upper()),
                                                    layer)
            changed += 1
    return changed


def _convolution_op(padding: str):
    def convolution_op(self, inputs, kernel):
        # A tensor, not the variable: tf.custom_gradient then differentiates the read.
        return _conv_with_xla_weight_gradient(inputs, tf.convert_to_tensor(kernel), padding)

    return convolution_op


def _conv_with_xla_weight_gradient(x: tf.Tensor, kernel: tf.Tensor, padding: str) -> tf.Tensor:
    @tf.custom_gradient
    def conv(x, kernel):
        def gradient(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel,
                                                out_backprop=dy, strides=[1, 1, 1, 1],
                                                padding=padding)
            return dx, _xla_filter_gradient(x, dy, tuple(kernel.shape.as_list()), padding)

        return tf.nn.conv2d(x, kernel, 1, padding), gradient

    return conv(x, kernel)


@tf.function(jit_compile=True, autograph=False)
def _xla_filter_gradient(x, dy, filter_shape, padding):
    """The weight gradient of a stride-1 2-D convolution, compiled by XLA. The filter's
    shape and the padding come as Python values: XLA needs them as constants (one trace per
    layer shape)."""
    return tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.constant(filter_shape),
                                           out_backprop=dy, strides=[1, 1, 1, 1],
                                           padding=padding)
