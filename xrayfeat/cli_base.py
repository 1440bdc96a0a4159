"""The plumbing every command of :mod:`xrayfeat.cli` shares: errors as one line and a
documented exit code (README "Exit codes"), usage errors the same way, and TensorFlow
imported without its start-up chatter."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from typing import Callable

import typer
from typer.core import TyperGroup

from xrayfeat.atomic import INTERRUPTED, MACHINE_ERRNOS, check_not_interrupted
from xrayfeat.errors import EXIT_INTERRUPTED, EXIT_USAGE, XrayfeatError
from xrayfeat.render import err_console, escape


def _one_line_usage_error(exc) -> None:
    """A usage error (unknown option, a value not among the choices) as one line, like
    every other error: Typer would draw a usage block and a boxed message."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help was shown instead
        return
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
    err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}{escape(hint)}",
                      highlight=False, soft_wrap=True)


class OneLineErrorsGroup(TyperGroup):
    """The Typer group of the ``xrayfeat`` app: usage errors as one line."""

    def main(self, *args, **kwargs):
        from typer import rich_utils

        drawn, rich_utils.rich_format_error = rich_utils.rich_format_error, _one_line_usage_error
        try:
            return super().main(*args, **kwargs)
        finally:
            rich_utils.rich_format_error = drawn


#: Set by the app's callback: `--debug` shows tracebacks instead of one-line errors.
state = {"debug": False}


def quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up lines (oneDNN, absl) kept off the terminal.

    They are written to file descriptor 2 before any log level applies; a Python error
    during the import still surfaces as an exception.
    """
    if "tensorflow" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def friendly_errors(command: Callable) -> Callable:
    """Turn the core's exceptions into one line on stderr and a documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with _ctrl_c_remembered():
            return _run(command, args, kwargs)

    return wrapper


def _on_ctrl_c(signum, frame) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def _ctrl_c_remembered():
    """Ctrl-C sets :data:`xrayfeat.atomic.INTERRUPTED` as well as raising, so an interrupt
    that Python drops (raised inside a ``__del__``) still stops the command before any
    output is put in place; the previous handler comes back afterwards."""
    INTERRUPTED.clear()
    previous = None
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        previous = signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(command: Callable, args, kwargs):
    """The command, with the core's exceptions turned into one line and an exit code."""
    try:
        result = command(*args, **kwargs)
        check_not_interrupted()  # a Ctrl-C dropped on the way: outputs were not replaced
        return result
    except XrayfeatError as exc:
        if state["debug"]:
            raise
        # escape: paths are data ("scan [1].png"), never Rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: partial outputs were removed")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as exc:  # a bug: say so in one line, traceback only with --debug
        if state["debug"]:
            raise
        if isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS:
            # A full disk or a read-only folder is the machine's state, not a bug.
            where = f"{exc.filename}: " if exc.filename else ""
            err_console.print(
                f"[bold red]error:[/] {escape(where)}{os.strerror(exc.errno)} "
                f"({MACHINE_ERRNOS[exc.errno]})", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
        first_line = (str(exc).splitlines() or [""])[0]
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(first_line)} "
            "(run with --debug for the traceback, and please report it)",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(1) from None
