"""Depth analysis: how much each layer knows about the classes, measured by linear probes.

Channel grids show *what* a layer responds to; a probe says *how much* it knows. For every
layer of a run (``visualize-layers RUN --data DATA.h5 --probe``):

1. each image of a dataset split goes through the network once, and each probed layer's
   output is pooled to one feature vector per image (:func:`pool_features`);
2. a linear probe -- ``StandardScaler`` then ``LogisticRegression(C=1, max_iter=1000)``
   -- is fitted on those vectors with cross-validation grouped by patient
   (``StratifiedGroupKFold``, :func:`grouped_folds`), so no patient is in the training and
   the test part of one fold;
3. the probe's ROC AUC on each held-out fold is reported as mean and SD over the folds
   (binary runs: AUC of the positive class; more classes: macro one-vs-rest AUC).

The same is done for the same architecture with random weights (:func:`random_baseline`):
the gap between the two curves is what training added at each depth.

Definitions:

* *Probed layers* (:func:`probe_points`): depth 0 is the image as the network sees it (the
  output of the model's resize/rescale layers, i.e. the resized image in [0, 1]); then
  every Conv2D, activation, pooling and Dense layer, the prediction included (its probe
  recalibrates the model's own scores, so its AUC is close to the model's). Skipped, as
  they would only repeat the row before: dropout (the identity at inference), flatten (the
  pooling layer's numbers, rearranged) and batch norm (at inference a per-channel affine
  map, which a probe on standardised features undoes: with average pooling its AUC equals
  the previous layer's exactly).
* *Depth*: Conv2D and Dense layers up to and including the layer. Conv layers so keep the
  depth they have everywhere else in xrayfeat (``block2_conv2`` is 4); ``fc1`` is 5 and
  ``predictions`` 6; a ReLU or batch norm shares the depth of the layer before it.
* *Pooling*: a spatial output (h, w, c) becomes one number per channel, its global
  average (default) or maximum (``pool="max"``). ``grid=g`` pools over a g x g grid of
  cells instead (g*g numbers per channel; cells as in adaptive pooling), the same for every
  layer; it gives depth 0 -- one channel -- more than its mean brightness. Vector outputs
  (Dense) are used as they are.

Memory: the split is streamed in batches through one multi-output model per network; full
activation maps live for one batch only. What is kept is the pooled features, ``n x
features`` float32 per layer and network, for every layer at once: one pass over the data
instead of one per layer, at a cost that is small next to the maps (``fc1`` of a width-1
MiniVGGNet is the largest, 512 numbers an image: ~10 MB for 5,000 images; all 14 layers of
both networks, ~1,500 numbers an image each, ~60 MB), so a split of thousands of images fits. Each layer's features are
released once its probes are fitted.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from xrayfeat.atomic import prepare_out_dir
from xrayfeat.choices import PROBE_POOLS
from xrayfeat.dataset import iter_split, load_split
from xrayfeat.errors import DatasetError, RunError, UsageError
from xrayfeat.figures import plot_probe_auc
from xrayfeat.layers import ActivationModel
from xrayfeat.runs import open_run_on_split, write_json

DEFAULT_FOLDS = 5  # the usual 5-fold CV; fewer when the split has fewer patients a class
MIN_FOLDS = 2
DEFAULT_SEED = 42  # folds and the random-weights baseline are the same on every call
MAX_GRID = 8  # a block2 map of a 32 px model is 8 x 8: finer cells would repeat pixels
PROBE_C = 1.0  # scikit-learn's default L2 strength; the probe is a measurement, not tuned
PROBE_MAX_ITER = 1000  # lbfgs converges on standardised features well before this

PROBES_JSON = "probes.json"
PROBES_PNG = "probes.png"

_INPUT_KINDS = ("InputLayer", "Resizing", "Rescaling", "Normalization", "CenterCrop")


# --------------------------------------------------------------------------- layers

@dataclass(frozen=True)
class ProbeLayer:
    """One layer whose output is probed."""
    name: str
    kind: str  # "input", "conv", "activation", "pooling", "dense" or "output"
    depth: int  # Conv2D and Dense layers up to and including this one; 0 = the input image
    shape: tuple[int, ...]  # output shape without the batch axis


def _layer_kind(layer, output_layers: set[str]) -> str | None:
    from keras import layers

    if isinstance(layer, layers.Conv2D):
        return "conv"
    if isinstance(layer, layers.Dense):
        return "output" if layer.name in output_layers else "dense"
    if isinstance(layer, (layers.Activation, layers.ReLU, layers.LeakyReLU, layers.Softmax)):
        return "activation"
    if isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D,
                          layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D)):
        return "pooling"
    return None  # dropout, flatten, batch norm...: identities, rearrangements, affine maps


def _shape(layer) -> tuple[int, ...] | None:
    try:
        shape = tuple(layer.output.shape)[1:]
    except (AttributeError, ValueError):
        return None
    if len(shape) not in (1, 3) or any(d is None for d in shape):
        return None
    return tuple(int(d) for d in shape)


def probe_points(model) -> list[ProbeLayer]:
    """The layers to probe, shallow to deep (see the module notes): depth 0 (the image as
    the network sees it), then every conv, activation, pooling and Dense layer."""
    output_layers = set()
    for layer in model.layers:
        try:
            if any(layer.output is t for t in model.outputs):
                output_layers.add(layer.name)
        except (AttributeError, ValueError):
            continue
    found: list[ProbeLayer] = []
    start = None  # the last preprocessing layer before the first weighted layer
    depth = 0
    for layer in model.layers:
        kind = _layer_kind(layer, output_layers)
        if depth == 0 and kind not in ("conv", "dense"):
            if type(layer).__name__ in _INPUT_KINDS and _shape(layer) is not None:
                start = layer
            continue
        if kind is None:
            continue
        depth += kind in ("conv", "dense", "output")
        shape = _shape(layer)
        if shape is not None:
            found.append(ProbeLayer(layer.name, kind, depth, shape))
    if start is not None:
        found.insert(0, ProbeLayer(start.name, "input", 0, _shape(start)))
    if not found:
        raise RunError("the model has no layer to probe")
    return found


# --------------------------------------------------------------------------- pooling

def _cells(n: int, grid: int) -> list[tuple[int, int]]:
    """Adaptive-pooling cell bounds: ``grid`` cells covering ``n`` pixels, never empty."""
    return [(math.floor(i * n / grid), math.ceil((i + 1) * n / grid)) for i in range(grid)]


def pool_features(acts: np.ndarray, pool: str = "avg", grid: int = 1) -> np.ndarray:
    """One feature vector per image: ``(b, h, w, c)`` pooled to ``(b, grid*grid*c)``
    (global average or max when ``grid`` is 1); ``(b, f)`` returned as it is. float32."""
    acts = np.asarray(acts)
    if acts.ndim == 2:
        return acts.astype(np.float32, copy=False)
    if acts.ndim != 4:
        raise ValueError(f"expected (b, h, w, c) or (b, f) activations, got {acts.shape}")
    reduce = np.mean if pool == "avg" else np.max
    if grid == 1:
        return reduce(acts, axis=(1, 2)).astype(np.float32)
    _, h, w, _ = acts.shape
    cells = [reduce(acts[:, y0:y1, x0:x1, :], axis=(1, 2))
             for y0, y1 in _cells(h, grid) for x0, x1 in _cells(w, grid)]
    return np.concatenate(cells, axis=1).astype(np.float32)


def feature_size(shape: Sequence[int], grid: int = 1) -> int:
    """Length of :func:`pool_features`' vector for a layer output of ``shape``."""
    return int(shape[0]) if len(shape) == 1 else int(shape[-1]) * grid * grid


