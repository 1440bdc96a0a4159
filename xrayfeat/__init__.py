"""xrayfeat: prepare chest radiographs, train a MiniVGGNet, evaluate it, and see what each
layer sees.

The public API (:mod:`xrayfeat.api`) is imported on first use, so ``import xrayfeat`` and
``xrayfeat --help`` stay instant::

    import xrayfeat
    run = xrayfeat.load_run("runs/mvgg")
    run.predict(["chest.jpeg"]).labels
"""

from __future__ import annotations

import os
import platform
from typing import Any

from xrayfeat.version import __version__

# TensorFlow runs its oneDNN kernels by default only on x86 CPUs with AVX512_VNNI,
# AVX512_BF16 or AMX, and its own (Eigen) kernels on the rest; on an AVX2-only CPU oneDNN's
# trained the default model 1.4x faster (BENCHMARKS.md, "oneDNN"). TensorFlow reads this
# once, when it is first imported; a value set by the user wins.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__all__ = ["Prediction", "Run", "__version__", "evaluate", "export", "load_run", "predict",
           "prepare", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from xrayfeat import api

        return getattr(api, name)
    raise AttributeError(f"module 'xrayfeat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
