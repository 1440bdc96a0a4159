"""Write-then-rename outputs: a crash, Ctrl-C or kill never leaves half a file under the
final name, and never destroys the previous version."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from xrayfeat.errors import UsageError

if TYPE_CHECKING:
    import h5py


def temporary_sibling(final: Path, suffix: str = "") -> Path:
    """A fresh hidden name in the same folder as ``final`` (so the rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    # mkstemp makes 0600 files; outputs should get the usual permissions (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the
    previous ``final`` is untouched. An unwritable folder or a full disk becomes a one-line
    :class:`UsageError`.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(final, final.suffix)
        if directory:
            tmp.unlink()
            tmp.mkdir()
    except OSError as exc:
        raise write_error(final.parent, exc, "cannot write to") from None
    try:
        yield tmp
        if directory and final.is_dir():
            # Directories cannot be renamed over a non-empty one: swap via a backup name.
            backup = temporary_sibling(final, ".old")
            backup.unlink()
            os.replace(final, backup)
            os.replace(tmp, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        if exc.errno in MACHINE_ERRNOS:
            raise write_error(final, exc) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def h5_writer(tmp: Path) -> Iterator[h5py.File]:
    """``h5py.File(tmp, "w")`` for a temporary that :func:`atomic_output` discards on error.

    On a full disk HDF5 cannot flush its caches when the file is closed; the file then stays
    half-open inside the library and the interpreter crashes at exit (a segfault, not the
    one-line error). The temporary is going to be deleted anyway, so on any error it is
    emptied first, which frees its space for the final flush, and then closed.
    """
    import h5py

    h5 = h5py.File(tmp, "w")
    try:
        yield h5
        h5.close()
    except BaseException:
        with contextlib.suppress(Exception):
            os.ftruncate(h5.id.get_vfd_handle(), 0)
        with contextlib.suppress(Exception):
            h5.close()
        raise


#: OS errors that describe the machine, not a bug, and what to do about each.
MACHINE_ERRNOS = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space or write to another disk",
    errno.EROFS: "write to another folder",
    errno.EACCES: "check the permissions, or write to another folder",
    errno.EPERM: "check the permissions, or write to another folder",
}


def write_error(path: Path, exc: OSError, verb: str = "cannot write") -> UsageError:
    """A one-line :class:`UsageError` for a failed write: where, why, and what to do."""
    hint = MACHINE_ERRNOS.get(exc.errno)
    return UsageError(f"{verb} {path}: {_reason(exc)}" + (f" ({hint})" if hint else ""))


def _reason(exc: OSError) -> str:
    """The system's one-line reason (h5py puts a multi-line report in ``strerror``)."""
    if exc.errno:
        return os.strerror(exc.errno)
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
