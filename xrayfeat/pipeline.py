"""The training input pipeline: a seeded order per epoch, radiograph-safe augmentation,
and the tf.data stream that feeds ``fit``.

Order and augmentation are seeded by (seed, epoch), so a resumed run sees the same batches
it would have seen uninterrupted. Augmentation runs on the stored images, in the graph.
"""

from __future__ import annotations

import math

import numpy as np

from xrayfeat.config import TrainConfig
from xrayfeat.dataset import DatasetInfo, iter_split, load_split, split_indices


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the train rows used in ``epoch`` (same after a resume)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def augment_batch(images, seeds, config: TrainConfig):
    """Radiograph-safe augmentation of a float32 batch ``(b, S, S, 1)`` in 0-255.

    One affine warp per image (rotation, shift, zoom: one interpolation, not three),
    then brightness and contrast, and where configured blur/sharpening, gamma and a black
    frame (the acquisition differences ``xrayfeat audit`` measures). ``seeds`` is a ``(2,)``
    int tensor: stateless ops make the result a pure function of it.
    """
    import tensorflow as tf

    b = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1], tf.float32)

    def u(i, lo, hi):
        return tf.random.stateless_uniform([b], seed=seeds + i, minval=lo, maxval=hi)

    theta = u(1, -1.0, 1.0) * (config.rotation_deg * math.pi / 180.0)
    zoom = 1.0 + u(2, -config.zoom, config.zoom)
    tx = u(3, -config.shift, config.shift) * size
    ty = u(4, -config.shift, config.shift) * size
    c = (size - 1.0) / 2.0
    cos, sin = tf.cos(theta) / zoom, tf.sin(theta) / zoom
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotate and
    # scale about the centre, then shift.
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = c - a0 * c - a1 * c + tx
    b2 = c - b0 * c - b1 * c + ty
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    if config.hflip:
        flip = u(5, 0.0, 1.0) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    contrast = 1.0 + u(6, -config.contrast, config.contrast)
    brightness = u(7, -config.brightness, config.brightness) * 255.0
    images = (images - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]
    images = tf.clip_by_value(images, 0.0, 255.0)
    if config.blur:
        # Blur (a > 0) or unsharp-mask sharpening (a < 0) towards a Gaussian of sigma
        # side/64: acquisition sites differ in sharpness (see `xrayfeat audit`).
        blurred = _gaussian_blur(images, sigma=size / 64.0)
        a = u(8, -config.blur, config.blur)[:, None, None, None]
        images = tf.clip_by_value(images + a * (blurred - images), 0.0, 255.0)
    if config.gamma:
        gamma = tf.exp(u(9, -config.gamma, config.gamma))[:, None, None, None]
        images = 255.0 * tf.pow(images / 255.0, gamma)
    if config.frame:
        # Half the images get a black frame of random width (collimation, scanner borders).
        width = u(10, 0.0, config.frame) * size * tf.cast(u(11, 0.0, 1.0) < 0.5, tf.float32)
        pos = tf.range(size)[None, :]
        inside = tf.cast((pos >= width[:, None]) & (pos < size - width[:, None]), tf.float32)
        images = images * (inside[:, :, None, None] * inside[:, None, :, None])
    return images


