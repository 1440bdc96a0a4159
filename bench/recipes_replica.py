"""Compare training recipes fast, on an accelerator: xrayfeat's recipe replicated in plain
Keras (any backend), many (variant, seed) runs side by side in parallel processes.

Why a replica: the lent GPU machine has no TensorFlow, and xrayfeat's input pipeline is
tf.data. Everything else is xrayfeat's own: the prepared datasets (``xrayfeat prepare``),
the model (``build_minivggnet``), the config defaults, class weights, the batch-norm
recalibration of averaged weights, the threshold rules and the decision rule. The
augmentation is ``pipeline.augment_arrays`` (OpenCV, as in ``xrayfeat train``) with
parameters drawn by NumPy, and the epoch loop keeps ``training.RunKeeper``'s rules: the
best validation AUC is kept, the learning rate halves after 2 epochs without improvement,
training stops after 4. Its figures rank recipes; the default recipe's own figures come
from ``bench/generalization.py`` (the real CLI).

``--test`` is only predicted (at the threshold chosen on validation), never fitted on.

    KERAS_BACKEND=jax python bench/recipes_replica.py --train train.h5 --test test.h5 \\
        --variant 'base={}' --variant 'px96={"input_size": 96}' --seeds 1,2,3 --jobs 8

Extra variant keys beyond TrainConfig's fields: ``standardize`` (per-image zero mean, unit
variance after the rescale, a LayerNormalization over the image) and ``clahe`` (contrast-
limited histogram equalisation of every stored image, train and test alike). ``ema`` works
on the TensorFlow backend only (Keras 3.15's JAX train step fails with it).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXTRA_KEYS = ("standardize", "clahe")


def load_all(path: Path):
    """Every split of a prepared dataset, concatenated: (images, labels, classes)."""
    from xrayfeat.dataset import load_split, open_dataset

    info = open_dataset(path)
    parts = [load_split(info.path, s) for s in info.split_counts if info.split_counts[s]]
    return (np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
            list(info.classes))


def clahe(images: np.ndarray) -> np.ndarray:
    import cv2

    tool = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    return np.stack([tool.apply(im) for im in images])


def augment(images: np.ndarray, rng: np.random.Generator, cfg) -> np.ndarray:
    """``pipeline.augment_batch`` with NumPy's random parameters: float32 (n, S, S) in 0-255.

    The pixels are xrayfeat's own (``pipeline.augment_arrays``, OpenCV); only the draws
    come from ``rng`` instead of TensorFlow's stateless ops."""
    from xrayfeat.pipeline import PARAMETERS, augment_arrays

    n, size = len(images), images.shape[1]
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    theta = u(-1, 1) * cfg.rotation_deg * math.pi / 180
    zoom = 1 + u(-cfg.zoom, cfg.zoom)
    tx, ty = u(-cfg.shift, cfg.shift) * size, u(-cfg.shift, cfg.shift) * size
    c = (size - 1) / 2
    cos, sin = np.cos(theta) / zoom, np.sin(theta) / zoom
    draws = {"a0": cos, "a1": -sin, "a2": c - cos * c + sin * c + tx,
             "b0": sin, "b1": cos, "b2": c - sin * c - cos * c + ty,
             "flip": (u(0, 1) < 0.5) if cfg.hflip else np.zeros(n),
             "contrast": 1 + u(-cfg.contrast, cfg.contrast),
             "brightness": u(-cfg.brightness, cfg.brightness) * 255,
             "blur": u(-cfg.blur, cfg.blur), "gamma": np.exp(u(-cfg.gamma, cfg.gamma)),
             "frame": u(0, cfg.frame) * size * (u(0, 1) < 0.5)}
    params = np.stack([draws[name] for name in PARAMETERS], axis=1).astype(np.float32)
    return augment_arrays(images.astype(np.float32)[..., None], params, cfg)[..., 0]


def build(cfg, size: int, standardize: bool):
    import keras

    from xrayfeat.model import build_minivggnet

    base = build_minivggnet(2, input_size=cfg.input_size, stored_size=size, width=cfg.width,
                            color_mode=cfg.color_mode, precision="float32")
    if not standardize:
        return base
    image = keras.Input((size, size, 1), name="image")
    x = image
    for layer in base.layers[1:]:  # MiniVGGNet is a chain
        x = layer(x)
        if layer.name == "rescale":
            x = keras.layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False,
                                                name="standardize")(x)
    return keras.Model(image, x)


