"""Write-then-rename outputs: a crash, Ctrl-C or kill never leaves half a file under the
final name, and never destroys the previous version."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from xrayfeat.errors import UsageError


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
        raise UsageError(f"cannot write to {final.parent}: {exc.strerror or exc}") from None
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
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise UsageError(f"cannot write {final}: {exc.strerror}") from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
