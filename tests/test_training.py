"""train: the model, the config, the input pipeline and the run directory it writes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import copy_moving_split
from xrayfeat.config import TrainConfig, load_train_config
from xrayfeat.errors import DatasetError, UsageError
from xrayfeat.pipeline import epoch_order
from xrayfeat.training import class_weights, train


# --------------------------------------------------------------------------- model


def test_minivggnet_layers_are_named_and_bn_normalises_channels():
    from keras import layers

    from xrayfeat.model import CONV_LAYERS, build_minivggnet

    model = build_minivggnet(3, input_size=32, stored_size=64)
    names = [layer.name for layer in model.layers]
    for name in (*CONV_LAYERS, "block1_pool", "block2_pool", "fc1", "predictions"):
        assert name in names
    assert model.output_shape == (None, 3)
    assert model.get_layer("resize").output.shape[1:3] == (32, 32)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            assert layer.axis in (-1, [-1], [3], 3), layer.axis
    # Published widths: 32 and 64 filters, 512 dense units.
    assert model.get_layer("block1_conv1").filters == 32
    assert model.get_layer("block2_conv2").filters == 64
    assert model.get_layer("fc1").units == 512


def test_width_multiplier_and_flop_count():
    from xrayfeat.model import build_minivggnet, forward_flops

    model = build_minivggnet(2, input_size=32, width=0.5)
    assert model.get_layer("block1_conv1").filters == 16
    # Hand count: conv 2*H*W*Cout*9*Cin, dense 2*in*out.
    expected = (2 * 32 * 32 * 16 * 9 * 1 + 2 * 32 * 32 * 16 * 9 * 16
                + 2 * 16 * 16 * 32 * 9 * 16 + 2 * 16 * 16 * 32 * 9 * 32
                + 2 * (8 * 8 * 32) * 256 + 2 * 256 * 2)
    assert forward_flops(model) == expected


def test_rgb_color_mode_copies_the_stored_grayscale_into_three_channels():
    from xrayfeat.model import build_minivggnet, forward_flops

    gray = build_minivggnet(2, input_size=32, stored_size=48, width=0.25)
    rgb = build_minivggnet(2, input_size=32, stored_size=48, width=0.25, color_mode="rgb")
    assert rgb.input_shape == gray.input_shape == (None, 48, 48, 1)  # same stored images
    assert rgb.get_layer("to_rgb").output.shape[-1] == 3
    assert rgb.get_layer("block1_conv1").kernel.shape == (3, 3, 3, 8)
    # Only the first convolution grows: 3 input channels instead of 1.
    assert forward_flops(rgb) - forward_flops(gray) == 2 * 2 * 32 * 32 * 8 * 9


def test_bfloat16_model_has_a_float32_twin_with_the_same_weights():
    from xrayfeat.model import build_minivggnet, float32_twin, is_float32

    model = build_minivggnet(2, input_size=32, stored_size=48, width=0.25, precision="bfloat16")
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"
    # Weights, the input scaling and the softmax stay float32.
    assert model.get_layer("block1_conv1").kernel.dtype == "float32"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert not is_float32(model)
    twin = float32_twin(model)
    assert is_float32(twin)
    assert [layer.name for layer in twin.layers] == [layer.name for layer in model.layers]
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    images = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 1)).astype(np.float32)
    mixed, exact = model(images).numpy(), twin(images).numpy()
    assert mixed.dtype == exact.dtype == np.float32
    # Same function, up to bfloat16 rounding (3 significant digits) of the activations.
    np.testing.assert_allclose(mixed, exact, atol=0.02)


def test_copy_weights_gives_the_twin_every_value_of_the_trained_model():
    import keras

    from xrayfeat.model import build_minivggnet, copy_weights, float32_twin

    model = build_minivggnet(2, input_size=32, stored_size=48, width=0.25, precision="bfloat16")
    twin = float32_twin(model)
    # Training moves weights and batch-norm statistics away from the twin's copy.
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="categorical_crossentropy")
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (8, 48, 48, 1)).astype(np.float32)
    model.fit(images, np.eye(2, dtype=np.float32)[rng.integers(0, 2, 8)], epochs=1, verbose=0)
    stale = twin.get_weights()
    assert any((a != b).any() for a, b in zip(model.get_weights(), stale))
    copy_weights(model, twin)
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="the models differ"):
        copy_weights(model, keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    with pytest.raises(ValueError):  # as many weights, of other shapes
        copy_weights(model, build_minivggnet(2, input_size=32, stored_size=48, width=0.5))


def test_a_prebuilt_optimizer_traces_the_step_once_and_trains_the_same_bits():
    import keras

    from xrayfeat.fused_kernels import fuse_training_step
    from xrayfeat.model import build_minivggnet
    from xrayfeat.training import build_optimizer

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (48, 48, 48, 1)).astype(np.float32)
    labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 48)]

    def fit(prebuilt: bool):
        keras.utils.set_random_seed(3)
        model = build_minivggnet(2, input_size=32, stored_size=48, width=0.25,
                                 precision="bfloat16")
        model.compile(optimizer=keras.optimizers.AdamW(2e-3, weight_decay=1e-4),
                      loss="categorical_crossentropy")
        fuse_training_step(model, xla_weight_gradients=False)
        if prebuilt:
            build_optimizer(model)
            build_optimizer(model)  # a second call (a resumed run's) changes nothing
        traces = []
        train_step = model.train_step
        model.train_step = lambda data: (traces.append(1), train_step(data))[1]
        model.fit(images, labels, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return len(traces), model.get_weights() + [v.numpy() for v in model.optimizer.variables]

    traces, prebuilt = fit(True)
    assert traces == 1
    _, built_in_step = fit(False)
    assert len(prebuilt) == len(built_in_step) == 3 * 22 + 2 + 10  # moments, counters, BN stats
    for a, b in zip(prebuilt, built_in_step):
        np.testing.assert_array_equal(a, b)


def test_validation_scoring_traces_once_and_matches_the_model():
    from xrayfeat.model import build_minivggnet
    from xrayfeat.training import _FORWARD, predict_local

    model = build_minivggnet(2, input_size=32, stored_size=32, width=0.25)
    images = np.random.default_rng(1).uniform(0, 255, (300, 32, 32, 1)).astype(np.float32)
    probs = predict_local(model, images, batch_size=128)  # 128 + 128 + 44 (padded)
    assert probs.shape == (300, 2)
    np.testing.assert_allclose(probs, model(images, training=False).numpy(), atol=1e-5)
    np.testing.assert_array_equal(predict_local(model, images[:7], batch_size=128), probs[:7])
    # One trace for every batch length, so TensorFlow never warns about retracing.
    assert _FORWARD[model].experimental_get_tracing_count() == 1
    # By default the fewest even batches: 300 images as 3 x 100, none of them padding.
    even = build_minivggnet(2, input_size=32, stored_size=32, width=0.25)
    np.testing.assert_allclose(predict_local(even, images),
                               even(images, training=False).numpy(), atol=1e-5)
    predict_local(even, images[:100], batch_size=100)  # the shape already traced
    assert _FORWARD[even].experimental_get_tracing_count() == 1


def test_auto_precision_is_bfloat16_on_cpus_with_native_bfloat16(tmp_path):
    from xrayfeat.model import cpu_has_native_bfloat16, resolve_precision

    cpuinfo = tmp_path / "cpuinfo"
    for flags in ("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8",
                  "fpu sse avx2 avx512f avx512_bf16 vaes"):
        cpuinfo.write_text(f"processor: 0\nflags\t\t: {flags}\n")
        assert cpu_has_native_bfloat16(cpuinfo)
        assert resolve_precision("auto", has_gpu=False, cpuinfo=cpuinfo) == "bfloat16"
        assert resolve_precision("auto", has_gpu=True, cpuinfo=cpuinfo) == "float32"
        # an explicit choice is never second-guessed
        assert resolve_precision("float32", has_gpu=False, cpuinfo=cpuinfo) == "float32"
    cpuinfo.write_text("processor: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not cpu_has_native_bfloat16(cpuinfo)
    assert resolve_precision("auto", has_gpu=False, cpuinfo=cpuinfo) == "float32"
    assert resolve_precision("auto", has_gpu=False, cpuinfo=tmp_path / "missing") == "float32"
    assert resolve_precision("bfloat16", has_gpu=False, cpuinfo=cpuinfo) == "bfloat16"


# --------------------------------------------------------------------------- config


def test_toml_config_and_cli_overrides(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text("epochs = 3\nlr = 0.01\n")
    config = load_train_config(toml, {"lr": 0.002, "batch_size": None})
    assert config.epochs == 3  # from the file
    assert config.lr == 0.002  # the command line wins
    assert config.batch_size == TrainConfig().batch_size  # default


def test_unknown_toml_key_is_an_error(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text("epochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(UsageError, match="learning_rate"):
        load_train_config(toml, {})


@pytest.mark.parametrize("override", [{"class_weight": "sometimes"}, {"epochs": 0},
                                      {"strategy": "cluster"}, {"input_size": 8},
                                      {"precision": "float16"}, {"color_mode": "cmyk"},
                                      {"threshold_method": "median"},
                                      {"threshold_sensitivity": 1.5}, {"ema_momentum": 1.0}])
def test_bad_values_are_usage_errors(override):
    with pytest.raises(UsageError):
        load_train_config(None, override)


@pytest.mark.parametrize("toml, message", [
    ("train = 5", "must be a table"),
    ("[train]\nseed = -1", "seed"),
    ("[train]\nseed = 4294967296", "seed"),
    ("[train]\nwidth = inf", "finite number"),
    ("[train]\nwidth = nan", "finite number"),
    ("[train]\nlr = inf", "finite number"),
    ("[train]\ntensorboard = 5", "must be text"),
    ("[train]\nepochs = 1.9", "whole number"),
    ("[train]\nepochs = true", "whole number"),
    ("[train]\nepochs = \"1\"", "whole number"),
    ("epoch = 3\n[train]\nepochs = 2", "unknown top-level setting(s)"),
    ("[train]\nlabel_smoothing = 5", "label_smoothing"),
    ("[train]\nzoom = -3", "zoom"),
    ("[train]\nshift = 50", "shift"),
    ("[train]\nweight_decay = -5", "weight_decay"),
    ("[train]\nlr_factor = 7", "lr_factor"),
    ("[train]\ninput_size = 5000", "input_size"),
])
def test_hostile_toml_values_are_one_line_usage_errors(tmp_path, toml, message):
    path = tmp_path / "train.toml"
    path.write_text(toml + "\n")
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(path, {})


def test_resume_ignores_a_tensorboard_folder_saved_in_the_run(examples_h5, tmp_path):
    run = tmp_path / "run"
    train(examples_h5, run, _tiny_config(epochs=1))
    config = json.loads((run / "config.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    config["train"]["tensorboard"] = str(elsewhere)
    (run / "config.json").write_text(json.dumps(config))
    train(examples_h5, run, _tiny_config(epochs=2), resume=True)
    assert not elsewhere.exists()


def test_a_run_from_before_a_setting_resumes_as_it_was_trained(examples_h5, tmp_path):
    # Settings added since a run was written resume as that run trained, not as the
    # current default (which may differ): same arithmetic, same augmentation.
    from xrayfeat.training import _resumed_config

    run = tmp_path / "run"
    train(examples_h5, run, _tiny_config(epochs=1))
    config = json.loads((run / "config.json").read_text())
    assert _resumed_config(run, TrainConfig()).fused_kernels is TrainConfig().fused_kernels
    for key in ("fused_kernels", "xla_weight_gradients", "byte_dropout", "blur", "gamma",
                "frame"):
        del config["train"][key]
    (run / "config.json").write_text(json.dumps(config))
    resumed = _resumed_config(run, TrainConfig())
    assert resumed.fused_kernels is False and resumed.xla_weight_gradients is False
    assert resumed.byte_dropout is False
    assert (resumed.blur, resumed.gamma, resumed.frame) == (0.0, 0.0, 0.0)
    # and not because the defaults are off
    assert TrainConfig().fused_kernels is True and TrainConfig().blur > 0
    assert TrainConfig().xla_weight_gradients is True and TrainConfig().byte_dropout is True


@pytest.mark.parametrize("damage", ["no_history", "no_train"])
def test_resume_of_a_damaged_run_is_a_one_line_error(examples_h5, tmp_path, damage):
    import zipfile

    from xrayfeat.errors import RunError
    from xrayfeat.runs import STATE_MEMBER

    run = tmp_path / "run"
    train(examples_h5, run, _tiny_config(epochs=1))
    if damage == "no_history":
        with zipfile.ZipFile(run / "last.keras") as archive:
            state = json.loads(archive.read(STATE_MEMBER))
        del state["history"]
        rebuilt = tmp_path / "rebuilt.keras"
        with zipfile.ZipFile(run / "last.keras") as src, zipfile.ZipFile(rebuilt, "w") as dst:
            for item in src.infolist():
                data = json.dumps(state).encode() if item.filename == STATE_MEMBER \
                    else src.read(item.filename)
                dst.writestr(item, data)
        rebuilt.replace(run / "last.keras")
    else:
        config = json.loads((run / "config.json").read_text())
        del config["train"]
        (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="damaged"):
        train(examples_h5, run, _tiny_config(epochs=2), resume=True)


# --------------------------------------------------------------------------- pipeline pieces


def test_balanced_class_weights_equalise_class_totals():
    labels = np.array([0] * 10 + [1] * 27)
    weights = class_weights(labels, 2)
    assert weights[0] * 10 == pytest.approx(weights[1] * 27)
    assert weights[0] * 10 + weights[1] * 27 == pytest.approx(len(labels))


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, 1, 3), epoch_order(50, 1, 3)
    assert np.array_equal(a, b)
    assert sorted(a) == list(range(50))
    assert not np.array_equal(a, epoch_order(50, 1, 4))


@pytest.mark.parametrize("memory_budget_mb", [4096, 0])  # held in RAM, streamed
def test_training_pipeline_has_no_autotuning_model(examples_h5, memory_budget_mb):
    """Deleting an iterator whose autotuning model is on waits for its optimisation
    thread to wake, up to tens of seconds after a long fit (BENCHMARKS.md): the pipeline
    that feeds fit runs without it, and still yields whole batches."""
    from xrayfeat.dataset import open_dataset
    from xrayfeat.pipeline import make_train_dataset

    config = _tiny_config(memory_budget_mb=memory_budget_mb)
    dataset, steps = make_train_dataset(open_dataset(examples_h5), config, 0, {0: 1.0, 1: 1.0},
                                        2)
    assert dataset.options().autotune.enabled is False
    images, one_hot, weights = next(iter(dataset))
    assert images.shape[0] == one_hot.shape[0] == weights.shape[0] == config.batch_size
    assert steps >= 1


@pytest.mark.parametrize("extra", [{}, {"blur": 1.0, "gamma": 0.4, "frame": 0.1}])
def test_augmentation_is_a_pure_function_of_its_seed(extra):
    import tensorflow as tf

    from xrayfeat.pipeline import augment_batch

    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 255, (4, 48, 48, 1)).astype("float32"))
    config = TrainConfig(**extra)
    a = augment_batch(x, tf.constant([1, 2]), config).numpy()
    b = augment_batch(x, tf.constant([1, 2]), config).numpy()
    c = augment_batch(x, tf.constant([1, 3]), config).numpy()
    assert a.shape == x.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 255


def test_no_horizontal_flip_by_default():
    """With every transform off, augmentation is the identity: nothing mirrors the heart."""
    import tensorflow as tf

    from xrayfeat.pipeline import augment_batch

    x = np.zeros((2, 32, 32, 1), np.float32)
    x[:, :, :8] = 200.0  # bright left edge
    config = TrainConfig(rotation_deg=0, shift=0, zoom=0, brightness=0, contrast=0, blur=0,
                         gamma=0, frame=0)
    out = augment_batch(tf.constant(x), tf.constant([5, 6]), config).numpy()
    np.testing.assert_allclose(out, x, atol=1e-3)


def test_opencv_augmentation_matches_tensorflow_image_ops(example_images):
    """Real radiographs, every augmentation on (hflip too): OpenCV's pixels are TensorFlow's
    to rounding, so switching to it changed the arithmetic, not the augmentation."""
    import cv2
    import tensorflow as tf

    from xrayfeat.pipeline import (augment_arrays, augment_with_tensorflow_ops,
                                   augmentation_parameters)

    images = np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (96, 96),
                                  interpolation=cv2.INTER_AREA) for p in example_images[:12]])
    x = tf.constant(images.astype("float32")[..., None])
    config = TrainConfig(blur=1.0, gamma=0.4, frame=0.1, hflip=True)
    params = augmentation_parameters(len(images), 96, tf.constant([7, 8]), config).numpy()
    assert (params[:, 6] > 0).any() and (params[:, 6] == 0).any()  # some flipped, some not
    assert (params[:, 11] > 0).any() and (params[:, 9] < 0).any()  # a frame, a sharpening
    got = augment_arrays(x.numpy(), params, config)
    want = augment_with_tensorflow_ops(x, tf.constant(params), config).numpy()
    assert got.shape == want.shape == x.shape
    error = np.abs(got - want)  # measured: mean 2e-5, max 0.004 (of 255)
    assert error.mean() < 1e-3 and error.max() < 0.05, (error.mean(), error.max())
    assert np.abs(got - x.numpy()).mean() > 5.0  # it did augment


def _augment_by_the_formulas(images, params, config):
    """augment_arrays as it was written before it worked in place: one new image per
    operation, the formulas as they read. The reference for its bits."""
    import cv2

    from xrayfeat.pipeline import _gaussian_taps

    b, height, width = images.shape[:3]
    out = np.empty((b, height, width), np.float32)
    rows, cols = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
    taps = _gaussian_taps(height)
    for i in range(b):
        a0, a1, a2, b0, b1, b2, flip, contrast, brightness, blur, gamma, frame = params[i]
        image = images[i, :, ::-1, 0] if flip else images[i, :, :, 0]
        x = cv2.warpAffine(np.ascontiguousarray(image), np.array([[a0, a1, a2], [b0, b1, b2]]),
                           (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        mean = x.mean(dtype=np.float32)
        x = np.clip((x - mean) * contrast + mean + brightness, 0.0, 255.0)
        blurred = cv2.sepFilter2D(x, cv2.CV_32F, taps, taps, borderType=cv2.BORDER_REFLECT_101)
        x = np.clip(x + blur * (blurred - x), 0.0, 255.0)
        x = cv2.pow(x * np.float32(1.0 / 255.0), float(gamma)) * np.float32(255.0)
        if frame > 0:
            x = x * (((rows >= frame) & (rows < height - frame))[:, None]
                     & ((cols >= frame) & (cols < width - frame))[None, :])
        out[i] = x
    return out[..., None]


def test_augmentation_in_place_keeps_the_bits_of_its_formulas(example_images):
    """augment_arrays works on each image in place to spare the training step's cores;
    on real radiographs, every augmentation on, its pixels are the formulas' to the bit."""
    import cv2
    import tensorflow as tf

    from xrayfeat.pipeline import augment_arrays, augmentation_parameters

    images = np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (96, 96),
                                  interpolation=cv2.INTER_AREA) for p in example_images[:12]])
    x = images.astype("float32")[..., None]
    config = TrainConfig(blur=1.0, gamma=0.4, frame=0.2, hflip=True)
    for seed in range(3):
        params = augmentation_parameters(len(images), 96, tf.constant([seed, 8]),
                                         config).numpy()
        got = augment_arrays(x, params, config)
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_array_equal(got.view(np.uint32),
                                      _augment_by_the_formulas(x, params, config).view(np.uint32))