# --------------------------------------------------------------------------- features

@dataclass
class Features:
    """Pooled features of one split: ``features[network][layer]`` is (n, f) float32."""
    labels: np.ndarray  # (n,) int
    patients: np.ndarray  # (n,) str
    features: dict[str, dict[str, np.ndarray]]


def extract_features(
    models: dict[str, object],
    layers: Sequence[ProbeLayer],
    data: str | os.PathLike,
    split: str,
    *,
    pool: str = "avg",
    grid: int = 1,
    batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> Features:
    """Stream ``split`` of ``data`` once through every network in ``models`` (name ->
    Keras model) and keep each probed layer's pooled features (see the module notes).

    A layer missing from a network is skipped for that network.
    """

    meta = load_split(Path(data), split, with_images=False)
    n = len(meta.labels)
    extractors, store = {}, {}
    for key, model in models.items():
        present = {layer.name for layer in model.layers}
        names = [p.name for p in layers if p.name in present]
        extractors[key] = ActivationModel(model, names)
        store[key] = {p.name: np.empty((n, feature_size(p.shape, grid)), np.float32)
                      for p in layers if p.name in present}
    labels = np.empty(n, np.int64)
    done = 0
    for images, batch_labels in iter_split(Path(data), split, batch_size):
        x = images[..., None].astype(np.float32)
        b = len(batch_labels)
        for key, extractor in extractors.items():
            for name, acts in extractor(x)[0].items():
                store[key][name][done : done + b] = pool_features(acts, pool, grid)
        labels[done : done + b] = batch_labels
        done += b
        if on_progress:
            on_progress(b)
    if done != n or not np.array_equal(labels, meta.labels):  # iter_split keeps file order
        raise DatasetError(f"{data} changed while it was read; run again")
    return Features(labels=labels, patients=meta.patients, features=store)


# --------------------------------------------------------------------------- probes

def grouped_folds(
    labels: np.ndarray,
    groups: np.ndarray,
    n_splits: int = DEFAULT_FOLDS,
    seed: int = DEFAULT_SEED,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """Patient-grouped, class-stratified folds: ``([(train, test), ...], notes)``.

    Uses ``min(n_splits, patients of the rarest class)`` folds (at least 2). Folds whose
    training or test part lacks a class (AUC undefined) are dropped, with a note.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    groups = np.asarray(groups)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise DatasetError(f"the split has one class only ({len(labels)} images): a probe "
                           "needs two or more")
    patients = {int(c): len(np.unique(groups[labels == c])) for c in classes}
    k = min(n_splits, min(patients.values()))
    if k < MIN_FOLDS:
        raise DatasetError(f"too few patients for grouped cross-validation (patients per class "
                           f"label: {patients}; needs {MIN_FOLDS}+ a class)")
    notes = []
    if k < n_splits:
        notes.append(f"{k} folds, not {n_splits}: a class has only {k} patients")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for i, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        if len(np.unique(labels[train])) < len(classes) or \
                len(np.unique(labels[test])) < len(classes):
            notes.append(f"fold {i + 1} of {k} dropped: a class is missing from its training "
                         "or test part")
            continue
        folds.append((train, test))
    if not folds:
        raise DatasetError("no cross-validation fold holds every class; the split is too small")
    return folds, notes


def probe_classifier(C: float = PROBE_C, max_iter: int = PROBE_MAX_ITER, seed: int = DEFAULT_SEED):
    """The linear probe: standardise each feature, then L2 logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=C, max_iter=max_iter, random_state=seed))


