"""Quantized syncs (issue 24): the block size, and steps to accuracy of each payload.

Two parts:

* `blocks`: the quantizer alone, on real drifts (LeNet-5 on the FEMNIST
  digits, Adam, 32 local steps from the initial weights and from weights
  trained 300 steps): the relative error `||dequantized - drift|| / ||drift||`
  of int8 and int4 with one scale per tensor and per block of 16 to 256
  entries, against the bytes per parameter. It picks `BLOCK_SIZE`.
* `accuracy`: `keras_fda.Simulation` in the regimes of
  `benchmarks/comm_to_accuracy.py` where communication matters (label skew
  Dirichlet 0.1 with a constant and a warmup + cosine rate, and the partitions
  rotated at mid-run), K = 10: periodic averaging (tau 32) with each payload
  (float32, bfloat16, int8 and int4, each with and without error feedback),
  then with DiLoCo's outer Nesterov step, and FDA (Theta = 4e-5 d) with the
  outer step, for float32, int8 and int4. Steps and bytes to the targets
  synchronous averaging reaches after 20%, 35% and 50% of the run, and the
  issue's goals.

Outputs under --out_dir: quantization_blocks.md, quantization.md and
quantization.csv (every evaluation).

    python benchmarks/quantization.py --part blocks      # a minute
    python benchmarks/quantization.py --part accuracy    # 42 runs, about 40 min on 2 quiet cores
"""

import argparse
import csv
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

REGIMES = ("dir0.1-const", "dir0.1-cosine", "dir0.1-rotate")
FRACTIONS = (0.2, 0.35, 0.5)
PAYLOADS = {  # name: Simulation.run keyword arguments
    "float32": {},
    "bfloat16": {"sync_dtype": "bfloat16"},
    "int8": {"sync_dtype": "int8"},
    "int8-noEF": {"sync_dtype": "int8", "error_feedback": False},
    "int4": {"sync_dtype": "int4"},
    "int4-noEF": {"sync_dtype": "int4", "error_feedback": False},
}
# The goals: (payload, steps tolerance, bytes per sync at most, as a fraction of float32's).
GOALS = (("int8", 0.05, 0.30), ("int4", 0.10, 0.17))
LEVELS = {"int8": 127, "int4": 7}
BLOCKS = (16, 32, 64, 128, 256, None)  # None: one scale per tensor


def quantized(x, levels, block):
    """numpy: `x` quantized with absmax scales per `block` entries (None: per tensor)."""
    flat = np.asarray(x, np.float32).reshape(-1)
    block = block or len(flat)
    blocks = np.pad(flat, (0, -len(flat) % block)).reshape(-1, block)
    scale = np.max(np.abs(blocks), axis=1) / np.float32(levels)
    q = np.clip(np.round(blocks / np.where(scale > 0, scale, 1)[:, None]), -levels, levels)
    return (q * scale[:, None]).reshape(-1)[: len(flat)]