def scores(y, p, threshold):
    from sklearn.metrics import roc_auc_score, roc_curve

    from xrayfeat.metrics import called_positive

    called = called_positive(p, threshold)
    fpr, tpr, _ = roc_curve(y, p)
    return {"accuracy": float(np.mean(called == (y == 1))),
            "sensitivity": float(np.mean(called[y == 1])),
            "specificity": float(np.mean(~called[y == 0])),
            "roc_auc": float(roc_auc_score(y, p)),
            "sens_at_spec85": float(tpr[fpr <= 0.15].max())}


def run_one(args) -> dict:
    """Train one (variant, seed) and score it on validation and the test set."""
    import cv2
    import keras
    from sklearn.metrics import roc_auc_score

    from xrayfeat.config import TrainConfig
    from xrayfeat.dataset import load_split
    from xrayfeat.thresholds import choose_threshold
    from xrayfeat.training import class_weights, recalibrate_batch_norm

    cv2.setNumThreads(1)
    started = time.perf_counter()
    overrides = json.loads(args.one)
    extra = {k: overrides.pop(k, False) for k in EXTRA_KEYS}
    cfg = TrainConfig(**overrides, seed=args.seed)
    keras.utils.set_random_seed(cfg.seed)
    train, val = load_split(Path(args.train), "train"), load_split(Path(args.train), "val")
    test_x, test_y, _ = load_all(Path(args.test))
    tr_x, va_x = train.images, val.images
    if extra["clahe"]:
        tr_x, va_x, test_x = clahe(tr_x), clahe(va_x), clahe(test_x)
    size = tr_x.shape[1]
    va_in, test_in = va_x[..., None].astype(np.float32), test_x[..., None].astype(np.float32)
    model = build(cfg, size, extra["standardize"])
    model.compile(optimizer=keras.optimizers.AdamW(cfg.lr, weight_decay=cfg.weight_decay,
                                                   use_ema=cfg.ema,
                                                   ema_momentum=cfg.ema_momentum),
                  loss=keras.losses.CategoricalCrossentropy())
    if cfg.ema and keras.backend.backend() == "jax":
        # Keras 3.15's JAX train step with use_ema fails: "donate the same buffer twice".
        raise SystemExit("ema is not supported on the JAX backend")
    weights = np.ones(2)
    if cfg.class_weight == "balanced":
        weights = np.array(list(class_weights(train.labels, 2).values()))
    bn_rows = np.sort(np.random.default_rng([cfg.seed, 7]).permutation(len(tr_x))[:768])
    bn_sample = tr_x[bn_rows][..., None].astype(np.float32)
    twin = keras.models.clone_model(model) if cfg.ema else None
    best = {"auc": -1.0, "epoch": 0}
    wait = lr_wait = 0
    history = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(tr_x))
        x = tr_x[order].astype(np.float32)
        if cfg.augment:
            x = augment(tr_x[order], np.random.default_rng([cfg.seed, epoch, 1]), cfg)
        y = keras.utils.to_categorical(train.labels[order], 2)
        y = y * (1 - cfg.label_smoothing) + cfg.label_smoothing / 2
        model.fit(x[..., None], y, sample_weight=weights[train.labels[order]],
                  batch_size=cfg.batch_size, epochs=1, shuffle=False, verbose=0)
        scorer = model
        if cfg.ema:
            twin.set_weights(model.get_weights())
            for v, a in zip(twin.trainable_variables,
                            model.optimizer._model_variables_moving_average):
                v.assign(keras.ops.convert_to_numpy(a))  # a copy: JAX donates the original
            recalibrate_batch_norm(twin, bn_sample)
            scorer = twin
        probs = scorer.predict(va_in, batch_size=256, verbose=0)[:, 1]
        auc = float(roc_auc_score(val.labels, probs))
        lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        history.append(round(auc, 4))
        if auc > best["auc"] + 1e-4:
            best = {"auc": auc, "epoch": epoch + 1, "val": probs,
                    "test": scorer.predict(test_in, batch_size=256, verbose=0)[:, 1]}
            wait = lr_wait = 0
        else:
            wait, lr_wait = wait + 1, lr_wait + 1
            if lr_wait >= cfg.lr_patience and lr > cfg.min_lr:
                model.optimizer.learning_rate = max(cfg.min_lr, lr * cfg.lr_factor)
                lr_wait = 0
            if wait >= cfg.early_stopping_patience:
                break
    from generalization import hindsight  # bench/ is this script's folder

    # Hindsight (the best single threshold on the test set itself) is a diagnosis, never a
    # result; the raw test scores let later analyses (ensembles, spreads) need no rerun.
    result = {"best_epoch": best["epoch"], "val_auc_history": history,
              "seconds": round(time.perf_counter() - started, 1),
              **hindsight(test_y, best["test"]),
              "test_prob": [round(float(p), 5) for p in best["test"]]}
    for method in ("sensitivity", "youden"):
        point = choose_threshold(val.labels, best["val"], method, groups=val.patients,
                                 min_sensitivity=cfg.threshold_sensitivity, seed=cfg.seed,
                                 n_boot=200)
        result[method] = {"threshold": point.threshold,
                          "val": scores(val.labels, best["val"], point.threshold),
                          "test": scores(test_y, best["test"], point.threshold)}
    return result


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':<14}{'n':>3} {'rule':<12}{'val AUC':>9}{'acc':>13}{'sens':>13}"
             f"{'spec':>13}{'AUC':>13}{'epoch':>7}{'s':>6}"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        for rule in ("sensitivity", "youden"):
            def ms(get):
                v = np.array([get(r) for r in mine], float)
                return f"{v.mean():.3f}±{v.std(ddof=1) if len(v) > 1 else 0:.3f}"
            lines.append(
                f"{name:<14}{len(mine):>3} {rule:<12}"
                f"{np.mean([r[rule]['val']['roc_auc'] for r in mine]):>9.4f}"
                + "".join(f"{ms(lambda r, k=k: r[rule]['test'][k]):>13}"
                          for k in ("accuracy", "sensitivity", "specificity", "roc_auc"))
                + f"{np.mean([r['best_epoch'] for r in mine]):>7.1f}"
                + f"{np.mean([r['seconds'] for r in mine]):>6.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="train folder, or it prepared (.h5)")
    parser.add_argument("--test", required=True,
                        help="test folder, or it prepared (.h5; every split is scored)")
    parser.add_argument("--variant", action="append", default=[], help='NAME=JSON overrides')
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--jobs", type=int, default=4, help="runs at a time")
    parser.add_argument("--out", default="recipes.jsonl")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    out = Path(args.out)
    for name in ("train", "test"):  # a folder is prepared once, as `xrayfeat prepare` does
        folder = Path(getattr(args, name))
        if folder.is_dir():
            from xrayfeat.dataset import prepare_dataset

            target = out.with_name(f"{out.stem}-{name}.h5")
            if not target.exists():
                started = time.perf_counter()
                prepare_dataset(folder, target)
                print(f"prepared {folder} in {time.perf_counter() - started:.1f} s", flush=True)
            setattr(args, name, str(target))
    variants = [v.partition("=") for v in args.variant or ["base={}"]]
    queue = [(name, spec, int(seed)) for name, _, spec in variants
             for seed in args.seeds.split(",")]
    running, rows = [], []
    while queue or running:
        while queue and len(running) < args.jobs:
            name, spec, seed = queue.pop(0)
            cmd = [sys.executable, __file__, "--train", args.train, "--test", args.test,
                   "--one", spec, "--seed", str(seed)]
            running.append((name, spec, seed, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        time.sleep(1)
        for item in [r for r in running if r[3].poll() is not None]:
            running.remove(item)
            name, spec, seed, proc = item
            text = proc.stdout.read()
            line = next((l for l in text.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{name} seed {seed} failed:\n{text[-3000:]}", flush=True)
                continue
            row = {"variant": name, "spec": spec, "seed": seed, **json.loads(line[7:])}
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            t = row["sensitivity"]["test"]
            print(f"{name} seed {seed}: test acc {t['accuracy']:.3f} spec {t['specificity']:.3f}"
                  f" AUC {t['roc_auc']:.3f} val AUC {row['sensitivity']['val']['roc_auc']:.4f}"
                  f" epoch {row['best_epoch']} {row['seconds']} s", flush=True)
    if rows:
        print(table(rows))


if __name__ == "__main__":
    main()