def probe_auc(
    features: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    C: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
) -> tuple[np.ndarray, int]:
    """``(held-out ROC AUC of each fold, fits that hit max_iter)``.

    Two classes: AUC of the larger label's probability; more: macro one-vs-rest AUC.
    """
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, np.float64)
    y = np.asarray(labels)
    classes = np.unique(y)
    template = probe_classifier(C, max_iter)
    # One BLAS thread: these fits are small, and threads only add synchronisation
    # (measured 8x faster for a 512-feature probe on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        aucs, unconverged = _fit_folds(template, x, y, classes, folds)
    return np.asarray(aucs, np.float64), unconverged


def _fit_folds(template, x, y, classes, folds) -> tuple[list[float], int]:
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import roc_auc_score

    aucs, unconverged = [], 0
    for train, test in folds:
        clf = clone(template)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(x[train], y[train])
        unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        proba = clf.predict_proba(x[test])
        if len(classes) == 2:
            aucs.append(roc_auc_score(y[test] == classes[1], proba[:, 1]))
        else:
            aucs.append(roc_auc_score(y[test], proba, multi_class="ovr", average="macro",
                                      labels=classes))
    return aucs, unconverged


def _mean_sd(values: np.ndarray) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------- baseline

def random_baseline(model, seed: int = DEFAULT_SEED):
    """The same architecture as ``model`` with fresh random weights (each layer's own
    initialiser, seeded: the same weights on every call). Batch norm starts from its
    initial statistics (mean 0, variance 1), as an untrained network has them.

    Keras seeds its global generators; NumPy's and Python's global states are restored.
    """
    import random

    import keras

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        keras.utils.set_random_seed(seed)
        return keras.models.clone_model(model)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


