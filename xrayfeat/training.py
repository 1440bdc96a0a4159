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

import json
import math
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from xrayfeat.atomic import atomic_output, output_lock, remove_stale_temporaries, temporary_sibling
from xrayfeat.config import TrainConfig, checked_settings
from xrayfeat.dataset import (DatasetInfo, iter_split, load_split, open_dataset, prepare_dataset,
                              split_indices)
from xrayfeat.distribute import fit_multi_worker, is_chief_worker, make_strategy
from xrayfeat.errors import DatasetError, RunError, UsageError
from xrayfeat.figures import plot_training_curves
from xrayfeat.metrics import evaluate_predictions
from xrayfeat.pipeline import make_train_dataset
from xrayfeat.preprocessing import PreprocessSettings
from xrayfeat.roi import RoiSettings
from xrayfeat.runs import (CONFIG_FILE, CURVES_FILE, HISTORY_FILE, LAST_FILE, MODEL_FILE,
                           STATE_FILE, VALIDATION_FILE, DataProvenance, RunConfig, check_out_dir,
                           embed_state, file_sha256, load_model_safely, read_json, resume_state,
                           swap_in, versions, write_history, write_json, write_run_config)
from xrayfeat.thresholds import choose_threshold

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


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced weights ``n / (k * count_c)``: each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    if (counts == 0).any():
        missing = [i for i in range(n_classes) if counts[i] == 0]
        raise DatasetError(f"the train split has no images of class index {missing}")
    return {i: float(len(labels) / (n_classes * counts[i])) for i in range(n_classes)}


def predict_local(model, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Class probabilities computed in this process only.

    ``model.predict`` under a multi-worker strategy splits the images across workers, so
    each would score a different subset and they could disagree on the best epoch (and
    deadlock). Calling the model on local batches gives every worker the same numbers.
    The last batch is zero-padded to full size, so the forward function is traced once per
    model, not once per batch shape (TensorFlow warns about retracing on the terminal).
    ``batch_size`` defaults to :func:`even_batch_size`: the fewest batches of at most 128,
    all of one size, so next to no padding is scored.
    """
    import tensorflow as tf

    batch_size = batch_size or even_batch_size(len(images))

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


def even_batch_size(n: int, most: int = 128) -> int:
    """The batch size that scores ``n`` images in the fewest batches of at most ``most``,
    all of one size: 521 validation images go in 5 batches of 105 (4 padded images), not 5
    of 128 (119 padded, 18 % of the work). :func:`predict_local` traces once per batch size,
    so a run scores its validation split with one trace at every epoch, and an audit its
    images with one trace for every perturbation."""
    return max(1, math.ceil(n / max(1, math.ceil(n / most))))


def val_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC for binary runs, macro one-vs-rest AUC for N > 2."""
    from sklearn.metrics import roc_auc_score

    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                               labels=list(range(probs.shape[1]))))


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


def new_run_state() -> dict:
    """The state of a run before its first epoch: what :func:`plateau_step` books epochs
    into, and what ``state.json`` and ``last.keras`` carry for ``--resume``."""
    return {"epoch": 0, "best_val_auc": -1.0, "best_epoch": 0, "wait": 0, "lr_wait": 0,
            "stopped_early": False, "history": []}


def plateau_step(state: dict, epoch: int, auc: float, lr: float,
                 config: TrainConfig) -> tuple[bool, float]:
    """Book epoch ``epoch`` (1-based), which scored validation ROC AUC ``auc`` at learning
    rate ``lr``, into the run's ``state``; returns whether it is the best epoch so far and
    the learning rate for the next one. Sets ``state["stopped_early"]`` when training
    should stop.

    The learning rate is halved (``lr_factor``) after ``lr_patience`` epochs without a
    better AUC, down to ``min_lr``; training stops after ``early_stopping_patience`` epochs
    without a better AUC, counted from the best epoch. Counting them from the last halving
    instead (so a lowered rate always had its epochs) was tried and failed its accuracy rule
    (BENCHMARKS.md, "Early stopping that waits").
    """
    if auc > state["best_val_auc"] + 1e-4:
        state.update(best_val_auc=auc, best_epoch=epoch, wait=0, lr_wait=0)
        return True, lr
    state["wait"] += 1
    state["lr_wait"] += 1
    if state["lr_wait"] >= config.lr_patience and lr > config.min_lr:
        lr = max(config.min_lr, lr * config.lr_factor)
        state["lr_wait"] = 0
    if state["wait"] >= config.early_stopping_patience:
        state["stopped_early"] = True
    return False, lr


