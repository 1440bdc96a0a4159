"""Training on several GPUs of one host (``mirrored``) or several hosts (``multi-worker``,
from ``TF_CONFIG``), with tf.distribute; on one CPU or GPU, the default strategy."""

from __future__ import annotations

import json
import os

from xrayfeat.config import TrainConfig
from xrayfeat.errors import UsageError


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