def test_acquisition_augmentations_do_what_they_say():
    import tensorflow as tf

    from xrayfeat.pipeline import augment_batch

    rng = np.random.default_rng(1)
    x = tf.constant(rng.uniform(40, 215, (64, 32, 32, 1)).astype("float32"))
    still = {"rotation_deg": 0, "shift": 0, "zoom": 0, "brightness": 0, "contrast": 0,
             "blur": 0, "gamma": 0, "frame": 0}
    seeds = tf.constant([3, 4])
    # Blur or sharpen: the mean stays, the pixel-to-pixel variation moves both ways.
    out = augment_batch(x, seeds, TrainConfig(**{**still, "blur": 1.0})).numpy()
    detail = np.abs(np.diff(out, axis=2)).mean(axis=(1, 2, 3))
    before = np.abs(np.diff(x.numpy(), axis=2)).mean(axis=(1, 2, 3))
    assert (detail < before * 0.9).any() and (detail > before * 1.1).any()
    np.testing.assert_allclose(out.mean(), x.numpy().mean(), rtol=0.02)
    # Gamma maps 0 and 255 onto themselves and moves mid-tones.
    ends = tf.constant(np.tile(np.array([0.0, 255.0], np.float32), (8, 8, 16))[..., None])
    np.testing.assert_allclose(augment_batch(ends, seeds, TrainConfig(**{**still, "gamma": 0.5})),
                               ends, atol=1e-3)
    # A black frame on about half the images, never wider than asked.
    out = augment_batch(x, seeds, TrainConfig(**{**still, "frame": 0.25})).numpy()
    framed = (out[:, 0, :, 0] == 0).all(axis=1)
    assert 0.2 < framed.mean() < 0.8
    assert (out[:, 8:24, 8:24] > 0).all()