def _gaussian_blur(images, sigma):
    """A separable 5-tap Gaussian blur with reflected edges, of a ``(b, S, S, 1)`` batch.

    Written as weighted sums of shifted slices, not ``tf.nn.conv2d``: a one-channel
    convolution is oneDNN's worst case, and took 5.5x as long here (225 against 41 ms for 32
    images at 224 px on 2 cores), most of an epoch's augmentation time.
    """
    import tensorflow as tf

    taps = tf.exp(-tf.square(tf.range(-2.0, 3.0)) / (2.0 * tf.square(sigma)))
    taps = taps / tf.reduce_sum(taps)
    size = tf.shape(images)[1]
    padded = tf.pad(images, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT")
    rows = tf.add_n([taps[k] * padded[:, k:k + size, :, :] for k in range(5)])
    return tf.add_n([taps[k] * rows[:, :, k:k + size, :] for k in range(5)])


def make_train_dataset(info: DatasetInfo, config: TrainConfig, initial_epoch: int,
                       weights: dict[int, float], n_classes: int):
    """tf.data pipeline of ``(images, one_hot, sample_weight)`` for epochs
    ``initial_epoch .. config.epochs - 1``; returns the dataset and its steps per epoch.

    The train split is held in RAM when it fits ``memory_budget_mb`` (read once from the
    HDF5 file), else streamed from the file batch by batch.
    """
    import tensorflow as tf

    n = len(split_indices(info.path, "train"))
    if n * info.size * info.size <= config.memory_budget_mb * 2**20:
        arrays = load_split(info.path, "train")
        return pipeline_from_arrays(tf.constant(arrays.images),
                                    tf.constant(arrays.labels, tf.int32),
                                    config, initial_epoch, weights, n_classes)

    def generate():
        for e in range(initial_epoch, config.epochs):
            yield from iter_split(info.path, "train", config.batch_size,
                                  order=epoch_order(n, config.seed, e))

    source = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec((None, info.size, info.size), tf.uint8),
        tf.TensorSpec((None,), tf.int64)))
    return _finish_pipeline(source, lambda batch: (batch[0], tf.cast(batch[1], tf.int32)),
                            n, config, initial_epoch, weights, n_classes)


def pipeline_from_arrays(images, labels, config: TrainConfig, initial_epoch: int,
                         weights: dict[int, float], n_classes: int):
    """The training pipeline over images ``(N, S, S)`` uint8 and labels already in memory.

    Augmentation warps the stored images, before the model's own antialiased resize: an
    augmentation at the input size (one bilinear warp of 64 px images) was tried for speed,
    and blurred the training images relative to the validation ones; its one measured run
    scored validation AUC 0.984 against 0.992 (BENCHMARKS.md).
    """
    import tensorflow as tf

    n = int(labels.shape[0])
    epochs = range(initial_epoch, config.epochs)
    orders = (np.stack([epoch_order(n, config.seed, e) for e in epochs]) if len(epochs)
              else np.zeros((0, n), np.int64))
    source = tf.data.Dataset.from_tensor_slices(orders).flat_map(
        tf.autograph.experimental.do_not_convert(
            lambda order: tf.data.Dataset.from_tensor_slices(order).batch(config.batch_size)))
    return _finish_pipeline(source, lambda idx: (tf.gather(images, idx), tf.gather(labels, idx)),
                            n, config, initial_epoch, weights, n_classes)


def _finish_pipeline(source, load, n: int, config: TrainConfig, initial_epoch: int,
                     weights: dict[int, float], n_classes: int):
    """One parallel map per batch: ``load`` it, augment, one-hot, weight; then prefetch."""
    import tensorflow as tf

    steps = math.ceil(n / config.batch_size)
    weight_table = tf.constant([weights[i] for i in range(n_classes)], tf.float32)
    # Batch b of epoch e gets augmentation seed (seed, e * steps + b): resumable.
    batch_ids = tf.data.Dataset.range(initial_epoch * steps, config.epochs * steps)

    def finish(item, batch_id):
        x, y = load(item)
        x = tf.cast(x, tf.float32)[..., None]
        if config.augment:
            seeds = tf.stack([tf.constant(config.seed, tf.int64), batch_id])
            x = augment_batch(x, tf.cast(seeds, tf.int32), config)
        one_hot = tf.one_hot(y, n_classes)
        if config.label_smoothing:
            one_hot = one_hot * (1 - config.label_smoothing) + config.label_smoothing / n_classes
        return x, one_hot, tf.gather(weight_table, y)

    # Plain TensorFlow code needs no AutoGraph conversion, and converting it prints
    # warnings to the user's terminal ("AutoGraph could not transform ...").
    ds = tf.data.Dataset.zip((source, batch_ids)).map(
        tf.autograph.experimental.do_not_convert(finish), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options), steps
