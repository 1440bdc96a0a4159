"""A model's layers as the visualisations see them, and one multi-output extractor.

*depth* of a layer: how many Conv2D layers come before it, itself included
(``block1_conv1`` is depth 1, its ReLU and batch norm too, ``block2_conv2`` depth 4).
*activation of a conv layer*: its rectified output, the ReLU that follows it in
MiniVGGNet (the conv output itself when no ReLU follows). :class:`ActivationModel` returns
any set of layers' outputs and the prediction from one forward pass; the per-image
figures, the class contrast and the depth probes all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from xrayfeat.errors import UsageError


@dataclass(frozen=True)
class LayerInfo:
    """A layer with a spatial (h, w, channels) output."""

    name: str
    kind: str  # "conv", "activation", "batchnorm", "pooling" or "other"
    depth: int  # Conv2D layers up to and including this one
    shape: tuple[int, int, int]  # (h, w, channels) of its output


def _kind(layer) -> str:
    from keras import layers

    if isinstance(layer, layers.Conv2D):
        return "conv"
    if isinstance(layer, (layers.Activation, layers.ReLU, layers.LeakyReLU)):
        return "activation"
    if isinstance(layer, layers.BatchNormalization):
        return "batchnorm"
    if isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
        return "pooling"
    return "other"


def describe_layers(model) -> list[LayerInfo]:
    """Every layer of ``model`` whose output is an image-like (batch, h, w, c) tensor."""
    from keras import layers

    from xrayfeat.model import member_of

    found, depths = [], {}  # conv layers so far, per ensemble member ("" outside ensembles)
    for layer in model.layers:
        if isinstance(layer, layers.InputLayer):
            continue
        kind = _kind(layer)
        member = member_of(layer.name)
        depths[member] = depth = depths.get(member, 0) + (kind == "conv")
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and all(d is not None for d in shape[1:]):
            found.append(LayerInfo(layer.name, kind, depth, tuple(int(d) for d in shape[1:])))
    return found


def conv_layers(model) -> list[LayerInfo]:
    """The Conv2D layers, shallow to deep."""
    return [info for info in describe_layers(model) if info.kind == "conv"]


def select_layers(
    model, names: Sequence[str] | None = None, all_layers: bool = False
) -> list[LayerInfo]:
    """The layers to draw: ``names`` (in model order), else every Conv2D, or with
    ``all_layers`` also every activation, batch-norm and pooling output."""
    spatial = describe_layers(model)
    if names:
        valid = {info.name: info for info in spatial}
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise UsageError(
                f"unknown layer {', '.join(repr(n) for n in unknown)}; valid names: "
                f"{', '.join(info.name for info in spatial)}"
            )
        wanted = set(names)
        return [info for info in spatial if info.name in wanted]
    kinds = {"conv", "activation", "batchnorm", "pooling"} if all_layers else {"conv"}
    return [info for info in spatial if info.kind in kinds and info.depth > 0]


def rectified_layer(model, conv_name: str) -> str:
    """The layer holding a conv layer's rectified output: the ReLU applied to it when there
    is one (MiniVGGNet), else the conv layer itself."""
    from keras import layers

    conv = model.get_layer(conv_name)
    activation = getattr(conv.activation, "__name__", "")
    if activation != "linear":
        return conv_name
    for layer in model.layers:
        is_relu = isinstance(layer, layers.ReLU) or (
            isinstance(layer, layers.Activation)
            and getattr(layer.activation, "__name__", "") == "relu")
        if is_relu:
            try:
                if layer.input is conv.output:
                    return layer.name
            except (AttributeError, ValueError):
                continue
    return conv_name


class ActivationModel:
    """One multi-output model over a trained one: every named layer's output and the
    prediction, from a single forward pass per batch (never one model per layer)."""

    def __init__(self, model, layer_names: Sequence[str]):
        import keras

        self.names = list(dict.fromkeys(layer_names))
        outputs = [model.get_layer(n).output for n in self.names] + [model.outputs[0]]
        self.model = keras.Model(model.inputs, outputs, name="xrayfeat_activations")

    def __call__(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(layer name -> (b, h, w, c) array, (b, classes) probabilities)``."""
        outputs = self.model.predict_on_batch(np.asarray(images, dtype=np.float32))
        outputs = [np.asarray(o) for o in outputs]
        return dict(zip(self.names, outputs[:-1])), outputs[-1]