def _plateau_run(aucs: list[float], **settings) -> tuple[list[float], dict]:
    """The learning rate of every epoch and the final state of a run scoring ``aucs``."""
    from xrayfeat.training import new_run_state, plateau_step

    config = TrainConfig(**{"lr": 1e-3, **settings})  # the rates below halve from 1e-3
    state = new_run_state()
    lr, lrs = config.lr, []
    for epoch, auc in enumerate(aucs, start=1):
        lrs.append(lr)
        _, lr = plateau_step(state, epoch, auc, lr, config)
        if state["stopped_early"]:
            break
    return lrs, state


def test_learning_rate_halves_and_early_stopping_counts_from_the_best_epoch():
    # Seed 3's validation AUC in bfloat16 (BENCHMARKS.md): best at epoch 3, then a swing
    # down; the rate halves after two epochs without a better AUC (epochs 5 and 7) and
    # training stops after four (epoch 7), keeping epoch 3.
    aucs = [0.867, 0.875, 0.965, 0.917, 0.940, 0.959, 0.963, 0.976, 0.975, 0.981]
    lrs, state = _plateau_run(aucs)
    assert state["stopped_early"] and state["best_epoch"] == 3 and state["best_val_auc"] == 0.965
    assert lrs == [1e-3] * 5 + [5e-4] * 2

    # An improvement resets both counts; an AUC within 1e-4 of the best is no improvement.
    lrs, state = _plateau_run([0.9, 0.8, 0.95, 0.8, 0.95005, 0.96, 0.8, 0.8, 0.8, 0.8, 0.8])
    assert state["best_epoch"] == 6 and len(lrs) == 10
    assert lrs == [1e-3] * 5 + [5e-4] * 3 + [2.5e-4] * 2

    # The rate never goes below min_lr.
    lrs, _ = _plateau_run([0.9] + [0.8] * 30, early_stopping_patience=50, min_lr=3e-4)
    assert min(lrs) == 3e-4 and lrs[-1] == 3e-4


