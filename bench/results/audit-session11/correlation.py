"""Does how far an audit's histogram equalisation (or blur, or black frame) moves a run's
normal validation images predict that run's test_dev specificity? One row per CLI run of
bench/out/gen whose audit CSV is in this folder (session 11); Spearman's rho over the runs.
A diagnosis of runs already trained: nothing here is fitted to test_dev.

    python bench/results/audit-session11/correlation.py
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parents[2] / "bench/out/gen/results.jsonl"
#: audit transform -> the name it is printed under
SHIFTS = {"equalized": "equalized shift", "blur": "blur shift", "black_frame": "frame shift"}
SCORES = {"specificity": "spec", "accuracy": "acc", "roc_auc": "auc"}


def test_dev_scores() -> dict[str, dict]:
    """test_dev figures of each single-seed run on the default prepared file, by run name."""
    scores = {}
    for line in RESULTS.read_text().splitlines():
        row = json.loads(line)
        if row["seed"] and "test_dev" in row and not row.get("prepare_options"):
            scores[f"{row['variant']}-seed{row['seed']}"] = row["test_dev"]
    return scores


def normal_shifts(audit_csv: Path) -> dict[str, tuple[float, float]]:
    """(mean shift, share flipped) of the NORMAL images under each transform."""
    with audit_csv.open() as fh:
        return {row["transform"]: (float(row["mean_shift"]), float(row["flipped"]))
                for row in csv.DictReader(fh) if row["class_name"] == "NORMAL"}


def main() -> None:
    scores = test_dev_scores()
    runs = sorted(((name, normal_shifts(HERE / f"{name}.csv"), test_dev)
                   for name, test_dev in scores.items() if (HERE / f"{name}.csv").exists()),
                  key=lambda run: run[1]["equalized"][0])
    for name, shifts, test_dev in runs:
        shift, flipped = shifts["equalized"]
        print(f"{name:18s} eq {shift:+.3f} ({100 * flipped:4.1f}%) "
              f"blur {shifts['blur'][0]:+.3f} frame {shifts['black_frame'][0]:+.3f}  "
              f"spec {test_dev['specificity']:.3f} acc {test_dev['accuracy']:.3f} "
              f"auc {test_dev['roc_auc']:.3f}")
    print("n", len(runs))
    for transform, label in SHIFTS.items():
        for score, short in SCORES.items():
            rho, p = spearmanr([shifts[transform][0] for _, shifts, _ in runs],
                               [test_dev[score] for _, _, test_dev in runs])
            print(f"{label} vs {short}: Spearman rho {rho:+.2f} (p {p:.3f})")


if __name__ == "__main__":
    main()
