"""What a sync sends and does: bfloat16 payload and an outer optimizer, FDA against periodic.

Trains K simulated workers (`keras_fda.Simulation`) in the regimes of
`benchmarks/comm_to_accuracy.py` where communication matters (label skew
Dirichlet 0.1 with a constant or warmup + cosine learning rate, and the concept
drift that rotates the partitions at mid-run), LeNet-5 on the FEMNIST digits,
K = 10. Per regime: synchronous and no-sync baselines, then FDA (linear, fixed
Theta = 1.6e-4 d and 4e-5 d) and periodic averaging (tau 32, 64), each with

* `plain`: today's sync (the float32 mean of the weights),
* `nesterov`: an outer `SGD(0.7, momentum=0.9, nesterov=True)` (DiLoCo's),
* `bf16`: the drift sent as bfloat16 (`sync_dtype="bfloat16"`),

and the FDA with the lower threshold also with outer Nesterov at learning rates 1.0
and 0.5. Reports bytes
(paper formula) and steps to targets that synchronous averaging reaches after
20%, 35% and 50% of the run, and the issue's goals.

Outputs under --out_dir: NAME.md, NAME.csv (every evaluation of every run),
NAME.png (accuracy against bytes, one panel per regime).

    python benchmarks/outer_optimizer.py                 # 48 runs, about 50 min at load 8
    python benchmarks/outer_optimizer.py --preset=smoke  # seconds: checks the script
"""

import argparse
import csv
import datetime
import math
import os
import pathlib
import platform
import shlex
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# Regime names, partitions, schedules and data loading are comm_to_accuracy's.
import comm_to_accuracy as c2a  # noqa: E402

PRESETS = {
    "default": dict(regimes=["dir0.1-const", "dir0.1-cosine", "dir0.1-rotate"], epochs=4,
                    writers=400, evaluations_per_epoch=12, fda_c=[1.6e-4, 4e-5], taus=[32, 64],
                    fda_lrs=[1.0, 0.5]),
    "smoke": dict(regimes=["dir0.1-rotate"], epochs=1, writers=20, evaluations_per_epoch=2,
                  fda_c=[1.6e-4], taus=[4], fda_lrs=[0.5]),
}  # fmt: skip
FRACTIONS = (0.2, 0.35, 0.5)
MATTERS = 0.03  # no sync loses at least this much final accuracy: communication matters
VARIANTS = ("plain", "nesterov", "bf16")


def report_header(title, command):
    """A report's first lines: title, command, date, machine and load (no timing claims)."""
    return [
        f"# {title}",
        "",
        f"Command (from the repo root): `{command}`",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), load "
        f"average at the start {os.getloadavg()[0]:.1f}. Bytes, steps and accuracy only (no "
        "timing claims).",
        "",
    ]


def nesterov(lr=0.7):
    import keras

    return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)


def variant_kwargs(variant):
    """`Simulation.run` keyword args of a variant name ("plain", "bf16", "nesterov[@lr]")."""
    if variant == "plain":
        return {}
    if variant == "bf16":
        return {"sync_dtype": "bfloat16"}
    _, _, lr = variant.partition("@")
    return {"outer_optimizer": nesterov(float(lr) if lr else 0.7)}


def grid(preset, num_params):
    """(trigger label, variant, trigger) of every run of one regime.

    The other outer learning rates run with the last FDA threshold (the one
    with the most syncs).
    """
    import keras_fda

    yield "synchronous", "plain", keras_fda.Synchronous()
    yield "no-sync", "plain", keras_fda.Periodic(2**62)
    triggers = [
        (f"fda-{c * 1e5:g}e-5d", lambda c=c: keras_fda.FDA("linear", threshold=c * num_params))
        for c in preset["fda_c"]
    ]
    triggers += [(f"periodic-{tau}", lambda tau=tau: keras_fda.Periodic(tau)) for tau in preset["taus"]]
    for label, make in triggers:
        for variant in VARIANTS:
            yield label, variant, make()
    fda_label, make_fda = triggers[len(preset["fda_c"]) - 1]
    for lr in preset["fda_lrs"]:
        yield fda_label, f"nesterov@{lr:g}", make_fda()


def bytes_to(history, target):
    hit = history.first_reaching("accuracy", target)
    return None if hit is None else (hit["paper_bytes"], hit["step"])


def fmt_hit(hit):
    return "not reached" if hit is None else f"{c2a.fmt_bytes(hit[0])}, {hit[1]} st"


