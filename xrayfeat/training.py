"""Fit a MiniVGGNet on a prepared dataset and write a self-describing run directory.

Design choices (measured, see BENCHMARKS.md):
- input: the dataset's stored images, held in RAM when they fit ``memory_budget_mb``,
  streamed from the HDF5 file otherwise; each epoch's order is a permutation seeded by
  ``(seed, epoch)``, and augmentation is seeded per batch with stateless random ops, so an
  epoch sees the same batches whether or not training was interrupted and resumed;
- augmentation: one affine warp per image (rotation, shift, zoom) plus brightness and
  contrast, no horizontal flip (the heart is on the left);
- class imbalance: balanced class weights (every image is used once per epoch; the loss of
  each class counts equally), which works unchanged for N classes;
- checkpoint on validation ROC AUC (macro one-vs-rest for N > 2), early stopping and
  learning-rate halving on plateau, all state kept in ``state.json`` for ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
import weakref
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from xrayfeat.version import __version__
from xrayfeat.atomic import (atomic_output, output_lock, remove_stale_temporaries,
                             temporary_sibling, write_text)
from xrayfeat.config import TrainConfig, checked_settings
from xrayfeat.csvout import csv_text
from xrayfeat.dataset import (DatasetInfo, iter_split, load_split, open_dataset,
                              prepare_dataset, split_indices)
from xrayfeat.errors import DatasetError, RunError, UsageError
from xrayfeat.metrics import evaluate_predictions
from xrayfeat.thresholds import choose_threshold
from xrayfeat.figures import plot_training_curves
from xrayfeat.runs import (CONFIG_FILE, CURVES_FILE, HISTORY_FILE, LAST_FILE, MODEL_FILE,
                           RUN_FORMAT, STATE_FILE, VALIDATION_FILE, load_model_safely,
                           read_json, write_json)

PREPARED_NAME = "data.h5"  # where a raw folder given to train is prepared, inside the run


class TrainReporter(Protocol):
    """What the CLI implements to show progress; every method is optional in spirit."""
    def on_prepare_start(self, total: int) -> None: ...
    def on_prepare_progress(self, n: int) -> None: ...
    def on_train_start(self, epochs: int, initial_epoch: int, steps: int) -> None: ...
    def on_batch_end(self, loss: float) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None: ...


@dataclass
class TrainResult:
    """What ``train`` returns to the CLI."""
    run: Path
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    threshold: float | None
    threshold_ci: dict[str, Any] | None
    threshold_method: str | None
    validation: dict[str, Any]
    seconds: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced weights ``n / (k * count_c)``: each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    if (counts == 0).any():
        missing = [i for i in range(n_classes) if counts[i] == 0]
        raise DatasetError(f"the train split has no images of class index {missing}")
    return {i: float(len(labels) / (n_classes * counts[i])) for i in range(n_classes)}


def predict_local(model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Class probabilities computed in this process only.

    ``model.predict`` under a multi-worker strategy splits the images across workers, so
    each would score a different subset and they could disagree on the best epoch (and
    deadlock). Calling the model on local batches gives every worker the same numbers.
    The last batch is zero-padded to full size, so the forward function is traced once per
    model, not once per batch shape (TensorFlow warns about retracing on the terminal).
    """
    import tensorflow as tf

    forward = _FORWARD.get(model)
    if forward is None:
        weak = weakref.ref(model)  # a strong reference here would keep the key alive forever
        forward = tf.function(lambda x: weak()(x, training=False), autograph=False)
        _FORWARD[model] = forward
    out = []
    for i in range(0, len(images), batch_size):
        chunk = np.asarray(images[i : i + batch_size], np.float32)
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]),
                                                    np.float32)])
        out.append(forward(tf.constant(chunk)).numpy()[:n])
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


