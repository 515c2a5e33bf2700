"""The language model on emulated links: plain MWMS against FDACallback's triggers.

Runs `benchmarks/lm_links_worker.py` on K = 2 worker processes inside
`benchmarks/network.py` (one network namespace per worker, each link limited
with tc tbf, a round trip from the harness's delay relay), one harness run per
link, every method side by side in it:

* `mwms`: plain Keras `tf.distribute.MultiWorkerMirroredStrategy`, the model
  built and compiled in its scope (gradient all-reduce every step);
* `synchronous`: `FDACallback(trigger="synchronous")`;
* `diloco-H<tau>`: `FDACallback(trigger="periodic", tau=H, outer_optimizer="nesterov")`;
* `auto`, `auto+nesterov`: `FDACallback(threshold="auto")`, without and with
  the outer step (the latter the library's recommended setting);
* `local`: a periodic trigger longer than the run (nothing sent between
  syncs, one average at the end): the local step time and the do-nothing
  baseline. It runs first and again last, to bracket the load.

The workload is examples/language_model.py's (the byte-level GPT, standard
library source split by module, AdamW warmup + cosine), in the size of
BENCHMARKS.md section 7's simulator runs. Targets: synchronous's validation
loss after 25% and 50% of the run and its final loss + 1%, from the first
link's synchronous run (losses depend on the steps, not on the link).

Writes NAME.md, NAME.csv (every evaluation), NAME.json (raw; `--from_json`
rewrites the report from it), NAME.png (validation loss against the clock)
and NAME_pareto.png (bytes against final loss). Needs root (see network.py).

    python benchmarks/lm_links.py                       # 4 links, about 40 min on 2 cores
    python benchmarks/lm_links.py --links 0:0 --steps 48 --eval_every 16 --methods \
        local,mwms,synchronous --name lm_links_smoke
"""

import argparse
import csv
import datetime
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import network  # noqa: E402
from time_to_accuracy import link_label, parse_links, tagged  # noqa: E402

WORKER = str(ROOT / "benchmarks" / "lm_links_worker.py")
# BENCHMARKS.md section 7's simulator workload (benchmarks/language_model.py's defaults).
WORKLOAD = dict(seq_len=64, dim=64, layers=2, heads=4, batch_size=16, learning_rate=3e-3,
                bytes_per_worker=1_000_000, val_bytes=65_536)
TARGET_FRACTIONS = (0.25, 0.5)
FINAL_BAND = 0.01  # the last target: synchronous's final loss + 1%
RECOMMENDED = "auto+nesterov"


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--links", default="0:0,1000:50,100:0,10:0",
                   help="RATE_MBIT:RTT_MS,... (rate 0: no limit); the first sets the targets")
    p.add_argument("--steps", type=int, default=384, help="steps per run (at most)")
    p.add_argument("--taus", default="32,128", help="DiLoCo periods H (outer Nesterov)")
    p.add_argument("--methods", default=None,
                   help="a subset of the methods, comma-separated (default: all); also "
                   "auto-every1 and auto+nesterov-every1 (exchange_every=1), run only when named")
    p.add_argument("--budget_s", type=float, default=90.0,
                   help="a run stops once its training clock passes this (marked capped)")
    p.add_argument("--budget_methods", default="mwms,synchronous",
                   help="the methods the budget applies to (the others always run all steps; "
                   "the results ran so because a chief that stopped early under "
                   "threshold='auto' hung the final sync, fixed since: BENCHMARKS.md 7)")
    p.add_argument("--eval_every", type=int, default=24, help="must divide --steps")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="per harness run, seconds")
    p.add_argument("--name", default="lm_links")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--from_json", help="rewrite the report from NAME.json without running")
    return p


def parse_args(argv):
    args = _parser().parse_args(argv)
    if args.steps % args.eval_every:
        raise SystemExit("--eval_every must divide --steps (MWMS agrees on stopping per epoch).")
    args.links = parse_links(args.links)
    args.taus = [int(t) for t in args.taus.split(",") if t]
    return args


