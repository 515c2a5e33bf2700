"""The language-model workload in the simulator: bytes and final loss of each sync strategy.

Runs examples/language_model.py's workload (a byte-level GPT-style decoder on
the Python standard library's source, split by top-level module across the
workers, held-out modules for validation; AdamW with warmup + cosine inside)
in `keras_fda.Simulation` at K = 4 and 8 workers, under the strategies a user
would choose between:

* synchronous: average after every step (the quality reference);
* DiLoCo: a fixed period H (swept) with the outer Nesterov step
  (`outer_optimizer="nesterov"`: SGD(0.7, momentum 0.9, Nesterov));
* FDA `threshold="auto"`, with and without the outer Nesterov step (the
  former is the library's recommended setting);
* no sync until the end: one average after the last step (what training
  without communication gives).

For each it reports the final validation loss and perplexity (of the model
the run leaves, as FDACallback leaves it: after the final sync and its outer
step), the bytes sent (paper formula, `SimulationHistory.communication()`),
the syncs, and the bytes and steps to 3 validation-loss targets taken from
synchronous's curve: the loss it reaches after 25% and 50% of the run, and its
final loss + 1% (the issue's quality band). Auto runs use the decision lag of
FDACallback's default overlapped exchange (`lag=1`).

Outputs under --out_dir: NAME.md (tables, verdicts, command, load), NAME.csv
(every evaluation of every run), NAME_pareto.png (bytes vs final loss) and
NAME_curves.png (validation loss vs bytes).

    python benchmarks/language_model.py                  # about 25 min on 2 cores
    python benchmarks/language_model.py --workers=4 --steps=60 --taus=16 --name=lm_smoke
"""

import csv
import datetime
import importlib.util
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

flags.DEFINE_list("workers", ["4", "8"], "Values of K.")
flags.DEFINE_integer("steps", 512, "Steps per run.", lower_bound=2)
flags.DEFINE_list("taus", ["16", "32", "64", "128"], "DiLoCo periods H (with the outer step).")
flags.DEFINE_list(
    "only", None,
    "Run only these of the standard strategies (labels as in the report, e.g. "
    "auto,diloco-H32), plus any --auto_variants; synchronous always runs, since the targets "
    "and the verdict come from it.",
)
flags.DEFINE_list(
    "auto_variants", [],
    "Extra AutoFDA settings, HORIZON:FIRST_ROUND each (library default 128:32), run with and "
    "without the outer step as auto-HORIZON-FIRST_ROUND[+nesterov].",
)
flags.DEFINE_list(
    "payloads", [],
    "Extra runs of DiLoCo with the first of --taus and another sync payload: int8, int4, "
    "bfloat16, or int8-noEF / int4-noEF (without error feedback), as diloco-H<tau>-<payload>.",
)
flags.DEFINE_integer("seq_len", 64, "Bytes per example.", lower_bound=2)
flags.DEFINE_integer("dim", 64, "Model width.", lower_bound=1)
flags.DEFINE_integer("layers", 2, "Transformer blocks.", lower_bound=1)
flags.DEFINE_integer("heads", 4, "Attention heads.", lower_bound=1)
flags.DEFINE_integer("batch_size", 16, "Examples per worker per step.", lower_bound=1)
flags.DEFINE_float("learning_rate", 3e-3, "AdamW's peak learning rate.", lower_bound=0)
flags.DEFINE_float("warmup_fraction", 0.1, "Warmup steps as a fraction of the run.")
flags.DEFINE_float("weight_decay", 0.1, "AdamW's weight decay.", lower_bound=0)
flags.DEFINE_integer("bytes_per_worker", 1_000_000, "Cap on each worker's bytes.")
flags.DEFINE_integer("val_bytes", 65_536, "Cap on the validation bytes.")
flags.DEFINE_integer("evaluations", 16, "Evaluations of the averaged model per run.")
flags.DEFINE_list(
    "target_fractions", ["0.25", "0.5"],
    "Targets: synchronous's validation loss after these fractions of the run; a last one "
    "is its final loss + 1%.",
)  # fmt: skip
flags.DEFINE_string("out_dir", "benchmarks/results", "Output folder, relative to the repo root.")
flags.DEFINE_string("name", "lm_sim", "Output file stem.")
flags.DEFINE_integer("seed", 0, "Seed of the split, initialization and data order.")
FLAGS = flags.FLAGS

QUALITY_TOLERANCE = 0.01  # the issue: within 1% of synchronous's final validation loss
QUALITY_SAVINGS = 100  # ... with >= 100x fewer bytes
RECOMMENDED = "auto+nesterov"


