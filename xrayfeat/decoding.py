"""Decoding many radiographs on every core: the one preprocessing path, in a pool.

``prepare`` and ``predict`` stream files through :func:`map_prepare`, which keeps a small
window of work in flight (memory stays flat however many files there are) and yields
results in input order. Threads start at once (OpenCV releases the GIL); processes isolate
a decoder that crashes, and a dead worker costs only the chunks it held.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import time
import zlib
from dataclasses import replace
from typing import Iterator, Sequence

import numpy as np

from xrayfeat.choices import DECODE_POOLS
from xrayfeat.errors import UsageError, XrayfeatError
from xrayfeat.preprocessing import PreprocessSettings, prepare_file


try:
    from isal import isal_zlib as _fast_zlib  # Intel ISA-L: the same zlib stream, faster
except ImportError:  # pragma: no cover - a core dependency; zlib keeps a broken install working
    _fast_zlib = None


def deflate(data: bytes, level: int) -> bytes:
    """``data`` as a zlib stream, the format HDF5's gzip filter stores and any zlib reads.

    ISA-L (the ``isal`` package) compresses at ``min(level, 3)``, its highest: 0.21 ms a
    224 px image against zlib's 1.09 ms at level 1 (about a tenth of a prepared image's
    cost), for a file 7 % larger (BENCHMARKS.md "Prepare").
    """
    if _fast_zlib is not None:
        return _fast_zlib.compress(data, min(level, 3))
    return zlib.compress(data, level)


def _prepare_worker(args: tuple[int, str, PreprocessSettings, int | None]):
    """Runs in a worker: decode and prepare one file (and deflate the image at
    ``deflate_level``, when given); errors come back as text."""
    index, path, settings, deflate_level = args
    try:
        prepared = prepare_file(path, settings)
    except XrayfeatError as exc:
        return index, None, str(exc)
    except Exception as exc:  # a decoder bug on one hostile file must not stop the run
        return index, None, f"unreadable: {type(exc).__name__}: {exc}"
    if deflate_level is not None:
        # The pixels travel once, compressed (``image`` left empty): less than half the
        # bytes through the pool's pipes, and a shorter window for a worker killed mid-send
        # to leave concurrent.futures reading half a message.
        prepared = replace(prepared, deflated=deflate(prepared.image.tobytes(), deflate_level),
                           image=np.empty((0, 0), np.uint8))
    return index, prepared, None


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one decode per core; OpenCV's own threads would oversubscribe


def _init_pool_worker() -> None:
    import signal
    import threading

    _init_worker()
    # Ctrl-C is the parent's to handle: it stops handing out work and lets in-flight
    # chunks finish (see map_prepare), so a worker process must not die of it mid-result.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                     name="xrayfeat-parent-watch").start()


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """End this worker once the process that started it is gone. A parent killed with
    SIGKILL cannot stop its workers, and each worker holds the writing end of the pool's
    task queue itself, so its wait for the next task never ends: without this, the
    workers of a killed ``prepare --isolate`` stayed alive (seen, minutes later)."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


#: The error row of a file whose decoding process died on it twice (a decoder crash on
#: that file, or the out-of-memory killer).
WORKER_DIED = "the decoding process died on this file (a decoder crash, or killed)"


def _executor(workers: int, pool: str = "process"):
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if pool == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="xrayfeat-decode")
    # Spawned, not forked: safe after TensorFlow has started its threads.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_pool_worker)


