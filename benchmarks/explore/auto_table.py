"""Units of bytes and steps to each target per run, as in benchmarks/results/issue13_report.md's exploration tables.

    python benchmarks/explore/auto_table.py dir0.1-const benchmarks/results/regimes_lenet5_k10_[ABC].csv \
        benchmarks/results/auto_explore.csv

Reads one regime's runs from the given CSVs (one of them must hold its synchronous run). A cell "3u 1.20x": the run first reached
the target with 3 units of one sync's bytes (the initial broadcast and 2 syncs) after
1.20x synchronous's steps. Targets as in comm_to_accuracy.py.
"""
import collections
import csv
import math
import sys

import numpy as np

regime, files = sys.argv[1], sys.argv[2:]
rows = []
for name in files:
    with open(name, newline="") as f:
        rows += [r for r in csv.DictReader(f) if r["regime"] == regime]
runs = collections.OrderedDict()
for r in rows:
    key = r["family"]
    if key in ("periodic", "fda-linear"):
        key = f"{key}:{float(r['param']):g}"
    runs.setdefault(key, []).append(r)
sync = runs["synchronous"]
steps = np.array([int(r["step"]) for r in sync])
best = np.maximum.accumulate([float(r["accuracy"]) for r in sync])
targets = sorted({math.floor(best[min(np.searchsorted(steps, f * steps[-1]), len(best) - 1)]
                             * 200) / 200 for f in (0.2, 0.35, 0.5)})


def hit(ev, target):
    return next(((int(r["step"]), int(r["syncs"])) for r in ev
                 if float(r["accuracy"]) >= target), None)


sync_steps = [hit(sync, t)[0] for t in targets]
print(regime, "targets", targets, "synchronous's steps", sync_steps)
for key, ev in runs.items():
    cells = []
    for target, s in zip(targets, sync_steps):
        h = hit(ev, target)
        cells.append("   -    " if h is None else f"{h[1] + 1:3d}u {h[0] / s:.2f}x")
    print(f"{key:36s} final {float(ev[-1]['accuracy']):.3f} syncs {int(ev[-1]['syncs']):3d} | "
          + " | ".join(cells))
