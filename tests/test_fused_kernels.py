"""TensorFlow's fused batch norm and Adam, and XLA's convolution weight gradients, compute
what Keras' own layers compute, dropout from bytes keeps what Keras' keeps, and a model
trained with them saves as Keras' own layers (xrayfeat.fused_kernels)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from xrayfeat.fused_kernels import (fuse_adam, fuse_batch_norm, fuse_convolution_gradients,
                                    fuse_dropout)
from xrayfeat.model import BN_MOMENTUM, build_minivggnet


def _bn_model(**bn_args) -> keras.Model:
    inputs = keras.Input((12, 12, 6))
    outputs = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, **bn_args)(inputs)
    model = keras.Model(inputs, outputs)
    layer = model.layers[1]
    layer.gamma.assign(np.linspace(0.5, 2.0, 6, dtype="float32"))
    layer.beta.assign(np.linspace(-1.0, 1.0, 6, dtype="float32"))
    return model


def _forward_backward(model: keras.Model, x: tf.Tensor, weights: tf.Tensor, training: bool):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=training)
        loss = tf.reduce_sum(y * weights)  # a generic linear loss: every gradient is non-zero
    grads = tape.gradient(loss, [x, *model.trainable_weights])
    layer = model.layers[1]
    return [np.asarray(t) for t in (y, *grads, layer.moving_mean, layer.moving_variance)]


def test_fused_batch_norm_matches_keras_forward_backward_and_moving_statistics():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(3.0, 2.0, (4, 12, 12, 6)).astype("float32"))
    weights = tf.constant(rng.normal(0.0, 1.0, (4, 12, 12, 6)).astype("float32"))
    keras_bn, fused_bn = _bn_model(), _bn_model()
    assert fuse_batch_norm(fused_bn) == 1

    expected = _forward_backward(keras_bn, x, weights, training=True)
    got = _forward_backward(fused_bn, x, weights, training=True)
    names = ("output", "d input", "d gamma", "d beta", "moving mean", "moving variance")
    for name, want, have in zip(names, expected, got):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                   err_msg=name)
    # The moving statistics really moved (towards mean 3, variance 4), in both.
    assert np.all(got[-2] > 0.2) and np.all(got[-1] > 1.2)

    # Inference uses the moving statistics through Keras' own call, unchanged: with the
    # same weights and statistics, the same numbers to the bit.
    fused_bn.set_weights(keras_bn.get_weights())
    inference = [_forward_backward(m, x, weights, training=False)[0] for m in (keras_bn, fused_bn)]
    np.testing.assert_array_equal(inference[0], inference[1])


def test_fused_batch_norm_in_bfloat16_matches_keras_and_stays_bfloat16():
    # bfloat16 activations go to the fused kernel without casts; its statistics are still
    # float32, as Keras' upcast keeps them, so only the bfloat16 rounding of the output and
    # of the input gradient may differ.
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(3.0, 2.0, (4, 12, 12, 6)), tf.bfloat16)
    weights = tf.constant(rng.normal(0.0, 1.0, (4, 12, 12, 6)), tf.bfloat16)
    keras_bn, fused_bn = _bn_model(dtype="mixed_bfloat16"), _bn_model(dtype="mixed_bfloat16")
    assert fuse_batch_norm(fused_bn) == 1

    expected = _forward_backward(keras_bn, x, weights, training=True)
    got = _forward_backward(fused_bn, x, weights, training=True)
    assert str(got[0].dtype) == str(got[1].dtype) == "bfloat16"  # output and d input
    names = ("output", "d input", "d gamma", "d beta", "moving mean", "moving variance")
    for name, want, have in zip(names, expected, got):
        want, have = want.astype("float32"), have.astype("float32")
        np.testing.assert_allclose(have, want, rtol=2e-2, atol=2e-2 * np.abs(want).max(),
                                   err_msg=name)
    assert np.all(got[-2] > 0.2) and np.all(got[-1] > 1.2)


def test_only_plain_four_dimensional_batch_norm_is_fused():
    model = build_minivggnet(2, input_size=32, stored_size=32)
    # four convolutional batch norms; the dense layer's (2-D) keeps Keras' ops
    assert fuse_batch_norm(model) == 4
    assert fuse_batch_norm(_bn_model(synchronized=True)) == 0
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():  # mirrored moving statistics
        assert fuse_batch_norm(_bn_model()) == 0


def _compiled_model(fused: bool) -> keras.Model:
    keras.utils.set_random_seed(3)
    model = build_minivggnet(2, input_size=32, stored_size=32)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
                  loss=keras.losses.CategoricalCrossentropy())
    if fused:
        assert fuse_adam(model.optimizer)
    return model


def test_fused_adam_updates_weights_and_moments_as_keras_adamw_does():
    keras_model, fused_model = _compiled_model(False), _compiled_model(True)
    rng = np.random.default_rng(5)
    for step in range(3):  # the bias correction differs at every step
        x = rng.uniform(0, 255, (16, 32, 32, 1)).astype("float32")
        y = keras.utils.to_categorical(rng.integers(0, 2, 16), 2)
        keras_model.train_on_batch(x, y)
        fused_model.train_on_batch(x, y)
        pairs = [*zip(fused_model.optimizer.variables, keras_model.optimizer.variables),
                 *zip(fused_model.weights, keras_model.weights)]
        for mine, theirs in pairs:
            mine_, theirs_ = np.asarray(mine), np.asarray(theirs)
            np.testing.assert_allclose(mine_, theirs_, rtol=1e-4,
                                       atol=1e-6 * max(1.0, np.abs(theirs_).max()),
                                       err_msg=f"step {step + 1}: {mine.path}")
            # Rounding differences would grow through later gradients: compare each step
            # from the same state.
            mine.assign(theirs_)
    assert int(fused_model.optimizer.iterations) == 3


def test_fused_adamw_decays_the_weights_keras_decays_and_only_those():
    # A zero gradient leaves Adam's step at zero, so what moves is the decay alone:
    # w * (1 - wd * lr), large enough here to see (the recipe's 1e-4 * 1e-3 is not).
    def trained(fused: bool) -> keras.Model:
        keras.utils.set_random_seed(1)
        inputs = keras.Input((3,))
        outputs = keras.layers.Dense(2, name="dense")(inputs)
        model = keras.Model(inputs, outputs)
        optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.5)
        optimizer.exclude_from_weight_decay(var_names=["bias"])
        model.compile(optimizer=optimizer, loss=lambda y, p: tf.reduce_sum(p) * 0.0)
        model.layers[1].bias.assign([1.0, -2.0])
        if fused:
            assert fuse_adam(model.optimizer)
        before = [np.asarray(w) for w in model.weights]
        model.train_on_batch(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
        return before, [np.asarray(w) for w in model.weights]

    (kernel0, bias0), (kernel, bias) = trained(fused=True)
    np.testing.assert_allclose(kernel, kernel0 * (1 - 0.5 * 0.1), rtol=1e-6)
    np.testing.assert_array_equal(bias, bias0)  # excluded from the decay, as in Keras
    _, keras_own = trained(fused=False)
    for mine, theirs in zip((kernel, bias), keras_own):
        # Keras' formula term for term; XLA may fuse a multiply-add where another CPU's
        # build does not, so to a rounding (an ulp or two) rather than bit for bit.
        np.testing.assert_array_max_ulp(mine, theirs, maxulp=2)


def test_fuse_adam_leaves_amsgrad_other_optimizers_and_strategies_alone():
    assert not fuse_adam(keras.optimizers.Adam(amsgrad=True))
    assert not fuse_adam(keras.optimizers.SGD())
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():  # mirrored variables
        assert not fuse_adam(keras.optimizers.AdamW())


def _gradients(model: keras.Model, x: tf.Tensor) -> list[np.ndarray]:
    """The output and the gradients of a generic loss w.r.t. the input and every weight."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=True)
        loss = tf.reduce_sum(y * tf.range(1.0, y.shape[-1] + 1.0))
    return [np.asarray(t) for t in (y, *tape.gradient(loss, [x, *model.trainable_weights]))]


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_xla_weight_gradients_match_tensorflow_own(padding):
    rng = np.random.default_rng(2)
    inputs = keras.Input((20, 20, 3))
    x = keras.layers.Conv2D(8, 3, padding=padding, activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, padding=padding, activation="relu")(x)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    keras.utils.set_random_seed(1)
    plain = keras.Model(inputs, outputs)
    xla = keras.Model.from_config(plain.get_config())
    xla.set_weights(plain.get_weights())
    assert fuse_convolution_gradients(xla, measured_cpus_only=False) == 2
    x = tf.constant(rng.normal(0.0, 1.0, (5, 20, 20, 3)).astype("float32"))

    expected, got = _gradients(plain, x), _gradients(xla, x)
    # The forward pass and the input gradient are TensorFlow's own ops: the same bits.
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    names = [w.path for w in plain.trainable_weights]
    for name, want, have in zip(names, expected[2:], got[2:]):
        assert np.any(want != 0), name
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                   err_msg=name)