# --------------------------------------------------------------------------- run directory


def test_run_directory_describes_itself(trained_run: Path):
    from xrayfeat.runs import load_run

    for name in ("model.keras", "last.keras", "state.json", "config.json", "validation.json",
                 "history.csv", "training_curves.png"):
        assert (trained_run / name).is_file(), name
    config = json.loads((trained_run / "config.json").read_text())
    assert config["classes"] == ["NORMAL", "PNEUMONIA"]
    assert len(config["data"]["sha256"]) == 64
    assert config["train"]["input_size"] == 32
    assert "tensorflow" in config["versions"]
    validation = json.loads((trained_run / "validation.json").read_text())
    assert 0.0 <= validation["threshold"] <= 1.0
    assert validation["threshold_method"] == config["train"]["threshold_method"]
    ci = validation["threshold_ci"]
    assert ci["lower"] <= ci["upper"] and ci["unit"] == "patient" and ci["n_boot"] > 0
    with open(trained_run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["val_auc"]) <= 1.0 for r in rows)
    run = load_run(trained_run)
    model = run.load_model()
    assert model.input_shape == (None, 224, 224, 1)
    # The deployable model is the weights alone; the optimizer's state is the checkpoint's.
    assert "optimizer" not in _weight_groups(trained_run / "model.keras")
    assert "optimizer" in _weight_groups(trained_run / "last.keras")


