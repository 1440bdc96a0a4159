"""MiniVGGNet (Rosebrock), with named layers that ``visualize-layers`` and users address.

Two blocks of CONV3x3-RELU-BN, CONV3x3-RELU-BN, MAXPOOL 2x2, DROPOUT 0.25 (32 then 64
filters), then FLATTEN, DENSE 512-RELU-BN, DROPOUT 0.5 and a softmax over the classes.
BatchNormalization normalises over the channel axis (-1 in channels-last); a widely copied
version uses ``axis=1``, which normalises over image rows by mistake.

The model takes the stored dataset images as they are (``(size, size, 1)``, 0-255) and its
first two layers resize them to the input size and scale them to [0, 1]: every command feeds
the same stored images, so resizing and scaling can never differ between train and predict.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any

import keras
from keras import layers

from xrayfeat.choices import COLOR_MODES
from xrayfeat.errors import RunError

#: Names of the convolutional layers, shallow to deep (width does not change them).
CONV_LAYERS = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2")
#: Moving-statistics momentum of BatchNormalization. Keras' 0.99 lags ~100 steps behind the
#: weights; with ~150 steps an epoch (batch 32), validation scores of the first epochs
#: collapsed to chance (measured: val AUC 0.90 then 0.50); 0.9 tracks them within an epoch.
BN_MOMENTUM = 0.9
#: Keras dtype policy of each precision: ``bfloat16`` computes convolutions and matrix
#: products in bfloat16 with float32 weights; ``float32`` computes everything in float32.
_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of this CPU as Linux lists them (empty where unknown)."""
    if platform.system() != "Linux":
        return set()
    try:
        return set(next((line for line in cpuinfo.read_text().splitlines()
                         if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX-BF16).

    Without it oneDNN emulates bfloat16, which is slower than float32.
    """
    flags = cpu_flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, *, has_gpu: bool | None = None,
                      cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``auto`` becomes ``bfloat16`` on a CPU-only host with native bfloat16 (AVX512_BF16 or
    AMX) and ``float32`` elsewhere (GPUs untried here). ``has_gpu`` is asked of TensorFlow
    unless given.

    On a 2-core Zen 4 with AVX512_BF16, bfloat16 trained 1.48x faster than float32, and on
    three new seeds of each, compared by a rule set before they ran, its held-out test
    figures were no worse than float32's (BENCHMARKS.md, "bfloat16 against float32").
    """
    if precision != "auto":
        return precision
    if has_gpu is None:
        import tensorflow as tf

        has_gpu = bool(tf.config.list_physical_devices("GPU"))
    return "bfloat16" if not has_gpu and cpu_has_native_bfloat16(cpuinfo) else "float32"


def build_minivggnet(
    num_classes: int,
    *,
    input_size: int = 128,
    stored_size: int | None = None,
    width: float = 1.0,
    color_mode: str = "grayscale",
    synchronized_bn: bool = False,
    precision: str = "float32",
    name: str = "minivggnet",
) -> keras.Model:
    """Build an uncompiled MiniVGGNet.

    ``stored_size`` is the side of the images the model is fed (the dataset's); they are
    resized to ``input_size`` inside the model. ``width`` multiplies every layer's units.
    ``synchronized_bn`` shares batch statistics across tf.distribute replicas, so every
    worker keeps the same moving averages (and so the same validation scores).
    ``color_mode="rgb"`` replicates the grayscale radiograph into three channels inside the
    model (what RGB-loading notebook recipes feed; it adds no information): the model's
    input stays the stored one-channel image.
    ``precision`` (``float32`` or ``bfloat16``) is the compute dtype of the layers between
    the input scaling and the softmax; both of those stay float32.
    """
    if num_classes < 2:
        raise ValueError("a classifier needs at least two classes")
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be one of {COLOR_MODES}, got {color_mode!r}")
    if precision not in _POLICY:
        raise ValueError(f"precision must be one of {sorted(_POLICY)}, got {precision!r}")
    policy = _POLICY[precision]
    stored_size = stored_size or input_size
    f1, f2, dense = (max(1, round(n * width)) for n in (32, 64, 512))
    inputs = keras.Input((stored_size, stored_size, 1), name="image")
    x = inputs
    if stored_size != input_size:
        # Antialiased bilinear: no aliasing when shrinking 224 -> 64, and unlike "area" it
        # has a gradient, which saliency and Grad-CAM through the input need.
        x = layers.Resizing(input_size, input_size, interpolation="bilinear", antialias=True,
                            dtype="float32", name="resize")(x)
    x = layers.Rescaling(1.0 / 255.0, dtype="float32", name="rescale")(x)
    if color_mode == "rgb":
        x = layers.Concatenate(axis=-1, dtype="float32", name="to_rgb")([x, x, x])
    for block, filters in ((1, f1), (2, f2)):
        for conv in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", dtype=policy,
                              name=f"block{block}_conv{conv}")(x)
            x = layers.Activation("relu", dtype=policy, name=f"block{block}_relu{conv}")(x)
            x = layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM,
                                          synchronized=synchronized_bn, dtype=policy,
                                          name=f"block{block}_bn{conv}")(x)
        x = layers.MaxPooling2D(2, dtype=policy, name=f"block{block}_pool")(x)
        x = layers.Dropout(0.25, dtype=policy, name=f"block{block}_dropout")(x)
    x = layers.Flatten(dtype=policy, name="flatten")(x)
    x = layers.Dense(dense, dtype=policy, name="fc1")(x)
    x = layers.Activation("relu", dtype=policy, name="fc1_relu")(x)
    x = layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM,
                                  synchronized=synchronized_bn, dtype=policy, name="fc1_bn")(x)
    x = layers.Dropout(0.5, dtype=policy, name="fc1_dropout")(x)
    # Softmax in float32: bfloat16 has 3 significant digits, too few for probabilities
    # near 0 or 1 (and for the thresholds chosen on them).
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32",
                           name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


