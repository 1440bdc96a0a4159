"""Benchmark: `prepare` (xrayfeat.dataset.prepare_dataset, all cores) with a process pool
and with a thread pool, against the plain loop most notebooks use (one process:
cv2.imread(path, 0) then cv2.resize to 224), on full-size radiographs, measured in the same
run in interleaved rounds.

    python bench/prepare.py            # N = 200 and 4N = 800 images
    python bench/prepare.py --n 150    # N = 150 and 600
    python bench/prepare.py --quick    # a smoke run: N = 20 and 80

Inputs: real Kermany radiographs from ../shared/data/kermany_224/train, upscaled to
realistic sizes (1000-2900 px a side, varying aspect ratio, film-grain noise, JPEG q=90),
cached in bench/out/ (gitignored) and reused on later runs.

Each measurement runs in a fresh subprocess so its peak memory is its own: the parent's
ru_maxrss, plus each spawned decode worker's peak RSS (VmHWM, sampled from /proc while the
worker lives). RSS counts shared library pages in every process, so the sum over processes
overstates the real footprint; it is the same measure for N and 4N, which is what the
"flat memory" target compares. The page cache is warmed before timing, so both contenders
read from memory. Targets (issue 15): prepare >= 1.0x the plain loop at N = 150 and >= 1.3x
at 600, ROI and compression included; peak memory within 10% from N to 4N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
POOL_KINDS = ("process", "thread")  # xrayfeat.choices.DECODE_POOLS
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "kermany_224" / "train"
CACHE = HERE / "out"
CLASSES = ("NORMAL", "PNEUMONIA")
SIZE = 224
GRAIN = 1.0  # sigma of the added noise, grey levels
POOL_VERSION = f"pool_v2_grain{GRAIN:g}_q90"  # a new name when the recipe changes


# --------------------------------------------------------------------------- inputs

def _make_one(task: tuple[str, str, int, int, int]) -> None:
    source, target, height, width, seed = task
    image = cv2.imread(source, cv2.IMREAD_GRAYSCALE)
    big = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    rng = np.random.default_rng(seed)
    # Film grain: with it the files weigh ~70 KB per megapixel, like the Kermany originals
    # (1.2 GB for 5856 images of ~3 MP); a clean upscale would compress (and decode) unrealistically well.
    big += rng.normal(0, GRAIN, big.shape).astype(np.float32)
    big = np.clip(big, 0, 255).astype(np.uint8)
    tmp = target + ".part.jpeg"
    if not cv2.imwrite(tmp, big, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise RuntimeError(f"cannot write {tmp}")
    os.replace(tmp, target)


def make_pool(source: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` full-size radiographs in CACHE/pool, made once and reused (deterministic)."""
    pool = CACHE / POOL_VERSION
    rng = np.random.default_rng(seed)
    candidates = sorted(p for c in CLASSES for p in (source / c).glob("*.jpeg"))
    if len(candidates) < count:
        raise SystemExit(f"need {count} source images, {source} has {len(candidates)}")
    picks = rng.permutation(len(candidates))[:count]
    tasks, paths = [], []
    for k, index in enumerate(picks):
        src = candidates[index]
        cls = src.parent.name
        short = int(rng.integers(1000, 2401))
        aspect = float(rng.uniform(0.8, 1.3))  # long / short side
        long = max(1000, min(2900, int(short * aspect)))
        height, width = (long, short) if rng.random() < 0.5 else (short, long)
        target = pool / cls / src.name
        paths.append(target)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tasks.append((str(src), str(target), height, width, int(seed * 100_000 + k)))
    if tasks:
        print(f"making {len(tasks)} full-size radiographs in {pool} (once) ...", file=sys.stderr)
        started = time.perf_counter()
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as workers:
            for _ in workers.imap_unordered(_make_one, tasks, chunksize=4):
                pass
        print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return paths


def make_view(paths: list[Path], n: int) -> Path:
    """CACHE/src_N/CLASS/*: hard links to the first ``n`` pool images (a class-folder layout)."""
    view = CACHE / f"src_{n}"
    wanted = {p.parent.name + "/" + p.name: p for p in paths[:n]}
    existing = {f"{p.parent.name}/{p.name}" for p in view.glob("*/*.jpeg")}
    if existing != set(wanted):
        shutil.rmtree(view, ignore_errors=True)
        for rel, src in wanted.items():
            dst = view / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return view


