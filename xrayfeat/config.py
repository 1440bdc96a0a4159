"""Every training default in one place, each with the reason it has that value.

A TOML file (``--config train.toml``) may set any field; unknown keys are errors, so a typo
never silently trains with a default. Command-line options override the file.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrayfeat.choices import (CLASS_WEIGHTS, COLOR_MODES, PRECISIONS, STRATEGIES,
                              THRESHOLD_METHODS)
from xrayfeat.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    """Settings of one training run; saved in the run's config.json."""

    # Model
    input_size: int = 64  # px the network sees; see README "Choosing the input size"
    width: float = 1.0  # multiplies every layer's width; 1.0 is MiniVGGNet as published
    color_mode: str = "grayscale"  # radiographs are grayscale; "rgb" copies the image into
    # three channels, as RGB-loading recipes feed it (no new information, 3x the first conv)

    # Optimisation
    epochs: int = 15  # a 64 px pass over 4,700 images: ~14-15 s on a 2-core Zen 4 in bfloat16
    # Batch 128 at Adam's square-root-scaled rate (1e-3 x sqrt(4)): a quarter of batch 32's
    # steps. On three seeds in each precision, by rules set before they ran, its held-out
    # figures were no worse than batch 64's, itself no worse than batch 32's; its validation
    # AUC swings more between epochs (BENCHMARKS.md, "A larger batch", "The 4-minute target")
    batch_size: int = 128
    lr: float = 0.002  # halved on plateau
    weight_decay: float = 1e-4  # AdamW decay: 8.4M dense weights at 64 px overfit 5k images
    label_smoothing: float = 0.05  # tempers over-confident scores (calibration)
    class_weight: str = "balanced"  # "balanced" or "none"; see README "Class imbalance"
    seed: int = 42

    # Weight averaging: validation AUC of the raw weights jumps between epochs (0.977,
    # 0.909, 0.948 in three neighbouring epochs of one run); an exponential moving average
    # of the weights (Keras' optimizer use_ema) is scored and saved instead.
    ema: bool = False
    ema_momentum: float = 0.995  # ~200 steps: about 5.4 epochs of 4,700 images at batch 128

    # Operating threshold of binary runs, chosen on validation (README "Choosing a threshold")
    # "sensitivity": the highest threshold keeping validation sensitivity >= 95 %, picked
    # on each run's own validation split. Youden's J sits at the low edge of its plateau;
    # which rule is the default was decided by comparing recipes in
    # bench/generalization.py (BENCHMARKS.md "Generalisation"), never fitted by the tool.
    # Also: "youden", "bootstrap".
    threshold_method: str = "sensitivity"
    threshold_sensitivity: float = 0.95  # the "sensitivity" method's validation target

    # Callbacks
    early_stopping_patience: int = 4  # epochs without a better validation AUC
    lr_patience: int = 2  # epochs without improvement before the learning rate is halved
    lr_factor: float = 0.5
    min_lr: float = 1e-5

    # Augmentation (radiograph-safe: no horizontal flip, the heart is on the left)
    augment: bool = True
    rotation_deg: float = 7.0
    shift: float = 0.06  # fraction of the side
    zoom: float = 0.10
    brightness: float = 0.10  # fraction of the 0-255 range
    contrast: float = 0.15
    hflip: bool = False
    # Against the acquisition shortcuts `xrayfeat audit` measures (README, `audit`: "Reading it");
    # on by default since they were shown not to cost held-out accuracy (BENCHMARKS.md
    # "Acquisition augmentation"); 0 turns each off
    blur: float = 1.0  # per image, blur (up to this mix) or sharpen (unsharp, up to this amount)
    gamma: float = 0.4  # gamma drawn from exp(+-gamma)
    frame: float = 0.1  # half the images get a black frame up to this fraction of the side

    # Arithmetic
    precision: str = "auto"  # "auto", "float32" or "bfloat16"; auto = bfloat16 on CPUs with
    # native bfloat16 (AVX512_BF16/AMX), float32 elsewhere (xrayfeat.model.resolve_precision).
    # Weights, softmax and the saved model stay float32 either way.
    fused_kernels: bool = True  # train batch norm with TensorFlow's fused kernel and AdamW in
    # one XLA pass: the same arithmetic in fewer passes (xrayfeat.fused_kernels); the default
    # since its held-out accuracy was shown unchanged (BENCHMARKS.md "Training speed")
    xla_weight_gradients: bool = True  # with fused_kernels, float32 convolutions take their
    # weight gradients from XLA's kernel on CPUs with AVX2 and no AVX-512, where it was
    # measured faster than oneDNN's (the same sum in another order;
    # xrayfeat.fused_kernels.fuse_convolution_gradients)
    byte_dropout: bool = True  # with fused_kernels, dropout masks from one byte of random
    # bits per unit instead of a 32-bit uniform: the same keep rate, other masks
    # (xrayfeat.fused_kernels.fuse_dropout); the default since three seeds held its rule
    # (BENCHMARKS.md, "Dropout masks a byte at a time")

    # Input pipeline
    memory_budget_mb: int = 4096  # datasets smaller than this are held in RAM, else streamed
    tensorboard: str | None = None  # optional TensorBoard log folder

    # Scale-out
    strategy: str = "auto"  # "auto", "mirrored" (GPUs of one host) or "multi-worker" (TF_CONFIG)

    def validate(self) -> None:
        """Raise :class:`UsageError` for values that cannot train."""
        if self.input_size < 32:
            raise UsageError(f"--input-size must be at least 32, got {self.input_size}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("--epochs and --batch-size must be positive")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.width <= 0:
            raise UsageError(f"--width must be positive, got {self.width}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise UsageError(f"--class-weight must be 'balanced' or 'none', got {self.class_weight!r}")
        if self.color_mode not in COLOR_MODES:
            raise UsageError(f"--color-mode must be grayscale or rgb, got {self.color_mode!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"--precision must be auto, float32 or bfloat16, got {self.precision!r}"
            )
        if self.threshold_method not in THRESHOLD_METHODS:
            raise UsageError(f"--threshold-method must be one of {', '.join(THRESHOLD_METHODS)}, "
                             f"got {self.threshold_method!r}")
        if not 0 < self.threshold_sensitivity <= 1:
            raise UsageError("--threshold-sensitivity must be in (0, 1], got "
                             f"{self.threshold_sensitivity}")
        if not 0 < self.ema_momentum < 1:
            raise UsageError(f"ema_momentum must be between 0 and 1, got {self.ema_momentum}")
        if self.strategy not in STRATEGIES:
            raise UsageError(
                f"--strategy must be auto, mirrored or multi-worker, got {self.strategy!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Inclusive range of every numeric setting. A value outside cannot train sensibly (or
#: at all): refused up front rather than after an epoch, or as an internal error.
RANGES: dict[str, tuple[float, float]] = {
    "input_size": (32, 4096), "width": (1e-3, 16.0), "epochs": (1, 100_000),
    "batch_size": (1, 4096), "lr": (1e-8, 10.0), "weight_decay": (0.0, 1.0),
    "label_smoothing": (0.0, 0.99), "seed": (0, 2**32 - 1),
    "early_stopping_patience": (1, 100_000), "lr_patience": (1, 100_000),
    "lr_factor": (1e-3, 0.999), "min_lr": (0.0, 10.0), "rotation_deg": (0.0, 180.0),
    "shift": (0.0, 0.5), "zoom": (0.0, 0.9), "brightness": (0.0, 1.0), "contrast": (0.0, 1.0),
    "blur": (0.0, 1.0), "gamma": (0.0, 2.0), "frame": (0.0, 0.45),
    "ema_momentum": (1e-3, 0.99999), "threshold_sensitivity": (1e-3, 1.0),
    "memory_budget_mb": (0, 2**40),
}


def checked_settings(values: dict[str, Any], source: str) -> TrainConfig:
    """A :class:`TrainConfig` from ``values``, every key known, every value of its field's
    type (an int is not a float's 1.9, nor ``true``, nor ``"1"``) and in its range;
    anything else is a one-line :class:`UsageError` naming ``source``."""
    config = TrainConfig()
    defaults = config.to_dict()
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise UsageError(f"unknown setting(s) in {source}: {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(defaults))}")
    for key, value in values.items():
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            kind = "true or false"
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            kind = "a whole number"
        elif isinstance(default, float):
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
            kind = "a finite number"
            value = float(value) if ok else value
        else:  # text settings; tensorboard may be unset
            ok = isinstance(value, str) or (value is None and default is None)
            kind = "text"
        if not ok:
            raise UsageError(f"setting {key} in {source} must be {kind}, got {value!r}")
        if key in RANGES and not RANGES[key][0] <= value <= RANGES[key][1]:
            low, high = RANGES[key]
            raise UsageError(f"setting {key} in {source} must be between {low:g} and "
                             f"{high:g}, got {value!r}")
        setattr(config, key, value)
    config.validate()
    return config


def load_train_config(toml_path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the TOML file, then the command-line overrides (``None`` = not given)."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        try:
            with open(toml_path, "rb") as fh:
                values = tomllib.load(fh)
        except OSError as exc:
            raise UsageError(f"cannot read config {toml_path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{toml_path} is not valid TOML: {exc}") from None
        if "train" in values:  # a [train] table, and nothing beside it
            others = sorted(set(values) - {"train"})
            if others:
                raise UsageError(f"unknown top-level setting(s) in {toml_path}: "
                                 f"{', '.join(others)}; put settings inside [train]")
            if not isinstance(values["train"], dict):
                raise UsageError(f"'train' in {toml_path} must be a table ([train]), got "
                                 f"{values['train']!r}")
            values = dict(values["train"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return checked_settings(values, str(toml_path) if toml_path else "the command line")