#: One traced inference function per model (weak keys: gone with the model).
_FORWARD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def val_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC for binary runs, macro one-vs-rest AUC for N > 2."""
    from sklearn.metrics import roc_auc_score

    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                               labels=list(range(probs.shape[1]))))


# --- run directory ---------------------------------------------------------------------------


def _check_out(out: Path, resume: bool, overwrite: bool) -> bool:
    """Validate ``--out``; True when it holds a previous run that --overwrite will replace."""
    if resume:
        missing = [f for f in (CONFIG_FILE, STATE_FILE, LAST_FILE) if not (out / f).is_file()]
        if missing:
            raise UsageError(f"cannot --resume {out}: {', '.join(missing)} missing "
                             "(no finished epoch to resume from)")
        return False
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out} exists and is not empty; pass --resume to continue it "
                             "or --overwrite to replace it")
        return True
    return False


def _swap_in(new: Path, out: Path) -> None:
    """Replace the run in ``out`` by the finished run in ``new`` (two renames)."""
    backup = temporary_sibling(out, ".previous")
    backup.unlink()
    os.replace(out, backup)
    os.replace(new, out)
    shutil.rmtree(backup, ignore_errors=True)


def _versions() -> dict[str, str]:
    import cv2
    import h5py
    import keras
    import sklearn
    import tensorflow as tf

    return {"xrayfeat": __version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
            "h5py": h5py.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__}


# --- input pipeline --------------------------------------------------------------------------


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
    """A separable 5-tap Gaussian blur with reflected edges, of a ``(b, S, S, 1)`` batch."""
    import tensorflow as tf

    taps = tf.exp(-tf.square(tf.range(-2.0, 3.0)) / (2.0 * tf.square(sigma)))
    taps = taps / tf.reduce_sum(taps)
    padded = tf.pad(images, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT")
    out = tf.nn.conv2d(padded, tf.reshape(taps, [5, 1, 1, 1]), 1, "VALID")
    return tf.nn.conv2d(out, tf.reshape(taps, [1, 5, 1, 1]), 1, "VALID")


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


# --- callbacks -------------------------------------------------------------------------------


#: Train images whose batch statistics are recomputed for averaged weights (``--ema``).
BN_SAMPLE_IMAGES = 768
BN_BATCH = 32


def recalibrate_batch_norm(model, images: np.ndarray) -> None:
    """Recompute ``model``'s batch-norm moving statistics on ``images`` (stored images).

    Keras' EMA averages the trainable weights only, so averaged weights would meet moving
    statistics gathered under the raw weights: an epoch-5 average scored validation AUC
    0.943 with those, 0.977 with statistics of its own (measured). Forward passes in
    training mode, averaging their batch statistics, give it its own (as SWA's
    ``update_bn`` does).
    """
    import keras

    batch_norms = [layer for layer in model.layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    if not batch_norms or not len(images):
        return
    momentum = [layer.momentum for layer in batch_norms]
    try:
        # Momentum (k - 1) / k for batch k makes the moving statistics the plain mean over
        # the batches, the first batch replacing the old values whole (resetting them to
        # 0 and 1 instead left a share of an arbitrary 1 in tiny post-ReLU variances).
        for k, start in enumerate(range(0, len(images), BN_BATCH), start=1):
            for layer in batch_norms:
                layer.momentum = (k - 1) / k
            model(np.asarray(images[start : start + BN_BATCH], np.float32), training=True)
    finally:
        for layer, value in zip(batch_norms, momentum):
            layer.momentum = value


def _make_keeper(out: Path, val_images: np.ndarray, val_labels: np.ndarray,
                 config: TrainConfig, state: dict, reporter: TrainReporter | None,
                 bn_sample: np.ndarray):
    import keras

    from xrayfeat.model import float32_twin, is_float32

    class RunKeeper(keras.callbacks.Callback):
        """Validation AUC, best/last checkpoints, plateau LR, early stopping, CSV history.

        One callback owns all training state so that ``state.json`` can restore it exactly.
        A model trained in bfloat16 is scored and saved as its float32 twin, so validation
        and every later command see the same float32 model.
        """

        _twin = None

        def scoring_model(self):
            """The model validation scores and ``model.keras`` saves: float32, and with the
            optimizer's moving average of the weights when ``ema`` is on."""
            if is_float32(self.model) and not config.ema:
                return self.model
            if self._twin is None:
                self._twin = float32_twin(self.model)
            else:
                self._twin.set_weights(self.model.get_weights())
            if config.ema:
                averages = self.model.optimizer._model_variables_moving_average
                for variable, average in zip(self._twin.trainable_variables, averages):
                    variable.assign(keras.ops.cast(average, variable.dtype))
                recalibrate_batch_norm(self._twin, bn_sample)
            return self._twin

        def on_train_batch_end(self, batch, logs=None):
            if reporter and logs:
                reporter.on_batch_end(float(logs.get("loss", float("nan"))))

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()
            # Dropout draws from per-layer seed generators whose state a saved model does
            # not restore; seeding them by (seed, epoch) makes a resumed epoch identical.
            for i, layer in enumerate(self.model.layers):
                generator = getattr(layer, "seed_generator", None)
                if generator is not None:
                    generator.state.assign(np.array([config.seed * 1000 + i, epoch],
                                                    dtype=generator.state.dtype))

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            scorer = self.scoring_model()
            probs = predict_local(scorer, val_images)
            auc = val_auc(val_labels, probs)
            eps = 1e-7
            val_loss = float(-np.mean(np.log(np.clip(
                probs[np.arange(len(val_labels)), val_labels], eps, 1.0))))
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs.update(val_auc=auc, val_loss=val_loss, lr=lr)
            row = {"epoch": epoch + 1, "loss": float(logs.get("loss", float("nan"))),
                   "val_loss": val_loss, "val_auc": auc, "lr": lr,
                   "seconds": time.perf_counter() - self._t0}
            state["history"].append(row)
            improved = auc > state["best_val_auc"] + 1e-4
            if improved:
                state.update(best_val_auc=auc, best_epoch=epoch + 1, wait=0, lr_wait=0)
                with atomic_output(out / MODEL_FILE) as tmp:
                    scorer.save(tmp)
            else:
                state["wait"] += 1
                state["lr_wait"] += 1
                if state["lr_wait"] >= config.lr_patience and lr > config.min_lr:
                    new_lr = max(config.min_lr, lr * config.lr_factor)
                    self.model.optimizer.learning_rate = new_lr
                    state["lr_wait"] = 0
                if state["wait"] >= config.early_stopping_patience:
                    self.model.stop_training = True
                    state["stopped_early"] = True
            state["epoch"] = epoch + 1
            with atomic_output(out / LAST_FILE) as tmp:
                self.model.save(tmp)  # with optimizer state, for --resume
                _embed_state(tmp, state)  # one rename makes weights and state current
            _write_history(out / HISTORY_FILE, state["history"])
            write_json(out / STATE_FILE, state)  # the same state, for people and scripts
            if reporter:
                reporter.on_epoch_end(epoch + 1, row)

    return RunKeeper()