def payload_bytes(sizes, bits, block):
    """Bytes of one worker's payload: levels padded to whole blocks, a float32 scale each."""
    total = 0
    for n in sizes:
        b = block or n
        blocks = -(-n // b)
        total += blocks * (b * bits // 8 + 4)
    return total


def blocks_part(args, out, command):
    import models

    data = dict(np.load(ROOT / args.data_path))
    x, y, _, _, _, classes = c2a.load_task(data, "digits", 400)
    model = models.build("lenet5", classes, args.seed, 1e-3)
    rng = np.random.default_rng(args.seed)
    sizes = [int(np.prod(w.shape)) for w in model.trainable_weights]
    d = sum(sizes)

    def drift(steps):
        start = [w.numpy() for w in model.trainable_weights]
        for _ in range(steps):
            i = rng.integers(0, len(y), c2a.BATCH_SIZE)
            model.train_on_batch(x[i], y[i])
        return [w.numpy() - s for w, s in zip(model.trainable_weights, start)]

    drifts = {"first 32 steps": drift(32)}
    drift(300 - 32)
    drifts["steps 300-332"] = drift(32)
    title = "Quantized syncs: the block size (issue 24)"
    lines = outer_optimizer.report_header(title, command) + [
        f"LeNet-5 (d = {d:,}, {len(sizes)} tensors, the smallest {min(sizes)} entries), Adam "
        f"(lr 1e-3), batch {c2a.BATCH_SIZE}, FEMNIST digits; the drift "
        "of 32 local steps. Relative error = ||dequantized - drift|| / ||drift||, one "
        "quantization (no error feedback); bytes per parameter include the float32 scales and "
        "the padding of each tensor to whole blocks.",
        "",
        "| payload | block | bytes / parameter | vs float32 | "
        + " | ".join(f"error, {k}" for k in drifts) + " |",
        "|---" * (4 + len(drifts)) + "|",
    ]
    for name, levels in LEVELS.items():
        bits = 8 if name == "int8" else 4
        for block in BLOCKS:
            per_param = payload_bytes(sizes, bits, block) / d
            errors = []
            for tensors in drifts.values():
                got = np.concatenate([quantized(t, levels, block) for t in tensors])
                want = np.concatenate([t.reshape(-1) for t in tensors])
                errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
            lines.append(
                f"| {name} | {block or 'per tensor'} | {per_param:.3f} | {per_param / 4:.3f}x | "
                + " | ".join(f"{e:.4f}" for e in errors) + " |"
            )
    lines += ["", f"Load average at the end {os.getloadavg()[0]:.1f}.", ""]
    (out / "quantization_blocks.md").write_text("\n".join(lines))
    print("\n".join(lines))


def grid(num_params):
    import keras_fda

    yield "synchronous", "float32", "plain", keras_fda.Synchronous()
    yield "no-sync", "float32", "plain", keras_fda.Periodic(2**62)
    for payload in PAYLOADS:
        yield "periodic-32", payload, "plain", keras_fda.Periodic(32)
    # With the outer step, the payloads with error feedback (what a user would pick).
    for payload in ("float32", "int8", "int4"):
        yield "periodic-32", payload, "nesterov", keras_fda.Periodic(32)
    for payload in ("float32", "int8", "int4"):
        yield "fda-4e-5d", payload, "nesterov", keras_fda.FDA("linear", threshold=4e-5 * num_params)


def run_kwargs(payload, outer):
    kwargs = dict(PAYLOADS[payload])
    if outer == "nesterov":
        kwargs["outer_optimizer"] = outer_optimizer.nesterov()
    return kwargs


def regime_lines(regime, runs, targets):
    final = {key: h.evaluations["accuracy"][-1] for key, h in runs.items()}
    sync = final[("synchronous", "float32", "plain")]
    nosync = final[("no-sync", "float32", "plain")]
    lines = [
        f"## {regime}: {c2a.regime_text(*c2a.REGIMES[regime])}",
        "",
        f"Final accuracy synchronous {sync:.4f}, no sync {nosync:.4f} (no sync loses "
        f"{100 * (sync - nosync):.1f} points). Targets: {', '.join(f'{t:.3f}' for t in targets)}.",
        "",
        "| trigger | payload | outer | syncs | final acc | bytes/sync | vs float32 | "
        + " | ".join(f"{t:.3f}: steps (vs float32)" for t in targets) + " |",
        "|---" * (7 + len(targets)) + "|",
    ]
    goals = []
    for (label, payload, outer), history in runs.items():
        ev = history.evaluations
        base = runs.get((label, "float32", outer), history)
        per_sync = history.communication().bytes_per_sync
        cells = []
        for t in targets:
            hit, ref = history.first_reaching("accuracy", t), base.first_reaching("accuracy", t)
            if hit is None:
                cells.append("not reached")
                continue
            rel = "" if ref is None else f" ({hit['step'] / ref['step']:.2f}x)"
            cells.append(f"{hit['step']}{rel}")
            for name, tolerance, _ in GOALS:
                if payload == name and ref is not None:
                    steps = hit["step"] / ref["step"]
                    goals.append((name, abs(steps - 1) <= tolerance,
                                  f"{regime} {label} {outer} {t:.3f}: {steps:.2f}x"))  # fmt: skip
            if payload in dict((g[0], 0) for g in GOALS) and ref is None:
                goals.append(
                    (payload, True, f"{regime} {label} {outer} {t:.3f}: float32 missed it")
                )
        for name, _, _ in GOALS:
            if payload == name:
                missed = [t for t in targets if history.first_reaching("accuracy", t) is None
                          and base.first_reaching("accuracy", t) is not None]  # fmt: skip
                goals += [(name, False, f"{regime} {label} {outer} {t:.3f}: not reached")
                          for t in missed]  # fmt: skip
        lines.append(
            f"| {label} | {payload} | {outer} | {ev['syncs'][-1]} | {ev['accuracy'][-1]:.4f} | "
            f"{per_sync:,} | {per_sync / base.communication().bytes_per_sync:.3f}x | "
            + " | ".join(cells) + " |"
        )
    return lines + [""], goals


def goal_lines(goals, ratios):
    lines = ["## Goals (issue 24)", ""]
    for name, tolerance, max_bytes in GOALS:
        cases = [(ok, text) for n, ok, text in goals if n == name]
        met = sum(ok for ok, _ in cases)
        bytes_ok = ratios[name] <= max_bytes
        verdict = "met" if met == len(cases) and bytes_ok else "MISSED"
        lines.append(
            f"* **{name}{' with error feedback' if name == 'int4' else ''}: every target within "
            f"+-{tolerance:.0%} of float32's steps at <= {max_bytes:.2f}x its bytes per sync: "
            f"{verdict}** ({met} of {len(cases)} cases within; bytes per sync {ratios[name]:.3f}x "
            "float32's). Outside: "
            + ("; ".join(text for ok, text in cases if not ok) or "none") + "."
        )
    return lines + [""]


def accuracy_part(args, out, command):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import models
    from keras_fda import Simulation

    data = dict(np.load(ROOT / args.data_path))
    x, y, writers, x_test, y_test, classes = c2a.load_task(data, "digits", 400)
    workers = 10
    num_steps = int(args.epochs * (len(y) // (c2a.BATCH_SIZE * workers)))
    started = time.time()
    title = "Quantized syncs: steps to accuracy of each payload (issue 24)"
    top = outer_optimizer.report_header(title, command) + [
        f"`keras_fda.Simulation`, FEMNIST digits (400 writers), LeNet-5, K = {workers}, Adam, "
        f"batch {c2a.BATCH_SIZE} per worker, {num_steps} steps, seed {args.seed}, one seed. "
        "Payloads: the drift in bfloat16, int8 or int4 (blocks of 64 with a float32 scale; "
        "`-noEF`: without error feedback), or float32 weights. `nesterov`: DiLoCo's outer "
        "`SGD(0.7, momentum=0.9, nesterov=True)`. Steps to a target are compared with the same "
        "trigger and outer step with a float32 payload.",
        "",
    ]
    body, rows, goals, ratios = [], [], [], {}
    for regime in args.regimes.split(","):
        partition_spec, lr_spec, drift_spec = c2a.REGIMES[regime]
        model = models.build("lenet5", classes, args.seed, c2a.learning_rate(lr_spec, num_steps))
        sim = Simulation(model, workers)
        parts = c2a.make_partitions(partition_spec, writers, y, workers, args.seed)
        runs = {}
        for label, payload, outer, trigger in grid(model.count_params()):
            history = sim.run(
                trigger, x, y, parts, batch_size=c2a.BATCH_SIZE, steps=num_steps,
                evaluations_per_epoch=args.evaluations_per_epoch,
                validation_data=(x_test, y_test), seed=args.seed,
                repartition=c2a.repartition(drift_spec, parts, num_steps),
                **run_kwargs(payload, outer),
            )  # fmt: skip
            runs[(label, payload, outer)] = history
            ev = history.evaluations
            print(f"[{time.time() - started:6.0f}s] {regime} {label} {payload} {outer}: acc "
                  f"{ev['accuracy'][-1]:.4f}, {ev['syncs'][-1]} syncs, load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
            for i in range(len(ev["step"])):
                rows.append({"regime": regime, "trigger": label, "payload": payload, "outer": outer,
                             **{k: v[i].item() for k, v in ev.items()}})  # fmt: skip
        float32 = runs[("periodic-32", "float32", "plain")].communication().bytes_per_sync
        for name, _, _ in GOALS:
            quantized = runs[("periodic-32", name, "plain")].communication().bytes_per_sync
            ratios[name] = quantized / float32
        targets = c2a.targets_from(runs[("synchronous", "float32", "plain")], FRACTIONS)
        lines, regime_goals = regime_lines(regime, runs, targets)
        body += lines
        goals += regime_goals
        md = top + goal_lines(goals, ratios) + body + [
            f"Time so far: {time.time() - started:.0f} s; load average now "
            f"{os.getloadavg()[0]:.1f}.", ""]  # fmt: skip
        (out / "quantization.md").write_text("\n".join(md))
        with open(out / "quantization.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"Wrote {out}/quantization.md and .csv in {time.time() - started:.0f} s.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["blocks", "accuracy"], required=True)
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--evaluations_per_epoch", type=int, default=12)
    parser.add_argument("--out_dir", default="benchmarks/results")
    parser.add_argument("--data_path", default="../shared/data/femnist_subset.npz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = ROOT / args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
    )
    (blocks_part if args.part == "blocks" else accuracy_part)(args, out, command)


if __name__ == "__main__":
    main()
