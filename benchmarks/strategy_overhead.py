"""Per-step time of FDAStrategy (no sync) vs plain MirroredStrategy, in one run.

All sections use the same logical CPU devices, model, batch and data. The
FDA threshold is set so high that no synchronization happens: the measured
difference is the per-step cost of the in-graph check (local state, one small
all-reduce, the cond) plus keeping updates local (no gradient all-reduce). A
third section adds the dashboard written at every step (`log_dir`,
`update_freq=1`: one host callback per step).

    python benchmarks/strategy_overhead.py --devices 2 --model lenet5 --steps 200 --rounds 3

`--sync_dtype int8` (one device: a quantized sync allows one replica per
worker) checks that the steps that do not sync do not pay for the payload.

Sections are interleaved (round 1: mirrored, fda, fda + dashboard; round 2: ...); each step is
timed between consecutive `on_train_batch_end` calls; the first `--warmup`
steps of each section are dropped. Prints a markdown table.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--model", default="lenet5", choices=["lenet5", "cnn", "mlp"])
parser.add_argument("--batch", type=int, default=32, help="per replica")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--warmup", type=int, default=20)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--variant", default="linear")
parser.add_argument("--sync_dtype", default=None, help="FDAStrategy's sync_dtype (e.g. int8)")
args = parser.parse_args()

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

from keras_fda.drivers.strategy import FDAStrategy  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def build():
    keras.utils.set_random_seed(0)
    if args.model == "mlp":
        return keras.Sequential([
            keras.Input((28, 28, 1)), keras.layers.Flatten(),
            keras.layers.Dense(1024, activation="relu"), keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ])
    return getattr(models, args.model)(10)


def setup(strategy):
    with strategy.scope():
        model = build()
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
    return model


rng = np.random.default_rng(0)
global_batch = args.batch * args.devices
x = rng.random((global_batch * 16, 28, 28, 1), dtype=np.float32)
y = rng.integers(0, 10, len(x)).astype("int32")
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch).repeat().prefetch(2)

sections = {
    "MirroredStrategy (gradient all-reduce every step)": setup(tf.distribute.MirroredStrategy()),
}
fda_name = f"FDAStrategy {args.variant}" + (f" {args.sync_dtype}" if args.sync_dtype else "")
fda = FDAStrategy(
    tf.distribute.MirroredStrategy(), threshold=1e30, variant=args.variant,
    sync_dtype=args.sync_dtype,
)
sections[f"{fda_name}, no sync"] = setup(fda)
# The same, writing the dashboard every step (a host callback per step).
dashboard_dir = tempfile.mkdtemp()
fda_dashboard = FDAStrategy(
    tf.distribute.MirroredStrategy(), threshold=1e30, variant=args.variant,
    sync_dtype=args.sync_dtype, log_dir=dashboard_dir, update_freq=1,
)
sections[f"{fda_name}, no sync, dashboard every step"] = setup(fda_dashboard)
samples = {name: [] for name in sections}
for _ in range(args.rounds):
    for name, model in sections.items():
        timer = StepTimer()
        model.fit(dataset, steps_per_epoch=args.steps + args.warmup, epochs=1, verbose=0,
                  callbacks=[timer])
        samples[name].extend(np.diff(timer.times[args.warmup:]) * 1e3)
# No sync during the timed steps: only the one that ends each fit.
assert fda.communication.syncs == fda_dashboard.communication.syncs == args.rounds
shutil.rmtree(dashboard_dir)

d = sum(int(np.prod(w.shape)) for w in sections[name].trainable_weights)
print(f"devices={args.devices} model={args.model} d={d} batch/replica={args.batch} "
      f"sync_dtype={args.sync_dtype} "
      f"steps={args.rounds}x{args.steps - 1} (warmup {args.warmup} dropped per section)\n")
print("| section | median ms | p10 ms | p90 ms |")
print("|---|---|---|---|")
base = np.median(samples[next(iter(samples))])
for name, values in samples.items():
    p10, med, p90 = np.percentile(values, [10, 50, 90])
    print(f"| {name} | {med:.2f} ({med / base:.2f}x) | {p10:.2f} | {p90:.2f} |")
