"""Write-then-rename outputs: a crash, Ctrl-C or kill never leaves half a file under the
final name, and never destroys the previous version."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from xrayfeat.errors import UsageError

if TYPE_CHECKING:
    import h5py


def temporary_sibling(final: Path, suffix: str = "") -> Path:
    """A fresh hidden name in the same folder as ``final`` (so the rename is atomic).

    The name carries this host and process id, so a later run can tell the leftovers of a
    killed process (see :func:`remove_stale_temporaries`) from another live writer's files.
    """
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.{_owner()}.", suffix=f".tmp{suffix}",
                                dir=final.parent)
    try:
        os.close(fd)
        # mkstemp makes 0600 files; outputs should get the usual permissions (umask applies).
        os.chmod(name, 0o666 & ~current_umask())
    except BaseException:  # Ctrl-C here: the caller never learns the name, so remove it
        _remove(Path(name))
        raise
    return Path(name)


@contextlib.contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[None]:
    """Hold an advisory lock on the output ``final`` while a command writes it.

    Two commands writing one output at once (two ``train --out runs/x``, two
    ``predict --skip-done``) would mix their results; the second is refused in one line
    instead. The lock is ``fcntl.flock`` on a hidden ``.NAME.lock`` beside the output, so
    the kernel releases it when the process dies, however it dies. The file is removed
    while still locked; a process that locked a file meanwhile removed sees that its inode
    is no longer the path's and tries again, so two holders can never coexist.
    """
    import fcntl

    final = Path(final)
    lock = final.parent / f".{final.name}.lock"
    for _ in range(3):
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as exc:
            raise write_error(final.parent, exc, "cannot write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{final} is being written by another xrayfeat command; wait "
                             "for it to finish or choose another output") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # locked a file its holder had just removed: take the new one
    else:
        raise UsageError(f"{final} is being written by another xrayfeat command")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)  # closing releases the lock


def write_text(path: str | os.PathLike, text: str) -> Path:
    """The one text writer: ``text`` to ``path`` atomically, as UTF-8.

    File names that are not valid UTF-8 reach Python as lone surrogates (``\\udcff``);
    they are written back as the bytes they were (``surrogateescape``), so a report that
    names such a file is written whole, and reads back (``--skip-done``) to the same path.
    """
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    return path


def locks_output(func: Callable) -> Callable:
    """Decorate a command so that it runs holding :func:`output_lock` on its ``out``
    argument (when one is given)."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def locked(*args, **kwargs):
        out = signature.bind(*args, **kwargs).arguments.get("out")
        if out is None:
            return func(*args, **kwargs)
        with output_lock(out):
            return func(*args, **kwargs)

    return locked


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows.

    ``os.umask`` can only be read by setting it; for that instant every thread of the
    process (tf.data, HDF5, a caller's) would create files with the temporary value.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # the fallback's instant is at least never world-writable
    os.umask(umask)
    return umask


#: Backups that hold a previous output while it is being replaced: never removed as stale,
#: because after a kill at the wrong moment they may be the only copy of the user's data.
_BACKUP_SUFFIXES = (".tmp.old", ".tmp.previous")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` left by killed processes of this host.

    A SIGKILL cannot clean up, so a killed ``prepare``, ``predict`` or ``train --overwrite``
    leaves a hidden ``.NAME.HOST-PID.xxxx.tmp...`` file or folder (a half-trained run can
    hold a whole prepared dataset). Those whose process no longer exists are removed; live
    writers' files, other hosts' files (a shared disk) and backups are left alone.
    """
    removed: list[Path] = []
    _cleaned_folders.add(Path(folder).resolve())  # atomic_output need not scan it again
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host = _owner().rsplit("-", 1)[0]
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if (match and not entry.name.endswith(_BACKUP_SUFFIXES) and match["host"] == host
                and not _process_alive(int(match["pid"]))):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


#: ``.NAME.HOST-PID.RANDOM.tmp[SUFFIX]``, as :func:`temporary_sibling` makes them.
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")
_cleaned_folders: set[Path] = set()


def _clean_once(folder: Path) -> None:
    """:func:`remove_stale_temporaries` the first time this process writes into ``folder``
    (not on every write: visualize-layers writes thousands of files into one folder)."""
    if folder.resolve() not in _cleaned_folders:
        remove_stale_temporaries(folder)


def _owner() -> str:
    """``HOST-PID`` with the host name reduced to characters safe in a file name."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the
    previous ``final`` is untouched. An unwritable folder or a full disk becomes a one-line
    :class:`UsageError`.
    """
    final = Path(final)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(final.parent)
        tmp = temporary_sibling(final, final.suffix)
        if directory:
            tmp.unlink()
            tmp.mkdir()
    except BaseException as exc:  # Ctrl-C included: no temporary is left behind
        if tmp is not None:
            _remove(tmp)
        if isinstance(exc, OSError):
            raise write_error(final.parent, exc, "cannot write to") from None
        raise
    try:
        yield tmp
        check_not_interrupted()
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


#: Set when Ctrl-C reaches a command (xrayfeat.cli_base installs the handler). Python raises
#: KeyboardInterrupt wherever the main thread is, and one raised inside a ``__del__`` or a
#: callback is printed and dropped; seen once in a test: the interrupted prepare finished and
#: replaced the previous dataset. Outputs are never put in place once this is set.
INTERRUPTED = threading.Event()


def check_not_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C arrived, even one Python dropped on the way."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


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


def prepare_out_dir(out: Path, overwrite: bool) -> Path:
    """Create ``out``; refuse a file, or a non-empty folder without ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and is not empty; pass --overwrite to write into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc.strerror or exc}") from None
    return out