#: The training state inside ``last.keras`` (a zip file Keras loads without looking at it).
STATE_MEMBER = "xrayfeat_state.json"


def _embed_state(checkpoint: Path, state: dict) -> None:
    """Add the training state to a saved checkpoint, so the two can never disagree.

    Written as two files, a kill between ``last.keras`` and ``state.json`` left epoch k's
    weights with epoch k-1's state, and the resumed run replayed an epoch (seen in a test).
    """
    with zipfile.ZipFile(checkpoint, "a") as archive:
        archive.writestr(STATE_MEMBER, json.dumps(state))


def resume_state(out: Path) -> dict:
    """The state that belongs to ``out/last.keras`` (``state.json`` for older runs)."""
    try:
        with zipfile.ZipFile(out / LAST_FILE) as archive:
            state = json.loads(archive.read(STATE_MEMBER))
    except KeyError:  # a run from before the state was embedded
        state = read_json(out / STATE_FILE)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise RunError(f"cannot resume {out}: {out / LAST_FILE} is damaged ({exc})") from None
    numbers = ("epoch", "best_epoch", "wait", "lr_wait")
    if (not isinstance(state, dict) or not isinstance(state.get("history"), list)
            or not all(isinstance(state.get(k), int) and state[k] >= 0 for k in numbers)
            or not isinstance(state.get("best_val_auc"), (int, float))):
        raise RunError(f"cannot resume {out}: its training state is damaged (epoch, history "
                       "or counters missing); start a new run")
    return state


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    write_text(path, csv_text(rows, list(rows[0])))