#: Layers of an ensemble's i-th member are named ``member{i}_{layer}`` (build_ensemble).
MEMBER_PREFIX = re.compile(r"^(member\d+)_")


def member_of(layer_name: str) -> str:
    """``member3`` for a layer of an ensemble's third member, ``""`` outside ensembles."""
    match = MEMBER_PREFIX.match(layer_name)
    return match.group(1) if match else ""


def build_ensemble(models: list[keras.Model], name: str = "ensemble") -> keras.Model:
    """One flat model averaging ``models``' outputs (same input shape and classes): every
    member's layers, renamed ``member{i}_...``, on one shared input, then an ``Average``
    layer named ``predictions``. Keras layers only, so it loads in safe mode."""
    shape = models[0].input_shape[1:]
    if any(m.input_shape[1:] != shape or m.output_shape != models[0].output_shape
           for m in models):
        raise RunError("the members' models take different inputs or predict different "
                       "classes; ensemble runs trained on the same prepared data")
    image = keras.Input(shape, name="image")
    outputs = []
    for i, member in enumerate(models, start=1):
        def renamed(layer, prefix=f"member{i}_"):
            config = layer.get_config()
            config["name"] = prefix + layer.name
            return layer.__class__.from_config(config)

        clone = keras.models.clone_model(member, input_tensors=image, clone_function=renamed)
        copy_weights(member, clone)
        outputs.append(clone.output)
    averaged = keras.layers.Average(name="predictions", dtype="float32")(outputs)
    return keras.Model(image, averaged, name=name)


def is_float32(model: keras.Model) -> bool:
    """Whether every layer of ``model`` computes in float32."""
    return all(layer.dtype_policy.name == "float32" for layer in model.layers)


def float32_twin(model: keras.Model) -> keras.Model:
    """A float32 copy of ``model`` with the same weights (no optimizer).

    Training may run in bfloat16, but the saved model, its validation scores and everything
    computed from it later (predict, evaluate, layer outputs, Grad-CAM) are float32.
    """
    config = _with_float32_policies(model.get_config())
    twin = model.__class__.from_config(config)
    copy_weights(model, twin)
    return twin


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Give ``target`` the weights of ``source``, a model of the same layers (its float32
    twin, say): the values ``target.set_weights(source.get_weights())`` gives, variable by
    variable without the round trip through NumPy (5 against 29 ms for the default
    MiniVGGNet, at the end of every epoch)."""
    if len(source.weights) != len(target.weights):
        raise ValueError(f"cannot copy {len(source.weights)} weights into "
                         f"{len(target.weights)}: the models differ")
    for to, value in zip(target.weights, source.weights):
        to.assign(value)


def _with_float32_policies(config: Any) -> Any:
    """``config`` with every layer's dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _with_float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_with_float32_policies(value) for value in config]
    return config


def forward_flops(model: keras.Model) -> int:
    """Multiply-adds x 2 of one forward pass, counted from the Conv2D and Dense layers."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            total += 2 * h * w * c_out * kh * kw * c_in
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)
