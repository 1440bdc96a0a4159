"""Every fixed set of values an option or setting takes, in one leaf module.

The command line turns each into a ``click.Choice`` (``--help`` lists them, a typo fails
before any work starts); the core modules check the same tuples when called from Python.
Nothing here imports anything, so ``xrayfeat --help`` stays instant.
"""

from __future__ import annotations

#: Splits of a prepared dataset.
SPLITS = ("train", "val", "test")
#: How a crop that is not square becomes the stored square (xrayfeat.preprocessing).
RESIZE_MODES = ("stretch", "pad")
#: Where prepare decodes: threads, or processes that isolate a crashing decoder.
DECODE_POOLS = ("process", "thread")
#: ``prepare --labels``: class names from folders or Kermany file names (or a CSV path).
LABEL_MODES = ("folders", "kermany-subtype")
#: ``auto`` resolves to one of the other two on the machine that trains (xrayfeat.model).
PRECISIONS = ("auto", "float32", "bfloat16")
COLOR_MODES = ("grayscale", "rgb")
CLASS_WEIGHTS = ("balanced", "none")
STRATEGIES = ("auto", "mirrored", "multi-worker")
#: How ``train`` chooses a binary run's operating threshold (xrayfeat.thresholds).
THRESHOLD_METHODS = ("youden", "bootstrap", "sensitivity")
#: predict's output formats.
FORMATS = ("csv", "jsonl", "json")
#: Class-activation maps (xrayfeat.cams).
CAM_METHODS = ("gradcam", "gradcam++", "scorecam")
#: visualize-layers --layers: the Conv2D layers, or every layer with a spatial output.
LAYER_MODES = ("conv", "all")
#: How a depth probe pools a layer's maps (xrayfeat.probes).
PROBE_POOLS = ("avg", "max")
#: ``xrayfeat export --format`` (xrayfeat.export).
EXPORT_FORMATS = ("saved_model", "onnx", "litert")
