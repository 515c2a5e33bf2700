"""Per-step overhead of `FDACallback` across real worker processes.

Run (2 worker processes on 127.0.0.1, results table printed by worker 0):

    python -m keras_fda.launch --workers 2 benchmarks/overhead.py \
        --steps=300 --warmup=30 --rounds=3 --output=/tmp/overhead.json

What is timed, on a ~1.07M-parameter MLP (784-1024-256-10, batch 32, Adam):

  local          `model.fit` step, no FDA (only the timing callback)
  fda_nosync     the same + `FDACallback(variant="linear", threshold=1e30)`:
                 local state, an 8-byte all-reduce and the (false) sync check
  fda_sync       the same + `FDACallback(trigger="synchronous")`: every step
                 averages the weights
  ar_small       bare `transport.all_reduce` of 2 floats in a `tf.function`
  ar_weights     bare `transport.all_reduce` of a preconcatenated d-float tensor
  sync_path      concat of the weights + all-reduce + split/assign back, one
                 `tf.function` (what a sync does to the weights)
  fit_ar_small,  `model.fit` step + a minimal callback running ar_small /
  fit_ar_weights ar_weights after every step: the same bare collective, but
                 placed where FDACallback runs it, between training steps
  avg_nosync,    `WorkerAverager.step()` called directly (no Keras, no
  avg_sync       callback): the compiled part of fda_nosync / fda_sync

The fit sections time what users see: the wall time between consecutive
`on_train_batch_end` calls of a timing callback placed last, i.e. one whole
step of `model.fit` (data, train step, log conversion, callbacks). The timing
callback is not async-safe, so Keras runs callbacks inline in all three
configurations alike. Bare collectives are timed per call, including fetching
a small result to the host, as the callback does with its statistic.

Goals: (fda_nosync - local) / ar_small <= 1.5 and
(fda_sync - local) / ar_weights <= 1.3.

The bare collectives are timed back to back, with both workers entering each
call nearly together. Between training steps they cost more: the workers
leave each training step at different times (more so on an oversubscribed
machine) and the first to arrive waits for the other. The fit_ar_* sections
measure that price of lock step without any FDA code, so the table also
reports the FDA overheads in units of the same collective in the same place:
(fda_nosync - local) / (fit_ar_small - local) and
(fda_sync - local) / (fit_ar_weights - local).

Collective timings mean something only while both workers run in lock step,
so every worker runs every section in the same order, with a barrier before
each. Sections are interleaved over `--rounds` rounds so that slow phases of a
noisy machine spread over all of them; each section drops its first
`--warmup` steps (tracing, first-call costs) and the statistics pool the rest.
"""

import keras_fda

# TensorFlow starts one watchdog thread per collective that has a timeout, and
# the thread sleeps for the whole timeout: at hundreds of collectives per
# second the default 300 s piles up tens of thousands of threads and a worker
# can die with "Resource temporarily unavailable". 30 s keeps it to a few
# thousand while still turning a hang into an error.
COLLECTIVE_TIMEOUT_SECONDS = 30

# TensorFlow's collective runtime must start before any other TF op.
cluster = keras_fda.connect(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)

import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_fda.policies import triggers  # noqa: E402
from keras_fda.engine.averager import WorkerAverager  # noqa: E402

flags.DEFINE_integer("steps", 300, "Measured steps (or calls) per section and round.")
flags.DEFINE_integer("warmup", 30, "Steps (or calls) dropped at the start of each section.")
flags.DEFINE_integer("rounds", 3, "Rounds; each round runs every section once, interleaved.")
flags.DEFINE_integer("batch_size", 32, "Batch size per worker.")
flags.DEFINE_integer("seed", 0, "Seed of the model and the synthetic data.")
flags.DEFINE_string(
    "output", None, "Where worker 0 writes the results: *.md for markdown, else JSON."
)
FLAGS = flags.FLAGS

INPUT_DIM = 784
NUM_CLASSES = 10
NEVER = 1e30  # an FDA threshold the variance estimate never exceeds

