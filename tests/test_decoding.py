"""xrayfeat.decoding: the decoding pool streams in order without running ahead of its
reader (pools, dead workers and determinism are also tested in test_dataset.py,
test_properties.py and test_interrupts.py)."""

from __future__ import annotations

from xrayfeat.preprocessing import PreprocessSettings


def test_parallel_prepare_does_not_run_ahead_of_its_reader(tmp_path, make_class_folder):
    """Memory stays flat only if workers wait for the writer: after the first result is
    read, at most a small window of files may have been decoded, however long we wait."""
    import time

    from xrayfeat.decoding import map_prepare

    src = make_class_folder(n_per_class=20, size=48)
    paths = sorted(src.rglob("*.jpeg"))
    results = map_prepare(paths, PreprocessSettings(size=32), workers=2, chunksize=2)
    first = next(results)
    assert first[0] == 0 and first[2] is None
    time.sleep(1.0)  # unbounded workers would finish all 40 small files meanwhile
    for path in paths:
        path.unlink()
    rest = list(results)
    assert [r[0] for r in rest] == list(range(1, 40))  # in order, none lost
    decoded = 1 + sum(error is None for _, _, error in rest)
    assert decoded <= 2 * 2 * 2 + 2, decoded  # window: 2 chunks a worker, plus one refill
    assert all("cannot open" in error for _, _, error in rest if error)


def test_stored_images_are_zlib_streams_holding_exactly_the_prepared_pixels(
        tmp_path, make_class_folder):
    """The decoders deflate with ISA-L (a core dependency: without it every prepared image
    costs ~1 ms more); what they store must be plain zlib, which h5py's gzip filter and
    any other reader inflate to the very pixels ``prepare_file`` gives."""
    import zlib

    import h5py
    import numpy as np

    from xrayfeat import decoding
    from xrayfeat.dataset import prepare_dataset
    from xrayfeat.preprocessing import prepare_file

    assert decoding._fast_zlib is not None, "isal is not installed"
    data = np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes() + bytes(5000)
    for level in (0, 1, 2, 3, 9):
        assert zlib.decompress(decoding.deflate(data, level)) == data

    src = make_class_folder(n_per_class=3, size=64)
    out = tmp_path / "d.h5"
    prepare_dataset(src, out)
    with h5py.File(out, "r") as f:
        images, paths = f["images"], f["path"].asstr()[:]
        size = images.shape[1]
        for row in range(len(paths)):
            _, raw = images.id.read_direct_chunk((row, 0, 0))
            pixels = np.frombuffer(zlib.decompress(raw), np.uint8).reshape(size, size)
            assert np.array_equal(pixels, images[row])
            expected = prepare_file(src / paths[row], PreprocessSettings(size=size)).image
            assert np.array_equal(images[row], expected), paths[row]


def _bytes_read() -> int:
    """What this process has read so far (``rchar`` of /proc/self/io)."""
    from pathlib import Path

    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_worker_killed_while_sending_its_result_breaks_the_pool_instead_of_hanging():
    """concurrent.futures' manager thread waits forever for the rest of a result whose
    sender died mid-message (what hung `prepare` after a kill -9, now and then);
    ``chunk_result`` notices the dead worker and raises ``BrokenProcessPool``."""
    import multiprocessing
    import os
    import signal
    import sys
    import threading
    import time
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import pytest

    from xrayfeat.decoding import chunk_result

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    size = 400_000_000  # a result that takes a while to come through the pipe
    for _ in range(10):  # until one kill lands mid-transfer (almost always the first)
        executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        before = _bytes_read()
        future = executor.submit(bytes, size)
        worker = next(iter(executor._processes.values()))
        deadline = time.monotonic() + 60
        # Past 50 MB read by this process, the manager thread is inside the result.
        while _bytes_read() - before < 50e6 and not future.done() \
                and time.monotonic() < deadline:
            pass
        if future.done() or _bytes_read() - before < 50e6:
            executor.shutdown(wait=True)
            continue
        os.kill(worker.pid, signal.SIGKILL)
        outcome: list = []

        def wait(executor=executor, future=future, outcome=outcome):
            try:
                chunk_result(executor, future)
                outcome.append("result")
            except BrokenProcessPool:
                outcome.append("broken")

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(timeout=60)
        assert outcome == ["broken"], "the wait hung on the dead worker's half-sent result"
        executor.shutdown(wait=True)  # the manager thread has ended too: no hang here
        return
    pytest.fail("no kill landed while the result was coming through")


def test_the_workers_of_a_killed_parent_exit_with_it(tmp_path):
    """A parent killed with SIGKILL leaves its decoding processes behind, waiting for work
    forever; each watches its parent and exits once it is gone."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    script = (
        "import json, time\n"
        "from xrayfeat.decoding import _executor\n"
        "executor = _executor(2)\n"
        "assert executor.submit(int, 1).result() == 1\n"  # the workers are up
        "print(json.dumps(list(executor._processes)), flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = json.loads(parent.stdout.readline())
        assert workers and all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its killed parent"
    finally:
        parent.kill()
        parent.wait(timeout=30)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (not gone, not a zombie)."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
