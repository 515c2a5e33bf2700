"""One worker of benchmarks/lm_links.py (started by it inside benchmarks/network.py).

Argument: one JSON spec (see lm_links.py's `worker_spec`). For each method of
the spec, in order, this worker trains examples/language_model.py's byte-level
GPT on its own share of the standard library's source for `steps` steps:

* `mwms`: plain Keras data parallelism, the model built and compiled in the
  scope of the cluster's `tf.distribute.MultiWorkerMirroredStrategy` (the
  one `keras_fda.connect()` made), the gradients all-reduced every step;
* `fda`: a local model and `keras_fda.FDACallback(**kwargs)` (a periodic
  trigger longer than the run is the local-only run: no communication until
  the final sync).

The clock of a run is the sum of the intervals between consecutive batch
ends (the first step, which traces, only starts it) plus FDACallback's final
sync; it stops while the workers evaluate the synchronized model on the
held-out modules (every `eval_every` steps when every step synchronizes, else
at the first sync at least `eval_every` steps after the last evaluation; the
chief also after fit). Every worker evaluates, so that a method that sends
nothing between syncs does not let the other worker train on alone while
the chief evaluates (on shared cores each would then compute faster than
in lockstep; BENCHMARKS.md, section 5); only the chief reports. A run of a
method in `budget_methods` stops once its clock passes `budget_s`:
FDACallback stops the other worker after its next step; under
MWMS the workers agree on the chief's decision every `eval_every` steps (an
epoch), with the clock paused.

Worker 0 prints one `LM_RESULT {json}` line per run, every worker one
`LM_TX {json}` line (the bytes its link sent during the run).
"""

import json
import sys

SPEC = json.loads(sys.argv[1])

import keras_fda  # noqa: E402

# TensorFlow's collective runtime must start before any other TF op.
CLUSTER = keras_fda.connect(timeout_seconds=SPEC.get("collective_timeout_s", 120))

import importlib.util  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("WARNING")
ROOT = pathlib.Path(__file__).resolve().parents[1]
IS_CHIEF = CLUSTER.is_chief


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "language_model_example", ROOT / "examples" / "language_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LM = _load_example()
MODULES = LM.stdlib_modules()
SHARD_CACHE = {}
(X_VAL, Y_VAL), _ = LM.load_validation_data(
    seq_len=SPEC["seq_len"], max_bytes=SPEC["val_bytes"], seed=SPEC["seed"], modules=MODULES)


def shard(index):
    """Worker `index`'s training windows (x, y)."""
    if index not in SHARD_CACHE:
        SHARD_CACHE[index], _ = LM.load_worker_data(
            index, CLUSTER.num_workers, seq_len=SPEC["seq_len"],
            max_bytes=SPEC["bytes_per_worker"], seed=SPEC["seed"], modules=MODULES)
    return SHARD_CACHE[index]