@contextlib.contextmanager
def _opencv_threads(n: int):
    """OpenCV's own thread count, set for a block and restored: decoding threads of ours
    each running OpenCV's parallel loops would oversubscribe the cores."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


#: Seconds a pool may keep a dead worker's chunk pending before it is declared lost.
DEAD_WORKER_GRACE_S = 2.0


def chunk_result(executor, future):
    """``future.result()``, or ``BrokenProcessPool`` once a worker of ``executor`` has died.

    concurrent.futures notices a dead worker at once, except one killed while sending its
    result: the pool's manager thread then waits forever for the rest of the message
    (Python 3.11; a ``kill -9`` test hung on it). So the wait also watches the workers, and
    a pool found with a dead worker is unblocked by hand: its other workers are killed and
    this process's end of the result pipe is closed, so the manager thread reads
    end-of-file, marks the pool broken and ends (else it would also hang the exit).
    """
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool

    dead_since = None
    while True:
        try:
            return future.result(timeout=0.5)
        except FutureTimeout:
            pass
        processes = list((getattr(executor, "_processes", None) or {}).values())
        if not any(p.exitcode is not None for p in processes):
            dead_since = None
            continue
        dead_since = dead_since or time.monotonic()
        if time.monotonic() - dead_since < DEAD_WORKER_GRACE_S:
            continue  # concurrent.futures normally notices first
        for process in processes:
            if process.exitcode is None:
                process.kill()
        writer = getattr(getattr(executor, "_result_queue", None), "_writer", None)
        with contextlib.suppress(OSError, AttributeError):
            writer.close()
        raise BrokenProcessPool("a worker died while sending its result")


def _retry_alone(chunk: list) -> list:
    """A chunk lost with a dead worker, run again in a process of its own; if that dies
    too, the chunk's files become error rows and the run goes on."""
    from concurrent.futures.process import BrokenProcessPool

    executor = _executor(1)
    try:
        return chunk_result(executor, executor.submit(_prepare_chunk, chunk))
    except BrokenProcessPool:
        return [(task[0], None, WORKER_DIED) for task in chunk]
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def map_prepare(
    paths: Sequence[str], settings: PreprocessSettings, workers: int | None = None,
    chunksize: int = 8, pool: str = "process", deflate_level: int | None = None,
) -> Iterator[tuple[int, object, str | None]]:
    """Prepare files on all cores, yielding ``(index, PreparedImage | None, error)`` in order.

    Results stream: only a few chunks per worker are in flight, so memory does not grow
    with the number of files. A worker that dies (``kill -9``, the out-of-memory killer, a
    decoder crash) costs only the chunks in flight: the pool notices at once
    (concurrent.futures marks it broken), each lost chunk runs again alone, and a chunk
    that kills its process twice becomes error rows. ``pool`` is one of :data:`DECODE_POOLS`;
    with ``thread`` nothing is isolated (a crash is the whole command's). With
    ``deflate_level``, each image also comes back zlib-compressed (``deflated``), so the
    HDF5 writer's compression runs on every core instead of the writer's one.
    """
    if pool not in DECODE_POOLS:
        raise UsageError(f"pool must be one of {', '.join(DECODE_POOLS)}, got {pool!r}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    in_threads = pool == "thread" and (workers or 2) > 1
    with _opencv_threads(1) if in_threads else contextlib.nullcontext():
        yield from _map_prepare(paths, settings, workers, chunksize, pool, deflate_level)


def _map_prepare(paths, settings, workers, chunksize, pool, deflate_level):
    from concurrent.futures.process import BrokenProcessPool

    workers = workers or os.cpu_count() or 1
    tasks = ((i, str(p), settings, deflate_level) for i, p in enumerate(paths))
    if workers == 1:
        _init_worker()
        yield from map(_prepare_worker, tasks)
        return
    # A window of 2 chunks a worker, refilled as each is read: workers never run far
    # ahead of a slower consumer (the HDF5 writer), so memory is bounded.
    chunks = iter(lambda: list(itertools.islice(tasks, chunksize)), [])
    executor = _executor(workers, pool)
    window: collections.deque = collections.deque()

    def refill() -> None:
        for chunk in itertools.islice(chunks, 2 * workers - len(window)):
            try:
                window.append((chunk, executor.submit(_prepare_chunk, chunk)))
            except BrokenProcessPool:  # a worker died since: the chunk is lost unstarted
                window.append((chunk, None))

    try:
        refill()
        while window:
            chunk, future = window.popleft()
            try:
                if future is None:
                    raise BrokenProcessPool
                done = chunk_result(executor, future)
            except BrokenProcessPool:
                # Every chunk in flight was lost with the pool: rerun each alone, in order.
                lost = [chunk] + [c for c, _ in window]
                window.clear()
                executor.shutdown(wait=False, cancel_futures=True)
                for retried in map(_retry_alone, lost):
                    yield from retried
                executor = _executor(workers, pool)
                refill()
                continue
            refill()
            yield from done
    finally:
        # A consumer that stops early (an error, --strict, Ctrl-C) waits at most a minute
        # for the few chunks in flight, then stops the workers outright.
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 60
        in_flight = [future for _, future in window if future is not None]
        for future in in_flight:
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive() and any(not f.done() for f in in_flight):
                process.kill()  # stuck on one file for a minute: no public API but kill


def _prepare_chunk(chunk: list[tuple[int, str, PreprocessSettings, int | None]]):
    return [_prepare_worker(task) for task in chunk]
