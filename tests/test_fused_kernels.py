"""TensorFlow's fused batch norm and Adam compute what Keras' own layers compute, and a model
trained with them saves as Keras' own layers (xrayfeat.fused_kernels)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from xrayfeat.fused_kernels import fuse_adam, fuse_batch_norm
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
        np.testing.assert_array_equal(mine, theirs)


def test_fuse_adam_leaves_amsgrad_other_optimizers_and_strategies_alone():
    assert not fuse_adam(keras.optimizers.Adam(amsgrad=True))
    assert not fuse_adam(keras.optimizers.SGD())
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():  # mirrored variables
        assert not fuse_adam(keras.optimizers.AdamW())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_model_trained_fused_saves_as_keras_own_layers(tmp_path, precision):
    keras.utils.set_random_seed(0)
    model = build_minivggnet(2, input_size=32, stored_size=32, precision=precision)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    fuse_batch_norm(model)
    fuse_adam(model.optimizer)
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    model.train_on_batch(x, keras.utils.to_categorical(np.arange(8) % 2, 2))
    model.save(tmp_path / "model.keras")

    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert type(loaded.optimizer) is keras.optimizers.AdamW
    batch_norms = [layer for layer in loaded.layers if "bn" in layer.name]
    assert len(batch_norms) == 5
    assert all(type(layer) is keras.layers.BatchNormalization for layer in batch_norms)
    assert all("call" not in vars(layer) for layer in batch_norms)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_train_with_fused_kernels_writes_an_ordinary_run(examples_h5, tmp_path):
    from xrayfeat.config import TrainConfig
    from xrayfeat.runs import load_run
    from xrayfeat.training import train

    config = TrainConfig(input_size=32, epochs=2, batch_size=4, width=0.25, fused_kernels=True)
    result = train(examples_h5, tmp_path / "run", config)
    assert result.epochs_run == 2 and all(np.isfinite(row["loss"]) for row in result.history)
    run = load_run(tmp_path / "run")
    assert run.config.train["fused_kernels"] is True
    model = run.load_model()  # safe_mode: Keras' own classes only
    assert all(type(layer) is keras.layers.BatchNormalization
               for layer in model.layers if "bn" in layer.name)
