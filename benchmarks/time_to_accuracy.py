"""Wall-clock time to accuracy on emulated slow links, with real worker processes.

Runs `benchmarks/tta_worker.py` on K = 2 worker processes inside
`benchmarks/network.py` (one network namespace per worker, each link limited
with tc tbf, a round trip added by the harness's delay relay), for each link
of the grid:

* time to accuracy (`tta`): LeNet-5 and the 1.1M-parameter CNN
  (`benchmarks/models.py`) on the FEMNIST digits (`../shared/data`), label
  skewed over the workers (Dirichlet alpha), Adam, batch 32 per worker,
  `model.fit` with `FDACallback`: synchronous averaging, periodic taus and FDA
  (linear, fixed Theta = c * d). The chief evaluates the synchronized model
  after syncs (at most every `--eval_every` steps, the clock paused) and after
  fit's final sync. A run stops at `--steps` or once its clock passes
  `--budget_s` (the other worker then stops too, through FDACallback's
  early-stop path).
* per step (`per_step`): local step, FDA without sync, periodic between
  syncs and synchronous step, interleaved in rounds in one harness run.
* `FDAStrategy` over `MultiWorkerMirroredStrategy`, one setting (`--strategy_link`).

Writes NAME.md (tables, commands, load averages), NAME.csv (every
evaluation), NAME_per_step.csv and NAME.png (accuracy against wall clock)
under --out_dir. Needs root (see network.py).

    python benchmarks/time_to_accuracy.py --quick      # about 10 min on 2 shared cores
    python benchmarks/time_to_accuracy.py              # the reduced full grid
"""

import argparse
import csv
import datetime
import json
import math
import os
import pathlib
import shlex
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import network  # noqa: E402

WORKER = str(ROOT / "benchmarks" / "tta_worker.py")
DATA = ROOT.parent / "shared" / "data" / "femnist_subset.npz"

PRESETS = {
    "quick": dict(
        links="100:0,100:50", models="lenet5", taus="32", fda="1e-5", steps=150, budget_s=40,
        per_step_links="100:0", per_step_models="lenet5", strategy_link="",
        name="time_to_accuracy_quick",
        targets="lenet5=0.65:0.7,cnn=0.8:0.85",
    ),
    "full": dict(
        links="1000:0,100:0,10:0,1000:50,100:50,10:50", models="lenet5,cnn", taus="8,32,128",
        fda="1e-5,4e-5", steps=300, budget_s=60, per_step_links="0:0,100:0,100:50",
        per_step_models="lenet5,cnn", strategy_link="100:0", name="time_to_accuracy",
        targets="lenet5=0.7:0.75:0.8,cnn=0.85:0.9:0.93",
    ),
}


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="a small grid (one model, 100 Mbit/s)")
    p.add_argument("--links", help="RATE_MBIT:RTT_MS,... (rate 0: no limit)")
    p.add_argument("--models", help="lenet5,cnn")
    p.add_argument("--taus", help="periodic taus")
    p.add_argument("--fda", help="FDA linear thresholds as multiples c of d (Theta = c d)")
    p.add_argument("--steps", type=int, help="steps per run (at most)")
    p.add_argument("--budget_s", type=float, help="a run stops once its clock passes this")
    p.add_argument("--per_step_links", help="links of the per-step table ('' for none)")
    p.add_argument("--per_step_models", help="models of the per-step table")
    p.add_argument("--strategy_link", help="link of the FDAStrategy run ('' for none)")
    p.add_argument("--targets", help="accuracy targets, MODEL=A:B,...")
    p.add_argument("--name", help="output file stem")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew")
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--test_samples", type=int, default=2000)
    p.add_argument("--per_step_steps", type=int, default=100)
    p.add_argument("--per_step_sync_steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="per harness run, seconds")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--from_json", help="rewrite the report from runs' NAME.json files "
                   "(comma-separated, merged; e.g. with other --targets) without running anything")
    return p


