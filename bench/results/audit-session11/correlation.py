"""Does how far an audit's histogram equalisation (or blur, or black frame) moves a run's
normal validation images predict that run's test_dev specificity? One row per CLI run of
bench/out/gen whose audit CSV is in this folder (session 11); Spearman's rho over the runs.
A diagnosis of runs already trained: nothing here is fitted to test_dev.

    python bench/results/audit-session11/correlation.py
"""
import csv, json, os
from pathlib import Path
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
from scipy.stats import spearmanr
rows = [json.loads(l) for l in open(ROOT / "bench/out/gen/results.jsonl")]
res = {}
for r in rows:
    if r["seed"] == 0 or "test_dev" not in r or r.get("prepare_options"): continue
    res[f"{r['variant']}-seed{r['seed']}"] = r["test_dev"]
paths = {}
for name in res:
    for f in (HERE / f"{name}.csv",):
        if os.path.exists(f): paths[name] = f
table = []
for name, f in paths.items():
    d = {(r["transform"], r["class_name"]): r for r in csv.DictReader(open(f))}
    table.append((name, float(d[("equalized", "NORMAL")]["mean_shift"]), float(d[("equalized", "NORMAL")]["flipped"]),
                  float(d[("blur", "NORMAL")]["mean_shift"]), float(d[("black_frame", "NORMAL")]["mean_shift"]),
                  res[name]["specificity"], res[name]["accuracy"], res[name]["roc_auc"]))
table.sort(key=lambda t: t[1])
for t in table: print(f"{t[0]:18s} eq {t[1]:+.3f} ({100*t[2]:4.1f}%) blur {t[3]:+.3f} frame {t[4]:+.3f}  spec {t[5]:.3f} acc {t[6]:.3f} auc {t[7]:.3f}")
print("n", len(table))
for i, name in ((1, "equalized shift"), (3, "blur shift"), (4, "frame shift")):
    for j, m in ((5, "spec"), (6, "acc"), (7, "auc")):
        rho, p = spearmanr([t[i] for t in table], [t[j] for t in table])
        print(f"{name} vs {m}: Spearman rho {rho:+.2f} (p {p:.3f})")