# --------------------------------------------------------------------------- the command

@dataclass
class ProbeRow:
    """The probes of one layer."""
    layer: str
    kind: str
    depth: int
    features: int  # length of the pooled feature vector
    auc_mean: float  # trained model: mean over folds of the held-out ROC AUC
    auc_sd: float  # ... and its sample SD over folds
    auc_folds: list[float]
    random_auc_mean: float | None = None  # the same with random weights (None: no baseline)
    random_auc_sd: float | None = None
    random_auc_folds: list[float] | None = None


@dataclass
class ProbeResult:
    """What :func:`depth_probes` wrote."""
    out: Path
    summary: Path  # probes.json
    figure: Path  # probes.png
    run: Path
    data: Path
    split: str
    classes: list[str]
    counts: dict[str, int]  # images per class in the split
    patients: int
    pool: str
    grid: int
    folds: int  # folds used (after dropping any that lack a class)
    metric: str
    rows: list[ProbeRow]
    baseline: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [self.figure, self.summary]

    def best(self, hidden: bool = True) -> ProbeRow:
        """The layer with the highest trained AUC (the shallowest of any ties); with
        ``hidden``, among the layers before the output when there are any."""
        rows = [r for r in self.rows if r.kind != "output"] if hidden else self.rows
        best = (rows or self.rows)[0]
        for row in rows[1:]:
            if row.auc_mean > best.auc_mean:
                best = row
        return best


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


