"""The bytes-vs-accuracy frontier of fixed periods, and where each sync policy lands (issue 25).

With DiLoCo's outer Nesterov step, more syncs buy final accuracy beyond
synchronous training, so a policy is judged by its final accuracy against
its total bytes, beside the frontier that fixed periods with the same outer
step draw (tau 8 to 256). For each policy at 3-4 settings of its one knob
this reports its *frontier gain* (final accuracy minus the periods'
frontier interpolated at its bytes, in points) and its *byte ratio* (its
bytes over the bytes the periods need for its final accuracy), per regime
and seed, and their means over seeds.

`keras_fda.Simulation`, LeNet-5 on the FEMNIST digits, K = 10, Adam, batch
32 per worker, the regimes of `benchmarks/comm_to_accuracy.py`. Regimes are
split in two: the development set (used to choose the knobs' grids) and the
report set (used for nothing but the report).

Policies (all with the outer step but the first two and post-local):
  synchronous (plain), no-sync (plain; the do-nothing baseline),
  periodic tau, auto (AutoFDA, its horizon), qsr (QSR, its base period at
  the peak rate), rate (`signals.RatePeriod`, its period at the peak rate), curvature
  (`signals.CurvatureFDA`, its loss-gap threshold), post-local (PostLocal, its tau;
  synchronous over the first 10% of the run; plain averages, as Lin et al.).

    python benchmarks/frontier.py --regimes dir0.1-cosine --seeds 0 --name f_a   # one job
    python benchmarks/frontier.py --summarize f_a,f_b --name frontier            # the report

Each job appends one row per run to NAME.csv (so two processes can share
the work, each with its own NAME); `--summarize` reads them all and writes
NAME.md and NAME.png.
"""

import argparse
import collections
import csv
import math
import os
import pathlib
import shlex
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import comm_to_accuracy as c2a  # noqa: E402
import outer_optimizer  # noqa: E402

DEVELOPMENT = ("dir0.1-const", "dir0.5-cosine")
REPORT = ("writers", "dir0.1-cosine", "dir0.1-rotate", "dir0.5-const")
TAUS = (8, 16, 32, 64, 128, 256)
# One knob per policy, 3-4 settings (chosen on the development set).
KNOBS = {
    "auto": (64, 128, 256),
    "qsr": (16, 32, 64),
    "rate": (32, 64, 128),
    "curvature": (8.0, 15.0, 30.0, 60.0),
    "post-local": (32, 128),
}
# Regimes with a learning-rate schedule or a concept drift (goal 2).
CHANGING = ("dir0.1-cosine", "dir0.5-cosine", "dir0.1-rotate")
MATTERS = 2.0  # points between synchronous and no sync
FIELDS = ("regime", "seed", "policy", "knob", "syncs", "bytes", "final_accuracy")


def peak_rate(lr_spec):
    return float(lr_spec.partition(":")[2])


def policies(lr_spec, num_steps, only):
    """(policy, knob, trigger factory, outer step?) of every run of a job."""
    import keras_fda
    import signals

    peak = peak_rate(lr_spec)
    grid = [
        ("synchronous", 0, keras_fda.Synchronous, False),
        ("no-sync", 0, lambda: keras_fda.Periodic(2**62), False),
    ]
    grid += [("periodic", t, lambda t=t: keras_fda.Periodic(t), True) for t in TAUS]
    grid += [("auto", h, lambda h=h: keras_fda.AutoFDA(horizon=h), True) for h in KNOBS["auto"]]
    # QSR's period at the peak rate is its base period; it grows as the rate decays.
    grid += [("qsr", b, lambda b=b: keras_fda.QSR(peak * math.sqrt(b), b), True)
             for b in KNOBS["qsr"]]  # fmt: skip
    grid += [("rate", p, lambda p=p: signals.RatePeriod(p, peak), True) for p in KNOBS["rate"]]
    grid += [("curvature", c, lambda c=c: signals.CurvatureFDA(c), True)
             for c in KNOBS["curvature"]]  # fmt: skip
    # Plain averages, as Lin et al.: an outer Nesterov step after every synchronous
    # step compounds momentum on Adam's (it ended 9-10 points below the frontier).
    switch = num_steps // 10
    grid += [("post-local", t, lambda t=t: keras_fda.PostLocal(t, switch), False)
             for t in KNOBS["post-local"]]  # fmt: skip
    return [g for g in grid if not only or g[0] in only]


def run_job(args):
    import models
    from keras_fda.drivers.simulation import Simulation

    data = dict(np.load(ROOT / args.data_path))
    x, y, writers, x_test, y_test, classes = c2a.load_task(data, "digits", 400)
    num_steps = int(args.epochs * (len(y) // (c2a.BATCH_SIZE * args.workers)))
    path = ROOT / args.out_dir / f"{args.name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if path.exists():
        with open(path) as f:
            done = {(r["regime"], r["seed"], r["policy"], r["knob"]) for r in csv.DictReader(f)}
    started = time.time()
    for regime in args.regimes.split(","):
        partition_spec, lr_spec, drift_spec = c2a.REGIMES[regime]
        for seed in (int(s) for s in args.seeds.split(",")):
            model = models.build("lenet5", classes, seed, c2a.learning_rate(lr_spec, num_steps))
            sim = Simulation(model, args.workers)
            parts = c2a.make_partitions(partition_spec, writers, y, args.workers, seed)
            for policy, knob, make, outer in policies(lr_spec, num_steps, args.policies):
                if args.plain and outer:  # the check of what the outer step does to a policy
                    policy, outer = f"{policy}-plain", False
                key = (regime, str(seed), policy, str(knob))
                if key in done:
                    continue
                kwargs = {"outer_optimizer": outer_optimizer.nesterov()} if outer else {}
                history = sim.run(
                    make(), x, y, parts, batch_size=c2a.BATCH_SIZE, steps=num_steps,
                    evaluations_per_epoch=args.evaluations_per_epoch,
                    validation_data=(x_test, y_test), seed=seed,
                    repartition=c2a.repartition(drift_spec, parts, num_steps), **kwargs,
                )  # fmt: skip
                ev = history.evaluations
                row = dict(zip(FIELDS, (
                    regime, seed, policy, knob, int(ev["syncs"][-1]),
                    int(history.communication().paper_bytes), float(ev["accuracy"][-1]),
                )))  # fmt: skip
                new = not path.exists()
                with open(path, "a", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=FIELDS)
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
                print(f"[{time.time() - started:6.0f}s] {regime} seed {seed} {policy} {knob}: "
                      f"acc {row['final_accuracy']:.4f}, {row['syncs']} syncs, load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip


def frontier(points):
    """The periods' frontier: (log bytes, accuracy) pairs, best accuracy for at most those bytes."""
    best, envelope = -1.0, []
    for b, acc in sorted(points):
        if acc > best:
            best = acc
            envelope.append((math.log(b), acc))
    return envelope


def accuracy_at(envelope, nbytes):
    """The frontier's accuracy at `nbytes` (linear in log bytes), None outside its range."""
    logb = math.log(nbytes)
    if not envelope[0][0] <= logb <= envelope[-1][0]:
        return None
    for (b0, a0), (b1, a1) in zip(envelope, envelope[1:]):
        if b0 <= logb <= b1:
            return a0 + (a1 - a0) * (logb - b0) / (b1 - b0)
    return envelope[-1][1]


def bytes_for(envelope, accuracy):
    """The bytes the periods need for `accuracy` (interpolated), None if they never reach it."""
    if accuracy <= envelope[0][1]:
        return math.exp(envelope[0][0])
    for (b0, a0), (b1, a1) in zip(envelope, envelope[1:]):
        if a0 <= accuracy <= a1:
            return math.exp(b0 + (b1 - b0) * (accuracy - a0) / (a1 - a0))
    return None


def summarize(args):
    rows = []
    for name in args.summarize.split(","):
        with open(ROOT / args.out_dir / f"{name}.csv") as f:
            rows += list(csv.DictReader(f))
    runs = collections.defaultdict(dict)
    for r in rows:
        runs[(r["regime"], int(r["seed"]))][(r["policy"], float(r["knob"]))] = (
            int(r["bytes"]), float(r["final_accuracy"]), int(r["syncs"]))
    # Per regime, seed, policy setting: (bytes, acc, syncs, gain in points, byte ratio).
    scored = collections.defaultdict(dict)
    for (regime, seed), by_policy in runs.items():
        periods = [(b, a) for (p, _), (b, a, _) in by_policy.items() if p == "periodic"]
        if len(periods) < 2:
            continue
        envelope = frontier(periods)
        for (policy, knob), (b, acc, syncs) in by_policy.items():
            on = accuracy_at(envelope, b)
            need = bytes_for(envelope, acc)
            scored[(regime, seed)][(policy, knob)] = (
                b, acc, syncs, None if on is None else 100 * (acc - on),
                None if need is None else b / need)
    regimes = sorted({r for r, _ in scored}, key=lambda r: (r not in DEVELOPMENT, r))
    lines = header = outer_optimizer.report_header(
        "Above the fixed-period frontier? (issue 25)", args.command) + [
        "`keras_fda.Simulation`, LeNet-5 on the FEMNIST digits (400 writers), K = "
        f"{args.workers}, Adam, batch {c2a.BATCH_SIZE} per worker. Outer step: DiLoCo's "
        "`SGD(0.7, momentum=0.9, nesterov=True)` for every policy but synchronous, no-sync, "
        "post-local and the `-plain` checks. "
        "Bytes: the paper's formula, total over the run (syncs + the initial broadcast, plus "
        "each step's trigger state). **Gain**: final accuracy minus the periods' frontier "
        "(their best accuracy for at most those bytes, linear in log bytes) at the policy's "
        "bytes, in points; `-` where its bytes fall outside the periods' range. **Byte ratio**: "
        "its bytes over what the periods need for its final accuracy; `above` where no period "
        "reaches it. Means over the seeds that have a value.",
        "",
        f"Development set (used to choose the knobs' grids): {', '.join(DEVELOPMENT)}. "
        f"Report set (used for nothing else): {', '.join(REPORT)}.",
        "",
    ]
    summary = collections.defaultdict(list)
    for regime in regimes:
        seeds = sorted(s for r, s in scored if r == regime)
        keys = sorted({k for s in seeds for k in scored[(regime, s)]}, key=_order)
        spec = c2a.regime_text(*c2a.REGIMES[regime])
        role = "development" if regime in DEVELOPMENT else "report"
        lines += [f"## {regime} ({role} set): {spec}", "",
                  f"Seeds {', '.join(map(str, seeds))}.", "",
                  "| policy | knob | syncs | MB | final accuracy | gain (points) | byte ratio |",
                  "|---|---|---|---|---|---|---|"]
        for key in keys:
            cells = [scored[(regime, s)][key] for s in seeds if key in scored[(regime, s)]]
            mb = np.mean([c[0] for c in cells]) / 1e6
            acc = [c[1] for c in cells]
            gains = [c[3] for c in cells if c[3] is not None]
            ratios = [c[4] for c in cells]
            per_seed = ", ".join(f"{g:+.1f}" for g in gains)
            gain = f"{np.mean(gains):+.1f} ({per_seed})" if gains else "-"
            finite = [r for r in ratios if r is not None]
            ratio = (f"{np.mean(finite):.2f}" if finite else "") + (
                f" ({len(ratios) - len(finite)} above)" if len(finite) < len(ratios) else "")
            lines.append(
                f"| {key[0]} | {key[1]:g} | {np.mean([c[2] for c in cells]):.1f} | {mb:.2f} | "
                f"{np.mean(acc):.4f} (+-{np.std(acc):.4f}) | {gain} | {ratio} |")
            if role == "report":
                summary[key].append((regime, gains, ratios))
        lines.append("")
    lines[len(header):len(header)] = goal_lines(scored, regimes)
    lines += summary_lines(summary)
    (ROOT / args.out_dir / f"{args.name}.md").write_text("\n".join(lines))
    plot(scored, regimes, ROOT / args.out_dir / f"{args.name}.png")
    print("\n".join(lines))


def _order(key):
    """Table order: the baselines, the periods, the policies in KNOBS' order, then checks."""
    order = ["synchronous", "no-sync", "periodic", *KNOBS]
    return (order.index(key[0]) if key[0] in order else len(order), key[0], key[1])


def matters(scored, regime):
    """Whether no sync until the end loses more than MATTERS points to synchronous (mean)."""
    cells = [v for (r, _), v in scored.items() if r == regime]
    gap = np.mean([c[("synchronous", 0.0)][1] - c[("no-sync", 0.0)][1] for c in cells])
    return 100 * gap > MATTERS, 100 * gap


def goal_lines(scored, regimes):
    """Issue 25's goals per policy setting, on the report set's means over seeds."""
    report = [r for r in regimes if r in REPORT]
    lines = ["## Goals (report set, means over seeds)", "",
             "Communication matters where no sync loses more than "
             f"{MATTERS:g} points to synchronous: "
             + ", ".join(f"{r} {'yes' if matters(scored, r)[0] else 'no'} "
                         f"({matters(scored, r)[1]:.1f})" for r in report) + ".",
             "",
             "| policy | knob | goal 1: >= +1 point or <= 0.7x bytes where it matters | "
             "goal 2: <= 0.5x bytes under schedules and drift | goal 3: <= 2 syncs where it "
             "does not matter |",
             "|---|---|---|---|---|"]
    keys = sorted({k for (r, _), v in scored.items() if r in report for k in v
                   if k[0] not in ("periodic", "synchronous", "no-sync")}, key=_order)
    for key in keys:
        cells = {1: [], 2: [], 3: []}
        for regime in report:
            per_seed = [v[key] for (r, _), v in scored.items() if r == regime and key in v]
            if not per_seed:
                continue
            gains = [c[3] for c in per_seed if c[3] is not None]
            gain = np.mean(gains) if gains else None
            ratios = [c[4] for c in per_seed]
            ratio = None if None in ratios else np.mean(ratios)
            if matters(scored, regime)[0]:
                ok = (gain is not None and gain >= 1) or (ratio is not None and ratio <= 0.7)
                text = "above" if ratio is None else f"{ratio:.2f}x"
                cells[1].append((ok, f"{regime} {'-' if gain is None else f'{gain:+.1f}'} / "
                                     f"{text}"))
                if regime in CHANGING:
                    ok2 = ratio is not None and ratio <= 0.5
                    cells[2].append((ok2, f"{regime} {text}"))
            else:
                extra = np.mean([c[2] for c in per_seed]) - 1
                cells[3].append((extra <= 2, f"{regime} {extra:.1f} besides the final"))
        row = [f"{'met' if c and all(ok for ok, _ in c) else 'missed'}: "
               + "; ".join(t for _, t in c) if c else "-" for c in cells.values()]
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(row) + " |")
    return lines + [""]


def summary_lines(summary):
    lines = ["## Report set: each policy setting across regimes", "",
             "| policy | knob | mean gain (points) per regime | byte ratio per regime |",
             "|---|---|---|---|"]
    for key, per_regime in summary.items():
        if key[0] == "periodic":
            continue
        gains, ratios = [], []
        for regime, g, rs in per_regime:
            gains.append(f"{regime} {np.mean(g):+.1f}" if g else f"{regime} -")
            finite = [x for x in rs if x is not None]
            above = len(rs) - len(finite)
            ratios.append(f"{regime} " + (f"{np.mean(finite):.2f}" if finite else "")
                          + (f" ({above} above)" if above else ""))
        lines.append(f"| {key[0]} | {key[1]:g} | {', '.join(gains)} | {', '.join(ratios)} |")
    return lines + [""]


def plot(scored, regimes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.8), squeeze=False)
    markers = {"periodic": "o-", "auto": "s", "qsr": "^", "rate": "v", "curvature": "D",
               "post-local": "P", "synchronous": "*", "no-sync": "x", "rate-plain": "1"}
    for ax, regime in zip(axes[0], regimes):
        seeds = sorted(s for r, s in scored if r == regime)
        by_key = collections.defaultdict(list)
        for s in seeds:
            for key, cell in scored[(regime, s)].items():
                by_key[key].append(cell)
        for policy, marker in markers.items():
            keys = sorted(k for k in by_key if k[0] == policy)
            if not keys:
                continue
            xs = [np.mean([c[0] for c in by_key[k]]) / 1e6 for k in keys]
            ys = [np.mean([c[1] for c in by_key[k]]) for k in keys]
            ax.plot(xs, ys, marker if policy == "periodic" else marker,
                    linestyle="-" if policy == "periodic" else "none", label=policy)
        ax.set_xscale("log")
        ax.set_title(f"{regime} ({len(seeds)} seeds)")
        ax.set_xlabel("total MB")
        ax.set_ylabel("final accuracy")
        ax.grid(alpha=0.3)
    # One legend for every panel: a policy may appear in some regimes only.
    labels = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    axes[0][0].legend(labels.values(), labels.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regimes", default=",".join(REPORT))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--policies", default="", help="Only these policies (comma list).")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--evaluations_per_epoch", type=int, default=1)
    parser.add_argument("--out_dir", default="benchmarks/results")
    parser.add_argument("--data_path", default="../shared/data/femnist_subset.npz")
    parser.add_argument("--name", default="frontier")
    parser.add_argument("--summarize", default="", help="CSV stems to read; train nothing.")
    parser.add_argument("--plain", action="store_true",
                        help="Run the policies without the outer step (named POLICY-plain).")
    args = parser.parse_args()
    args.policies = [p for p in args.policies.split(",") if p]
    args.command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    (summarize if args.summarize else run_job)(args)


if __name__ == "__main__":
    main()