def methods(steps, taus, only=None):
    """The worker's method specs, in running order (`local` first and last)."""
    local = {"kind": "fda", "kwargs": {"trigger": "periodic", "tau": steps + 1}}
    out = [{"name": "local", **local},
           {"name": "mwms", "kind": "mwms", "always_synced": True},
           {"name": "synchronous", "kind": "fda", "always_synced": True,
            "kwargs": {"trigger": "synchronous"}}]
    out += [{"name": f"diloco-H{t}", "kind": "fda",
             "kwargs": {"trigger": "periodic", "tau": t, "outer_optimizer": "nesterov"}}
            for t in taus]
    out += [{"name": "auto", "kind": "fda", "kwargs": {"threshold": "auto"}},
            {"name": RECOMMENDED, "kind": "fda",
             "kwargs": {"threshold": "auto", "outer_optimizer": "nesterov"}},
            {"name": "local-again", **local}]
    if only:
        # Run only when named: auto with the exchange every step (no lag to agree on).
        out[-1:-1] = [{"name": f"{m['name']}-every1", "kind": "fda",
                       "kwargs": {**m["kwargs"], "exchange_every": 1}}
                      for m in out if m["name"].startswith("auto")]
        out = [m for m in out if m["name"] in only]
    return out


def worker_spec(args):
    only = set(args.methods.split(",")) if args.methods else None
    if only and "local" in only:
        only.add("local-again")
    return {**WORKLOAD, "steps": args.steps, "eval_every": args.eval_every,
            "budget_s": args.budget_s, "budget_methods": args.budget_methods.split(","),
            "seed": args.seed,
            "methods": methods(args.steps, args.taus, only)}


def harness_run(args, link, spec, log):
    """All methods on one link; returns {method: run} with both workers' link bytes."""
    rate, rtt = link
    loads = [os.getloadavg(), None]
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    started = time.time()
    with network.Network(args.workers, rate_mbit=rate, delay_ms=rtt / 2, echo=False) as net:
        results = net.run([sys.executable, WORKER, json.dumps(spec)], timeout=args.timeout)
    for i, r in enumerate(results):
        log.write("".join(f"[{link_label(link)}] [worker {i}] {line}\n" for line in r.lines))
    log.flush()
    for i, r in enumerate(results):
        if r.returncode:
            raise RuntimeError(f"worker {i} failed on {link_label(link)}:\n"
                               + "\n".join(r.lines[-40:]))
    loads[1] = os.getloadavg()
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    runs = {r["method"]: r for r in tagged(results[0].lines, "LM_RESULT")}
    for r in results:
        for tx in tagged(r.lines, "LM_TX"):
            runs[tx["method"]]["tx_bytes_total"] = (
                runs[tx["method"]].get("tx_bytes_total", 0) + tx["tx_bytes"])
    wall = time.time() - started
    print(f"{link_label(link)}: {wall:.0f} s; {uptime[0]} -> {uptime[1]}", flush=True)
    return runs, {"link": link, "loads": loads, "uptime": uptime, "wall_s": wall}


# --- analysis ---


def targets_of(sync_run, steps):
    """Synchronous's loss at 25% and 50% of the run, and its final loss + 1%."""
    points = sync_run["points"]
    out = []
    for fraction in TARGET_FRACTIONS:
        at = [p for p in points if p["step"] <= fraction * steps]
        out.append(at[-1]["loss"] if at else math.nan)
    out.append(points[-1]["loss"] * (1 + FINAL_BAND))
    return out


def first_at(run, target):
    """The first evaluation of `run` with loss <= target, or None."""
    return next((p for p in run["points"] if p["loss"] <= target), None)


def local_step_ms(runs, key="median_step_ms"):
    """The local step: the local runs' median steps (their mean, where both ran).

    Medians, as the per-step tables of section 5: on the shared cores load
    spikes put a few steps of every run at several times the rest, which
    would make the bound, and a method's utilization, a draw of the load.
    """
    local = [runs[m][key] for m in ("local", "local-again") if m in runs]
    return sum(local) / len(local) if local else math.nan


def utilization(run, local_ms, point=None):
    """steps x the local step / training clock (at `point`, else the whole run)."""
    steps, clock = (point["step"], point["clock_s"]) if point else (run["steps"], run["clock_s"])
    # The clock holds the steps after the first one (and the final sync).
    return (steps - 1) * local_ms / 1e3 / clock if clock > 0 else math.nan


def full_time(run, steps):
    """The clock of all the steps: measured, or extrapolated from the mean step where capped."""
    return run["mean_step_ms"] * (steps - 1) / 1e3 if run["capped"] else run["clock_s"]