DESCRIPTIONS = {
    "local": "model.fit step, no FDA",
    "fda_nosync": "fit step + FDACallback(linear, never syncs)",
    "fda_sync": "fit step + FDACallback(trigger='synchronous')",
    "ar_small": "bare all_reduce, 2 floats (tf.function)",
    "ar_weights": "bare all_reduce, d floats (tf.function)",
    "sync_path": "concat + all_reduce + split/assign of the weights (tf.function)",
    "fit_ar_small": "fit step + callback running ar_small",
    "fit_ar_weights": "fit step + callback running ar_weights",
    "avg_nosync": "WorkerAverager.step() alone, linear, no sync",
    "avg_sync": "WorkerAverager.step() alone, synchronous",
}


def make_model():
    """A ~1.07M-parameter MLP classifier, compiled with Adam, outside any strategy."""
    keras.utils.set_random_seed(FLAGS.seed)
    model = keras.Sequential(
        [
            keras.Input((INPUT_DIM,)),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def make_dataset():
    """Synthetic in-memory batches, repeated forever (fit runs by steps_per_epoch)."""
    rng = np.random.default_rng(FLAGS.seed + cluster.worker_index)
    n = 64 * FLAGS.batch_size
    x = rng.standard_normal((n, INPUT_DIM)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size, drop_remainder=True)
    return ds.cache().repeat().prefetch(tf.data.AUTOTUNE)


class StepTimer(keras.callbacks.Callback):
    """Records the wall time of every `on_train_batch_end`; place it last.

    Not async-safe on purpose (the default), so that Keras runs the callbacks
    inline whether or not FDACallback is present.
    """

    def on_train_begin(self, logs=None):
        self.stamps = []

    def on_train_batch_end(self, batch, logs=None):
        self.stamps.append(time.perf_counter())

    def durations(self):
        return np.diff(self.stamps)


class EveryStep(keras.callbacks.Callback):
    """Runs `fn` after every training step: a bare collective in FDACallback's place."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def on_train_batch_end(self, batch, logs=None):
        np.asarray(self.fn())


def barrier():
    cluster.transport.all_reduce(tf.constant([1.0])).numpy()


def time_fit(model, dataset, callbacks, n):
    """Per-step wall times of `n` steps of `model.fit` with `callbacks`."""
    timer = StepTimer()
    model.fit(
        dataset,
        epochs=1,
        steps_per_epoch=n + 1,  # n + 1 stamps give n step durations
        verbose=0,
        callbacks=list(callbacks) + [timer],
    )
    return timer.durations()


def time_calls(fn, n):
    """Wall times of `n` calls of `fn`, each fetching its (small) result to the host."""
    times = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        np.asarray(fn())
        times[i] = time.perf_counter() - start
    return times


def make_sections(model, dataset):
    """Returns `{name: f(n) -> n per-step times in seconds}`, in run order."""
    transport = cluster.transport
    variables = [w.value for w in model.trainable_weights]
    num_params = sum(int(v.shape.num_elements()) for v in variables)
    small = tf.constant([1.0, 2.0])
    flat = tf.random.normal([num_params], seed=FLAGS.seed)

    @tf.function
    def ar_small():
        return transport.all_reduce(small, "mean")

    @tf.function
    def ar_weights():
        return transport.all_reduce(flat, "mean")[:1]

    @tf.function
    def sync_path():
        concat = tf.concat([tf.reshape(v, [-1]) for v in variables], 0)
        mean = transport.all_reduce(concat, "mean")
        sizes = [int(v.shape.num_elements()) for v in variables]
        for v, part in zip(variables, tf.split(mean, sizes)):
            v.assign(tf.reshape(part, v.shape))
        return mean[:1]

    def averager_step(trigger):
        def run(n):
            averager = WorkerAverager(trigger, transport, variables)
            averager.broadcast()
            # Fetch one of step()'s scalars, as the callback fetches the statistic.
            return time_calls(lambda: tf.nest.flatten(averager.step())[0], n)

        return run

    def fit(make_callbacks):
        return lambda n: time_fit(model, dataset, make_callbacks(), n)

    return {
        "local": fit(lambda: []),
        "fda_nosync": fit(lambda: [keras_fda.FDACallback(threshold=NEVER, variant="linear")]),
        "fit_ar_small": fit(lambda: [EveryStep(ar_small)]),
        "fda_sync": fit(lambda: [keras_fda.FDACallback(trigger="synchronous")]),
        "fit_ar_weights": fit(lambda: [EveryStep(ar_weights)]),
        "ar_small": lambda n: time_calls(ar_small, n),
        "ar_weights": lambda n: time_calls(ar_weights, n),
        "sync_path": lambda n: time_calls(sync_path, n),
        "avg_nosync": averager_step(triggers.FDA("linear", NEVER)),
        "avg_sync": averager_step(triggers.Synchronous()),
    }, num_params


def summarize(samples):
    ms = 1e3 * np.asarray(samples)
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "n": int(ms.size),
    }


def ratios(medians):
    """The goal ratios from a `{section: median_ms}` dict (see the module docstring)."""
    nosync = medians["fda_nosync"] - medians["local"]
    sync = medians["fda_sync"] - medians["local"]
    return {
        "nosync_overhead_vs_ar_small": nosync / medians["ar_small"],
        "sync_overhead_vs_ar_weights": sync / medians["ar_weights"],
        "nosync_overhead_vs_fit_ar_small": nosync / (medians["fit_ar_small"] - medians["local"]),
        "sync_overhead_vs_fit_ar_weights": sync / (medians["fit_ar_weights"] - medians["local"]),
    }


GOALS = {
    "nosync_overhead_vs_ar_small": 1.5,
    "sync_overhead_vs_ar_weights": 1.3,
    "nosync_overhead_vs_fit_ar_small": 1.5,
    "sync_overhead_vs_fit_ar_weights": 1.3,
}


def format_markdown(result):
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; machine: {result['machine']}; "
        f"{result['num_workers']} workers; d = {result['num_params']:,} params; "
        f"batch {result['batch_size']}; {result['rounds']} rounds x {result['steps']} "
        f"measured steps per section (warm-up {result['warmup']} dropped per round).",
        "",
        "| section | what | median ms | p10 ms | p90 ms | per-round medians ms |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, s in result["sections"].items():
        per_round = ", ".join(f"{m:.2f}" for m in s["round_medians_ms"])
        lines.append(
            f"| {name} | {DESCRIPTIONS[name]} | {s['median_ms']:.2f} | {s['p10_ms']:.2f} "
            f"| {s['p90_ms']:.2f} | {per_round} |"
        )
    lines += ["", "| ratio | pooled medians | per-round | goal |", "|---|---:|---|---:|"]
    for name, value in result["ratios"].items():
        per_round = ", ".join(f"{r[name]:.2f}" for r in result["round_ratios"])
        verdict = "met" if value <= GOALS[name] else "missed"
        lines.append(f"| {name} | {value:.2f} | {per_round} | <= {GOALS[name]} ({verdict}) |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    model = make_model()
    dataset = make_dataset()
    sections, num_params = make_sections(model, dataset)
    samples = {name: [] for name in sections}
    for _ in range(FLAGS.rounds):
        for name, run in sections.items():
            barrier()
            times = run(FLAGS.warmup + FLAGS.steps)
            samples[name].append(times[FLAGS.warmup :])
    barrier()

    if not cluster.is_chief:
        return
    result = {
        "command": "python -m keras_fda.launch --workers "
        f"{cluster.num_workers} benchmarks/overhead.py {' '.join(sys.argv[1:])}".strip(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "num_workers": cluster.num_workers,
        "num_params": num_params,
        "batch_size": FLAGS.batch_size,
        "steps": FLAGS.steps,
        "warmup": FLAGS.warmup,
        "rounds": FLAGS.rounds,
        "sections": {
            name: {
                **summarize(np.concatenate(per_round)),
                "round_medians_ms": [1e3 * float(np.median(t)) for t in per_round],
            }
            for name, per_round in samples.items()
        },
    }
    medians = {name: s["median_ms"] for name, s in result["sections"].items()}
    result["ratios"] = ratios(medians)
    result["round_ratios"] = [
        ratios({name: s["round_medians_ms"][r] for name, s in result["sections"].items()})
        for r in range(FLAGS.rounds)
    ]
    text = format_markdown(result)
    print(text, flush=True)
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w") as f:
            if FLAGS.output.endswith(".md"):
                f.write(text)
            else:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
