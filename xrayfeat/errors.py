"""Exceptions with messages a person can act on.

The CLI catches :class:`XrayfeatError` and prints ``error: <message>`` on one line with the
exception's ``exit_code``; anything else is a bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

#: Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURES = 1  # the job ran, but some inputs failed and --strict was given
EXIT_USAGE = 2  # bad arguments or input: nothing was done
EXIT_INTERRUPTED = 130  # Ctrl-C; partial outputs were removed


class XrayfeatError(Exception):
    """Base class: an error caused by the user's input or environment, not a bug."""

    exit_code: int = EXIT_USAGE


class UsageError(XrayfeatError):
    """Wrong arguments: a missing path, a refused overwrite, an unknown option value."""


class ImageReadError(XrayfeatError):
    """A file could not be read as a radiograph (empty, not an image, truncated, too large...)."""


class DatasetError(XrayfeatError):
    """A folder or HDF5 file is not a usable dataset (one class, no images, wrong schema)."""


class RunError(XrayfeatError):
    """A run directory is missing, incomplete, from another version, or unsafe to load."""


class NotAvailableError(XrayfeatError):
    """A feature needs an optional dependency or is not built yet."""
