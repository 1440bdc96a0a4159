"""TensorFlow's fused kernels for the training step, with the saved model left as it is.

Keras 3 writes batch normalization and Adam as chains of small element-wise ops: a batch-norm
layer on a 64 x 64 x 32 activation runs about a dozen separate passes over it forward and
backward, and AdamW updates the 8.4 M-parameter dense kernel in about ten passes a step.
TensorFlow has one kernel for each (``FusedBatchNormV3``, which oneDNN accelerates, and
``ResourceApplyAdam``) computing the same arithmetic; timed alone on a 2-core AMD EPYC they
took 0.69x and 0.33x the time of Keras' versions, and the whole training step 0.86x
(BENCHMARKS.md, "Training speed").

``xrayfeat train`` uses them when ``fused_kernels`` is set (off by default: see
``TrainConfig``). Both are swapped in on the *instances* of one training process, never by
a subclass, so ``model.keras`` and ``last.keras`` still hold Keras' own
``BatchNormalization`` and ``AdamW``: a saved run loads in plain Keras, with ``safe_mode``,
exactly as before, and a resumed run with the setting is fused again by ``train``.
Inference (``training`` false) is untouched.

What is not swapped keeps Keras' ops: synchronized (multi-replica) batch norm, masked or
non-4-D inputs (the dense layer's batch norm), AMSGrad, and training under a
``tf.distribute`` strategy (``--strategy mirrored`` or ``multi-worker``).
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf


def fuse_training_step(model: keras.Model) -> None:
    """Train ``model`` (compiled) with the fused batch norm and Adam: what ``xrayfeat train``
    does when ``fused_kernels`` is set, and what ``bench/train.py`` times."""
    fuse_batch_norm(model)
    fuse_adam(model.optimizer)


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
        # Keras upcasts bfloat16 activations to float32 for the statistics; so does this.
        x = tf.cast(inputs, tf.float32)
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


def fuse_adam(optimizer: keras.optimizers.Optimizer) -> bool:
    """Make ``optimizer`` (Keras ``Adam`` or ``AdamW``) update each variable with TensorFlow's
    ``ResourceApplyAdam``; returns whether it did.

    The update is Keras' formula (``m``, ``v`` and the bias-corrected step size, epsilon
    outside the square root); AdamW's decoupled weight decay is applied by Keras before it,
    unchanged, and so is the optimizer's moving average of the weights (``use_ema``).
    """
    if not isinstance(optimizer, keras.optimizers.Adam) or optimizer.amsgrad:
        return False
    if tf.distribute.has_strategy():  # mirrored variables: keep Keras' update
        return False
    keras_update = optimizer.update_step

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices) or variable.dtype != "float32":
            return keras_update(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, tf.float32)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]),
            beta1_power=tf.pow(tf.cast(self.beta_1, tf.float32), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, tf.float32), step),
            lr=tf.cast(learning_rate, tf.float32), beta1=tf.cast(self.beta_1, tf.float32),
            beta2=tf.cast(self.beta_2, tf.float32), epsilon=tf.cast(self.epsilon, tf.float32),
            grad=tf.cast(gradient, tf.float32))

    optimizer.update_step = types.MethodType(update_step, optimizer)
    return True


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras variable or of the ``tf.Variable`` inside one."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle
