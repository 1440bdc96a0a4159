"""Three-class benchmark: NORMAL vs bacterial vs viral pneumonia (Kermany file names).

Prepares the shared train split with ``--labels kermany-subtype`` (patient-grouped
validation cut from train), trains the default recipe on it, and prints the validation
macro one-vs-rest ROC AUC, accuracy and per-class figures. Kermany et al. report 90.7%
accuracy and AUC 0.940 for bacterial vs viral on their test split (not available here).

    python bench/subtypes.py [--data ../shared/data/kermany_224/train] [--out bench/out/subtypes]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/kermany_224/train")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/subtypes")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    started = time.perf_counter()
    h5 = args.out / "subtypes.h5"
    subprocess.run([sys.executable, "-m", "xrayfeat", "prepare", str(args.data), "--out", str(h5),
                    "--labels", "kermany-subtype"], check=True, env=env, stdout=subprocess.DEVNULL)
    result = subprocess.run([sys.executable, "-m", "xrayfeat", "train", str(h5), "--out",
                             str(args.out / "run"), "--json"], check=True, env=env,
                            stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    report = json.loads(result.stdout)
    m = report["validation"]
    config = json.loads((args.out / "run" / "config.json").read_text())
    print(f"classes {config['classes']}, splits {config['data']['splits']}")
    print(f"wall time (prepare + train): {wall / 60:.1f} min; best epoch {report['best_epoch']} "
          f"of {report['epochs_run']}")
    print(f"val accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
          f"macro OvR ROC AUC {m['macro']['roc_auc']:.4f}, weighted {m['weighted']['roc_auc']:.4f}")
    for name, per in m["per_class"].items():
        print(f"  {name:<10} sensitivity {per['sensitivity']:.3f} specificity "
              f"{per['specificity']:.3f} ROC AUC {per['roc_auc']:.3f} PR AUC {per['pr_auc']:.3f} "
              f"(n {per['support']})")
    print("confusion (rows true, columns predicted):", m["confusion_matrix"])


if __name__ == "__main__":
    main()
