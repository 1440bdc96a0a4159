"""The training input pipeline: a seeded order per epoch, radiograph-safe augmentation,
and the tf.data stream that feeds ``fit``.

Order and augmentation are seeded by (seed, epoch), so a resumed run sees the same batches
it would have seen uninterrupted. Augmentation runs on the stored images: its parameters
are drawn in the graph, its pixels computed by OpenCV (``augment_arrays``) in a fifth of
the CPU time of TensorFlow's image ops, which matters because the pipeline shares the
cores with the training step.
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
    int tensor: the parameters are drawn by stateless ops, so the result is a pure function
    of it. The pixels are computed by :func:`augment_arrays` (OpenCV), inside the graph.
    """
    import tensorflow as tf

    params = augmentation_parameters(tf.shape(images)[0], tf.shape(images)[1], seeds, config)
    out = tf.numpy_function(lambda x, p: augment_arrays(x, p, config), [images, params],
                            tf.float32, stateful=False, name="augment")
    out.set_shape(images.shape)
    return out


#: Columns of :func:`augmentation_parameters`: the inverse affine map (output pixel (x, y)
#: samples input (a0 x + a1 y + a2, b0 x + b1 y + b2)), then one value per adjustment.
PARAMETERS = ("a0", "a1", "a2", "b0", "b1", "b2", "flip", "contrast", "brightness", "blur",
              "gamma", "frame")


def augmentation_parameters(b, size, seeds, config: TrainConfig):
    """A float32 ``(b, 12)`` tensor of each image's augmentation (columns ``PARAMETERS``),
    drawn by stateless ops from ``seeds``."""
    import tensorflow as tf

    size = tf.cast(size, tf.float32)

    def u(i, lo, hi):
        return tf.random.stateless_uniform([b], seed=seeds + i, minval=lo, maxval=hi)

    theta = u(1, -1.0, 1.0) * (config.rotation_deg * math.pi / 180.0)
    zoom = 1.0 + u(2, -config.zoom, config.zoom)
    tx = u(3, -config.shift, config.shift) * size
    ty = u(4, -config.shift, config.shift) * size
    c = (size - 1.0) / 2.0
    cos, sin = tf.cos(theta) / zoom, tf.sin(theta) / zoom
    # Rotate and scale about the centre, then shift.
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = c - a0 * c - a1 * c + tx
    b2 = c - b0 * c - b1 * c + ty
    flip = tf.cast(u(5, 0.0, 1.0) < 0.5, tf.float32) if config.hflip else tf.zeros([b])
    contrast = 1.0 + u(6, -config.contrast, config.contrast)
    brightness = u(7, -config.brightness, config.brightness) * 255.0
    blur = u(8, -config.blur, config.blur)
    gamma = tf.exp(u(9, -config.gamma, config.gamma))
    # Half the images get a black frame of random width (collimation, scanner borders).
    frame = u(10, 0.0, config.frame) * size * tf.cast(u(11, 0.0, 1.0) < 0.5, tf.float32)
    return tf.stack([a0, a1, a2, b0, b1, b2, flip, contrast, brightness, blur, gamma, frame],
                    axis=1)