def test_xla_weight_gradients_train_minivggnet_as_tensorflow_own_gradients_do():
    def model() -> keras.Model:  # the same weights and dropout seeds
        keras.utils.set_random_seed(4)
        return build_minivggnet(2, input_size=32, stored_size=32)

    plain, xla = model(), model()
    # the three convolutions after the first; the first sees one channel and is left alone
    assert fuse_convolution_gradients(xla, measured_cpus_only=False) == 3
    assert "convolution_op" not in vars(xla.get_layer("block1_conv1"))
    x = tf.constant(np.random.default_rng(4).uniform(0, 255, (6, 32, 32, 1)).astype("float32"))
    for want, have in zip(_gradients(plain, x), _gradients(xla, x)):
        np.testing.assert_allclose(have, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_only_float32_convolutions_on_one_cpu_take_xla_weight_gradients():
    def fused(model: keras.Model) -> int:
        return fuse_convolution_gradients(model, measured_cpus_only=False)

    assert fused(build_minivggnet(2, input_size=32, stored_size=32, precision="bfloat16")) == 0
    inputs = keras.Input((16, 16, 4))
    strided = keras.layers.Conv2D(4, 3, strides=2)(inputs)
    dilated = keras.layers.Conv2D(4, 3, dilation_rate=2)(strided)
    assert fused(keras.Model(inputs, dilated)) == 0
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        assert fused(build_minivggnet(2, input_size=32, stored_size=32)) == 0


def test_xla_weight_gradients_only_on_the_cpus_they_were_measured_faster_on(tmp_path,
                                                                            monkeypatch):
    import xrayfeat.fused_kernels as fused_kernels

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx avx2 fma\n")
    assert fused_kernels.xla_weight_gradients_measured_faster(cpuinfo)
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx avx2 fma avx512f avx512bw\n")
    assert not fused_kernels.xla_weight_gradients_measured_faster(cpuinfo)
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx\n")
    assert not fused_kernels.xla_weight_gradients_measured_faster(cpuinfo)
    assert not fused_kernels.xla_weight_gradients_measured_faster(tmp_path / "missing")

    def model() -> keras.Model:
        return build_minivggnet(2, input_size=32, stored_size=32)

    monkeypatch.setattr(fused_kernels, "xla_weight_gradients_measured_faster", lambda: False)
    assert fuse_convolution_gradients(model()) == 0
    assert fuse_convolution_gradients(model(), measured_cpus_only=False) == 3
    monkeypatch.setattr(fused_kernels, "xla_weight_gradients_measured_faster", lambda: True)
    assert fuse_convolution_gradients(model()) == 3


def _dropout_model(rate: float, dtype: str, **dropout_args) -> keras.Model:
    inputs = keras.Input((32, 32, 16), dtype="float32" if dtype == "float32" else "bfloat16")
    policy = "float32" if dtype == "float32" else "mixed_bfloat16"
    outputs = keras.layers.Dropout(rate, dtype=policy, seed=3, **dropout_args)(inputs)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("rate", [0.25, 0.5])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_byte_dropout_keeps_units_at_the_layer_rate_and_scales_them_as_keras(rate, dtype):
    model = _dropout_model(rate, dtype)
    assert fuse_dropout(model) == 1
    layer = model.layers[1]
    x = tf.cast(tf.random.stateless_uniform((64, 32, 32, 16), [1, 2], 1.0, 2.0), dtype)
    y = model(x, training=True)
    assert y.dtype == x.dtype
    y, x = np.asarray(tf.cast(y, tf.float32)), np.asarray(tf.cast(x, tf.float32))
    kept = y != 0
    # 1,048,576 units: the kept share's SD is under 0.0005 at either rate
    assert abs(kept.mean() - (1 - rate)) < 0.003
    expected = np.asarray(tf.cast(tf.cast(x, dtype) * tf.cast(1 / (1 - rate), dtype),
                                  tf.float32))
    np.testing.assert_array_equal(y[kept], expected[kept])
    # every position of a 4-byte word, and every image, gets its own draws
    for share in (kept.reshape(-1, 4).mean(axis=0), kept.reshape(64, -1).mean(axis=1)):
        assert np.all(np.abs(share - (1 - rate)) < 0.02)
    # the masks follow the layer's seed generator (train seeds it per epoch, for --resume)
    layer.seed_generator.state.assign(np.array([7, 1]))
    first = np.asarray(model(x, training=True))
    layer.seed_generator.state.assign(np.array([7, 1]))
    np.testing.assert_array_equal(np.asarray(model(x, training=True)), first)
    assert not np.array_equal(np.asarray(model(x, training=True)), first)
    # inference is Keras' own: the inputs unchanged
    np.testing.assert_array_equal(np.asarray(tf.cast(model(x, training=False), tf.float32)), x)


def test_only_plain_dropout_at_whole_256ths_draws_bytes():
    assert fuse_dropout(_dropout_model(0.3, "float32")) == 0  # 76.8 / 256: Keras' own
    assert fuse_dropout(_dropout_model(0.25, "float32", noise_shape=(None, 1, 1, 16))) == 0
    assert fuse_dropout(build_minivggnet(2, input_size=32, stored_size=32)) == 3
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert fuse_dropout(_dropout_model(0.25, "float32")) == 0


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_model_trained_fused_saves_as_keras_own_layers(tmp_path, precision):
    keras.utils.set_random_seed(0)
    model = build_minivggnet(2, input_size=32, stored_size=32, precision=precision)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    fuse_batch_norm(model)
    fuse_adam(model.optimizer)
    xla_layers = fuse_convolution_gradients(model, measured_cpus_only=False)
    assert xla_layers == (3 if precision == "float32" else 0)
    assert fuse_dropout(model) == 3
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    model.train_on_batch(x, keras.utils.to_categorical(np.arange(8) % 2, 2))
    model.save(tmp_path / "model.keras")

    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert type(loaded.optimizer) is keras.optimizers.AdamW
    batch_norms = [layer for layer in loaded.layers if "bn" in layer.name]
    assert len(batch_norms) == 5
    assert all(type(layer) is keras.layers.BatchNormalization for layer in batch_norms)
    assert all("call" not in vars(layer) for layer in batch_norms)
    convolutions = [layer for layer in loaded.layers if "conv" in layer.name]
    assert len(convolutions) == 4
    assert all(type(layer) is keras.layers.Conv2D and "convolution_op" not in vars(layer)
               for layer in convolutions)
    dropouts = [layer for layer in loaded.layers if "dropout" in layer.name]
    assert len(dropouts) == 3
    assert all(type(layer) is keras.layers.Dropout and "call" not in vars(layer)
               for layer in dropouts)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_train_with_fused_kernels_writes_an_ordinary_run(examples_h5, tmp_path):
    from xrayfeat.config import TrainConfig
    from xrayfeat.runs import load_run
    from xrayfeat.training import train

    config = TrainConfig(input_size=32, epochs=2, batch_size=4, width=0.25, fused_kernels=True,
                         xla_weight_gradients=True, byte_dropout=True, precision="float32")
    result = train(examples_h5, tmp_path / "run", config)
    assert result.epochs_run == 2 and all(np.isfinite(row["loss"]) for row in result.history)
    run = load_run(tmp_path / "run")
    assert run.config.train["fused_kernels"] is True
    assert run.config.train["xla_weight_gradients"] is True
    assert run.config.train["byte_dropout"] is True
    model = run.load_model()  # safe_mode: Keras' own classes only
    assert all(type(layer) is keras.layers.BatchNormalization
               for layer in model.layers if "bn" in layer.name)