def run_rows(runs, targets, steps):
    """One dict per method with the report's figures."""
    local_ms = local_step_ms(runs)
    mwms = runs.get("mwms")
    mwms_full = mwms and full_time(mwms, steps)
    rows = []
    for name, r in runs.items():
        last = r["points"][-1]
        wire = r.get("tx_bytes_total", r["tx_bytes_worker0"])
        full = full_time(r, steps)
        hits = [first_at(r, t) for t in targets]
        rows.append({
            "method": name, "steps": r["steps"], "capped": r["capped"], "syncs": r["syncs"],
            "clock_s": r["clock_s"], "mean_step_ms": r["mean_step_ms"],
            "median_step_ms": r["median_step_ms"], "final_loss": last["loss"],
            "perplexity": math.exp(last["loss"]), "tx_bytes_total": wire,
            "paper_bytes": r["paper_bytes"], "utilization": utilization(r, local_ms),
            "speedup_vs_mwms": (mwms_full / full) if mwms else math.nan,
            "hits": hits,
            "hit_utilization": [utilization(r, local_ms, h) if h else math.nan for h in hits],
            "hit_speedup": [
                (first_at(mwms, t)["clock_s"] / h["clock_s"])
                if (mwms and h and first_at(mwms, t)) else math.nan
                for t, h in zip(targets, hits)],
        })
    return rows


def bound(runs, key="median_step_ms"):
    """The largest speedup over MWMS any method could get: MWMS step / local step."""
    return runs["mwms"][key] / local_step_ms(runs, key) if "mwms" in runs else math.nan


def fmt_hit(point, util):
    if point is None:
        return "not reached"
    return f"{point['clock_s']:.1f} s, {point['tx_bytes'] / 1e6:.2f} MB, util {util:.0%}"


def link_table(runs, targets, steps):
    head = ("| method | steps | syncs | clock s | step ms mean / median | final loss (ppl) | MB on wire "
            "(both) | paper MB | util | speedup vs MWMS | "
            + " | ".join(f"to {t:.3f} (w0 MB)" for t in targets) + " |")
    lines = [head, "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|" + "---|" * len(targets)]
    for row in run_rows(runs, targets, steps):
        mark = " (capped)" if row["capped"] else ""
        paper = "" if row["paper_bytes"] is None else f"{row['paper_bytes'] / 1e6:.2f}"
        lines.append(
            f"| {row['method']}{mark} | {row['steps']} | {row['syncs'] if row['syncs'] is not None else 'every step'} | "
            f"{row['clock_s']:.1f} | {row['mean_step_ms']:.1f} / {row['median_step_ms']:.1f} | "
            f"{row['final_loss']:.4f} "
            f"({row['perplexity']:.2f}) | {row['tx_bytes_total'] / 1e6:.2f} | {paper} | "
            f"{row['utilization']:.0%} | {row['speedup_vs_mwms']:.2f}x | "
            + " | ".join(fmt_hit(h, u) for h, u in zip(row["hits"], row["hit_utilization"]))
            + " |")
    return lines


def slowest_lines(runs):
    """Where a run's mean step exceeds its median: its slowest steps (runs that recorded them)."""
    out = []
    for name, r in runs.items():
        if not r.get("slowest_steps"):
            continue
        excess = sum(ms - r["median_step_ms"] for _, ms, _ in r["slowest_steps"]) / 1e3
        out.append(
            f"* {name}: clock {r['clock_s']:.1f} s = {r['steps'] - 1} steps x median "
            f"{r['median_step_ms']:.1f} ms ({(r['steps'] - 1) * r['median_step_ms'] / 1e3:.1f} s) "
            f"+ {r['clock_s'] - (r['steps'] - 1) * r['median_step_ms'] / 1e3:.1f} s; its 12 slowest "
            f"steps hold {excess:.1f} s above the median: "
            + ", ".join(f"step {s} {ms:.0f} ms" + (" (sync)" if synced else "")
                        for s, ms, synced in r["slowest_steps"]))
    return ["", "Slowest steps:", ""] + out if out else []