def _weight_groups(keras_file: Path) -> set[str]:
    """The top-level groups of the weights file inside a ``.keras`` archive."""
    import io
    import zipfile

    with zipfile.ZipFile(keras_file) as archive:
        weights = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(weights, "r") as h5:
        return set(h5.keys())


def _tiny_config(**kw) -> TrainConfig:
    return TrainConfig(**{"input_size": 32, "epochs": 2, "batch_size": 16, "width": 0.25, **kw})


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resume_finishes_with_the_same_history_as_an_uninterrupted_run(examples_h5, tmp_path,
                                                                       precision):
    full = train(examples_h5, tmp_path / "full", _tiny_config(precision=precision))
    train(examples_h5, tmp_path / "part", _tiny_config(epochs=1, precision=precision))
    resumed = train(examples_h5, tmp_path / "part", _tiny_config(epochs=2), resume=True)
    assert resumed.epochs_run == 2
    for a, b in zip(full.history, resumed.history):
        assert a["epoch"] == b["epoch"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=1e-6)


def test_resume_trusts_the_state_saved_inside_the_checkpoint(examples_h5, tmp_path):
    # A kill after last.keras was replaced but before history.csv and state.json were
    # rewritten leaves epoch 2's weights beside epoch 1's files; resuming must continue
    # from epoch 2 and bring those files up to date.
    full = train(examples_h5, tmp_path / "full", _tiny_config(epochs=3))
    run = tmp_path / "part"
    train(examples_h5, run, _tiny_config(epochs=1))
    stale_state, stale_history = ((run / name).read_text() for name in ("state.json",
                                                                         "history.csv"))
    train(examples_h5, run, _tiny_config(epochs=2), resume=True)
    (run / "state.json").write_text(stale_state)
    (run / "history.csv").write_text(stale_history)
    finished = train(examples_h5, run, _tiny_config(epochs=2), resume=True)
    assert finished.epochs_run == 2  # nothing left to train, and the readable copies agree
    assert json.loads((run / "state.json").read_text())["epoch"] == 2
    with open(run / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    resumed = train(examples_h5, run, _tiny_config(epochs=3), resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history):  # tolerances as in the test above
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=1e-6)