def parse_args(argv):
    args = _parser().parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.links = parse_links(args.links)
    args.per_step_links = parse_links(args.per_step_links)
    args.strategy_link = parse_links(args.strategy_link)
    args.models = [m for m in args.models.split(",") if m]
    args.per_step_models = [m for m in args.per_step_models.split(",") if m]
    args.targets = {
        m: [float(t) for t in ts.split(":")]
        for m, ts in (item.split("=") for item in args.targets.split(","))
    }
    return args


def parse_links(text):
    links = []
    for item in filter(None, text.split(",")):
        rate, rtt = item.split(":")
        links.append((float(rate) or None, float(rtt)))
    return links


def link_label(link):
    rate, rtt = link
    speed = "no limit" if rate is None else (
        f"{rate / 1000:g} Gbit/s" if rate >= 1000 else f"{rate:g} Mbit/s"
    )
    return f"{speed}, RTT {rtt:g} ms"


def strategies(args):
    out = [{"name": "synchronous", "trigger": "synchronous"}]
    out += [{"name": f"periodic tau {t}", "trigger": "periodic", "tau": int(t)}
            for t in args.taus.split(",") if t]
    out += [{"name": f"FDA linear {c}d", "trigger": "fda", "theta_c": float(c)}
            for c in args.fda.split(",") if c]
    return out


def harness_run(args, link, spec, log):
    """Runs the workers on one link; returns worker 0's output lines and the load averages."""
    rate, rtt = link
    spec = {"data": str(DATA), "alpha": args.alpha, "seed": args.seed, "batch_size": 32,
            "test_samples": args.test_samples, "eval_every": args.eval_every, **spec}
    load_before = os.getloadavg()
    started = time.time()
    with network.Network(args.workers, rate_mbit=rate, delay_ms=rtt / 2, echo=False) as net:
        results = net.run([sys.executable, WORKER, json.dumps(spec)], timeout=args.timeout)
    for i, r in enumerate(results):
        log.write("".join(f"[{link_label(link)}] [worker {i}] {line}\n" for line in r.lines))
        if r.returncode:
            raise RuntimeError(
                f"worker {i} failed on {link_label(link)} ({spec['mode']}):\n"
                + "\n".join(r.lines[-30:])
            )
    loads = (load_before, os.getloadavg())
    print(f"{spec['mode']} on {link_label(link)}: {time.time() - started:.0f} s, "
          f"load {loads[0][0]:.1f} -> {loads[1][0]:.1f}", flush=True)
    return results[0].lines, loads, time.time() - started


def tagged(lines, tag):
    return [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith(tag + " ")]


def time_to(run, target):
    """(clock seconds, steps, syncs) at the first evaluation reaching `target`, or None."""
    for p in run["points"]:
        if p["accuracy"] >= target:
            return p
    return None


def fmt_s(point):
    return "not reached" if point is None else f"{point['clock_s']:.1f} s ({point['syncs']} syncs)"


