"""Accuracy benchmark: the default recipe end to end, from a raw folder to a trained run.

Runs ``xrayfeat train FOLDER --out RUN`` exactly as a user would (no flags but DATA and
--out, preparing included) as a subprocess, and prints its wall time and the validation
metrics of the best epoch at the operating threshold chosen on validation.

The official Kermany test split is not available here; validation is a patient-grouped
split cut from train and flatters (expect the official test split to be harder).

    python bench/accuracy.py [--data ../shared/data/kermany_224/train] [--out bench/out/accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"accuracy": 0.93, "roc_auc": 0.97}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/kermany_224/train")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/accuracy")
    parser.add_argument("extra", nargs="*", help="extra train options, e.g. --input-size 64")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    cmd = [sys.executable, "-m", "xrayfeat", "train", str(args.data), "--out", str(args.out),
           "--json", *args.extra]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"train failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout)
    m = result["validation"]
    config = json.loads((args.out / "config.json").read_text())
    print(f"machine: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"tensorflow {config['versions']['tensorflow']}")
    print(f"recipe: input {config['train']['input_size']} px, epochs <= {config['train']['epochs']}, "
          f"batch {config['train']['batch_size']}, class weights {config['train']['class_weight']}, "
          f"precision {config.get('precision', 'float32')}")
    print(f"data splits: {config['data']['splits']}")
    print(f"wall time (prepare + train + threshold): {wall / 60:.1f} min (limit 30 min: "
          f"{wall / 1800:.2f} of it)")
    print(f"best epoch {result['best_epoch']} of {result['epochs_run']}, "
          f"threshold {m['threshold']:.4f} (Youden's J on validation)")
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy",
                "precision", "npv", "f1", "brier", "ece"):
        target = TARGETS.get(key)
        note = f"   (official-test target >= {target}; ratio {m[key] / target:.3f})" if target else ""
        print(f"  val {key:<18} {m[key]:.4f}{note}")
    cm = m["confusion_matrix"]
    print(f"  val confusion: tp {cm['tp']} fp {cm['fp']} tn {cm['tn']} fn {cm['fn']} (n {m['n']})")


if __name__ == "__main__":
    main()