# A Keras callback closed over the run's state: checkpointing, early stopping, the
# learning-rate schedule and EMA scoring must agree epoch by epoch, so they live together.
def _make_keeper(out: Path, val_images: np.ndarray, val_labels: np.ndarray,
                 config: TrainConfig, state: dict, reporter: TrainReporter | None,
                 bn_sample: np.ndarray):
    import keras

    from xrayfeat.model import copy_weights, float32_twin

    class RunKeeper(keras.callbacks.Callback):
        """Validation AUC, best/last checkpoints, plateau LR, early stopping, CSV history.

        One callback owns all training state so that ``state.json`` can restore it exactly.
        Validation scores, and ``model.keras`` saves, a float32 twin of the trained model
        without the optimizer: a model trained in bfloat16 is seen as float32 by validation
        and every later command, and the deployable file holds the weights alone (the Adam
        moments, two thirds of a checkpoint, live in ``last.keras`` only).
        """

        _twin = None
        #: The best epoch's validation probabilities: what ``model.keras`` scores, so the
        #: run's threshold and metrics need not load and score it again.
        best_probs: np.ndarray | None = None

        def scoring_model(self):
            """The model validation scores and ``model.keras`` saves: float32, without the
            optimizer, and with the optimizer's moving average of the weights when ``ema``
            is on."""
            if self._twin is None:
                self._twin = float32_twin(self.model)
            else:
                copy_weights(self.model, self._twin)
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
            improved, next_lr = plateau_step(state, epoch + 1, auc, lr, config)
            if improved:
                with atomic_output(out / MODEL_FILE) as tmp:
                    scorer.save(tmp)
                self.best_probs = probs
            if next_lr != lr:
                self.model.optimizer.learning_rate = next_lr
            if state["stopped_early"]:
                self.model.stop_training = True
            state["epoch"] = epoch + 1
            with atomic_output(out / LAST_FILE) as tmp:
                self.model.save(tmp)  # with optimizer state, for --resume
                embed_state(tmp, state)  # one rename makes weights and state current
            write_history(out / HISTORY_FILE, state["history"])
            write_json(out / STATE_FILE, state)  # the same state, for people and scripts
            if reporter:
                reporter.on_epoch_end(epoch + 1, row)

    return RunKeeper()


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
        check_out_dir(out, resume=True, overwrite=False)
        config = _resumed_config(out, config)
        _require_tensorboard(config)
        return _train_in(data, out, config, resume=True, reporter=reporter, started=started)
    config.validate()
    _require_tensorboard(config)
    if data.is_file():
        open_dataset(data)  # a file that is not a dataset is refused before --out is touched
    created = not out.exists()
    replace = check_out_dir(out, resume=False, overwrite=overwrite)
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
        swap_in(work, out)
        result.run = out
    return result


# The fit in reading order (prepare, build or reload, config, fit, finish); resume and
# a fresh run differ in two places, marked below.
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
        write_history(out / HISTORY_FILE, state["history"])
        write_json(out / STATE_FILE, state)
    else:
        state = new_run_state()
        write_run_config(out, RunConfig(
            classes=info.classes, train=config.to_dict(), precision=precision,
            class_weights={str(k): v for k, v in weights.items()},
            preprocess=PreprocessSettings(size=info.size, roi=info.roi, resize=info.resize,
                                          roi_settings=RoiSettings(**_roi_settings(info.path))),
            data=DataProvenance(path=str(_final_path(data, out, final)),
                                sha256=file_sha256(data), splits=info.split_counts,
                                label_mode=info.label_mode),
            versions=versions(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds")))

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
        if config.fused_kernels:  # under --strategy mirrored/multi-worker: Keras' own ops
            from xrayfeat.fused_kernels import fuse_training_step

            fuse_training_step(model, xla_weight_gradients=config.xla_weight_gradients,
                               byte_dropout=config.byte_dropout)
        build_optimizer(model)
    train_ds, steps = make_train_dataset(info, config, state["epoch"], weights, n_classes)
    if reporter:
        reporter.on_train_start(config.epochs, state["epoch"], steps)
    bn_sample = _bn_sample(info, config) if config.ema else np.zeros((0,))
    keeper = _make_keeper(out, val.images[..., None], val.labels, config, state, reporter,
                          bn_sample)
    callbacks = [keeper]
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

    return _finish(out, info, val, state, config, started, keeper.best_probs)


def build_optimizer(model) -> None:
    """Create the compiled ``model``'s optimizer variables now, as its first update would,
    with the same names and values. Left to that update, they are created inside the first
    trace of the training step, and TensorFlow traces a function that creates variables
    twice: 0.4-1 s more before the first epoch (BENCHMARKS.md, "the step traced once").
    A no-op for an optimizer already built (a resumed run's)."""
    import keras

    optimizer = model.optimizer
    with keras.name_scope(optimizer.name, caller=optimizer):
        optimizer.build(model.trainable_variables)


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
    settings.setdefault("fused_kernels", False)  # a resumed run keeps its arithmetic
    settings.setdefault("xla_weight_gradients", False)
    settings.setdefault("byte_dropout", False)
    for key in ("blur", "gamma", "frame"):  # and its augmentation
        settings.setdefault(key, 0.0)
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
            started: float, best_probs: np.ndarray | None = None) -> TrainResult:
    """Threshold and metrics of the best model on validation; training curves.

    ``best_probs`` are the best epoch's validation probabilities when this process scored
    it; otherwise (a resumed run whose best epoch came before) ``model.keras`` is scored.
    """
    probs = best_probs
    if probs is None:
        probs = predict_local(load_model_safely(out / MODEL_FILE), val.images[..., None])
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