def goal_lines(results, targets, steps):
    """Issue 23's time goals, per link, for the recommended setting.

    Met on a link where it reaches synchronous's final loss + 1% at >= 90%
    utilization, with a speedup over MWMS (to that target where MWMS reached
    it, else for the whole run) >= 80% of the largest any method could get,
    and >= 5x where that largest is >= 5x.
    """
    out = []
    for link, runs, _ in results:
        if RECOMMENDED not in runs or "mwms" not in runs or not targets:
            continue
        rows = {r["method"]: r for r in run_rows(runs, targets, steps)}
        rec, largest = rows[RECOMMENDED], bound(runs)
        hit, util = rec["hits"][-1], rec["hit_utilization"][-1]
        to_target = rec["hit_speedup"][-1]
        speedup = to_target if math.isfinite(to_target) else rec["speedup_vs_mwms"]
        met = (hit is not None and util >= 0.9 and speedup >= 0.8 * largest
               and (largest < 5 or speedup >= 5))
        reached = (f"reaches synchronous's final loss + 1% ({targets[-1]:.4f}) at "
                   f"{hit['clock_s']:.1f} s, utilization there {util:.0%}" if hit else
                   f"does not reach synchronous's final loss + 1% ({targets[-1]:.4f}; ends at "
                   f"{rec['final_loss']:.4f})")
        out.append(
            f"* {link_label(link)}: largest speedup any method could get (MWMS step / local "
            f"step) {largest:.2f}x; {RECOMMENDED} {reached}; speedup over MWMS "
            + (f"to that target {to_target:.2f}x, " if math.isfinite(to_target) else "")
            + f"for the whole run {rec['speedup_vs_mwms']:.2f}x "
            f"({speedup / largest:.0%} of the largest; goal >= 80%"
            + (", and >= 5x here" if largest >= 5 else "") + "); whole-run utilization "
            f"{rec['utilization']:.0%}: " + ("**met**" if met else "**missed**") + ".")
        diloco = [rows[m] for m in rows if m.startswith("diloco")]
        mwms = rows["mwms"]
        for i, t in enumerate(targets):
            best = [(d["hits"][i]["clock_s"], d["method"]) for d in diloco if d["hits"][i]]
            mine, theirs = rec["hits"][i], mwms["hits"][i]
            out.append(
                f"  * target {t:.4f}: {RECOMMENDED} "
                + (f"{mine['clock_s']:.1f} s ({mine['step']} steps)" if mine else "not reached")
                + "; MWMS " + (f"{theirs['clock_s']:.1f} s" if theirs else "not reached")
                + ("" if not (mine and theirs) else f" ({rec['hit_speedup'][i]:.2f}x)")
                + "; best DiLoCo "
                + (f"{min(best)[1]} {min(best)[0]:.1f} s" if best else "not reached") + ".")
    return out