# --- strategy --------------------------------------------------------------------------------


def is_chief_worker(strategy: str) -> bool:
    """Whether this process writes the run: always, except a non-chief multi-worker task."""
    if strategy != "multi-worker":
        return True
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except ValueError:
        raise UsageError("TF_CONFIG is not valid JSON") from None
    if not tf_config.get("cluster"):
        raise UsageError("--strategy multi-worker needs TF_CONFIG describing the cluster")
    task = tf_config.get("task", {})
    if "chief" in tf_config["cluster"]:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def make_strategy(name: str):
    """The tf.distribute strategy for ``--strategy``."""
    import tensorflow as tf

    if name == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def fit_multi_worker(model, strategy, train_ds, steps: int, config: TrainConfig,
                     initial_epoch: int, callbacks: list) -> None:
    """The training loop for MultiWorkerMirroredStrategy.

    Keras 3's ``model.fit`` does not run under MultiWorkerMirroredStrategy (it fails on
    per-replica values; keras-team/keras#20585), so the multi-worker path steps the model
    itself with ``strategy.run`` and drives the same callbacks ``fit`` would.
    """
    import keras
    import tensorflow as tf

    dist_ds = strategy.experimental_distribute_dataset(train_ds)
    optimizer = model.optimizer

    def replica_step(x, y, w):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            per_example = keras.losses.categorical_crossentropy(y, probs) * w
            # Scale by the global batch so gradients summed across replicas are a mean.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=config.batch_size)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(iterator):
        x, y, w = next(iterator)
        losses = strategy.run(replica_step, args=(x, y, w))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    for callback in callbacks:
        callback.set_model(model)
    model.stop_training = False
    iterator = iter(dist_ds)
    for epoch in range(initial_epoch, config.epochs):
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        total = 0.0
        for batch in range(steps):
            loss = float(train_step(iterator))
            total += loss
            for callback in callbacks:
                callback.on_train_batch_end(batch, {"loss": loss})
        logs = {"loss": total / steps}
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
        if model.stop_training:
            break


# --- the command -----------------------------------------------------------------------------