def ratio(a, b):
    """b's bytes / a's bytes (how many times fewer bytes a needs), or None."""
    if a is None or b is None:
        return None
    return b[0] / a[0]


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def regime_report(regime, runs, targets, num_params):
    """Markdown of one regime and the goal checks: {goal: [(ok, text)]}."""
    final = {key: h.evaluations["accuracy"][-1] for key, h in runs.items()}
    sync, nosync = runs[("synchronous", "plain")], runs[("no-sync", "plain")]
    loss = final[("synchronous", "plain")] - final[("no-sync", "plain")]
    lines = [
        f"## {regime}: {c2a.regime_text(*c2a.REGIMES[regime])}",
        "",
        f"Final accuracy synchronous {final[('synchronous', 'plain')]:.4f}, no sync "
        f"{final[('no-sync', 'plain')]:.4f}: no sync loses {100 * loss:.1f} points "
        f"(communication {'matters' if loss >= MATTERS else 'does not matter'}). Targets "
        f"(synchronous after {', '.join(map(str, FRACTIONS))} of the run): "
        f"{', '.join(f'{t:.3f}' for t in targets)}.",
        "",
        "Bytes (paper formula) and steps to first reach each target:",
        "",
        "| run | syncs | final acc | bytes/sync | " + " | ".join(f"{t:.3f}" for t in targets) + " |",
        "|---" * (4 + len(targets)) + "|",
    ]
    for (label, variant), history in runs.items():
        ev = history.evaluations
        hits = [fmt_hit(bytes_to(history, t)) for t in targets]
        lines.append(
            f"| {label} {variant} | {ev['syncs'][-1]} | {ev['accuracy'][-1]:.4f} | "
            f"{c2a.fmt_bytes(history.communication().bytes_per_sync)} | " + " | ".join(hits) + " |"
        )
    lines += ["", "Ratios (bytes of plain / bytes of the variant: > 1 means the variant needs "
              "fewer), and bfloat16 steps / float32 steps:", ""]
    lines += ["| trigger | target | nesterov: bytes ratio | bf16: bytes ratio | bf16: steps ratio |",
              "|---|---|---|---|---|"]  # fmt: skip
    goals = {"bf16": [], "outer": [], "compare": []}
    triggers = [label for label, variant in runs if variant == "nesterov"]
    for label in triggers:
        plain = runs[(label, "plain")]
        for target in targets:
            p = bytes_to(plain, target)
            n = bytes_to(runs[(label, "nesterov")], target)
            b = bytes_to(runs[(label, "bf16")], target)
            steps = None if p is None or b is None else b[1] / p[1]
            lines.append(
                f"| {label} | {target:.3f} | {fmt_ratio(ratio(n, p))} | {fmt_ratio(ratio(b, p))} "
                f"| {'-' if steps is None else f'{steps:.2f}'} |"
            )
            ok = p is not None and b is not None and abs(steps - 1) <= 0.05
            if p is None and b is None:
                ok, text = True, "neither reached it"
            elif p is None or b is None:
                text = f"{'float32' if p is None else 'bfloat16'} did not reach it"
            else:
                text = f"{b[1]} vs {p[1]} steps ({steps:.2f}x)"
            goals["bf16"].append((ok, f"{regime} {label} {target:.3f}: {text}"))
            if loss >= MATTERS:
                r = ratio(n, p)
                goals["outer" if label.startswith("fda") else "compare"].append(
                    (r is not None and r >= 1.5, (regime, label, target, r))
                )
    sync_bytes = {v: runs[(triggers[0], v)].communication().bytes_per_sync for v in VARIANTS}
    lines += ["", f"Bytes per sync: float32 {sync_bytes['plain']:,}, bfloat16 "
              f"{sync_bytes['bf16']:,} ({sync_bytes['bf16'] / sync_bytes['plain']:.2f}x).", ""]
    return lines, goals


def goals_text(all_goals):
    lines = ["## Goals (issue 15)", ""]
    bf16 = [g for goals in all_goals for g in goals["bf16"]]
    met = sum(ok for ok, _ in bf16)
    lines.append(
        f"* **bfloat16 payload: every target within +-5% of the float32 run's steps, at half its "
        f"sync bytes: {'met' if met == len(bf16) else 'MISSED'}** ({met} of {len(bf16)} "
        "(regime, trigger, target) cases within 5%; the sync payload is exactly half). "
        "Misses: " + ("; ".join(t for ok, t in bf16 if not ok) or "none") + "."
    )
    outer = [g for goals in all_goals for g in goals["outer"]]
    by_regime = {}
    for ok, (regime, label, target, r) in outer:
        by_regime.setdefault(f"{regime} {label}", []).append((ok, target, r))
    winners = [reg for reg, hits in by_regime.items() if all(ok for ok, _, _ in hits)]
    detail = "; ".join(
        f"{reg}: " + ", ".join(f"{t:.3f} {fmt_ratio(r)}" for _, t, r in hits)
        for reg, hits in by_regime.items()
    )
    lines.append(
        "* **Outer Nesterov (SGD 0.7, momentum 0.9): FDA reaches each target with >= 1.5x fewer "
        f"bytes than FDA plain in at least one regime where communication matters (either "
        f"threshold): "
        f"{'met' if winners else 'MISSED'}** ({'met in ' + ', '.join(winners) if winners else 'no regime'}; "
        f"plain bytes / Nesterov bytes per target: {detail})."
    )
    per_trigger = {}
    for goals in all_goals:
        for ok, (_, label, _, r) in goals["outer"] + goals["compare"]:
            per_trigger.setdefault(label, []).append(r)

    def gmean(values):
        got = [v for v in values if v is not None]
        return (math.exp(sum(map(math.log, got)) / len(got)) if got else None), len(values) - len(got)

    parts = [f"{label} {fmt_ratio(gmean(v)[0])} ({gmean(v)[1]} targets unreached by one side)"
             for label, v in per_trigger.items()]  # fmt: skip
    lines.append(
        "* **Does an outer optimizer help FDA more than periodic averaging?** Geometric mean over "
        "the targets of the regimes where communication matters of plain bytes / Nesterov bytes: "
        + ", ".join(parts) + "."
    )
    return lines + [""]


