"""The installed package's version, read from its metadata (pyproject.toml is the one
place it is written). A leaf module: what records a version imports this, not the package."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("xrayfeat")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