def dataset(index, batches=1):
    """Worker `index`'s shuffled batches of `batches` x batch_size windows."""
    x, y = shard(index)
    return (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=SPEC["seed"] + index).repeat()
            .batch(batches * SPEC["batch_size"], drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def build():
    """The same initial weights on every worker and in every run."""
    keras.utils.set_random_seed(SPEC["seed"])
    return LM.make_model(seq_len=SPEC["seq_len"], dim=SPEC["dim"], layers=SPEC["layers"],
                         heads=SPEC["heads"], seed=SPEC["seed"])


def compiled(model):
    return LM.compile_model(model, steps=SPEC["steps"], learning_rate=SPEC["learning_rate"],
                            warmup_steps=max(1, SPEC["steps"] // 10))


def link_tx_bytes():
    """Bytes this worker's link (eth0 of its namespace) has sent so far."""
    try:
        return int(pathlib.Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())
    except OSError:
        return 0


class LinkClock(keras.callbacks.Callback):
    """Training clock (batch end to batch end), evaluations with it paused, the budget.

    `always_synced`: every step leaves the synchronized model (MWMS,
    synchronous); otherwise a step synchronized when FDACallback's
    `fda/syncs` log grew. `stats`: a callable giving FDACallback's
    `communication` (None for MWMS). List it after FDACallback.
    """

    def __init__(self, evaluate, always_synced, stats=None, agree=None, budget=True):
        super().__init__()
        self.evaluate, self.always_synced, self.stats, self.agree, self.budget = (
            evaluate, always_synced, stats, agree, budget)
        self.steps = self.syncs = 0
        self.durations, self.points = [], []
        self.trace = []  # (step, ms, synced) of every timed step
        self.clock, self.final_sync_s = 0.0, 0.0
        self.capped = False
        self._prev, self._last_eval, self._tx0 = None, 0, link_tx_bytes()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.steps += 1
        syncs = int((logs or {}).get("fda/syncs", 0))
        synced = self.always_synced or syncs > self.syncs
        self.syncs = self.steps if self.always_synced else syncs
        if self._prev is not None:
            self.durations.append(now - self._prev)
            self.trace.append((self.steps, 1e3 * (now - self._prev), synced))
            self.clock += now - self._prev
        self._prev = now
        if self.evaluate and synced and self.steps - self._last_eval >= SPEC["eval_every"]:
            self.record()
        if (IS_CHIEF and self.budget and self.clock > SPEC["budget_s"]
                and self.steps < SPEC["steps"]):
            self.capped = True
            if self.agree is None:  # FDACallback stops the other worker
                self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.agree is not None:  # MWMS: both workers stop at the same step
            if self.agree(self.capped):
                self.capped = True
                self.model.stop_training = True
            self._prev = time.perf_counter()

    def on_train_end(self, logs=None):
        # FDACallback's final sync ran just before (it is listed first).
        now = time.perf_counter()
        if self._prev is not None:
            self.final_sync_s = now - self._prev
            self.clock += self.final_sync_s

    def record(self):
        self._last_eval = self.steps
        stats = self.stats() if self.stats else None
        loss = self.evaluate()
        self.points.append({
            "step": self.steps, "clock_s": self.clock, "syncs": self.syncs, "loss": loss,
            "tx_bytes": link_tx_bytes() - self._tx0,
            "paper_bytes": stats.paper_bytes if stats else None,
        })
        self._prev = time.perf_counter()  # evaluation is not training time


def patch_keras_for_mwms():
    """Works around Keras 3.15's `fit` under a multi-worker strategy (TF backend).

    Its per-step logs reduction calls `strategy.reduce("MEAN", loss, axis=0)`
    on the scalar loss, which fails to trace ("Invalid reduction dimension 0
    for input with 0 dimensions"): reduce the logs with `axis=None` (the same
    one all-reduce of the logs per step, as Keras intends).
    """
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(
                strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    trainer.reduce_per_replica = reduce_per_replica


def agree_on(strategy):
    """A function all workers call together: True where the chief's flag is."""
    def agree(flag):
        mine = float(flag) if IS_CHIEF else 0.0
        per_replica = strategy.run(lambda: tf.constant(mine))
        return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) > 0)
    return agree


def run(method):
    eval_model = build()
    eval_model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def evaluate():
        eval_model.set_weights(model.get_weights())
        return float(eval_model.evaluate(X_VAL, Y_VAL, batch_size=256, verbose=0))

    fit_args = dict(epochs=1, steps_per_epoch=SPEC["steps"], verbose=0)
    if method["kind"] == "mwms":
        strategy = CLUSTER.strategy
        patch_keras_for_mwms()
        with strategy.scope():
            model = compiled(build())
        # Keras distributes the dataset itself: each worker's own share, not
        # sharded again, in global batches that it splits into batch_size per worker.
        train = dataset(CLUSTER.worker_index, batches=CLUSTER.num_workers)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF)
        train = train.with_options(options)
        if IS_CHIEF:
            first = next(iter(strategy.experimental_distribute_dataset(train)))[0]
            print(f"mwms: per-replica batch {strategy.experimental_local_results(first)[0].shape}",
                  flush=True)
        # Keras 3.15's fit under a multi-worker strategy all-reduces the first
        # (x, y) batch to build the model symbolically, which TF's reduce
        # rejects (a tuple: "Attempt to convert a value (PerReplica...)"): build
        # it from a local batch instead, as Keras does without a strategy.
        local_batch = next(iter(dataset(CLUSTER.worker_index)))
        model._maybe_symbolic_build = lambda iterator=None, data_batch=None: (
            type(model)._maybe_symbolic_build(model, data_batch=local_batch))
        agree = agree_on(strategy)
        agree(False)  # traced once, outside the clock
        every = SPEC["eval_every"]
        fit_args.update(epochs=-(-SPEC["steps"] // every), steps_per_epoch=every)
        callbacks, fda = [], None
    else:
        model = compiled(build())
        train, agree = dataset(CLUSTER.worker_index), None
        fda = keras_fda.FDACallback(**method["kwargs"])
        callbacks = [fda]
    clock = LinkClock(evaluate,
                      always_synced=method.get("always_synced", False),
                      stats=(lambda: fda.communication) if fda else None, agree=agree,
                      budget=method["name"] in SPEC["budget_methods"])
    started = time.perf_counter()
    model.fit(train, callbacks=callbacks + [clock], **fit_args)
    fit_wall = time.perf_counter() - started
    last = clock.points[-1]["step"] if clock.points else None
    if IS_CHIEF and not (clock.always_synced and last == clock.steps):
        clock.record()  # the model fit leaves (after the final sync)
    tx = link_tx_bytes() - clock._tx0
    print("LM_TX " + json.dumps({"method": method["name"], "tx_bytes": tx}), flush=True)
    if not IS_CHIEF:
        return
    stats = fda.communication if fda else None
    durations = np.array(clock.durations)
    print("LM_RESULT " + json.dumps({
        "method": method["name"], "kind": method["kind"], "params": model.count_params(),
        "steps": clock.steps, "capped": clock.capped, "syncs": stats.syncs if stats else None,
        "clock_s": clock.clock, "final_sync_s": clock.final_sync_s, "fit_wall_s": fit_wall,
        "mean_step_ms": 1e3 * float(durations.mean()) if durations.size else None,
        "median_step_ms": 1e3 * float(np.median(durations)) if durations.size else None,
        # Where a mean far above the median comes from: load spikes, syncs, or FDA's work.
        "slowest_steps": sorted(clock.trace, key=lambda t: -t[1])[:12],
        "sync_steps_ms": sum(ms for _, ms, synced in clock.trace if synced),
        "paper_bytes": stats.paper_bytes if stats else None,
        "ring_wire_bytes": stats.wire_bytes if stats else None,
        "tx_bytes_worker0": tx, "points": clock.points, "load": os.getloadavg(),
    }), flush=True)


def main():
    for method in SPEC["methods"]:
        run(method)


if __name__ == "__main__":
    main()
