"""xrayfeat: prepare chest radiographs, train a MiniVGGNet, evaluate it, and see what each
layer sees.

The public API (:mod:`xrayfeat.api`) is imported on first use, so ``import xrayfeat`` and
``xrayfeat --help`` stay instant::

    import xrayfeat
    run = xrayfeat.load_run("runs/mvgg")
    run.predict(["chest.jpeg"]).labels
"""

from __future__ import annotations

from typing import Any

from xrayfeat.version import __version__

__all__ = ["Prediction", "Run", "__version__", "evaluate", "export", "load_run", "predict",
           "prepare", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from xrayfeat import api

        return getattr(api, name)
    raise AttributeError(f"module 'xrayfeat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