def warm_page_cache(folder: Path) -> int:
    total = 0
    for path in sorted(folder.rglob("*.jpeg")):
        total += len(path.read_bytes())
    return total


# --------------------------------------------------------------------------- children

def _rss_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except OSError:
        pass
    return out


class WorkerPeaks(threading.Thread):
    """Samples the peak RSS (VmHWM) of every child process of this one until stopped."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval, self.peaks, self._halt = interval, {}, threading.Event()
        self.ignored: set[int] = set()

    @staticmethod
    def _kind(pid: int) -> str:
        """"worker" once the child has exec'd into a spawned worker. Between fork and exec
        the child is a copy of this process and its RSS is ours: not counted."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            return "gone"
        if b"resource_tracker" in cmdline:
            return "tracker"
        return "worker" if b"spawn_main" in cmdline else "starting"

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            for pid in _children(me):
                if pid in self.ignored:
                    continue
                kind = self._kind(pid)
                if kind == "tracker":
                    self.ignored.add(pid)
                if kind != "worker":
                    continue
                hwm = _rss_kib(pid, "VmHWM")
                if hwm is not None:
                    self.peaks[pid] = max(hwm, self.peaks.get(pid, 0))
            self._halt.wait(self.interval)

    def stop(self) -> dict[int, int]:
        self._halt.set()
        self.join()
        return self.peaks


