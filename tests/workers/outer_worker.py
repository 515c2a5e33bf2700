"""A worker for tests/test_outer.py: the SyncRule core over TF's real collectives.

Started by `python -m keras_fda.launch --workers N tests/workers/outer_worker.py --out DIR
--cases CASE...`. For each case (a sync rule's settings), one after another, each
worker holds its own weights and an inner Adam; every round it moves both by its
own random steps (standing in for local training), then syncs in one compiled
function, inside `tf.cond`, as a driver would: payload, all-reduce MEAN
(`CollectiveTransport`), average, outer step, moments. Writes
`DIR/{case}_worker{i}.npz`: the weights and moments before each sync, and the
weights, w0, moments and outer optimizer variables after it.
"""

import argparse

import keras_fda

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--cases", nargs="+", required=True,
                    help="sync_dtype,outer,optimizer_state for each case, run one after "
                    "another (sync_dtype None: float32; outer none or diloco)")
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()

cluster = keras_fda.connect(timeout_seconds=60)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_fda.policies.outer import SyncRule, moment_variables  # noqa: E402

transport = cluster.transport
index = transport.worker_index
shapes = [(5, 4), (4,)]


def all_reduce(tensors):
    """One collective for a list of equally typed tensors: flatten, MEAN, split."""
    if not tensors:
        return []
    flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)
    mean = transport.all_reduce(flat, "mean")
    sizes = [int(np.prod(t.shape)) for t in tensors]
    return [tf.reshape(p, t.shape) for p, t in zip(tf.split(mean, sizes), tensors)]


def run_case(sync_dtype, outer_name, optimizer_state):
    """Every round: local moves, then a sync; returns what each round recorded."""
    start = np.random.default_rng(0)  # the same w0 on every worker
    weights = [tf.Variable(start.normal(size=s).astype(np.float32)) for s in shapes]
    reference = [tf.Variable(w.read_value()) for w in weights]
    inner = keras.optimizers.Adam(0.01)
    inner.build(weights)
    moments = moment_variables(inner)
    outer = None
    if outer_name == "diloco":
        outer = keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)
    rule = SyncRule(sync_dtype=None if sync_dtype == "None" else sync_dtype,
                    outer_optimizer=outer, optimizer_state=optimizer_state)  # fmt: skip
    sync = rule.build(reference, tf.float32)

    @tf.function
    def sync_step(decided):
        def synchronize():
            payload = sync.payload([w.read_value() for w in weights],
                                   [r.read_value() for r in reference])  # fmt: skip
            means = sync.mean_weights(all_reduce(payload))
            mean_moments = all_reduce(sync.moments_payload(moments))
            new = sync.step(means)
            for w, value in zip(weights, new):
                w.assign(tf.cast(value, w.dtype))
            for r, value in zip(reference, new):
                r.assign(value)
            sync.update_moments(moments, mean_moments)
            return tf.constant(True)

        return tf.cond(decided, synchronize, lambda: tf.constant(False))

    record = {}
    rng = np.random.default_rng([1, index])  # each worker its own "training"
    for r in range(args.rounds):
        for w in weights:
            w.assign_add(rng.normal(scale=0.05, size=w.shape).astype(np.float32))
        inner.apply([tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes], weights)
        sync_step(tf.constant(False))  # a step without a sync changes nothing
        for i, w in enumerate(weights):
            record[f"before{r}_w{i}"] = w.numpy()
        for i, m in enumerate(moments):
            record[f"before{r}_m{i}"] = m.numpy()
        assert bool(sync_step(tf.constant(True)))
        for i, (w, ref) in enumerate(zip(weights, reference)):
            record[f"after{r}_w{i}"] = w.numpy()
            record[f"after{r}_ref{i}"] = ref.numpy()
        for i, m in enumerate(moments):
            record[f"after{r}_m{i}"] = m.numpy()
        for i, v in enumerate(sync.state_variables()):
            record[f"after{r}_outer{i}"] = v.numpy()
    return record


for case in args.cases:
    np.savez(f"{args.out}/{case}_worker{index}.npz", **run_case(*case.split(",")))
print(f"worker {index} done", flush=True)