def augment_arrays(images: np.ndarray, params: np.ndarray, config: TrainConfig) -> np.ndarray:
    """:func:`augment_batch`'s pixels: ``images`` float32 ``(b, S, S, 1)`` in 0-255, each
    transformed by its row of ``params`` (:func:`augmentation_parameters`).

    OpenCV, one image at a time on one core: the same arithmetic as TensorFlow's image ops
    to rounding (tests/test_training.py), in a fifth of their CPU time (18.8 against 88.3
    ms for 32 images at 224 px: BENCHMARKS.md), CPU the training step beside the input
    pipeline would otherwise lose.
    """
    import cv2

    b, height, width = images.shape[:3]
    out = np.empty((b, height, width), np.float32)
    rows, cols = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
    taps = _gaussian_taps(height)
    # Each image is worked on in place, in its row of ``out``: the same float32 operations
    # in the same order as the formulas in the comments (the same bits: tested), without a
    # temporary image per operation: 24 against 28 ms of one core for 64 images, though no
    # change the epoch could show (BENCHMARKS.md, "The 4-minute target").
    for i in range(b):
        a0, a1, a2, b0, b1, b2, flip, contrast, brightness, blur, gamma, frame = params[i]
        image = images[i, :, ::-1, 0] if flip else images[i, :, :, 0]
        x = out[i]
        cv2.warpAffine(np.ascontiguousarray(image), np.array([[a0, a1, a2], [b0, b1, b2]]),
                       (width, height), dst=x, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        # clip((x - mean) * contrast + mean + brightness, 0, 255)
        mean = x.mean(dtype=np.float32)
        x -= mean
        x *= contrast
        x += mean
        x += brightness
        np.clip(x, 0.0, 255.0, out=x)
        if config.blur:
            # Blur (blur > 0) or unsharp-mask sharpening (< 0) towards a Gaussian of sigma
            # height/64: acquisition sites differ in sharpness (see `xrayfeat audit`).
            # clip(x + blur * (blurred - x), 0, 255)
            blurred = cv2.sepFilter2D(x, cv2.CV_32F, taps, taps,
                                      borderType=cv2.BORDER_REFLECT_101)
            blurred -= x
            blurred *= blur
            x += blurred
            np.clip(x, 0.0, 255.0, out=x)
        if config.gamma:
            # 255 * (x / 255) ** gamma, as (x * float32(1 / 255)) ** gamma * 255
            x *= np.float32(1.0 / 255.0)
            cv2.pow(x, float(gamma), dst=x)
            x *= np.float32(255.0)
        if config.frame and frame > 0:  # a black frame: zero the rows and columns outside
            x[~((rows >= frame) & (rows < height - frame))] = 0.0
            x[:, ~((cols >= frame) & (cols < width - frame))] = 0.0
    return out[..., None]


def augment_with_tensorflow_ops(images, params, config: TrainConfig):
    """:func:`augment_arrays` written in TensorFlow's image ops (the implementation until
    OpenCV's replaced it, 4.7x its CPU time): the reference the OpenCV pixels are tested
    against, and the baseline ``bench/train.py`` times them against. Same arguments, as
    tensors; returns a tensor."""
    import tensorflow as tf

    a0, a1, a2, b0, b1, b2, flip, contrast, brightness, blur, gamma, frame = (
        params[:, k] for k in range(len(PARAMETERS)))
    height, width = images.shape[1], images.shape[2]
    zeros = tf.zeros_like(a0)
    x = tf.where(flip[:, None, None, None] > 0, tf.reverse(images, axis=[2]), images)
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1),
        output_shape=[height, width], fill_value=0.0, interpolation="BILINEAR",
        fill_mode="CONSTANT")
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]
    x = tf.clip_by_value(x, 0.0, 255.0)
    if config.blur:
        taps = _gaussian_taps(height)
        padded = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT")
        down = tf.add_n([taps[k] * padded[:, k:k + height] for k in range(5)])
        blurred = tf.add_n([taps[k] * down[:, :, k:k + width] for k in range(5)])
        x = tf.clip_by_value(x + blur[:, None, None, None] * (blurred - x), 0.0, 255.0)
    if config.gamma:
        x = 255.0 * tf.pow(x / 255.0, gamma[:, None, None, None])
    if config.frame:
        rows = tf.range(height, dtype=tf.float32)[None, :]
        cols = tf.range(width, dtype=tf.float32)[None, :]
        inside_rows = tf.cast((rows >= frame[:, None]) & (rows < height - frame[:, None]),
                              tf.float32)
        inside_cols = tf.cast((cols >= frame[:, None]) & (cols < width - frame[:, None]),
                              tf.float32)
        x = x * (inside_rows[:, :, None, None] * inside_cols[:, None, :, None])
    return x


def _gaussian_taps(size: int) -> np.ndarray:
    """The 5 normalised taps of a Gaussian of sigma ``size / 64`` (the blur augmentation)."""
    sigma = np.float32(size / 64.0)
    taps = np.exp(-np.arange(-2.0, 3.0, dtype=np.float32) ** 2 / (2 * sigma * sigma))
    return (taps / taps.sum()).astype(np.float32)


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
    # No autotuning model: deleting the iterator at the end of ``fit`` waits for the
    # model's optimisation thread (py-spy: inside the iterator's destructor), the process
    # idle for 4 s after one epoch, 9 s after two, 37 s after three (measured). Without it
    # the map keeps its starting parallelism, one call per core up to 16, and was no
    # slower; the batches are the same (BENCHMARKS.md, "The 4-minute target").
    options.autotune.enabled = False
    return ds.with_options(options), steps