def child_prepare(src: str, out: str, pool: str) -> None:
    from xrayfeat.dataset import prepare_dataset

    monitor = WorkerPeaks()
    monitor.start()
    started = time.perf_counter()
    result = prepare_dataset(Path(src), Path(out), overwrite=True, pool=pool)  # all cores
    seconds = time.perf_counter() - started
    peaks = monitor.stop()
    n = sum(sum(c.values()) for c in result.counts.values())
    print(json.dumps({
        "seconds": seconds, "images": n, "skipped": len(result.skipped),
        "parent_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "workers_kib": sorted(peaks.values()),
        "largest_child_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }))


def child_baseline(src: str) -> None:
    """The notebook loop: one process, full decode, resize, keep the arrays in a list."""
    paths = sorted(str(p) for p in Path(src).rglob("*.jpeg"))
    started = time.perf_counter()
    images = []
    for path in paths:
        image = cv2.imread(path, 0)
        images.append(cv2.resize(image, (SIZE, SIZE)))
    seconds = time.perf_counter() - started
    print(json.dumps({
        "seconds": seconds, "images": len(images),
        "parent_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "workers_kib": [], "largest_child_kib": 0,
    }))


def child_stages(src: str) -> None:
    """Per-image cost of each step on one core (OpenCV single-threaded), for the record."""
    from xrayfeat.dataset import prepare_dataset
    from xrayfeat.imaging import read_radiograph
    from xrayfeat.preprocessing import PreprocessSettings, prepare_array
    from xrayfeat.roi import find_roi

    cv2.setNumThreads(1)
    paths = sorted(str(p) for p in Path(src).rglob("*.jpeg"))
    settings = PreprocessSettings(size=SIZE)
    out: dict[str, float] = {}

    def timed(name, fn, items):
        started = time.perf_counter()
        results = [fn(item) for item in items]
        out[name] = (time.perf_counter() - started) * 1000 / len(items)
        return results

    timed("plain imread+resize", lambda p: cv2.resize(cv2.imread(p, 0), (SIZE, SIZE)), paths)
    timed("full decode", lambda p: read_radiograph(p), paths)
    decoded = timed("reduced decode", lambda p: read_radiograph(p, target_size=2 * SIZE), paths)
    timed("ROI", lambda d: find_roi(d[0]), decoded)
    timed("ROI+resize", lambda d: prepare_array(d[0], settings, d[1]), decoded)
    prepare_dataset(Path(src), CACHE / "stages.h5", overwrite=True, workers=1)  # imports
    started = time.perf_counter()
    prepare_dataset(Path(src), CACHE / "stages.h5", overwrite=True, workers=1)
    out["prepare_dataset, 1 process"] = (time.perf_counter() - started) * 1000 / len(paths)
    print(json.dumps(out))


def median_seconds(runs: list[dict]) -> float:
    return float(np.median([r["seconds"] for r in runs]))


def peak_mb(runs: list[dict]) -> float:
    """Median over rounds of the peak RSS summed over the parent and its workers."""
    return float(np.median([r["parent_kib"] / 1024 + sum(r["workers_kib"]) / 1024
                            for r in runs]))


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {args[0]} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="N: images in the small run (4N too)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 20")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help="folder of CLASS/*.jpeg to upscale (default: kermany_224/train)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--child-prepare", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--pool", choices=POOL_KINDS, default="process", help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", metavar="SRC", help=argparse.SUPPRESS)
    parser.add_argument("--child-stages", metavar="SRC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_prepare:
        return child_prepare(*args.child_prepare, pool=args.pool)
    if args.child_baseline:
        return child_baseline(args.child_baseline)
    if args.child_stages:
        return child_stages(args.child_stages)

    n = 20 if args.quick else args.n
    sizes = [n, 4 * n]
    pool = make_pool(args.source, max(sizes))
    from xrayfeat.imaging import read_header

    sides = np.array([[h.width, h.height] for h in
                      (read_header(p.read_bytes()) for p in pool[: max(sizes)])])
    mb = sum(p.stat().st_size for p in pool[: max(sizes)]) / 1e6
    print(f"xrayfeat prepare benchmark  |  {platform.node()}  {os.cpu_count()} cores  "
          f"load {os.getloadavg()[0]:.2f}  |  python {platform.python_version()}  "
          f"opencv {cv2.__version__}")
    print(f"inputs: {max(sizes)} JPEGs (q=90), {sides.min()}-{sides.max()} px a side "
          f"(mean {sides.prod(axis=1).mean() / 1e6:.1f} MP), {mb:.0f} MB; stored size {SIZE}")
    print(f"median of {args.rounds} interleaved rounds (plain loop, process pool, thread "
          "pool), each measurement in a fresh process")
    header = (f"{'images':>6} | {'plain s':>7} | {'process s':>9} {'ratio':>6} {'MB':>5} | "
              f"{'thread s':>8} {'ratio':>6} {'MB':>5}")
    print(header)
    print("-" * len(header))
    results: dict[int, dict[str, list[dict]]] = {}
    for count in sizes:
        view = make_view(pool, count)
        warm_page_cache(view)
        runs: dict[str, list[dict]] = {"plain": [], "process": [], "thread": []}
        for _ in range(args.rounds):
            runs["plain"].append(run_child("--child-baseline", str(view)))
            for kind in POOL_KINDS:
                out = CACHE / f"prepared_{count}_{kind}.h5"
                prep = run_child("--child-prepare", str(view), str(out), "--pool", kind)
                assert prep["images"] + prep["skipped"] == count, prep
                runs[kind].append(prep)
        results[count] = runs
        base = median_seconds(runs["plain"])
        cells = []
        for kind in POOL_KINDS:
            seconds = median_seconds(runs[kind])
            cells.append(f"{seconds:>9.2f} {base / seconds:>5.2f}x {peak_mb(runs[kind]):>5.0f}")
        print(f"{count:>6} | {base:>7.2f} | " + " | ".join(cells))
    print()
    n1, n4 = sizes
    for kind in POOL_KINDS:
        ratios = [median_seconds(results[c]["plain"]) / median_seconds(results[c][kind])
                  for c in sizes]
        growth = peak_mb(results[n4][kind]) / peak_mb(results[n1][kind]) - 1
        marginal = (n4 - n1) / (median_seconds(results[n4][kind]) - median_seconds(results[n1][kind]))
        base_marginal = (n4 - n1) / (median_seconds(results[n4]["plain"])
                                     - median_seconds(results[n1]["plain"]))
        print(f"{kind} pool: {ratios[0]:.2f}x the plain loop at N={n1}, {ratios[1]:.2f}x at "
              f"4N={n4} (targets >= 1.0x, >= 1.3x); peak memory 4N vs N {growth:+.1%}; "
              f"marginal rate {marginal:.0f} img/s vs plain {base_marginal:.0f} "
              f"({marginal / base_marginal:.2f}x)")
    stages = run_child("--child-stages", str(make_view(pool, n1)))
    print(f"one core, ms per image (N={n1}): " + ", ".join(
        f"{name} {ms:.1f}" for name, ms in stages.items()))
    print(f"HDF5 output: {(CACHE / f'prepared_{n4}_thread.h5').stat().st_size / 1e6:.1f} MB for {n4} "
          "images")


if __name__ == "__main__":
    main()
