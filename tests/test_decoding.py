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
