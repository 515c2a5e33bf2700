"""Communication to accuracy: bytes and steps each sync strategy needs to reach a target.

Trains K simulated workers (`keras_fda.Simulation`) on the FEMNIST
subset with Adam and batch 32 per worker, under synchronous averaging, no
synchronization until the end (the do-nothing baseline: how much
communication matters), periodic averaging (a tau sweep), Kamp's local
condition, FDA naive / linear / sketch / exact (threshold sweeps given as
c * d, d the number of model parameters) and FDA with `threshold="auto"`.
For each strategy it reports the bytes (the paper's formula) and steps to
first reach target test accuracies of the averaged model; targets are what
synchronous averaging reaches at fixed fractions of the run, so synchronous
always reaches them.

A regime is a partition (whole writers, label skew), a learning-rate schedule
(constant, warmup + cosine decay) and optionally a concept drift (the workers'
partitions rotate at a fraction of the run); `--regimes` runs several and adds
a summary of auto against the best periodic tau per regime and the best
single tau across them.

Outputs under --out_dir: NAME.md (tables, command, date, simulator efficiency),
NAME.csv (every evaluation of every run), NAME.png (accuracy vs bytes) and
NAME_pareto.png (bytes against steps to each target, one panel per regime).

    python benchmarks/comm_to_accuracy.py --preset=quick    # < 10 min on 2 cores
    python benchmarks/comm_to_accuracy.py --preset=regimes  # about an hour
    python benchmarks/comm_to_accuracy.py --preset=full     # hours
"""

import csv
import dataclasses
import datetime
import math
import os
import pathlib
import platform
import shlex
import sys
import time

import numpy as np
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# Regimes: (partition, learning rate, drift); see the --partition, --lr and --drift flags.
REGIMES = {
    "writers": ("by_writer", "constant:1e-3", "none"),
    "dir0.1-const": ("dirichlet:0.1", "constant:1e-3", "none"),
    "dir0.1-cosine": ("dirichlet:0.1", "cosine:3e-3", "none"),
    "dir0.5-const": ("dirichlet:0.5", "constant:1e-3", "none"),
    "dir0.5-cosine": ("dirichlet:0.5", "cosine:3e-3", "none"),
    "dir0.1-rotate": ("dirichlet:0.1", "constant:1e-3", "rotate:0.5"),
}

PRESETS = {
    # Seconds: a test runs it. Few writers, 2 workers, a handful of steps.
    "smoke": dict(
        tasks=["digits"], models=["lenet5"], workers=[2], epochs=1, writers=20,
        evaluations_per_epoch=2, taus=[4], kamp=[8e-5], fda={"linear": [4e-5]}, auto=True,
        test_samples=500, efficiency_rounds=1, outer_lr=0.7,
    ),
    # < 10 min on 2 shared cores: LeNet-5 digits K=10, whole writers (communication
    # does not matter) and label skew with warmup + cosine (it does), over 3
    # epochs; a short and a long period, the paper's c = 4e-5 and auto, the
    # period and auto also with the outer Nesterov step.
    "quick": dict(
        tasks=["digits"], models=["lenet5"], workers=[10], epochs=3, writers=400,
        regimes=["writers", "dir0.1-cosine"], evaluations_per_epoch=4, taus=[16, 128], kamp=[],
        fda={"linear": [4e-5]}, auto=True, test_samples=None, efficiency_rounds=1,
        outer_lr=0.7,
    ),
    # Every regime, LeNet-5 digits K=10, 4 epochs (504 steps): the tau and Theta sweeps.
    "regimes": dict(
        tasks=["digits"], models=["lenet5"], workers=[10], epochs=4, writers=400,
        regimes=list(REGIMES), evaluations_per_epoch=6, taus=[8, 16, 32, 64, 96, 128], kamp=[],
        fda={"linear": [4e-5, 1.6e-4]}, auto=True,
        test_samples=None, efficiency_rounds=1, outer_lr=0.7,
    ),
    "full": dict(
        tasks=["digits", "femnist62"], models=["lenet5", "cnn"], workers=[10, 40], epochs=8,
        writers=400, evaluations_per_epoch=4, taus=[8, 32, 128, 512], kamp=[1.6e-4, 6.4e-4],
        fda={
            "naive": [1.6e-4, 6.4e-4],
            "linear": [2e-5, 8e-5, 3.2e-4, 1.28e-3],
            "sketch": [8e-5, 3.2e-4],
        },
        auto=True, test_samples=None, efficiency_rounds=3,
    ),
}  # fmt: skip