def plot(all_runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_runs), figsize=(6 * len(all_runs), 4.5), squeeze=False)
    styles = {"plain": "-", "nesterov": "--", "bf16": ":"}
    for ax, (regime, runs) in zip(axes[0], all_runs.items()):
        for (label, variant), history in runs.items():
            ev = history.evaluations
            style = styles.get(variant.split("@")[0], "-.")
            ax.plot(np.maximum(ev["paper_bytes"], 1), ev["accuracy"], style,
                    label=f"{label} {variant}", linewidth=1.2)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent (paper formula)")
        ax.set_ylabel("test accuracy of the averaged model")
        ax.set_title(regime)
        ax.set_ylim(0.3, None)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--regimes", default=None, help="Comma-separated override.")
    parser.add_argument("--name", default=None, help="Output stem; default outer_<preset>.")
    parser.add_argument("--out_dir", default="benchmarks/results")
    parser.add_argument("--data_path", default="../shared/data/femnist_subset.npz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import models
    from keras_fda.drivers.simulation import Simulation

    preset = dict(PRESETS[args.preset])
    if args.regimes:
        preset["regimes"] = args.regimes.split(",")
    name = args.name or f"outer_{args.preset}"
    out = ROOT / args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data = dict(np.load(ROOT / args.data_path))
    x, y, writers, x_test, y_test, classes = c2a.load_task(data, "digits", preset["writers"])
    workers = 10
    num_steps = int(preset["epochs"] * (len(y) // (c2a.BATCH_SIZE * workers)))
    started = time.time()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    header = report_header(
        "What a sync sends and does: bfloat16 payload, outer Nesterov (issue 15)", command
    ) + [
        f"`keras_fda.Simulation`, FEMNIST digits ({preset['writers']} writers), LeNet-5, K = "
        f"{workers}, Adam, batch {c2a.BATCH_SIZE} per worker, {num_steps} steps, seed "
        f"{args.seed}, accuracy of the averaged model on the test set evaluated "
        f"{preset['evaluations_per_epoch']} times per epoch. FDA: linear estimator, Theta = "
        f"{' and '.join(f'{c:g}' for c in preset['fda_c'])} * d (`fda-Cd`). Variants: `plain` (float32 mean of the weights), `nesterov` "
        "(outer `SGD(0.7, momentum=0.9, nesterov=True)` on w0; `nesterov@LR` another rate), "
        "`bf16` (drift sent as bfloat16). Bytes: the paper's formula with the sync payload, "
        "`2 K (4 d + syncs * bytes_per_sync) + state_bytes * steps * K`.",
        "",
    ]
    all_runs, all_goals, body, rows = {}, [], [], []
    for regime in preset["regimes"]:
        partition_spec, lr_spec, drift_spec = c2a.REGIMES[regime]
        model = models.build("lenet5", classes, args.seed, c2a.learning_rate(lr_spec, num_steps))
        num_params = model.count_params()
        sim = Simulation(model, workers)
        parts = c2a.make_partitions(partition_spec, writers, y, workers, args.seed)
        runs = {}
        for label, variant, trigger in grid(preset, num_params):
            history = sim.run(
                trigger, x, y, parts, batch_size=c2a.BATCH_SIZE, steps=num_steps,
                evaluations_per_epoch=preset["evaluations_per_epoch"],
                validation_data=(x_test, y_test), seed=args.seed,
                repartition=c2a.repartition(drift_spec, parts, num_steps),
                **variant_kwargs(variant),
            )  # fmt: skip
            runs[(label, variant)] = history
            ev = history.evaluations
            print(f"[{time.time() - started:6.0f}s] {regime} {label} {variant}: acc "
                  f"{ev['accuracy'][-1]:.4f}, {ev['syncs'][-1]} syncs, load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
            for i in range(len(ev["step"])):
                rows.append({"regime": regime, "trigger": label, "variant": variant,
                             **{k: v[i].item() for k, v in ev.items()}})  # fmt: skip
        targets = c2a.targets_from(runs[("synchronous", "plain")], FRACTIONS)
        lines, goals = regime_report(regime, runs, targets, num_params)
        body += lines
        all_runs[regime] = runs
        all_goals.append(goals)
        md = header + goals_text(all_goals) + body
        md += [f"Time so far: {time.time() - started:.0f} s; load average now "
               f"{os.getloadavg()[0]:.1f}.", ""]  # fmt: skip
        (out / f"{name}.md").write_text("\n".join(md))
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot(all_runs, out / f"{name}.png")
    print(f"Wrote {out / name}.md, .csv and .png in {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