def train(
    data: Path,
    out: Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: TrainReporter | None = None,
) -> TrainResult:
    """Train (or resume) a run in ``out`` from a prepared dataset or a raw class folder."""
    data, out = Path(data), Path(out)
    if not data.exists():
        raise UsageError(f"{data} does not exist")
    if is_chief_worker(config.strategy):
        with output_lock(out):  # a second train into the same run is refused, not mixed in
            return _train(data, out, config, resume=resume, overwrite=overwrite,
                          reporter=reporter)
    # Every worker saves (all must take part in each step), but only the chief into --out:
    # the others write into a private folder that is removed at the end.
    private = Path(tempfile.mkdtemp(prefix="xrayfeat-worker-"))
    try:
        return _train(data, private / "run", config, resume=False, overwrite=False,
                      reporter=reporter)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _train(data: Path, out: Path, config: TrainConfig, *, resume: bool, overwrite: bool,
           reporter: TrainReporter | None) -> TrainResult:
    started = time.perf_counter()
    if resume:
        _check_out(out, resume=True, overwrite=False)
        config = _resumed_config(out, config)
        _require_tensorboard(config)
        return _train_in(data, out, config, resume=True, reporter=reporter, started=started)
    config.validate()
    _require_tensorboard(config)
    if data.is_file():
        open_dataset(data)  # a file that is not a dataset is refused before --out is touched
    created = not out.exists()
    replace = _check_out(out, resume=False, overwrite=overwrite)
    # --overwrite trains beside the previous run and swaps it in only when finished: a
    # crash, Ctrl-C or kill leaves the previous run whole under its name.
    work = out
    if replace:
        remove_stale_temporaries(out.parent)  # e.g. unfinished runs of a killed --overwrite
        work = temporary_sibling(out, ".new")
        work.unlink()
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = _train_in(data, work, config, resume=False, reporter=reporter,
                           started=started, final=out)
    except BaseException:
        if replace:
            shutil.rmtree(work, ignore_errors=True)
        elif created and not (out / STATE_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing resumable: leave no empty run
        raise
    if replace:
        _swap_in(work, out)
        result.run = out
    return result


def _train_in(data: Path, out: Path, config: TrainConfig, *, resume: bool,
              reporter: TrainReporter | None, started: float,
              final: Path | None = None) -> TrainResult:
    """Prepare (for a folder), build or reload the model, fit, and finish the run in ``out``.

    ``final`` is where the run will live when ``out`` is a temporary folder (--overwrite).
    """
    final = final or out
    if data.is_dir():
        prepared = out / PREPARED_NAME
        if not (resume and prepared.is_file()):
            prepare_dataset(data, prepared, overwrite=True,
                            on_start=getattr(reporter, "on_prepare_start", None),
                            on_progress=getattr(reporter, "on_prepare_progress", None))
        data = prepared
    info = open_dataset(data)
    info.require_split("train")
    info.require_split("val")
    if config.input_size > info.size:
        raise UsageError(f"--input-size {config.input_size} is larger than the {info.size} px "
                         f"images stored in {data}; prepare with --size {config.input_size}")
    n_classes = len(info.classes)

    import keras  # TensorFlow starts here, after any prepare workers are done

    from xrayfeat.model import build_minivggnet, resolve_precision

    keras.utils.set_random_seed(config.seed)
    precision = resolve_precision(config.precision)
    strategy = make_strategy(config.strategy)
    val = load_split(info.path, "val")
    train_labels = load_split(info.path, "train", with_images=False).labels
    if len(np.unique(val.labels)) < 2:
        raise DatasetError(f"the validation split of {data} holds only one class; "
                           "its AUC is undefined")
    weights = class_weights(train_labels, n_classes) if config.class_weight == "balanced" else \
        {i: 1.0 for i in range(n_classes)}

    if resume:
        state = resume_state(out)
        # A kill may have come between last.keras and the two readable copies of its state.
        _write_history(out / HISTORY_FILE, state["history"])
        write_json(out / STATE_FILE, state)
    else:
        state = {"epoch": 0, "best_val_auc": -1.0, "best_epoch": 0, "wait": 0, "lr_wait": 0,
                 "stopped_early": False, "history": []}
        write_json(out / CONFIG_FILE, {
            "format": RUN_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "classes": info.classes,
            "positive_class": info.classes[1] if n_classes == 2 else None,
            "train": config.to_dict(),
            "precision": precision,  # what "auto" became on this machine
            "class_weights": weights,
            "preprocess": {"size": info.size, "roi": info.roi, "resize": info.resize,
                           "roi_settings": _roi_settings(info.path)},
            "data": {"path": str(_final_path(data, out, final)), "sha256": file_sha256(data),
                     "splits": info.split_counts, "label_mode": info.label_mode},
            "versions": _versions(),
        })

    with strategy.scope():
        if resume:
            model = load_model_safely(out / LAST_FILE, compile=True)
        else:
            model = build_minivggnet(n_classes, input_size=config.input_size,
                                     stored_size=info.size, width=config.width,
                                     color_mode=config.color_mode,
                                     synchronized_bn=strategy.num_replicas_in_sync > 1,
                                     precision=precision)
            model.compile(
                optimizer=keras.optimizers.AdamW(config.lr, weight_decay=config.weight_decay,
                                                 use_ema=config.ema,
                                                 ema_momentum=config.ema_momentum),
                loss=keras.losses.CategoricalCrossentropy(),
            )
    train_ds, steps = make_train_dataset(info, config, state["epoch"], weights, n_classes)
    if reporter:
        reporter.on_train_start(config.epochs, state["epoch"], steps)
    bn_sample = _bn_sample(info, config) if config.ema else np.zeros((0,))
    callbacks = [_make_keeper(out, val.images[..., None], val.labels, config, state, reporter,
                              bn_sample)]
    if config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(config.tensorboard))
    already_stopped = state.get("stopped_early", False)
    if state["epoch"] < config.epochs and not already_stopped:
        if config.strategy == "multi-worker":
            fit_multi_worker(model, strategy, train_ds, steps, config, state["epoch"],
                             callbacks)
        else:
            model.fit(train_ds, epochs=config.epochs, initial_epoch=state["epoch"],
                      steps_per_epoch=steps, callbacks=callbacks, verbose=0, shuffle=False)

    return _finish(out, info, val, state, config, started)


