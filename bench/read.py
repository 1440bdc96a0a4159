"""Reading a prepared dataset's splits into memory: ``xrayfeat.dataset.load_split`` (one
read per run of consecutive rows) against the reader it replaced (512-row slabs up to the
split's last row, the split's rows picked from each), in the same process, interleaved.

Every split of the file is read by both, ``--rounds`` times in turn; the table gives each
one's median seconds and the ratio against the old reader. Both must return the same
images (checked every round). Training reads the validation and train splits before its
first step, ``evaluate`` the test split.

    python bench/read.py --data bench/out/k224.h5 [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xrayfeat.dataset import load_split, split_indices  # noqa: E402


def slab_reader(path: Path, split: str) -> np.ndarray:
    """The split's images as ``load_split`` read them until session 15: every 512-row slab
    from the file's start to the split's last row, keeping the split's rows."""
    index = split_indices(path, split)
    with h5py.File(path, "r") as h5:
        size = int(h5.attrs["size"])
        images = np.empty((len(index), size, size), np.uint8)
        done = 0
        for slab in range(0, int(index[-1]) + 1 if len(index) else 0, 512):
            rows = index[(index >= slab) & (index < slab + 512)]
            if len(rows):
                block = h5["images"][slab : int(rows[-1]) + 1]
                images[done : done + len(rows)] = block[rows - slab]
                done += len(rows)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="a dataset from 'xrayfeat prepare'")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with h5py.File(args.data, "r") as h5:
        splits = sorted(set(h5["split"].asstr()[:]))
        rows = len(h5["split"])
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, h5py {h5py.__version__}; "
          f"{args.data}: {rows} rows; {args.rounds} interleaved rounds (page cache warm "
          f"after the first)")
    readers = {"slabs (before)": slab_reader,
               "runs (load_split)": lambda path, split: load_split(path, split).images}
    seconds = {(split, name): [] for split in splits for name in readers}
    for _ in range(args.rounds):
        for split in splits:
            images = {}
            for name, read in readers.items():
                t = time.perf_counter()
                images[name] = read(args.data, split)
                seconds[split, name].append(time.perf_counter() - t)
            first, second = images.values()
            if not np.array_equal(first, second):
                sys.exit(f"the readers disagree on the {split} split")
    print(f"\n{'split':<8} {'rows':>6} {'reader':<20} {'median s':>9} {'vs slabs':>9}")
    for split in splits:
        n = len(split_indices(args.data, split))
        base = statistics.median(seconds[split, "slabs (before)"])
        for name in readers:
            median = statistics.median(seconds[split, name])
            print(f"{split:<8} {n:>6} {name:<20} {median:9.3f} {median / base:8.3f}x")


if __name__ == "__main__":
    main()
