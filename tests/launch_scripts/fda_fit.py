"""A small FDA fit on every worker, for the launcher, SLURM and Kubernetes tests.

Usage: fda_fit.py --out DIR [--verbose 1] [--hold_at_step N] [--report_ports]
                  [--linger_on I --linger S] [--resolver]
                  [--fail_on I --fail_how raise|exit|os_exit|sigkill]

Writes DIR/worker{i}.json: the cluster it joined, its final weights and the
fda/* logs of every step. Options:
    --hold_at_step N: before step N (0-based) of the first epoch, write
        DIR/held{i} (JSON: PID and the cluster's addresses) and wait (at most
        120 s) until the file DIR/go exists; a test uses it to look at the job
        while it trains.
    --report_ports: also record whether each worker's port accepts a TCP
        connection from inside the job.
    --linger_on I --linger S: worker I works S seconds more after training
        (as a chief evaluating a test set would), to test the order of exit.
    --fail_on I --fail_how HOW: worker I fails after fit returned and its
        report is written (HOW: raise an exception, sys.exit(3), os._exit(3)
        or SIGKILL itself), as a peer of a SLURM or Kubernetes job might.
    --resolver: join through connect(cluster_resolver=...) built from
        TF_CONFIG instead of reading TF_CONFIG in connect().
"""

import argparse
import json
import os
import signal
import socket
import sys
import time

import keras_fda

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--verbose", type=int, default=0)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--hold_at_step", type=int, default=None)
parser.add_argument("--report_ports", action="store_true")
parser.add_argument("--linger_on", type=int, default=None)
parser.add_argument("--linger", type=float, default=0.0)
parser.add_argument("--resolver", action="store_true")
parser.add_argument("--fail_on", type=int, default=None)
parser.add_argument("--fail_how", choices=["raise", "exit", "os_exit", "sigkill"], default="raise")
args = parser.parse_args()

if args.resolver:
    import tensorflow as tf

    cluster = keras_fda.connect(
        timeout_seconds=60,
        cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver(),
    )
else:
    cluster = keras_fda.connect(timeout_seconds=60)

import keras  # noqa: E402
import numpy as np  # noqa: E402

index = cluster.worker_index
addresses = cluster.strategy.cluster_resolver.cluster_spec().as_dict()["worker"]


def reachable(address):
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except OSError:
        return False


class Hold(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if batch != args.hold_at_step or self.held:
            return
        self.held = True
        held = os.path.join(args.out, f"held{index}")
        with open(held + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "addresses": addresses}, f)
        os.replace(held + ".tmp", held)  # a reader never sees half of it
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(args.out, "go")):
            if time.monotonic() > deadline:
                sys.exit("fda_fit.py: nobody created the go file")
            time.sleep(0.05)

    held = False


class Logs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append({k: float(v) for k, v in logs.items() if k.startswith("fda/")})


rng = np.random.default_rng(index)
x = (rng.standard_normal((96, 4)) + index).astype("float32")
y = (x.sum(axis=1, keepdims=True) * (1 + index)).astype("float32")
keras.utils.set_random_seed(index)  # different initial weights: FDA must unify them
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(1)])
model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
logs = Logs()
callbacks = [keras_fda.FDACallback(threshold=0.05), logs]
if args.hold_at_step is not None:
    callbacks.insert(0, Hold())
model.fit(
    x, y, batch_size=8, epochs=args.epochs, steps_per_epoch=args.steps, callbacks=callbacks,
    verbose=args.verbose,
)
report = {
    "num_workers": cluster.num_workers,
    "worker_index": index,
    "addresses": addresses,
    "final": np.concatenate([np.ravel(w) for w in model.get_weights()]).tolist(),
    "fda_logs": logs.steps,
}
if args.report_ports:
    report["reachable_inside"] = [reachable(a) for a in addresses]
with open(os.path.join(args.out, f"worker{index}.json"), "w") as f:
    json.dump(report, f)
if index == args.fail_on:
    print(f"worker {index} fails ({args.fail_how})", flush=True)
    if args.fail_how == "raise":
        raise RuntimeError(f"worker {index} fails after fit on purpose")
    if args.fail_how == "exit":
        sys.exit(3)
    if args.fail_how == "os_exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
if index == args.linger_on:
    time.sleep(args.linger)  # more work after training, e.g. an evaluation
print(f"worker {index} done", flush=True)