def plot(results, targets, stem):
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), squeeze=False, figsize=(3.8 * len(results), 3.4))
    for ax, (link, runs, _) in zip(axes[0], results):
        for name, r in runs.items():
            if name == "local-again":
                continue
            xs = [p["clock_s"] for p in r["points"]]
            ax.plot(xs, [p["loss"] for p in r["points"]], marker=".",
                    ls="--" if r["capped"] else "-", label=name + (" (capped)" * r["capped"]))
        for t in targets:
            ax.axhline(t, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_title(link_label(link), fontsize=8)
        ax.set_xlabel("training clock, s", fontsize=7)
        ax.set_ylabel("validation loss (nats/byte)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    markers, colors = "osD^v<>p", {}
    for i, (link, runs, _) in enumerate(results):
        ax.scatter([], [], marker=markers[i % 8], color="grey", label=link_label(link))
        for row in run_rows(runs, targets, 10**9):
            if row["method"] == "local-again":
                continue
            first = row["method"] not in colors
            color = colors.setdefault(row["method"], f"C{len(colors) % 10}")
            x = max(row["tx_bytes_total"], 1)
            ax.scatter(x, row["final_loss"], marker=markers[i % 8], s=24, color=color,
                       alpha=0.5 if row["capped"] else 1.0)
            if first:
                ax.annotate(row["method"], (x, row["final_loss"]), fontsize=6,
                            xytext=(4, 4), textcoords="offset points", color=color)
    for t in targets[-1:]:
        ax.axhline(t, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the wire, both workers (measured, eth0)")
    ax.set_ylabel("final validation loss")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{stem}_pareto.png", dpi=110)
    plt.close(fig)


def write_report(args, out, command, started, results):
    stem = out / args.name
    first = results[0][1]
    targets = targets_of(first["synchronous"], args.steps) if "synchronous" in first else []
    loads = [info for _, _, info in results]
    some = next(iter(first.values()))
    md = [
        f"# The language model on emulated links ({args.name})", "",
        f"Command: `{command}`  ",
        f"Started {started:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU cores shared with other jobs "
        "(not quiet: see the load); K = "
        f"{args.workers} worker processes, each in its own network namespace (benchmarks/network.py: "
        "veth pairs into a bridge, tc tbf on both ends of each link, round trip by the harness's "
        "relay). Workload: examples/language_model.py's byte-level GPT "
        f"(dim {WORKLOAD['dim']}, {WORKLOAD['layers']} blocks, {WORKLOAD['heads']} heads, context "
        f"{WORKLOAD['seq_len']}, d = {some['params']:,}), batch {WORKLOAD['batch_size']} x "
        f"{WORKLOAD['seq_len']} bytes per worker, AdamW peak {WORKLOAD['learning_rate']}, 10% "
        f"warmup then cosine over {args.steps} steps; at most {args.steps} steps or "
        f"{args.budget_s:g} s of training clock for {args.budget_methods} (capped runs are "
        "marked; the other methods run all steps). The chief "
        f"evaluates the synchronized model on {WORKLOAD['val_bytes']:,} held-out bytes with the "
        f"clock paused: every {args.eval_every} steps where every step synchronizes (MWMS, "
        "synchronous), else at the first sync at least that many steps after the last "
        "evaluation, and after fit (the final sync). Clock: sum of the intervals between "
        "consecutive batch ends (the first step only starts it) plus the final sync. Bytes: "
        "`MB on wire` is what both workers' eth0 sent during the run (gRPC and TCP overhead "
        "included); `paper MB` FDACallback's `communication.paper_bytes`; `to TARGET` gives the "
        "clock, worker 0's eth0 MB and the utilization at the first evaluation at or below the "
        "target. Utilization: (steps - 1) x the local step (the median step of the two local runs "
        "of the same link, averaged) / clock; load spikes in a run's own steps count against "
        "it, so values just above 100% are noise. Speedup vs MWMS: MWMS's time for all the steps (extrapolated from "
        "its mean step where capped) / the method's (likewise).", "",
        "Targets (validation loss, from synchronous on the first link): "
        + ", ".join(f"{t:.4f}" for t in targets)
        + " (its loss after 25% and 50% of the run, its final loss + 1%; none without a "
        "synchronous run).", "",
        "Load (`uptime` before -> after each harness run):", "",
    ]
    md += [f"* {link_label(i['link'])} ({i['wall_s']:.0f} s): `{i['uptime'][0]}` -> "
           f"`{i['uptime'][1]}`" for i in loads]
    for link, runs, _ in results:
        md += ["", f"## {link_label(link)}", "",
               f"Local step {local_step_ms(runs):.1f} ms (median; local runs' medians "
               + ", ".join(f"{runs[m]['median_step_ms']:.1f}" for m in ("local", "local-again")
                           if m in runs)
               + f" ms); MWMS step {runs['mwms']['median_step_ms']:.1f} ms (median); largest "
               f"speedup any method could get over MWMS: {bound(runs):.2f}x (with mean steps: "
               f"{bound(runs, 'mean_step_ms'):.2f}x)." if "mwms" in runs else "", ""]
        md += link_table(runs, targets, args.steps)
        md += slowest_lines(runs)
    goals = goal_lines(results, targets, args.steps)
    if goals:
        md += ["", "## Issue 23's time goals (recommended setting)", ""] + goals
    md += ["", f"![validation loss against the clock]({stem.name}.png)", "",
           f"![bytes against final loss]({stem.name}_pareto.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rate_mbit", "rtt_ms", "method", "capped", "step", "clock_s", "syncs",
                    "val_loss", "tx_bytes_worker0", "paper_bytes"])
        for (rate, rtt), runs, _ in results:
            for name, r in runs.items():
                for p in r["points"]:
                    w.writerow([rate or 0, rtt, name, int(r["capped"]), p["step"],
                                f"{p['clock_s']:.3f}", p["syncs"], f"{p['loss']:.5f}",
                                p["tx_bytes"], p["paper_bytes"] if p["paper_bytes"] else ""])
    plot(results, targets, stem)
    print(stem.with_suffix(".md").read_text())


def save_json(out, args, command, started, results):
    (out / f"{args.name}.json").write_text(json.dumps({
        "command": command, "started": started.isoformat(),
        "settings": {k: getattr(args, k) for k in (
            "steps", "budget_s", "budget_methods", "eval_every", "workers")},
        "results": [(list(link), runs, info) for link, runs, info in results]}))


def load_json(path, args):
    raw = json.loads(pathlib.Path(path).read_text())
    for key, value in raw["settings"].items():
        setattr(args, key, value)
    results = [(tuple(link), runs, info) for link, runs, info in raw["results"]]
    return raw["command"], datetime.datetime.fromisoformat(raw["started"]), results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        write_report(args, out, *load_json(args.from_json, args))
        return 0
    try:
        network.check_available()
    except network.NetworkError as e:
        print(f"lm_links: {e}", file=sys.stderr)
        return 2
    command = "python benchmarks/lm_links.py " + " ".join(shlex.quote(a) for a in argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    spec, results = worker_spec(args), []
    with open(pathlib.Path("/tmp") / f"{args.name}_workers.log", "w") as log:
        for link in args.links:
            runs, info = harness_run(args, link, spec, log)
            results.append((link, runs, info))
            save_json(out, args, command, started, results)  # an interrupted grid keeps its links
    write_report(args, out, command, started, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