def load_example():
    """examples/language_model.py as a module (it defines no flags on import)."""
    spec = importlib.util.spec_from_file_location(
        "language_model_example", ROOT / "examples" / "language_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strategies(steps, taus, auto_variants=(), only=None, payloads=()):
    """`[(label, trigger factory, run kwargs)]`: a fresh trigger per run (triggers hold state).

    `auto_variants`: `(horizon, first_round)` pairs of extra AutoFDA runs;
    `only`: labels of the standard runs to keep (synchronous always is;
    the variants always run); `payloads`: sync_dtype names (a "-noEF"
    suffix turns error feedback off) of extra DiLoCo runs with the first tau.
    """
    import keras_fda

    runs = [("synchronous", keras_fda.Synchronous, {})]
    runs += [
        (f"diloco-H{tau}", lambda tau=tau: keras_fda.Periodic(tau), {"outer_optimizer": "nesterov"})
        for tau in taus
    ]
    runs += [
        ("auto", lambda: keras_fda.AutoFDA("linear"), {"lag": 1}),
        (RECOMMENDED, lambda: keras_fda.AutoFDA("linear"),
         {"lag": 1, "outer_optimizer": "nesterov"}),
        # A period longer than the run: only the final average.
        ("no-sync", lambda: keras_fda.Periodic(steps + 1), {}),
    ]  # fmt: skip
    if only is not None:
        runs = [r for r in runs if r[0] == "synchronous" or r[0] in only]
    for horizon, first in auto_variants:
        def make(horizon=horizon, first=first):
            return keras_fda.AutoFDA("linear", horizon=horizon, first_round=first)

        runs += [
            (f"auto-{horizon}-{first}", make, {"lag": 1}),
            (f"auto-{horizon}-{first}+nesterov", make, {"lag": 1, "outer_optimizer": "nesterov"}),
        ]
    for payload in payloads:
        dtype = payload.removesuffix("-noEF")
        runs.append((
            f"diloco-H{taus[0]}-{payload}", lambda tau=taus[0]: keras_fda.Periodic(tau),
            {"outer_optimizer": "nesterov", "sync_dtype": dtype,
             **({"error_feedback": False} if payload.endswith("-noEF") else {})},
        ))  # fmt: skip
    return runs


def first_below(history, target):
    """The first evaluation with validation loss <= target: `(step, paper bytes)`, or None."""
    losses = history.evaluations["loss"]
    hits = np.flatnonzero(losses <= target)
    if not hits.size:
        return None
    i = hits[0]
    return int(history.evaluations["step"][i]), float(history.evaluations["paper_bytes"][i])


def targets_from(sync_history, fractions):
    """Synchronous's loss at each fraction of the run (interpolated), then its final loss + 1%."""
    steps = sync_history.evaluations["step"]
    losses = sync_history.evaluations["loss"]
    # Best so far: a target is a level synchronous has reached by then.
    best = np.minimum.accumulate(losses)
    targets = [float(np.interp(f * steps[-1], steps, best)) for f in fractions]
    return targets + [float(sync_history.final_loss * (1 + QUALITY_TOLERANCE))]


def fmt_bytes(b):
    """Bytes as B/kB/MB/GB with 3 significant figures."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def run_workers(lm, k, data, val, runs_spec):
    """Trains every strategy at K = k; returns `[(label, history)]` with `final_loss` set."""
    import keras
    import keras_fda

    x, y, parts = data
    keras.utils.set_random_seed(FLAGS.seed)
    warmup = int(FLAGS.warmup_fraction * FLAGS.steps)
    model = lm.compile_model(
        lm.make_model(seq_len=FLAGS.seq_len, dim=FLAGS.dim, layers=FLAGS.layers,
                      heads=FLAGS.heads, seed=FLAGS.seed),
        steps=FLAGS.steps, learning_rate=FLAGS.learning_rate, warmup_steps=warmup,
        weight_decay=FLAGS.weight_decay,
    )  # fmt: skip
    sim = keras_fda.Simulation(model, num_workers=k)
    steps_per_epoch = max(1, sum(len(p) for p in parts) // (FLAGS.batch_size * k))
    # evaluations_per_epoch is what run() takes; ask for about --evaluations per run.
    per_epoch = max(1, round(FLAGS.evaluations * steps_per_epoch / FLAGS.steps))
    results = []
    for label, make_trigger, kwargs in runs_spec:
        start = time.perf_counter()
        history = sim.run(
            make_trigger(), x, y, parts, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
            evaluations_per_epoch=per_epoch, validation_data=val, eval_batch_size=256,
            seed=FLAGS.seed, **kwargs,
        )  # fmt: skip
        # The model the run leaves (after the final sync and, with an outer
        # optimizer, its step), as FDACallback leaves it after fit.
        history.final_loss = float(sim.model.evaluate(*val, batch_size=256, verbose=0))
        history.wall_seconds = time.perf_counter() - start
        stats = history.communication()
        print(
            f"K={k} {label:>16}: final loss {history.final_loss:.4f} (ppl "
            f"{math.exp(history.final_loss):.3f}), last average "
            f"{history.evaluations['loss'][-1]:.4f}, "
            f"{stats.syncs} syncs, {fmt_bytes(stats.paper_bytes)}, {history.wall_seconds:.0f} s, "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        results.append((label, history))
    return results, sim.num_params


def worker_partitions(lm, k, modules):
    """All K shares concatenated: `(x, y, partitions)` for `Simulation.run`."""
    xs, ys, parts, offset = [], [], [], 0
    for index in range(k):
        (x, y), _ = lm.load_worker_data(
            index, k, seq_len=FLAGS.seq_len, max_bytes=FLAGS.bytes_per_worker,
            seed=FLAGS.seed, modules=modules,
        )  # fmt: skip
        xs.append(x)
        ys.append(y)
        parts.append(np.arange(offset, offset + len(x)))
        offset += len(x)
    return np.concatenate(xs), np.concatenate(ys), parts


def report(k, results, num_params, fractions):
    """Markdown table rows for K = k and the quality verdict line."""
    sync = dict(results)["synchronous"]
    targets = targets_from(sync, fractions)
    sync_bytes = sync.communication().paper_bytes
    names = [f"{f:.0%} of sync's run" for f in fractions] + ["sync's final + 1%"]
    lines = [
        f"### K = {k} (d = {num_params:,} parameters)",
        "",
        "Targets (validation loss): "
        + ", ".join(f"{t:.4f} ({n})" for t, n in zip(targets, names)),
        "",
        "| strategy | final loss | perplexity | vs sync | syncs | bytes (paper) | sync / bytes "
        "| " + " | ".join(f"to {t:.3f}: steps, bytes" for t in targets) + " | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(targets) + "---:|",
    ]
    for label, h in results:
        stats = h.communication()
        cells = []
        for t in targets:
            hit = first_below(h, t)
            cells.append("not reached" if hit is None else f"{hit[0]}, {fmt_bytes(hit[1])}")
        lines.append(
            f"| {label} | {h.final_loss:.4f} | {math.exp(h.final_loss):.3f} | "
            f"{(h.final_loss / sync.final_loss - 1):+.2%} | {stats.syncs} | "
            f"{fmt_bytes(stats.paper_bytes)} | {sync_bytes / stats.paper_bytes:.1f}x | "
            + " | ".join(cells) + f" | {h.wall_seconds:.0f} |"
        )
    if RECOMMENDED not in dict(results):
        return lines, f"Quality goal at K = {k}: not evaluated ({RECOMMENDED} not run).", targets
    rec = dict(results)[RECOMMENDED]
    gap = rec.final_loss / sync.final_loss - 1
    savings = sync_bytes / rec.communication().paper_bytes
    met = gap <= QUALITY_TOLERANCE and savings >= QUALITY_SAVINGS
    verdict = (
        f"**Quality goal at K = {k}: {'MET' if met else 'MISSED'}.** {RECOMMENDED} ends at "
        f"{rec.final_loss:.4f} against synchronous's {sync.final_loss:.4f} ({gap:+.2%}; goal "
        f"<= +1%) with {savings:.0f}x fewer bytes (goal >= {QUALITY_SAVINGS}x)."
    )
    return lines + ["", verdict, ""], verdict, targets


def write_csv(path, all_results):
    """Every evaluation of every run, one row each, with K, strategy and the final loss."""
    with open(path, "w", newline="") as f:
        writer = None
        for k, results in all_results.items():
            for label, h in results:
                names = list(h.evaluations)
                if writer is None:
                    writer = csv.writer(f)
                    writer.writerow(["workers", "strategy", *names, "final_loss", "total_syncs",
                                     "total_paper_bytes"])  # fmt: skip
                stats = h.communication()
                for row in zip(*(h.evaluations[n].tolist() for n in names)):
                    writer.writerow([k, label, *row, h.final_loss, stats.syncs, stats.paper_bytes])


def plot(out_stem, all_results):
    """Writes NAME_pareto.png (bytes vs final loss) and NAME_curves.png (loss vs bytes), per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(all_results)
    colors = {}
    fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 4.5), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for label, h in all_results[k]:
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            b = h.communication().paper_bytes
            ax.scatter(b, h.final_loss, color=color, label=label, zorder=3)
            last_average = h.evaluations["loss"][-1]
            if abs(last_average - h.final_loss) > 1e-4:
                # With an outer step the model left is not the plain average:
                # the hollow marker is the average, to show what the step did.
                ax.scatter(b, last_average, facecolors="none", edgecolors=color, zorder=3)
            ax.annotate(label, (b, h.final_loss), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        sync = dict(all_results[k])["synchronous"]
        ax.axhline(sync.final_loss * (1 + QUALITY_TOLERANCE), color="gray", ls="--", lw=0.8,
                   label="sync's final + 1%")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent (paper formula)")
        ax.set_ylabel("final validation loss (nats/byte)")
        ax.set_title(f"K = {k}: bytes vs final loss (hollow: plain average before the outer step)",
                     fontsize=9)  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out_stem}_pareto.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 4.5), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for label, h in all_results[k]:
            e = h.evaluations
            # Step 0 sends nothing yet: start the log axis at the first evaluation with bytes.
            keep = e["paper_bytes"] > 0
            ax.plot(e["paper_bytes"][keep], e["loss"][keep], marker=".", color=colors[label],
                    label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent so far (paper formula)")
        ax.set_ylabel("validation loss of the averaged model")
        ax.set_title(f"K = {k}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out_stem}_curves.png", dpi=110)
    plt.close(fig)


def main(argv):
    """Runs the grid, prints each run, writes the report, CSV and plots."""
    del argv
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    load_start = os.getloadavg()
    print(f"load average at start (1, 5, 15 min): {load_start}", flush=True)
    started = time.perf_counter()
    lm = load_example()
    modules = lm.stdlib_modules()
    (x_val, y_val), held_out = lm.load_validation_data(
        seq_len=FLAGS.seq_len, max_bytes=FLAGS.val_bytes, seed=FLAGS.seed, modules=modules
    )
    fractions = [float(f) for f in FLAGS.target_fractions]
    taus = [int(t) for t in FLAGS.taus]
    variants = [tuple(int(v) for v in pair.split(":")) for pair in FLAGS.auto_variants]
    all_results, sections, verdicts, num_params = {}, [], [], None
    for k in (int(w) for w in FLAGS.workers):
        data = worker_partitions(lm, k, modules)
        print(f"K={k}: {len(data[0]) * FLAGS.seq_len} training bytes, validation "
              f"{x_val.size} bytes from {len(held_out)} held-out modules", flush=True)  # fmt: skip
        results, num_params = run_workers(
            lm, k, data, (x_val, y_val), strategies(FLAGS.steps, taus, variants, FLAGS.only, FLAGS.payloads)
        )
        all_results[k] = results
        lines, verdict, _ = report(k, results, num_params, fractions)
        sections += lines
        verdicts.append(verdict)
    load_end = os.getloadavg()
    elapsed = time.perf_counter() - started
    print(f"load average at end (1, 5, 15 min): {load_end}; {elapsed / 60:.1f} min", flush=True)

    out_dir = ROOT / FLAGS.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / FLAGS.name
    write_csv(f"{stem}.csv", all_results)
    plot(str(stem), all_results)
    command = "python benchmarks/language_model.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    header = [
        f"# Language model in the simulator: {FLAGS.name}",
        "",
        f"Command: `{command.strip()}`  ",
        f"Date: {datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"{elapsed / 60:.1f} min. Load average (1, 5, 15 min) at start "
        f"{tuple(round(v, 2) for v in load_start)}, at end {tuple(round(v, 2) for v in load_end)} "
        "(wall times depend on it; losses and bytes do not).",
        "",
        f"Workload: byte-level GPT (dim {FLAGS.dim}, {FLAGS.layers} blocks, {FLAGS.heads} heads, "
        f"context {FLAGS.seq_len}, d = {num_params:,}) on the standard library's source, whole "
        f"top-level modules per worker (at most {FLAGS.bytes_per_worker:,} bytes each), "
        f"validation on {len(held_out)} held-out modules ({x_val.size:,} bytes). "
        f"{FLAGS.steps} steps of {FLAGS.batch_size} x {FLAGS.seq_len} bytes per worker; AdamW "
        f"(peak {FLAGS.learning_rate:g}, weight decay {FLAGS.weight_decay:g}, "
        f"{FLAGS.warmup_fraction:.0%} warmup then cosine to 10%). Outer step: SGD(0.7, momentum "
        "0.9, Nesterov). Final loss: the model the run leaves (after the final sync and its outer "
        "step), in nats per byte; perplexity per byte. Steps and bytes to a target: the first "
        f"of about {FLAGS.evaluations} evaluations of the plain average at or below it.",
        "",
        *verdicts,
        "",
        f"Plots: `{FLAGS.name}_pareto.png` (bytes vs final loss), `{FLAGS.name}_curves.png` "
        f"(loss vs bytes); every evaluation: `{FLAGS.name}.csv`.",
        "",
    ]
    (out_dir / f"{FLAGS.name}.md").write_text("\n".join(header + sections))
    print("\n".join(verdicts))
    print(f"wrote {stem}.md, .csv, _pareto.png, _curves.png")


if __name__ == "__main__":
    app.run(main)
