"""The wall time of a synchronizing step, per payload, on emulated links (issue 24).

Driver (needs root, see benchmarks/network.py):

    python benchmarks/sync_cost.py                 # 100 and 10 Mbit/s, 2 workers

runs this file as the worker of 2 processes in `benchmarks/network.py`'s
namespaces, once per link. Each worker trains the MLP of `benchmarks/models.py`
(d = 1.07M) with `FDACallback(trigger="synchronous")`, so that every step
synchronizes, with each payload in turn (float32 weights, the bfloat16, int8
and int4 drift) and without FDA (the local step), interleaved in rounds. A
step's time is the interval between consecutive batch ends; the median of the
steps after the first of each fit is reported. Writes
benchmarks/results/sync_cost.md.
"""

import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAYLOADS = (None, "bfloat16", "int8", "int4")
TAG = "SYNC_COST"


def worker(spec):
    import keras_fda

    keras_fda.connect(timeout_seconds=300)
    import time

    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import models

    model = models.build("mlp", 10, seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * (spec["steps"] + 1), 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, len(x))

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    samples = {str(p): [] for p in ("local",) + PAYLOADS}
    for _ in range(spec["rounds"]):
        for payload in ("local",) + PAYLOADS:
            clock = Clock()
            callbacks = [] if payload == "local" else [
                keras_fda.FDACallback(trigger="synchronous", sync_dtype=payload)
            ]
            model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      callbacks=callbacks + [clock])  # fmt: skip
            samples[str(payload)] += np.diff(clock.ends)[1:].tolist()
    print(f"{TAG} " + json.dumps({
        "params": model.count_params(),
        "median_ms": {k: float(np.median(v)) * 1e3 for k, v in samples.items()},
        "n": {k: len(v) for k, v in samples.items()},
    }), flush=True)


def main():
    import argparse
    import datetime
    import time

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import network

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="100,10", help="Link rates, Mbit/s.")
    parser.add_argument("--steps", type=int, default=8, help="Steps per fit.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sync_cost.md"))
    args = parser.parse_args()
    network.check_available()
    spec = {"steps": args.steps, "rounds": args.rounds}
    started, load = time.time(), os.getloadavg()[0]
    rows = []
    for rate in map(float, args.rates.split(",")):
        with network.Network(2, rate_mbit=rate, echo=False) as net:
            results = net.run([sys.executable, __file__, json.dumps(spec)], timeout=1800)
        lines = [line for r in results for line in r.lines]
        if any(r.returncode for r in results):
            raise RuntimeError(f"a worker failed at {rate:g} Mbit/s:\n" + "\n".join(lines[-30:]))
        found = json.loads(next(line for line in results[0].lines if line.startswith(TAG))
                           .split(" ", 1)[1])  # fmt: skip
        rows.append((rate, found, os.getloadavg()[0]))
        print(rate, found, flush=True)
    command = "python benchmarks/sync_cost.py " + " ".join(sys.argv[1:])
    ms = lambda found, p: found["median_ms"][str(p)]  # noqa: E731
    lines = [
        "# The wall time of a synchronizing step, per payload (issue 24)",
        "",
        f"Command: `{command.strip()}`; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.time() - started:.0f} s, 2 shared CPU cores, load {load:.1f} at the start "
        f"({'a quiet machine' if max(load, *(r[2] for r in rows)) < 1 else 'not a quiet machine'}).",
        "",
        f"2 worker processes in network namespaces (tbf rate limit, no added delay), MLP d = "
        f"{rows[0][1]['params']:,}, batch 32, `FDACallback(trigger=\"synchronous\")`: every step "
        f"syncs. Median step time (batch end to batch end), {args.rounds} rounds of "
        f"{args.steps} steps per payload, interleaved.",
        "",
        "| link | local step | float32 sync step | bfloat16 | int8 | int4 | int8 / float32 | "
        "int4 / float32 | load after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, found, load_after in rows:
        f32 = ms(found, None)
        lines.append(
            f"| {rate:g} Mbit/s | {ms(found, 'local'):.1f} ms | {f32:.1f} ms | "
            f"{ms(found, 'bfloat16'):.1f} ms | {ms(found, 'int8'):.1f} ms | "
            f"{ms(found, 'int4'):.1f} ms | {ms(found, 'int8') / f32:.3f}x | "
            f"{ms(found, 'int4') / f32:.3f}x | {load_after:.1f} |"
        )
    ratio = ms(rows[0][1], "int8") / ms(rows[0][1], None)
    lines += [
        "",
        f"Goal (a synchronizing step with int8 <= 0.35x a float32 one at 100 Mbit/s): "
        f"**{'met' if ratio <= 0.35 else 'MISSED'}** ({ratio:.3f}x; load printed).",
        "",
    ]
    pathlib.Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        worker(json.loads(sys.argv[1]))
    else:
        main()