def run_table(runs, targets):
    lines = [
        "| strategy | driver | steps | syncs | final acc | "
        + " | ".join(f"time to {t:.2f}" for t in targets)
        + " | clock s | compute s | exchange s | syncs s | median step ms | MB sent (worker 0) |",
        "|---|---|---:|---:|---:|" + "---|" * len(targets) + "---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        last = run["points"][-1]
        if run["driver"] == "FDAStrategy":
            # Its exchange runs inside the compiled train step: no split to see.
            last = {**last, "compute_s": math.nan, "exchange_s": math.nan, "sync_s": math.nan}
        lines.append(
            f"| {run['strategy']} | {run['driver']} | {run['steps']} | {run['syncs']} | "
            f"{last['accuracy']:.3f} | "
            + " | ".join(fmt_s(time_to(run, t)) for t in targets)
            + f" | {last['clock_s']:.1f} | {last['compute_s']:.1f} | {last['exchange_s']:.1f} | "
            f"{last['sync_s']:.1f} | {run['median_step_ms']:.1f} | {last['tx_bytes'] / 1e6:.1f} |"
        )
    return lines


def goal_lines(results, targets):
    """The issue's time goal at 100 Mbit/s with the CNN (each RTT): one line per target."""
    out = []
    for (model, link), runs in results.items():
        if model != "cnn" or link[0] != 100:
            continue
        sync = next((r for r in runs if r["strategy"] == "synchronous"), None)
        periodic = [r for r in runs if r["strategy"].startswith("periodic")]
        fdas = [r for r in runs if r["strategy"].startswith("FDA") and r["driver"] == "FDACallback"]
        for fda in fdas:
            for t in targets[model]:
                f = time_to(fda, t)
                head = f"* {link_label(link)}, {fda['strategy']}, target {t}:"
                if f is None:
                    out.append(f"{head} FDA did not reach it (missed).")
                    continue
                s = time_to(sync, t) if sync else None
                if s is not None:
                    # Evaluated every --eval_every steps: it got there after the
                    # evaluation before; the ratio uses that earlier, kinder bound.
                    before = max((p["clock_s"] for p in sync["points"]
                                  if p["clock_s"] < s["clock_s"]), default=0.0)
                    ratio = before / f["clock_s"]
                    vs_sync = (f"synchronous {s['clock_s']:.1f} s (after {before:.1f} s), "
                               f"FDA {ratio:.1f}x sooner")
                elif sync is not None:
                    ratio = sync["points"][-1]["clock_s"] / f["clock_s"]
                    vs_sync = (f"synchronous did not reach it in "
                               f"{sync['points'][-1]['clock_s']:.0f} s (its budget), "
                               f"FDA > {ratio:.1f}x sooner")
                else:
                    ratio, vs_sync = math.nan, "no synchronous run"
                reached = [(time_to(r, t), r["strategy"]) for r in periodic]
                reached = [(p["clock_s"], name) for p, name in reached if p]
                if reached:
                    best_s, best = min(reached)
                    vs_periodic = (f"best periodic ({best}) {best_s:.1f} s, FDA takes "
                                   f"{f['clock_s'] / best_s:.2f}x its time")
                    later = f["clock_s"] > best_s
                else:
                    vs_periodic, later = "no periodic tau reached it", False
                verdict = "met" if ratio >= 10 and not later else "missed"
                out.append(
                    f"{head} FDA {f['clock_s']:.1f} s; {vs_sync}; {vs_periodic} ({verdict})."
                )
    return out


def per_step_table(rows):
    lines = [
        "| link | model (d) | local step | FDA linear, no sync (overlap) | FDA, blocking | "
        "FDA, exchange_every=auto | periodic tau 32, between syncs | synchronous | "
        "FDA overlap / local | FDA blocking / local | FDA auto / local | periodic / local | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for link, r in rows:
        s = r["sections"]
        local = s["local"]["step"]
        # Runs from before the overlap have no blocking / auto sections.
        step = {k: s[k]["step"] if k in s else float("nan") for k in (
            "fda_nosync", "fda_blocking", "fda_every_auto", "periodic_32", "synchronous")}
        lines.append(
            f"| {link_label(link)} | {r['model']} ({r['params']:,}) | {local:.1f} ms | "
            f"{step['fda_nosync']:.1f} ms | {step['fda_blocking']:.1f} ms | "
            f"{step['fda_every_auto']:.1f} ms | {step['periodic_32']:.1f} ms | "
            f"{step['synchronous']:.1f} ms | "
            f"{step['fda_nosync'] / local:.2f}x | {step['fda_blocking'] / local:.2f}x | "
            f"{step['fda_every_auto'] / local:.2f}x | {step['periodic_32'] / local:.2f}x | "
            f"{r['load'][0]:.1f} |"
        )
    return lines


def plot(results, targets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    keys = list(results)
    models_ = sorted({m for m, _ in keys})
    links = sorted({l for _, l in keys}, key=lambda l: (l[1], -(l[0] or 1e9)))
    fig, axes = plt.subplots(len(models_), len(links), squeeze=False,
                             figsize=(3.6 * len(links), 3.2 * len(models_)))
    for i, m in enumerate(models_):
        for j, link in enumerate(links):
            ax = axes[i][j]
            for run in results.get((m, link), []):
                xs = [p["clock_s"] for p in run["points"]]
                ys = [p["accuracy"] for p in run["points"]]
                style = "--" if run["driver"] == "FDAStrategy" else "-"
                ax.plot(xs, ys, style, marker=".", label=f"{run['strategy']} ({run['driver']})"
                        if run["driver"] == "FDAStrategy" else run["strategy"])
            for t in targets.get(m, []):
                ax.axhline(t, color="grey", lw=0.5)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set_title(f"{m}, {link_label(link)}", fontsize=8)
            ax.set_xlabel("wall clock, s (training only)", fontsize=7)
            ax.set_ylabel("test accuracy", fontsize=7)
            ax.set_ylim(0.5, 1.0)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_json(paths, args):
    """Merges the raw results of one or more runs (NAME.json) and restores their settings."""
    results, per_step, loads, commands = {}, [], [], []
    for path in paths.split(","):
        raw = json.loads(pathlib.Path(path).read_text())
        for m, link, runs in raw["results"]:
            results.setdefault((m, tuple(link)), []).extend(runs)
        per_step += [(tuple(link), r) for link, r in raw["per_step"]]
        loads += raw["loads"]
        commands.append(raw["command"])
        started = datetime.datetime.fromisoformat(raw["started"])
        for key, value in raw["settings"].items():
            setattr(args, key, value)
    return " and ".join(f"`{c}`" for c in commands), started, results, per_step, loads


def jobs(args):
    """(what, link, worker spec) of every harness run, in order."""
    for link in args.per_step_links:
        yield "per step", link, {
            "mode": "per_step", "models": args.per_step_models, "steps": args.per_step_steps,
            "sync_steps": args.per_step_sync_steps, "warmup": 10, "rounds": args.rounds,
        }
    for link in args.links:
        yield "time to accuracy", link, {
            "mode": "tta", "models": args.models, "strategies": strategies(args),
            "steps": args.steps, "budget_s": args.budget_s,
        }
    for link in args.strategy_link:
        yield "FDAStrategy", link, {
            "mode": "strategy", "models": args.models[-1:], "steps": args.steps,
            "strategies": [s for s in strategies(args) if s["trigger"] == "fda"][:1],
            "budget_s": None,
        }


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out_dir)
    if args.from_json:
        write_report(args, out, *load_json(args.from_json, args))
        return 0
    try:
        network.check_available()
    except network.NetworkError as e:
        print(f"time_to_accuracy: {e}", file=sys.stderr)
        return 2
    command = "python benchmarks/time_to_accuracy.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    started = datetime.datetime.now(datetime.timezone.utc)
    log_path = pathlib.Path("/tmp") / f"{args.name}_workers.log"
    results, per_step, loads = {}, [], []
    with open(log_path, "w") as log:
        out.mkdir(parents=True, exist_ok=True)
        for what, link, spec in jobs(args):
            lines, load, wall = harness_run(args, link, spec, log)
            per_step += [(link, r) for r in tagged(lines, "TTA_PER_STEP")]
            for r in tagged(lines, "TTA_RESULT"):
                results.setdefault((r["model"], link), []).append(r)
            loads.append((what, link, load, wall))
            # After every harness run: an interrupted grid keeps what it finished.
            save_json(args, out, command, started, results, per_step, loads)
    write_report(args, out, f"`{command}`", started, results, per_step, loads)
    return 0


# What the report's text says about a run; kept in NAME.json for --from_json.
RECORDED_SETTINGS = ("workers", "alpha", "steps", "budget_s", "test_samples", "eval_every",
                     "per_step_steps", "per_step_sync_steps", "rounds")


def save_json(args, out, command, started, results, per_step, loads):
    (out / f"{args.name}.json").write_text(json.dumps({
        "command": command, "started": started.isoformat(), "loads": loads,
        "results": [(m, l, runs) for (m, l), runs in results.items()],
        "per_step": per_step, "settings": {k: getattr(args, k) for k in RECORDED_SETTINGS},
    }))


def write_report(args, out, commands, started, results, per_step, loads):
    """NAME.md, NAME.csv, NAME_per_step.csv and NAME.png from the raw results."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.name
    md = [
        f"# Time to accuracy on emulated links ({args.name})", "",
        f"Command: {commands}  ",
        f"Started {started:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU cores shared with other "
        f"jobs; K = {args.workers} worker processes, each in its own network namespace "
        "(benchmarks/network.py: veth pairs into a bridge, tc tbf on both ends of each link, "
        "round trip by the harness's delay relay). FEMNIST digits, Dirichlet "
        f"alpha {args.alpha} label skew over the workers, Adam, batch 32 per worker, at most "
        f"{args.steps} steps or {args.budget_s:g} s of training clock per run; the chief evaluates "
        f"the synchronized model on {args.test_samples} test digits after syncs (at most every "
        f"{args.eval_every} steps, clock paused) and after fit's final sync. Clock: wall time from "
        "the end of the first step (tracing and set-up excluded), evaluation excluded. Split: "
        "compute (everything before FDACallback's hook: data, train step, Keras' loop), "
        "exchange (FDACallback's hook on steps without sync: state all-reduce or flag), "
        "syncs (the hook on sync steps, and the final sync).", "",
        "Load average (1 min) before -> after each harness run:", "",
    ]
    md += [f"* {what}, {link_label(link)}: {a[0]:.1f} -> {b[0]:.1f} ({wall:.0f} s)"
           for what, link, (a, b), wall in loads]
    if per_step:
        md += ["", "## Per step (median, side by side in one harness run per link)", "",
               f"{args.per_step_steps} steps per section (synchronous: {args.per_step_sync_steps}) "
               f"x {args.rounds} interleaved rounds, 10 warm-up steps dropped per section; "
               "'FDA exchange part' is the median time inside FDACallback's hook on a no-sync "
               "step. Load: 1-min average at the end of the run.", ""]
        md += per_step_table(per_step)
    for (model, link), runs in results.items():
        md += ["", f"## {model}, {link_label(link)}", ""]
        md += run_table(runs, args.targets.get(model, []))
    goals = goal_lines(results, args.targets)
    if goals:
        md += ["", "## Goal: CNN at 100 Mbit/s, FDA >= 10x sooner than synchronous, "
               "no later than the best periodic tau", ""] + goals
    md += ["", f"![accuracy against wall clock]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "rate_mbit", "rtt_ms", "strategy", "driver", "step", "clock_s",
                    "syncs", "accuracy", "compute_s", "exchange_s", "sync_s", "tx_bytes"])
        for (model, (rate, rtt)), runs in results.items():
            for r in runs:
                for p in r["points"]:
                    w.writerow([model, rate or 0, rtt, r["strategy"], r["driver"], p["step"],
                                f"{p['clock_s']:.3f}", p["syncs"], f"{p['accuracy']:.4f}",
                                f"{p['compute_s']:.3f}", f"{p['exchange_s']:.3f}",
                                f"{p['sync_s']:.3f}", p["tx_bytes"]])
    if per_step:
        with open(f"{stem}_per_step.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rate_mbit", "rtt_ms", "model", "section", "step_ms", "compute_ms",
                        "exchange_ms", "n", "load1"])
            for (rate, rtt), r in per_step:
                for name, s in r["sections"].items():
                    w.writerow([rate or 0, rtt, r["model"], name, f"{s['step']:.3f}",
                                f"{s['compute']:.3f}", f"{s['exchange']:.3f}", s["n"],
                                f"{r['load'][0]:.2f}"])
    if results:
        plot(results, args.targets, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.exit(main())
