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

import keras
from keras import layers

#: Names of the convolutional layers, shallow to deep (width does not change them).
CONV_LAYERS = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2")
#: Moving-statistics momentum of BatchNormalization. Keras' 0.99 lags ~100 steps behind the
#: weights; with ~150 steps an epoch, validation scores of the first epochs collapsed to
#: chance (measured: val AUC 0.90 then 0.50); 0.9 tracks them within an epoch.
BN_MOMENTUM = 0.9


def build_minivggnet(
    num_classes: int,
    *,
    input_size: int = 128,
    stored_size: int | None = None,
    width: float = 1.0,
    channels: int = 1,
    synchronized_bn: bool = False,
    name: str = "minivggnet",
) -> keras.Model:
    """Build an uncompiled MiniVGGNet.

    ``stored_size`` is the side of the images the model is fed (the dataset's); they are
    resized to ``input_size`` inside the model. ``width`` multiplies every layer's units.
    ``synchronized_bn`` shares batch statistics across tf.distribute replicas, so every
    worker keeps the same moving averages (and so the same validation scores).
    """
    if num_classes < 2:
        raise ValueError("a classifier needs at least two classes")
    stored_size = stored_size or input_size
    f1, f2, dense = (max(1, round(n * width)) for n in (32, 64, 512))
    inputs = keras.Input((stored_size, stored_size, channels), name="image")
    x = inputs
    if stored_size != input_size:
        # Antialiased bilinear: no aliasing when shrinking 224 -> 64, and unlike "area" it
        # has a gradient, which saliency and Grad-CAM through the input need.
        x = layers.Resizing(input_size, input_size, interpolation="bilinear", antialias=True,
                            name="resize")(x)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for block, filters in ((1, f1), (2, f2)):
        for conv in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", name=f"block{block}_conv{conv}")(x)
            x = layers.Activation("relu", name=f"block{block}_relu{conv}")(x)
            x = layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM,
                                          synchronized=synchronized_bn,
                                          name=f"block{block}_bn{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.Dropout(0.25, name=f"block{block}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense, name="fc1")(x)
    x = layers.Activation("relu", name="fc1_relu")(x)
    x = layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM,
                                  synchronized=synchronized_bn, name="fc1_bn")(x)
    x = layers.Dropout(0.5, name="fc1_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


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