# The whole analysis in reading order: extract (one pass), fit per layer, baseline,
# write; each step is a function above, this one only sequences them and their checks.
def depth_probes(
    run_path: str | os.PathLike,
    data: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    *,
    pool: str = "avg",
    grid: int = 1,
    n_folds: int = DEFAULT_FOLDS,
    baseline: bool = True,
    seed: int = DEFAULT_SEED,
    batch_size: int = 64,
    overwrite: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_fit_start: Callable[[int], None] | None = None,
    on_fit: Callable[[int], None] | None = None,
) -> ProbeResult:
    """At which depth does the network separate the classes? Linear probes per layer.

    Streams ``split`` of ``data`` once through the run's model (and, with ``baseline``,
    through the same architecture with random weights), pools every probed layer's output
    (``pool`` "avg" or "max" over a ``grid`` x ``grid`` grid, global by default) and fits a
    linear probe per layer with patient-grouped ``n_folds``-fold cross-validation. See the
    module notes for the definitions.

    Writes ``OUT/probes.json`` (settings and one row per layer: layer, kind, depth, feature
    size, AUC mean, SD and per fold, for both networks) and ``OUT/probes.png`` (AUC against
    depth). ``on_start(images)``/``on_progress(n)`` follow the streaming,
    ``on_fit_start(layers)``/``on_fit(1)`` the probe fits.
    """

    started = time.perf_counter()
    out = Path(out)
    if pool not in PROBE_POOLS:
        raise UsageError(f"--pool must be one of {', '.join(PROBE_POOLS)}, got {pool!r}")
    if not 1 <= grid <= MAX_GRID:
        raise UsageError(f"--pool-grid must be between 1 and {MAX_GRID}, got {grid}")
    if n_folds < MIN_FOLDS:
        raise UsageError(f"folds must be at least {MIN_FOLDS}, got {n_folds}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    run, info, total = open_run_on_split(run_path, data, split)
    classes = run.classes
    model = run.load_model()
    layers = probe_points(model)
    prepare_out_dir(out, overwrite)

    models = {"trained": model}
    if baseline:
        models["random"] = random_baseline(model, seed)
    if on_start:
        on_start(total)
    feats = extract_features(models, layers, data, split, pool=pool, grid=grid,
                             batch_size=batch_size, on_progress=on_progress)
    folds, notes = grouped_folds(feats.labels, feats.patients, n_folds, seed)

    if on_fit_start:
        on_fit_start(len(layers))
    rows: list[ProbeRow] = []
    unconverged = 0
    for p in layers:
        aucs, bad = probe_auc(feats.features["trained"][p.name], feats.labels, folds)
        unconverged += bad
        mean, sd = _mean_sd(aucs)
        row = ProbeRow(p.name, p.kind, p.depth, feature_size(p.shape, grid), mean, sd,
                       [float(a) for a in aucs])
        if baseline and p.name in feats.features["random"]:
            raucs, bad = probe_auc(feats.features["random"][p.name], feats.labels, folds)
            unconverged += bad
            row.random_auc_mean, row.random_auc_sd = _mean_sd(raucs)
            row.random_auc_folds = [float(a) for a in raucs]
        del feats.features["trained"][p.name]  # release as soon as probed
        feats.features.get("random", {}).pop(p.name, None)
        rows.append(row)
        if on_fit:
            on_fit(1)
    if unconverged:
        notes.append(f"{unconverged} probe fit(s) stopped at {PROBE_MAX_ITER} iterations "
                     "before converging")

    counts = {c: int((feats.labels == k).sum()) for k, c in enumerate(classes)}
    n_patients = int(len(np.unique(feats.patients)))
    metric = ("ROC AUC" if len(classes) == 2 else "macro one-vs-rest ROC AUC")
    pooling = (f"global {'average' if pool == 'avg' else 'max'} pooling" if grid == 1
               else f"{'average' if pool == 'avg' else 'max'} pooling over a {grid}x{grid} grid")
    figure = plot_probe_auc(
        [(r.layer, r.depth, r.auc_mean, r.auc_sd, r.random_auc_mean, r.random_auc_sd)
         for r in rows],
        out / PROBES_PNG,
        title=(f"Linear probe per layer: {Path(run_path).name} on '{split}' "
               f"({', '.join(f'{c} {n}' for c, n in counts.items())}; {n_patients} patients)\n"
               f"{metric}, mean \u00b1 SD over {len(folds)} patient-grouped folds; "
               f"{pooling}"),
        ylabel=f"probe {metric} (held-out folds)",
        chance=0.5)
    summary = out / PROBES_JSON
    result = ProbeResult(
        out=out, summary=summary, figure=figure, run=Path(run_path), data=Path(data),
        split=split, classes=classes, counts=counts, patients=n_patients, pool=pool, grid=grid,
        folds=len(folds), metric=metric, rows=rows, baseline=baseline, seconds=0.0, notes=notes)
    write_json(summary, {
        "run": str(run_path), "data": str(data), "split": split, "classes": classes,
        "counts": counts, "patients": n_patients,
        "probe": f"StandardScaler + LogisticRegression(C={PROBE_C}, max_iter={PROBE_MAX_ITER})",
        "features": f"{pooling} of each layer's output per image (dense layers as they are)",
        "pool": pool, "grid": grid,
        "cv": f"StratifiedGroupKFold by patient, {len(folds)} folds, shuffled with seed {seed}; "
              "the same folds for every layer and both networks",
        "metric": f"{metric} on the held-out fold; mean and sample SD over folds",
        "depth": "Conv2D and Dense layers up to and including the layer; 0 = the input image "
                 "as the network sees it",
        "baseline": (f"the same architecture with random weights (seed {seed})"
                     if baseline else None),
        "notes": notes,
        "layers": [{**asdict(r),
                    "auc_mean": _json_float(r.auc_mean), "auc_sd": _json_float(r.auc_sd),
                    "auc_folds": [_json_float(a) for a in r.auc_folds],
                    "random_auc_mean": _json_float(r.random_auc_mean),
                    "random_auc_sd": _json_float(r.random_auc_sd),
                    "random_auc_folds": (None if r.random_auc_folds is None
                                         else [_json_float(a) for a in r.random_auc_folds])}
                   for r in rows],
    })
    result.seconds = time.perf_counter() - started
    return result