def _bn_sample(info: DatasetInfo, config: TrainConfig) -> np.ndarray:
    """A fixed, seeded sample of train images ``(n, S, S, 1)`` for batch-norm statistics."""
    n = len(split_indices(info.path, "train"))
    order = np.random.default_rng([config.seed, 7]).permutation(n)[:BN_SAMPLE_IMAGES]
    return np.concatenate([images for images, _ in iter_split(
        info.path, "train", BN_SAMPLE_IMAGES, order=np.sort(order))])[..., None]


def _resumed_config(out: Path, given: TrainConfig) -> TrainConfig:
    """The settings a run was started with, checked like a TOML file (a run directory is
    data: it may have been edited). Where TensorBoard logs go is the command line's choice
    alone, never the file's (a crafted run could point it outside itself); ``--epochs`` may
    extend the run."""
    saved = read_json(out / CONFIG_FILE)
    settings = saved.get("train") if isinstance(saved, dict) else None
    if not isinstance(settings, dict):
        raise RunError(f"{out / CONFIG_FILE} is damaged (no train settings); cannot resume")
    settings = {**settings, "tensorboard": given.tensorboard}
    settings.setdefault("precision", "float32")  # runs from before the setting
    config = checked_settings(settings, str(out / CONFIG_FILE))
    config.epochs = max(config.epochs, given.epochs)
    return config


def _require_tensorboard(config: TrainConfig) -> None:
    """``--tensorboard`` needs the tensorboard package: say so before the first epoch."""
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: "
                             "pip install tensorboard") from None


def _final_path(path: Path, out: Path, final: Path) -> Path:
    """Where ``path`` will be once the run in ``out`` has moved to ``final``."""
    path, out = path.resolve(), out.resolve()
    return final.resolve() / path.relative_to(out) if path.is_relative_to(out) else path


def _roi_settings(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs.get("roi_settings", "{}"))


def _finish(out: Path, info: DatasetInfo, val, state: dict, config: TrainConfig,
            started: float) -> TrainResult:
    """Threshold and metrics of the best model on validation; training curves."""
    model = load_model_safely(out / MODEL_FILE)
    probs = predict_local(model, val.images[..., None])
    validation: dict[str, Any] = {"threshold": None, "threshold_method": None}
    if probs.shape[1] == 2:
        point = choose_threshold(val.labels, probs[:, 1], config.threshold_method,
                                 groups=val.patients,
                                 min_sensitivity=config.threshold_sensitivity, seed=config.seed)
        validation.update(point.to_dict())
    threshold = validation["threshold"]
    metrics = evaluate_predictions(val.labels, probs, info.classes, threshold=threshold,
                                   groups=val.patients, n_boot=0)
    validation.update(best_epoch=state["best_epoch"], metrics=metrics)
    write_json(out / VALIDATION_FILE, validation)

    plot_training_curves(state["history"], out / CURVES_FILE)
    return TrainResult(run=out, best_epoch=state["best_epoch"],
                       best_val_auc=state["best_val_auc"], epochs_run=state["epoch"],
                       threshold=threshold, threshold_ci=validation.get("threshold_ci"),
                       threshold_method=validation["threshold_method"], validation=metrics,
                       seconds=time.perf_counter() - started,
                       stopped_early=state.get("stopped_early", False),
                       history=state["history"])