flags.DEFINE_enum("preset", "quick", sorted(PRESETS), "Grid and run length.")
flags.DEFINE_bool("quick", False, "Shorthand for --preset=quick.")
flags.DEFINE_string(
    "data_path", "../shared/data/femnist_subset.npz", "FEMNIST subset, relative to the repo root."
)
flags.DEFINE_string("out_dir", "benchmarks/results", "Output folder, relative to the repo root.")
flags.DEFINE_string("name", None, "Output file stem; default comm_to_accuracy_<preset>.")
flags.DEFINE_list("tasks", None, "Override: digits, femnist62.")
flags.DEFINE_list("models", None, "Override: lenet5, cnn.")
flags.DEFINE_list("workers", None, "Override: values of K.")
flags.DEFINE_float("epochs", None, "Override: epochs per run (every task).")
flags.DEFINE_string(
    "partition", "by_writer",
    "How samples go to workers: by_writer (whole writers, natural non-IID), "
    "sorted:FRACTION (keras_fda.partition.sorted_by_label, the paper's label skew), "
    "dirichlet:ALPHA (keras_fda.partition.dirichlet) or iid.",
)
flags.DEFINE_string(
    "lr", "constant:1e-3",
    "Adam's learning rate: constant:RATE, or cosine:PEAK (linear warmup over the first 10% "
    "of the run to PEAK, then cosine decay to 0 at the end).",
)
flags.DEFINE_string(
    "drift", "none",
    "Concept drift: none, or rotate:FRACTION (after that fraction of the run each worker "
    "trains on its neighbour's partition; `Simulation.run(repartition=...)`).",
)
flags.DEFINE_list(
    "regimes", None,
    f"Override: named regimes ({', '.join(REGIMES)}); each sets --partition, --lr, --drift.",
)
flags.DEFINE_integer("steps", None, "Override: steps per run instead of epochs.")
flags.DEFINE_list("taus", None, "Override: periodic taus.")
flags.DEFINE_list("kamp", None, "Override: Kamp thresholds as multiples c of d.")
flags.DEFINE_list("fda_naive", None, "Override: naive FDA thresholds as c (empty: none).")
flags.DEFINE_list("fda_linear", None, "Override: linear FDA thresholds as c (empty: none).")
flags.DEFINE_list("fda_sketch", None, "Override: sketch FDA thresholds as c (empty: none).")
flags.DEFINE_list("fda_exact", None, "Override: exact FDA thresholds as c (empty: none).")
flags.DEFINE_bool("auto", None, "Override: run FDA with threshold='auto' (linear estimator).")
flags.DEFINE_integer("evaluations_per_epoch", None, "Override: evaluations per epoch.")
flags.DEFINE_integer("efficiency_rounds", None, "Override: interleaved efficiency rounds.")
flags.DEFINE_list(
    "target_fractions", ["0.2", "0.35", "0.5"],
    "Targets: the accuracy synchronous averaging reaches after these fractions of the run "
    "(rounded down to 0.005), so that other strategies get 2x its steps and more.",
)  # fmt: skip
flags.DEFINE_list(
    "summarize", None,
    "Train nothing: read these CSVs of earlier --regimes runs (e.g. two halves run in "
    "parallel) and write NAME.md with the summary across them and NAME_pareto.png.",
)
flags.DEFINE_integer("seed", 0, "Seed of partitions, data order and model initialization.")
flags.DEFINE_float(
    "outer_lr", None,
    "Override: also run auto and every periodic tau with DiLoCo's outer optimizer at each "
    "sync, SGD(OUTER_LR, momentum=0.9, nesterov=True) (`outer_optimizer=`; families "
    "fda-auto+nesterov and periodic+nesterov); the quick and regimes presets use 0.7; 0: none.",
)
FLAGS = flags.FLAGS

BATCH_SIZE = 32


@dataclasses.dataclass
class Run:
    """One simulated run: a strategy with one parameter value, and its history."""

    family: str
    param: float
    history: object

    @property
    def label(self):
        if self.family in ("synchronous", "no-sync") or self.family.startswith("fda-auto"):
            return self.family
        if self.family.startswith("periodic"):
            return f"{self.family} tau={int(self.param)}"
        return f"{self.family} Theta={self.param:.3g}"


def load_task(data, task, writers):
    """(x, y, writer ids, x_test, y_test, classes) of a task, restricted to the first writers."""
    keep = data["writer_train"] < writers
    keep_test = data["writer_test"] < writers
    if task == "digits":
        keep &= data["y_train"] < 10
        keep_test &= data["y_test"] < 10
    elif task != "femnist62":
        raise ValueError(f"Unknown task {task!r}; use digits or femnist62.")

    def images(x):
        return (x[..., None] / np.float32(255)).astype(np.float32)

    return (
        images(data["x_train"][keep]),
        data["y_train"][keep].astype(np.int32),
        data["writer_train"][keep],
        images(data["x_test"][keep_test]),
        data["y_test"][keep_test].astype(np.int32),
        10 if task == "digits" else 62,
    )


def make_partitions(spec, writers, labels, num_workers, seed):
    """K index arrays per --partition (see its help)."""
    from keras_fda import partition

    kind, _, arg = spec.partition(":")
    if kind == "by_writer" and not arg:
        return partition.by_writer(writers, num_workers, seed=seed)
    if kind == "iid" and not arg:
        return partition.iid(len(labels), num_workers, seed=seed)
    if kind == "sorted" and arg:
        return partition.sorted_by_label(labels, num_workers, float(arg), seed=seed)
    if kind == "dirichlet" and arg:
        return partition.dirichlet(labels, num_workers, float(arg), seed=seed)
    raise app.UsageError(
        f"--partition={spec!r}: use by_writer, iid, sorted:FRACTION or dirichlet:ALPHA."
    )


