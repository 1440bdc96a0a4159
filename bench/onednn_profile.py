"""Where the default training step's oneDNN time goes, primitive by primitive, *inside* the
step: ``bench/train.py``'s default variant (tensors in memory) run for one warm-up and one
timed epoch with ``ONEDNN_VERBOSE=profile_exec``, and the timed epoch's executions summed
by primitive, direction, implementation and shape.

The times are oneDNN's own wall time per execution. TensorFlow runs a layer's input and
weight gradients at once, each on the same two cores, so those two columns overlap: their
sum is more than the step's wall time. Set against ``bench/kernels.py`` (each kernel
alone) it shows what running inside the step costs each kernel.

    python bench/onednn_profile.py --data bench/out/k224.h5 [--images 1024] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from train import make_subset  # bench/train.py: the same subset of the train split

from xrayfeat.config import TrainConfig

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="a dataset from 'xrayfeat prepare' (224 px)")
    parser.add_argument("--images", type=int, default=1024, help="train images per epoch")
    parser.add_argument("--top", type=int, default=25, help="rows of the table")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    data = make_subset(args.data, args.images, tmp / "subset.h5")
    env = {**os.environ, "ONEDNN_VERBOSE": "profile_exec", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(HERE / "train.py"), "--data", str(data),
                           "--variant", "tensors", "--epochs", "1"],
                          env=env, capture_output=True, text=True, check=True)
    epoch_seconds = float(done.stdout.strip().splitlines()[-1].strip("[]"))
    # onednn_verbose,v1,primitive,exec,cpu,KIND,IMPLEMENTATION,DIRECTION,...,SHAPE,MS
    rows = [line.split(",") for line in done.stdout.splitlines()
            if line.startswith("onednn_verbose") and ",exec," in line]
    timed = rows[len(rows) // 2:]  # the warm-up epoch ran the same primitives first
    batch = TrainConfig().batch_size  # the default variant's batch
    steps = -(-args.images // batch)
    total: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0])
    for row in timed:
        key = (row[5], row[7], row[6], row[-2])
        total[key][0] += 1
        total[key][1] += float(row[-1])
    by_kind: dict[tuple, float] = collections.Counter()
    for (kind, direction, _, _), (_, ms) in total.items():
        by_kind[(kind, direction)] += ms
    print(f"timed epoch: {epoch_seconds:.2f} s, {steps} steps of {batch} "
          f"({1e3 * epoch_seconds / steps:.0f} ms a step with verbose timing on)")
    print("\noneDNN ms a step, by primitive and direction:")
    for (kind, direction), ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {ms / steps:8.1f}  {kind} {direction}")
    print(f"  {sum(by_kind.values()) / steps:8.1f}  all (gradients overlap)")
    print(f"\nthe {args.top} largest, ms a step:")
    for (kind, direction, impl, shape), (count, ms) in sorted(
            total.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"  {ms / steps:8.1f}  {count:4d}x  {kind} {direction} {impl} {shape}")


if __name__ == "__main__":
    main()