def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(examples_h5, tmp_path):
    from xrayfeat.errors import RunError

    run = tmp_path / "run"
    train(examples_h5, run, _tiny_config(epochs=1))
    (run / "last.keras").write_bytes(b"not a zip file")
    with pytest.raises(RunError, match="damaged"):
        train(examples_h5, run, _tiny_config(epochs=2), resume=True)


def test_rgb_run_trains_and_its_model_reads_the_stored_images(examples_h5, tmp_path):
    from xrayfeat.dataset import load_split
    from xrayfeat.runs import load_run

    train(examples_h5, tmp_path / "run", _tiny_config(epochs=1, color_mode="rgb"))
    run = load_run(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["color_mode"] \
        == "rgb"
    model = run.load_model()
    assert model.get_layer("block1_conv1").kernel.shape[2] == 3
    val = load_split(examples_h5, "val")
    probs = model.predict_on_batch(val.images[:4, ..., None].astype(np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_streaming_from_disk_trains_exactly_as_in_memory(examples_h5, tmp_path):
    # memory_budget_mb=0 streams the train split batch by batch from the HDF5 file (the path
    # for datasets larger than RAM); it must see the same batches as the in-memory path.
    in_ram = train(examples_h5, tmp_path / "ram", _tiny_config(precision="float32"))
    streamed = train(examples_h5, tmp_path / "disk",
                     _tiny_config(precision="float32", memory_budget_mb=0))
    for a, b in zip(in_ram.history, streamed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=1e-9)


def test_ema_run_scores_and_saves_the_moving_average_of_the_weights(examples_h5, tmp_path):
    from xrayfeat.runs import load_model_safely

    train(examples_h5, tmp_path / "run", _tiny_config(ema=True, epochs=1))
    best = load_model_safely(tmp_path / "run" / "model.keras")  # epoch 1 is the best
    last = load_model_safely(tmp_path / "run" / "last.keras", compile=True)
    averages = last.optimizer._model_variables_moving_average
    assert last.optimizer.use_ema and len(averages) == len(best.trainable_variables)
    differs = 0
    for saved, average, raw in zip(best.trainable_variables, averages,
                                   last.trainable_variables):
        np.testing.assert_allclose(saved.numpy(), average.numpy(), rtol=1e-6)
        differs += not np.allclose(average.numpy(), raw.numpy())
    assert differs  # the raw weights trained on; the saved model is their average


def test_batch_norm_recalibration_gives_averaged_weights_their_own_statistics():
    import keras

    from xrayfeat.training import recalibrate_batch_norm

    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.9)(inputs))
    bn = model.layers[-1]
    bn.moving_mean.assign([123.0])
    # Two batches of different means: the statistics become their plain mean, whatever
    # they were before, and the layer's momentum is left as it was.
    images = np.concatenate([np.full((32, 4, 4, 1), 10.0, np.float32),
                             np.full((32, 4, 4, 1), 20.0, np.float32)])
    recalibrate_batch_norm(model, images)
    assert float(bn.moving_mean.numpy()[0]) == pytest.approx(15.0, rel=1e-5)
    assert float(bn.moving_variance.numpy()[0]) == pytest.approx(0.0, abs=1e-3)
    assert bn.momentum == 0.9


def test_threshold_method_is_recorded_with_its_interval(examples_h5, tmp_path):
    result = train(examples_h5, tmp_path / "run",
                   _tiny_config(threshold_method="sensitivity", threshold_sensitivity=0.9))
    validation = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert validation["threshold_method"] == result.threshold_method == "sensitivity"
    assert validation["threshold_min_sensitivity"] == 0.9
    assert validation["metrics"]["sensitivity"] >= 0.9
    assert validation["threshold"] == result.threshold


def test_even_batch_size_scores_in_the_fewest_batches_of_one_size():
    from xrayfeat.training import even_batch_size

    assert even_batch_size(521) == 105  # 5 batches, 4 padded images (not 119)
    assert even_batch_size(300) == 100
    assert even_batch_size(128) == 128 and even_batch_size(129) == 65
    assert even_batch_size(7) == 7 and even_batch_size(1) == 1 and even_batch_size(0) == 1


def test_the_runs_threshold_and_metrics_are_those_of_its_saved_model(trained_run, examples_h5,
                                                                    tmp_path):
    """train takes the threshold and validation metrics from the best epoch's own scores;
    scoring the saved model.keras again must give the same file."""
    from xrayfeat.config import checked_settings
    from xrayfeat.dataset import load_split, open_dataset
    from xrayfeat.training import _finish

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    written = (run / "validation.json").read_text()
    config = json.loads((run / "config.json").read_text())["train"]
    _finish(run, open_dataset(examples_h5), load_split(examples_h5, "val"),
            json.loads((run / "state.json").read_text()), checked_settings(config, "config"),
            started=0.0)  # no probabilities given: model.keras is loaded and scored
    assert (run / "validation.json").read_text() == written


def test_bfloat16_training_scores_and_saves_a_float32_model(examples_h5, tmp_path):
    from xrayfeat.dataset import load_split
    from xrayfeat.model import is_float32
    from xrayfeat.runs import load_model_safely
    from xrayfeat.training import predict_local, val_auc

    result = train(examples_h5, tmp_path / "run", _tiny_config(precision="bfloat16"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["precision"] == "bfloat16" and config["precision"] == "bfloat16"
    best = load_model_safely(tmp_path / "run" / "model.keras")
    assert is_float32(best)  # what predict, evaluate and visualize-layers will load
    # The checkpoint for --resume keeps training in bfloat16.
    assert not is_float32(load_model_safely(tmp_path / "run" / "last.keras"))
    # The validation AUC that chose the best epoch is the saved float32 model's own.
    val = load_split(examples_h5, "val")
    assert val_auc(val.labels, predict_local(best, val.images[..., None])) == \
        pytest.approx(result.best_val_auc, abs=1e-9)


def test_existing_run_is_refused_without_resume_or_overwrite(trained_run, examples_h5):
    with pytest.raises(UsageError, match="--resume"):
        train(examples_h5, trained_run, _tiny_config())


def test_overwrite_keeps_nothing_of_the_old_run_but_loses_nothing_on_failure(examples_h5,
                                                                             tmp_path):
    run = tmp_path / "run"
    train(examples_h5, run, _tiny_config(epochs=1))
    (run / "marker.txt").write_text("old")
    train(examples_h5, run, _tiny_config(epochs=1), overwrite=True)
    assert not (run / "marker.txt").exists()
    assert (run / "model.keras").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the backup was removed


def test_bad_data_is_a_one_line_error(tmp_path, examples_h5):
    with pytest.raises(UsageError, match="does not exist"):
        train(tmp_path / "missing.h5", tmp_path / "r1", _tiny_config())
    not_dataset = tmp_path / "other.h5"
    with h5py.File(not_dataset, "w") as h5:
        h5["x"] = np.zeros(3)
    with pytest.raises(DatasetError, match="not an xrayfeat dataset"):
        train(not_dataset, tmp_path / "r2", _tiny_config())
    with pytest.raises(UsageError, match="larger than"):
        train(examples_h5, tmp_path / "r3", _tiny_config(input_size=512))


def test_dataset_without_validation_images_is_refused(examples_h5, tmp_path):
    copy = copy_moving_split(examples_h5, tmp_path / "noval.h5", "val")
    with pytest.raises(DatasetError, match="no 'val' images"):
        train(copy, tmp_path / "r", _tiny_config())


class _InterruptAfterFirstEpoch:
    """A reporter that presses Ctrl-C when the first epoch ends."""

    def on_prepare_start(self, total): ...
    def on_prepare_progress(self, n): ...
    def on_train_start(self, epochs, initial_epoch, steps): ...
    def on_batch_end(self, loss): ...

    def on_epoch_end(self, epoch, logs):
        raise KeyboardInterrupt


def test_interrupted_overwrite_brings_the_previous_run_back(examples_h5, tmp_path):
    run = tmp_path / "run"
    train(examples_h5, run, _tiny_config(epochs=1))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        train(examples_h5, run, _tiny_config(epochs=2), overwrite=True,
              reporter=_InterruptAfterFirstEpoch())
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no backup or temporary left


def test_refused_arguments_leave_no_run_folder(examples_h5, tmp_path):
    with pytest.raises(UsageError, match="larger than"):
        train(examples_h5, tmp_path / "r", _tiny_config(input_size=512))
    assert not (tmp_path / "r").exists()


def test_overwrite_trains_beside_the_previous_run_until_it_finishes(examples_h5, tmp_path):
    """A kill at any point of an --overwrite run leaves the previous run whole: while the
    new one trains, the old one is still under its name."""
    run = tmp_path / "run"
    train(examples_h5, run, _tiny_config(epochs=1))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    seen = []

    class Check(_InterruptAfterFirstEpoch):
        def on_epoch_end(self, epoch, logs):
            seen.append({p.name: p.read_bytes() for p in run.iterdir()} == before)

    result = train(examples_h5, run, _tiny_config(epochs=2, seed=7), overwrite=True,
                   reporter=Check())
    assert seen == [True, True]
    assert result.run == run and result.epochs_run == 2
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["seed"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_raw_folder_run_records_its_final_data_path(tmp_path):
    from conftest import EXAMPLES_DIR

    run = tmp_path / "run"
    train(EXAMPLES_DIR, run, _tiny_config(epochs=1))
    train(EXAMPLES_DIR, run, _tiny_config(epochs=1), overwrite=True)
    config = json.loads((run / "config.json").read_text())
    assert Path(config["data"]["path"]) == (run / "data.h5").resolve()