def learning_rate(spec, num_steps):
    """Adam's learning rate per --lr: a float or a warmup + cosine schedule over the run."""
    import keras

    kind, _, arg = spec.partition(":")
    try:
        rate = float(arg)
    except ValueError:
        rate = -1.0
    if rate <= 0 or kind not in ("constant", "cosine"):
        raise app.UsageError(f"--lr={spec!r}: use constant:RATE or cosine:PEAK, e.g. cosine:3e-3.")
    if kind == "constant":
        return rate
    warmup = max(1, num_steps // 10)
    return keras.optimizers.schedules.CosineDecay(
        0.0, num_steps - warmup, alpha=0.0, warmup_target=rate, warmup_steps=warmup
    )


def repartition(spec, parts, num_steps):
    """`Simulation.run`'s repartition per --drift: None, or {step: rotated partitions}."""
    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return None
    try:
        fraction = float(arg)
    except ValueError:
        fraction = 0.0
    if kind == "rotate" and 0 < fraction < 1:
        return {int(fraction * num_steps): parts[1:] + parts[:1]}
    raise app.UsageError(f"--drift={spec!r}: use none or rotate:FRACTION (0 < FRACTION < 1).")


def regime_text(partition_spec, lr_spec, drift_spec):
    kind, _, arg = lr_spec.partition(":")
    lr = (f"Adam, constant learning rate {arg}" if kind == "constant" else
          f"Adam, learning rate warmed up linearly to {arg} over 10% of the run, then cosine "
          "decay to 0")
    text = f"{partition_text(partition_spec)}; {lr}"
    if drift_spec != "none":
        text += (f"; concept drift: after {drift_spec.partition(':')[2]} of the run each worker "
                 "trains on its neighbour's partition")
    return text


def partition_text(spec):
    kind, _, arg = spec.partition(":")
    return {
        "by_writer": "whole writers per worker (`partition.by_writer`)",
        "iid": "IID (`partition.iid`)",
        "sorted": f"label skew: a fraction {arg} of the samples sorted by label and cut into K "
        "blocks, the rest IID (`partition.sorted_by_label`)",
        "dirichlet": f"label skew Dirichlet(alpha={arg}) (`partition.dirichlet`)",
    }[kind]


def strategies(preset, num_params):
    """(family, param, trigger, Simulation.run kwargs) per run of the grid; Theta = c * d."""
    import keras

    import keras_fda

    yield "synchronous", 0.0, keras_fda.Synchronous(), {}
    # Never within the run: Simulation evaluates (and leaves) the average at the end.
    yield "no-sync", 0.0, keras_fda.Periodic(2**62), {}
    outer_lr = preset.get("outer_lr")

    def outer():  # a fresh optimizer per run: its slots belong to one run's w0
        return {"outer_optimizer": keras.optimizers.SGD(outer_lr, momentum=0.9, nesterov=True)}

    if preset.get("auto"):
        yield "fda-auto", 0.0, keras_fda.triggers.get("fda", threshold="auto"), {}
        if outer_lr:
            yield ("fda-auto+nesterov", 0.0, keras_fda.triggers.get("fda", threshold="auto"),
                   outer())
    for tau in preset["taus"]:
        yield "periodic", float(tau), keras_fda.Periodic(int(tau)), {}
    for tau in preset["taus"] if outer_lr else ():
        yield "periodic+nesterov", float(tau), keras_fda.Periodic(int(tau)), outer()
    for c in preset["kamp"]:
        yield "kamp", c * num_params, keras_fda.Kamp(c * num_params), {}
    for variant, grid in preset["fda"].items():
        for c in grid:
            yield (f"fda-{variant}", c * num_params,
                   keras_fda.FDA(variant, threshold=c * num_params), {})


def plain_step_ms(model_name, classes, x, y, seed):
    """Median ms per step of one plain compiled model in model.fit, batch 32."""
    import keras

    import models

    model = models.build(model_name, classes, seed)
    times = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    n = BATCH_SIZE * 220
    model.fit(x[:n], y[:n], batch_size=BATCH_SIZE, epochs=1, verbose=0, callbacks=[Clock()])
    # The median is robust to the load spikes of a shared machine.
    return 1e3 * float(np.median(np.diff(times[10:])))


def steady_ms_per_step(history):
    """Median ms per simulator step, tracing excluded."""
    return 1e3 * float(np.median(history.step_seconds[10:]))


def measure_efficiency(sim, model_name, classes, x, y, parts, seed, rounds):
    """Interleaved medians: (plain step ms, {family: simulator step ms}).

    Plain and simulator steps alternate so that both see the same load.
    """
    import keras_fda

    linear = keras_fda.FDA("linear", threshold=1e6)  # never syncs: the check alone
    plain, sim_ms = [], {"synchronous": [], "fda-linear": []}
    for _ in range(rounds):
        plain.append(plain_step_ms(model_name, classes, x, y, seed))
        for family, trigger in (("synchronous", keras_fda.Synchronous()), ("fda-linear", linear)):
            history = sim.run(trigger, x, y, parts, batch_size=BATCH_SIZE, steps=50, seed=seed)
            sim_ms[family].append(steady_ms_per_step(history))
    return float(np.median(plain)), {f: float(np.median(v)) for f, v in sim_ms.items()}


def targets_from(sync, fractions):
    """Accuracies synchronous averaging has reached at `fractions` of its run."""
    ev = sync.evaluations
    best = np.maximum.accumulate(ev["accuracy"])
    found = []
    for f in fractions:
        i = np.searchsorted(ev["step"], f * ev["step"][-1])
        found.append(math.floor(best[min(i, len(best) - 1)] * 200) / 200)
    return sorted(set(found))


def best_runs(runs, target, max_steps):
    """Per family, the run with fewest bytes to `target` (preferring <= max_steps)."""
    best = {}
    for run in runs:
        hit = run.history.first_reaching("accuracy", target)
        if hit is None:
            continue
        key = (hit["step"] > max_steps, hit["paper_bytes"])
        if run.family not in best or key < best[run.family][0]:
            best[run.family] = (key, run, hit)
    return {family: (run, hit) for family, (_, run, hit) in best.items()}


def fmt_bytes(b):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def _verdict(ok):
    return "met" if ok else "MISSED"


FAMILIES = [
    "synchronous", "no-sync", "periodic", "kamp", "fda-naive", "fda-linear", "fda-sketch",
    "fda-exact", "fda-auto", "periodic+nesterov", "fda-auto+nesterov",
]  # fmt: skip
# Communication matters where no sync until the end loses this much final accuracy.
MATTERS = 0.03


def final_accuracy(runs, family):
    return next(r for r in runs if r.family == family).history.evaluations["accuracy"][-1]


def report_config(title, runs, targets, num_params, workers, efficiency, regime=""):
    """Markdown for one (task, model, K, regime): targets table, final accuracies, goal checks."""
    sync = next(r for r in runs if r.family == "synchronous")
    lines = [f"### {title}", "", f"{regime}.", ""]
    lines += [f"d = {num_params:,}, K = {workers}. {efficiency}", ""]
    if any(r.family == "no-sync" for r in runs):
        loss = final_accuracy(runs, "synchronous") - final_accuracy(runs, "no-sync")
        lines += [
            f"**Does communication matter here?** Final accuracy synchronous "
            f"{final_accuracy(runs, 'synchronous'):.4f}, no sync until the end "
            f"{final_accuracy(runs, 'no-sync'):.4f}: no sync loses {100 * loss:.1f} points "
            f"({'it matters' if loss >= MATTERS else 'it does not matter'}: threshold "
            f"{100 * MATTERS:.0f} points).",
            "",
        ]
    lines += [
        "Bytes (paper formula) and steps to first reach each target; per sweep the run with "
        "fewest bytes among those within 2x synchronous's steps (else any run that reached it).",
        "",
        "| target | " + " | ".join(FAMILIES) + " | sync / linear | best periodic / linear |",
        "|---" * (len(FAMILIES) + 3) + "|",
    ]
    goals = []
    for target in targets:
        sync_hit = sync.history.first_reaching("accuracy", target)
        best = best_runs(runs, target, 2 * sync_hit["step"])
        cells = []
        for family in FAMILIES:
            if family not in best:
                ran = any(r.family == family for r in runs)
                cells.append("not reached" if ran else "-")
                continue
            run, hit = best[family]
            param = "" if " " not in run.label else f" ({run.label.split(' ', 1)[1]})"
            cells.append(f"{fmt_bytes(hit['paper_bytes'])}, {hit['step']} st{param}")
        ratios = ["-", "-"]
        if "fda-linear" in best:
            linear_run, linear = best["fda-linear"]
            ratios[0] = f"{sync_hit['paper_bytes'] / linear['paper_bytes']:.1f}x"
            periodic = best.get("periodic", (None, None))[1]
            if periodic:
                ratios[1] = f"{periodic['paper_bytes'] / linear['paper_bytes']:.1f}x"
            vs_sync = sync_hit["paper_bytes"] >= 100 * linear["paper_bytes"]
            vs_periodic = periodic and periodic["paper_bytes"] >= 10 * linear["paper_bytes"]
            goals.append(
                f"* target {target:.3f}: linear FDA sends {ratios[0]} fewer bytes than "
                f"synchronous (goal >= 100x: {_verdict(vs_sync)}), "
                f"{ratios[1]} fewer than the best periodic (goal >= 10x: {_verdict(vs_periodic)}), "
                f"in {linear['step'] / sync_hit['step']:.2f}x synchronous's steps (goal <= 2x: "
                f"{_verdict(linear['step'] <= 2 * sync_hit['step'])}); best Theta = "
                f"{linear_run.param:.3g} = {linear_run.param / num_params:.2g} * d."
            )  # fmt: skip
        else:
            goals.append(f"* target {target:.3f}: linear FDA did not reach it (goals MISSED).")
        lines.append(f"| {target:.3f} | " + " | ".join(cells) + f" | {ratios[0]} | {ratios[1]} |")
    lines += ["", "Goals (linear FDA):", "", *goals, ""]
    lines += auto_goals(runs, targets)
    lines += auto_goals(runs, targets, auto="fda-auto+nesterov")
    lines += ["Final test accuracy and bytes of every run:", ""]
    lines += ["| run | final accuracy | syncs | paper bytes | steps |", "|---|---|---|---|---|"]
    for run in runs:
        ev = run.history.evaluations
        lines.append(
            f"| {run.label} | {ev['accuracy'][-1]:.4f} | {ev['syncs'][-1]} | "
            f"{fmt_bytes(ev['paper_bytes'][-1])} | {ev['step'][-1]} |"
        )
    return lines + [""]


def auto_goals(runs, targets, auto="fda-auto"):
    """Issue 13's goals for one auto family in one config, as markdown bullets.

    Auto is held to the plain periodic taus (local SGD, the issue's baseline) whatever
    its outer optimizer; the tables show periodic+nesterov beside it.
    """
    families = {r.family for r in runs}
    if auto not in families or "no-sync" not in families:
        return []
    name = auto
    auto = next(r for r in runs if r.family == name).history
    sync = next(r for r in runs if r.family == "synchronous").history
    matters = final_accuracy(runs, "synchronous") - final_accuracy(runs, "no-sync") >= MATTERS
    lines = [f"Goals ({name}):", ""]
    if not matters:
        # The trigger's own syncs: the last evaluation also counts the final one.
        syncs = int(np.sum(auto.synced))
        lines.append(
            f"* communication does not matter here: auto made {syncs} syncs besides the final "
            f"one (goal <= 2: {_verdict(syncs <= 2)})."
        )
    for target in targets:
        hit = auto.first_reaching("accuracy", target)
        sync_hit = sync.first_reaching("accuracy", target)
        periodic = [
            (h["paper_bytes"], r.label)
            for r in runs
            if r.family == "periodic" and (h := r.history.first_reaching("accuracy", target))
        ]
        if hit is None:
            lines.append(f"* target {target:.3f}: auto did not reach it (MISSED).")
            continue
        steps = hit["step"] / sync_hit["step"]
        text = f"* target {target:.3f}: auto {fmt_bytes(hit['paper_bytes'])}, {hit['step']} st "
        text += f"({steps:.2f}x synchronous's steps, goal <= 1.5: {_verdict(steps <= 1.5)})"
        if periodic:
            best, label = min(periodic)
            text += (f"; best periodic ({label}) {fmt_bytes(best)}: auto / best = "
                     f"{hit['paper_bytes'] / best:.2f}")
            if matters:
                text += f" (goal <= 1: {_verdict(hit['paper_bytes'] <= best)})"
        lines.append(text + ".")
    return lines + [""]


def _hit(run, target):
    return run.history.first_reaching("accuracy", target)


def _sync_unit(runs):
    """Bytes of the initial broadcast, the unit one more sync adds (the paper's formula)."""
    sync = next(r for r in runs if r.family == "synchronous").history.evaluations
    return float(sync["paper_bytes"][0])


def summaries(configs):
    """regime_summary for each auto family against each periodic family that ran."""
    families = {r.family for _, runs, _, _ in configs for r in runs}
    pairs = [("fda-auto", "periodic"), ("fda-auto+nesterov", "periodic"),
             ("fda-auto+nesterov", "periodic+nesterov")]
    return [line for auto, periodic in pairs if {auto, periodic} <= families
            for line in regime_summary(configs, auto, periodic)]


def regime_summary(configs, auto_family="fda-auto", periodic_family="periodic"):
    """Markdown: auto against the best periodic tau per config and the best single tau.

    Two readings of "the best tau tuned for the regime": fewest bytes whatever its
    steps, and fewest bytes among the taus within 1.5x synchronous's steps (the limit
    auto is held to). The floor is what any policy needs: no sync before the target
    is the no-sync run itself, so where that run misses the target (within the steps
    limit) every policy pays the initial broadcast and one sync.
    """
    rows, per_tau = [], {}
    for title, runs, targets, _ in configs:
        auto = next((r for r in runs if r.family == auto_family), None)
        families = {r.family for r in runs}
        if auto is None or not {"no-sync", periodic_family} <= families:
            continue
        sync = next(r for r in runs if r.family == "synchronous")
        nosync = next(r for r in runs if r.family == "no-sync")
        unit = _sync_unit(runs)
        for target in targets:
            limit = 1.5 * _hit(sync, target)["step"]
            hit = _hit(auto, target)
            periodic, in_limit = {}, {}
            for r in runs:
                if r.family == periodic_family:
                    h = _hit(r, target)
                    periodic[int(r.param)] = h["paper_bytes"] if h else math.inf
                    in_limit[int(r.param)] = h["paper_bytes"] if h and h["step"] <= limit \
                        else math.inf
            for tau, b in periodic.items():
                per_tau.setdefault(tau, []).append(b)
            free = _hit(nosync, target)
            floor = unit * (1 if free and free["step"] <= limit else 2)
            rows.append((title, target, hit, limit, periodic, in_limit, floor, unit))
    if not rows or not per_tau:
        return []
    # The single tau a user who cannot tune per task would pick: reaches every target,
    # then fewest bytes in geometric mean.
    def score(tau):
        b = per_tau[tau]
        reached = [x for x in b if x < math.inf] or [1]
        return (sum(math.isinf(x) for x in b), float(np.mean(np.log(reached))))
    single = min(per_tau, key=score)

    def cell(b, unit):
        return "-" if math.isinf(b) else f"{fmt_bytes(b)} ({b / unit:.0f})"

    lines = [
        f"## Summary: {auto_family} against tuned {periodic_family}",
        "",
        f"Best single tau across every config and target (fewest misses, then fewest bytes in "
        f"geometric mean): **tau = {single}**. Bytes to each target, in brackets in units of "
        "one sync (2 K 4 d; the paper's formula counts the initial broadcast as one); -: not "
        "reached. Steps: auto's steps / synchronous's. \"best tau\": fewest bytes whatever "
        "the steps; \"best tau <= 1.5x\": among the taus within 1.5x synchronous's steps. "
        "\"floor\": the least any policy can send (1 unit if no sync at all reaches the "
        "target within 1.5x synchronous's steps, else 2).",
        "",
        "| config | target | auto | auto steps | best tau | best tau <= 1.5x | "
        f"tau {single} | floor | best tau / auto | best tau <= 1.5x / auto | "
        f"tau {single} / auto |",
        "|---" * 11 + "|",
    ]
    goals = []
    for title, target, hit, limit, periodic, in_limit, floor, unit in rows:
        best_tau = min(periodic, key=periodic.get)
        best_in = min(in_limit, key=in_limit.get)
        config = next(c for c in configs if c[0] == title)
        matters = final_accuracy(config[1], "synchronous") - final_accuracy(
            config[1], "no-sync") >= MATTERS
        auto_bytes = hit["paper_bytes"] if hit else math.inf
        steps = hit["step"] / (limit / 1.5) if hit else math.inf

        def ratio(b):
            if math.isinf(auto_bytes):
                return "0 (auto missed)"
            return "inf" if math.isinf(b) else f"{b / auto_bytes:.2f}x"
        lines.append(
            f"| {title} | {target:.3f} | {cell(auto_bytes, unit)} | "
            f"{'-' if math.isinf(steps) else f'{steps:.2f}'} | "
            f"{best_tau}: {cell(periodic[best_tau], unit)} | "
            f"{best_in if in_limit[best_in] < math.inf else '-'}: "
            f"{cell(in_limit[best_in], unit)} | {cell(periodic[single], unit)} | "
            f"{cell(floor, unit)} | {ratio(periodic[best_tau])} | {ratio(in_limit[best_in])} | "
            f"{ratio(periodic[single])} |"
        )
        if not matters:
            continue
        need = 2.0 if config[3] else 1.0
        got = periodic[best_tau] / auto_bytes
        reachable = periodic[best_tau] / floor
        goals.append(
            f"* {title}, {target:.3f}: best tau {best_tau} / auto = {got:.2f}x (goal >= "
            f"{need:g}x: {_verdict(got >= need)}; at most {reachable:.2f}x for any policy) "
            f"in {steps:.2f}x synchronous's steps (goal <= 1.5: {_verdict(steps <= 1.5)}); "
            f"best tau within 1.5x steps ({best_in}) / auto = "
            f"{in_limit[best_in] / auto_bytes:.2f}x; tau {single} / auto = "
            f"{periodic[single] / auto_bytes:.2f}x (goal >= 3x: "
            f"{_verdict(periodic[single] / auto_bytes >= 3)}; at most "
            f"{periodic[single] / floor:.2f}x for any policy)."
        )
    return lines + ["", f"Goals where communication matters ({auto_family} against "
                    f"{periodic_family}):", "", *goals, ""]


def pareto(configs, path):
    """Bytes against steps to each target, one panel per config, one marker per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(configs))
    rows = -(-len(configs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.8 * rows), squeeze=False)
    colors = dict(zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    for ax in axes.flat[len(configs):]:
        ax.axis("off")
    for ax, (title, runs, targets, _) in zip(axes.flat, configs):
        for i, target in enumerate(targets):
            for run in runs:
                hit = run.history.first_reaching("accuracy", target)
                if hit is None:
                    continue
                ax.scatter(hit["step"], hit["paper_bytes"], color=colors[run.family],
                           marker="os^D"[i % 4], s=60 if run.family.startswith("fda-auto") else 20,
                           label=f"{run.family}, target {target:.3f}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=5, ncol=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps to target")
        ax.set_ylabel("bytes to target (paper formula)")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_rank(run, target):
    """Fewest bytes to `target` first; runs that never reach it by final accuracy."""
    hit = run.history.first_reaching("accuracy", target)
    if hit is None:
        return (1, -run.history.evaluations["accuracy"][-1])
    return (0, hit["paper_bytes"])


def plot(configs, path):
    """Accuracy vs paper bytes (log x), one panel per config, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5), squeeze=False)
    for ax, (title, runs, targets, _) in zip(axes[0], configs):
        for family in FAMILIES:
            members = [r for r in runs if r.family == family]
            if not members:
                continue
            run = min(members, key=lambda r: _plot_rank(r, targets[-1]))
            ev = run.history.evaluations
            ax.plot(ev["paper_bytes"], ev["accuracy"], marker=".", label=run.label)
        for target in targets:
            ax.axhline(target, color="gray", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent (paper formula)")
        ax.set_ylabel("test accuracy of the averaged model")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(max(0.0, targets[0] - 0.25), min(1.0, targets[-1] + 0.1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def configs_from_csv(paths):
    """(title, runs, targets, scheduled_or_drift) per config of earlier runs' CSVs."""
    from keras_fda.drivers.history import SimulationHistory

    rows = []
    for path in paths:
        with open(ROOT / path, newline="") as f:
            rows += list(csv.DictReader(f))
    keys = dict.fromkeys((r["regime"], r["task"], r["model"], r["workers"]) for r in rows)
    fractions = [float(f) for f in FLAGS.target_fractions]
    configs = []
    for regime, task, model, workers in keys:
        mine = [r for r in rows if (r["regime"], r["task"], r["model"], r["workers"]) ==
                (regime, task, model, workers)]
        runs = []
        for family, param in dict.fromkeys((r["family"], r["param"]) for r in mine):
            ev = [r for r in mine if (r["family"], r["param"]) == (family, param)]
            evaluations = {k: np.array([float(r[k]) for r in ev]) for k in
                           ("step", "syncs", "paper_bytes", "accuracy")}
            history = SimulationHistory(
                trigger=family, threshold=float(param), num_workers=int(workers), num_params=0,
                state_bytes=0, steps_per_epoch=1, evaluations=evaluations,
                statistic=np.zeros(0), synced=np.zeros(0, bool), step_seconds=np.zeros(0),
            )
            runs.append(Run(family, float(param), history))
        _, lr_spec, drift_spec = REGIMES.get(regime, ("", "constant:0", "none"))
        title = f"{task}, {model}, K={workers}, {int(evaluations['step'][-1])} steps, {regime}"
        configs.append((title, runs, targets_from(runs[0].history, fractions),
                        drift_spec != "none" or not lr_spec.startswith("constant")))
    return configs


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if FLAGS.summarize:
        configs = configs_from_csv(FLAGS.summarize)
        stem = ROOT / FLAGS.out_dir / (FLAGS.name or "comm_to_accuracy_summary")
        md = [f"# Communication to accuracy: summary of {', '.join(FLAGS.summarize)}", ""]
        stem.with_suffix(".md").write_text("\n".join(md + summaries(configs)))
        pareto(configs, stem.parent / f"{stem.name}_pareto.png")
        print(f"Wrote {stem}.md and {stem.name}_pareto.png.")
        return
    import models
    from keras_fda.drivers.simulation import Simulation

    preset_name = "quick" if FLAGS.quick else FLAGS.preset
    preset = dict(PRESETS[preset_name])
    for key in ("tasks", "models", "regimes"):
        if getattr(FLAGS, key):
            preset[key] = getattr(FLAGS, key)
    if FLAGS.workers:
        preset["workers"] = [int(k) for k in FLAGS.workers]
    if FLAGS.epochs:
        preset["epochs"] = FLAGS.epochs
    for key in ("taus", "kamp"):
        if getattr(FLAGS, key) is not None:
            preset[key] = [float(v) for v in getattr(FLAGS, key)]
    preset["fda"] = dict(preset["fda"])
    for variant in ("naive", "linear", "sketch", "exact"):
        values = getattr(FLAGS, f"fda_{variant}")
        if values is not None:
            preset["fda"][variant] = [float(v) for v in values]
    if FLAGS.auto is not None:
        preset["auto"] = FLAGS.auto
    if FLAGS.outer_lr is not None:
        preset["outer_lr"] = FLAGS.outer_lr
    for key in ("evaluations_per_epoch", "efficiency_rounds"):
        if getattr(FLAGS, key):
            preset[key] = getattr(FLAGS, key)
    if "regimes" in preset:
        unknown = [r for r in preset["regimes"] if r not in REGIMES]
        if unknown:
            raise app.UsageError(f"Unknown regimes {unknown}; use some of {list(REGIMES)}.")
        regimes = [(r, *REGIMES[r]) for r in preset["regimes"]]
    else:
        regimes = [(None, FLAGS.partition, FLAGS.lr, FLAGS.drift)]
    for _, partition_spec, lr_spec, drift_spec in regimes:  # bad specs fail before training
        make_partitions(partition_spec, [0], np.zeros(1), 1, 0)
        learning_rate(lr_spec, 100)
        repartition(drift_spec, [np.arange(1)], 100)
    fractions = [float(f) for f in FLAGS.target_fractions]
    name = FLAGS.name or f"comm_to_accuracy_{preset_name}"
    out_dir = ROOT / FLAGS.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = ROOT / FLAGS.data_path
    if not data_path.exists():
        raise app.UsageError(
            f"No data at {data_path}; pass --data_path (see shared/data/README.md)."
        )
    data = dict(np.load(data_path))

    started = time.time()
    argv = [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
    command = "python " + " ".join(shlex.quote(a) for a in argv)
    md = [
        f"# Communication to accuracy ({preset_name})",
        "",
        f"Command (from the repo root): `{command}`",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"load average at the start {os.getloadavg()[0]:.1f}; "
        "Keras simulator `keras_fda.Simulation`.",
        "",
        f"Adam, batch {BATCH_SIZE} per worker, accuracy of the averaged model on the task's "
        f"test set, evaluated {preset['evaluations_per_epoch']} times per epoch. Bytes: the "
        "paper's formula `(syncs + 1) * 2 * K * 4 * d + state_bytes * steps * K`. Targets: what "
        f"synchronous averaging reaches after {', '.join(map(str, fractions))} of the run, "
        "rounded down to 0.005. `no-sync`: no synchronization before the final average. "
        "`fda-auto`: `threshold=\"auto\"` (`keras_fda.triggers.AutoFDA`, linear estimator).",
        "",
    ]
    csv_rows = []
    configs = []
    efficiency_rows = []
    for regime, partition_spec, lr_spec, drift_spec in regimes:
        for task in preset["tasks"]:
            x, y, writers, x_test, y_test, classes = load_task(data, task, preset["writers"])
            epochs = preset["epochs"]
            if isinstance(epochs, dict):
                epochs = epochs[task]
            if preset["test_samples"]:
                x_test, y_test = x_test[: preset["test_samples"]], y_test[: preset["test_samples"]]
            for model_name in preset["models"]:
                for workers in preset["workers"]:
                    num_steps = FLAGS.steps or int(epochs * (len(y) // (BATCH_SIZE * workers)))
                    model = models.build(
                        model_name, classes, FLAGS.seed, learning_rate(lr_spec, num_steps)
                    )
                    num_params = model.count_params()
                    sim = Simulation(model, workers)
                    parts = make_partitions(partition_spec, writers, y, workers, FLAGS.seed)
                    plain, measured = measure_efficiency(
                        sim, model_name, classes, x, y, parts, FLAGS.seed,
                        preset["efficiency_rounds"],
                    )  # fmt: skip
                    runs = []
                    for family, param, trigger, kwargs in strategies(preset, num_params):
                        history = sim.run(
                            trigger, x, y, parts, batch_size=BATCH_SIZE, steps=num_steps,
                            evaluations_per_epoch=preset["evaluations_per_epoch"],
                            validation_data=(x_test, y_test), seed=FLAGS.seed,
                            repartition=repartition(drift_spec, parts, num_steps), **kwargs,
                        )  # fmt: skip
                        runs.append(Run(family, param, history))
                        ev = history.evaluations
                        print(
                            f"[{time.time() - started:6.0f}s] {regime or ''} {task} {model_name} "
                            f"K={workers} {runs[-1].label}: acc {ev['accuracy'][-1]:.4f}, "
                            f"{ev['syncs'][-1]} syncs, "
                            f"{steady_ms_per_step(history):.1f} ms/step, "
                            f"load {os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
                        for i in range(len(ev["step"])):
                            csv_rows.append(
                                {"task": task, "model": model_name, "workers": workers,
                                 "family": family, "param": param, "regime": regime or "",
                                 **{k: v[i].item() for k, v in ev.items()}}
                            )  # fmt: skip
                    title = f"{task}, {model_name}, K={workers}, {num_steps} steps"
                    title += f", {regime}" if regime else (
                        f", {partition_spec}" if partition_spec != "by_writer" else ""
                    )
                    sweep_ms = {
                        family: float(np.median([steady_ms_per_step(r.history) for r in members]))
                        for family in FAMILIES
                        if (members := [r for r in runs if r.family == family])
                    }
                    efficiency = (
                        f"Interleaved medians: one plain compiled step (model.fit, batch "
                        f"{BATCH_SIZE}) {plain:.2f} ms; one simulator step (all K workers) "
                        f"{measured['synchronous']:.1f} ms synchronous, "
                        f"{measured['fda-linear']:.1f} ms linear FDA check; efficiency "
                        f"K x plain / simulator = "
                        f"{workers * plain / measured['synchronous']:.2f} and "
                        f"{workers * plain / measured['fda-linear']:.2f} (goal >= {1 / 1.3:.2f})."
                    )
                    efficiency_rows.append((title, workers, plain, measured, sweep_ms))
                    targets = targets_from(runs[0].history, fractions)
                    md += report_config(
                        title, runs, targets, num_params, workers, efficiency,
                        regime_text(partition_spec, lr_spec, drift_spec),
                    )  # fmt: skip
                    configs.append((title, runs, targets, drift_spec != "none" or
                                    not lr_spec.startswith("constant")))
                    # Written after every config so that a long run leaves results as it goes.
                    write_outputs(out_dir / name, md, efficiency_rows, csv_rows, configs, started)
    print(f"Wrote {out_dir / name}.md, .csv and .png in {time.time() - started:.0f} s.")


def write_outputs(stem, md, efficiency_rows, csv_rows, configs, started):
    """NAME.md (report so far + efficiency table), NAME.csv and NAME.png."""
    md = md + summaries(configs) + [
        "## Simulator efficiency",
        "",
        "Median ms per step, tracing excluded. Efficiency = K x plain step / simulator step; "
        "the goal is a simulator step <= 1.3 K plain steps (efficiency >= 0.77). The first "
        "columns come from interleaved measurements (plain, synchronous, linear FDA check that "
        "never syncs, medians of rounds); the sweep columns are medians over each sweep's "
        "runs, taken "
        "minutes apart, so they carry more of the shared machine's load noise.",
        "",
        "| config | plain ms | simulator ms (sync) | simulator ms (linear) | efficiency (sync) "
        "| efficiency (linear) | " + " | ".join(f"sweep: {f} ms" for f in FAMILIES) + " |",
        "|---" * (len(FAMILIES) + 6) + "|",
    ]
    for title, workers, plain, measured, sweep_ms in efficiency_rows:
        sync_ms, linear_ms = measured["synchronous"], measured["fda-linear"]
        cells = [f"{plain:.2f}", f"{sync_ms:.1f}", f"{linear_ms:.1f}"]
        cells += [f"{workers * plain / sync_ms:.2f}", f"{workers * plain / linear_ms:.2f}"]
        cells += [f"{sweep_ms[f]:.1f}" if f in sweep_ms else "-" for f in FAMILIES]
        md.append(f"| {title} | " + " | ".join(cells) + " |")
    md += ["", f"Time so far: {time.time() - started:.0f} s.", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    plot(configs, stem.with_suffix(".png"))
    pareto(configs, stem.parent / f"{stem.name}_pareto.png")


if __name__ == "__main__":
    app.run(main)
