"""One worker of benchmarks/time_to_accuracy.py (started by it inside benchmarks/network.py).

Argument: one JSON spec (see time_to_accuracy.py). Modes:

  tta       for each model and each strategy: `model.fit` with `FDACallback`
            on this worker's label-skewed share of the FEMNIST digits; the
            chief evaluates the synchronized model after syncs and prints one
            `TTA_RESULT {json}` line per run
  per_step  per-step wall time of local / FDA no-sync / periodic between syncs
            / synchronous steps, interleaved in rounds; `TTA_PER_STEP {json}`
  strategy  the same training through `FDAStrategy` over
            `MultiWorkerMirroredStrategy` (FDA); `TTA_RESULT {json}`

The clock of a run starts after its first step (tracing, connection set-up
and the initial broadcast are the same for every strategy and not part of
training) and stops while the chief evaluates. Each step's time is split at
two points: before FDACallback's hook runs (compute: data, train step, Keras'
loop) and after it (the exchange: the state all-reduce, or the flag, and on a
sync step the weights' average, counted as sync time).
"""

import json
import sys

SPEC = json.loads(sys.argv[1])
# Collectives may wait this long (a peer evaluating, a slow sync): TF starts a
# watchdog thread per collective that sleeps this long, so not much longer.
COLLECTIVE_TIMEOUT_SECONDS = 90

# TF's collective runtime must be configured before any other TF op.
if SPEC["mode"] == "strategy":
    import tensorflow as tf

    BASE_STRATEGY = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS
        )
    )
    WORKER_INDEX = BASE_STRATEGY.cluster_resolver.task_id
    NUM_WORKERS = BASE_STRATEGY.num_replicas_in_sync
else:
    import keras_fda

    CLUSTER = keras_fda.connect(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
    WORKER_INDEX, NUM_WORKERS = CLUSTER.worker_index, CLUSTER.num_workers

import os  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_fda  # noqa: E402
from keras_fda import partition  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

IS_CHIEF = WORKER_INDEX == 0
NUM_CLASSES = 10


def link_tx_bytes():
    """Bytes this worker's link (eth0 of its namespace) has sent so far."""
    try:
        with open("/sys/class/net/eth0/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return 0


def load_data():
    """This worker's Dirichlet share of the FEMNIST digits, and a fixed test subset."""
    data = np.load(SPEC["data"])
    train = data["y_train"] < NUM_CLASSES
    test = data["y_test"] < NUM_CLASSES

    def images(x):
        return (x[..., None] / np.float32(255)).astype(np.float32)

    x, y = images(data["x_train"][train]), data["y_train"][train].astype(np.int32)
    parts = partition.dirichlet(y, NUM_WORKERS, SPEC["alpha"], seed=SPEC["seed"])
    x_test, y_test = images(data["x_test"][test]), data["y_test"][test].astype(np.int32)
    keep = np.random.default_rng(SPEC["seed"]).permutation(len(y_test))[: SPEC["test_samples"]]
    return x, y, parts, x_test[keep], y_test[keep]


X, Y, PARTS, X_TEST, Y_TEST = load_data()


def worker_dataset(share):
    ds = tf.data.Dataset.from_tensor_slices((X[share], Y[share]))
    ds = ds.shuffle(len(share), seed=SPEC["seed"] + WORKER_INDEX).repeat()
    return ds.batch(SPEC["batch_size"], drop_remainder=True).prefetch(tf.data.AUTOTUNE)


class _Hook(keras.callbacks.Callback):
    def __init__(self, begin=None, end=None, train_end=None):
        super().__init__()
        self._begin, self._end, self._train_end = begin, end, train_end

    def on_train_batch_begin(self, batch, logs=None):
        if self._begin:
            self._begin()

    def on_train_batch_end(self, batch, logs=None):
        if self._end:
            self._end(logs)

    def on_train_end(self, logs=None):
        if self._train_end:
            self._train_end()


class StepClock:
    """Times every step around FDACallback: `before` goes first in the list, `after` last.

    Records, per step, its wall time, the part before FDA's hook (compute)
    and FDA's part (exchange, or sync on a step that synchronized). With
    `evaluate`, it evaluates after syncs (at most every `eval_every` steps)
    with the clock paused; with `budget_s`, it stops training after that
    much clock. Every worker evaluates at the same steps (only the chief
    reports): were only the chief to pause, under a fixed period the other
    worker would train on alone until the next sync, and on shared cores
    each would then compute faster than in lockstep (BENCHMARKS.md,
    section 5).
    """

    def __init__(self, evaluate=None, eval_every=1, budget_s=None):
        self.evaluate, self.eval_every, self.budget_s = evaluate, eval_every, budget_s
        self.before = _Hook(begin=self._begin, end=self._computed)
        self.after = _Hook(end=self._done, train_end=self._train_end)
        self.steps, self.syncs = 0, 0
        self.durations, self.compute, self.exchange, self.synced = [], [], [], []
        self.clock = 0.0
        self.split = {"compute_s": 0.0, "exchange_s": 0.0, "sync_s": 0.0}
        self.points = []
        self._last_eval_step = 0
        self._prev = None

    def _begin(self):
        self._t0 = time.perf_counter()

    def _computed(self, logs):
        self._t1 = time.perf_counter()

    def _done(self, logs):
        t2 = time.perf_counter()
        syncs = int(logs.get("fda/syncs", 0)) if logs else 0
        synced, self.syncs = syncs > self.syncs, syncs
        self.steps += 1
        if self._prev is not None:  # the first step only starts the clock
            step, fda = t2 - self._prev, t2 - self._t1
            self.durations.append(step)
            self.compute.append(self._t1 - self._t0)
            self.exchange.append(fda)
            self.synced.append(synced)
            self.clock += step
            self.split["sync_s" if synced else "exchange_s"] += fda
            self.split["compute_s"] += step - fda
        self._prev = t2
        if self.evaluate is None:
            return
        if synced and self.steps - self._last_eval_step >= self.eval_every:
            self.record()
        if self.budget_s is not None and self.clock > self.budget_s:
            self.after.model.stop_training = True

    def _train_end(self):
        # FDACallback's final sync ran just before this hook.
        t = time.perf_counter()
        if self._prev is not None:
            self.clock += t - self._prev
            self.split["sync_s"] += t - self._prev
        self._prev = t

    def record(self):
        self._last_eval_step = self.steps
        accuracy = self.evaluate()
        self.points.append({
            "step": self.steps, "clock_s": self.clock, "syncs": self.syncs,
            "accuracy": accuracy, "tx_bytes": link_tx_bytes(), **self.split,
        })
        self._prev = time.perf_counter()  # evaluation is not training time


def accuracy_of(model):
    return float(model.evaluate(X_TEST, Y_TEST, batch_size=500, verbose=0)[1])


def fda_callback(strategy, num_params):
    if strategy["trigger"] == "fda":
        return keras_fda.FDACallback(threshold=strategy["theta_c"] * num_params, variant="linear")
    if strategy["trigger"] == "periodic":
        return keras_fda.FDACallback(trigger="periodic", tau=strategy["tau"])
    if strategy["trigger"] == "never":
        return keras_fda.FDACallback(
            threshold=1e30, variant="linear", overlap=strategy.get("overlap", True),
            exchange_every=strategy.get("exchange_every", 1),
        )
    return keras_fda.FDACallback(trigger=strategy["trigger"])


def report(clock, model_name, num_params, strategy, driver, syncs, tx0, started):
    """Evaluates the model after fit's final sync; prints the run's `TTA_RESULT` line."""
    clock.record()
    for p in clock.points:
        p["tx_bytes"] -= tx0
    print("TTA_RESULT " + json.dumps({
        "model": model_name, "params": num_params, "strategy": strategy["name"],
        "driver": driver, "steps": clock.steps, "syncs": syncs,
        "fit_wall_s": time.perf_counter() - started, "points": clock.points,
        "median_step_ms": 1e3 * float(np.median(clock.durations)),
    }), flush=True)


def run_tta(model_name, strategy):
    model = models.build(model_name, NUM_CLASSES, seed=SPEC["seed"])
    num_params = model.count_params()
    fda = fda_callback(strategy, num_params)
    clock = StepClock(
        evaluate=lambda: accuracy_of(model), eval_every=SPEC["eval_every"],
        budget_s=SPEC["budget_s"] if IS_CHIEF else None,
    )
    tx0, started = link_tx_bytes(), time.perf_counter()
    model.fit(
        worker_dataset(PARTS[WORKER_INDEX]), epochs=1, steps_per_epoch=SPEC["steps"], verbose=0,
        callbacks=[clock.before, fda, clock.after],
    )
    if IS_CHIEF:
        report(clock, model_name, num_params, strategy, "FDACallback", fda.communication.syncs,
               tx0, started)


def run_strategy(model_name, strategy):
    # A plain twin of the model: its size sets Theta, and it evaluates the average.
    eval_model = models.build(model_name, NUM_CLASSES, seed=SPEC["seed"])
    num_params = eval_model.count_params()
    fda_strategy = keras_fda.FDAStrategy(
        BASE_STRATEGY, threshold=strategy["theta_c"] * num_params, variant="linear"
    )
    with fda_strategy.scope():
        model = models.build(model_name, NUM_CLASSES, seed=SPEC["seed"])

    def evaluate():
        # Right after a sync every replica holds the average: this worker's copy is it.
        eval_model.set_weights([w.numpy() for w in model.weights])
        return accuracy_of(eval_model)

    clock = StepClock(evaluate, SPEC["eval_every"], budget_s=None)
    train = fda_strategy.distribute_datasets_from_function(
        lambda context: worker_dataset(PARTS[context.input_pipeline_id])
    )
    tx0, started = link_tx_bytes(), time.perf_counter()
    model.fit(train, epochs=1, steps_per_epoch=SPEC["steps"], verbose=0,
              callbacks=[clock.before, clock.after])
    if IS_CHIEF:
        report(clock, model_name, num_params, strategy, "FDAStrategy",
               fda_strategy.communication.syncs, tx0, started)


PER_STEP_SECTIONS = {
    "local": None,
    "fda_nosync": {"trigger": "never"},
    "fda_blocking": {"trigger": "never", "overlap": False},
    "fda_every_auto": {"trigger": "never", "exchange_every": "auto"},
    "periodic_32": {"trigger": "periodic", "tau": 32},
    "synchronous": {"trigger": "synchronous"},
}


def run_per_step(model_name):
    model = models.build(model_name, NUM_CLASSES, seed=SPEC["seed"])
    dataset = worker_dataset(PARTS[WORKER_INDEX])
    samples = {name: {"step": [], "compute": [], "exchange": []} for name in PER_STEP_SECTIONS}
    for _ in range(SPEC["rounds"]):
        for name, strategy in PER_STEP_SECTIONS.items():
            steps = SPEC["sync_steps"] if name == "synchronous" else SPEC["steps"]
            clock = StepClock()
            callbacks = [clock.before] + ([fda_callback(strategy, 0)] if strategy else [])
            model.fit(dataset, epochs=1, steps_per_epoch=SPEC["warmup"] + steps + 1, verbose=0,
                      callbacks=callbacks + [clock.after])
            keep = slice(SPEC["warmup"], None)
            # Between syncs only: the periodic section's sync steps are left out.
            between = name != "periodic_32" or None
            for key, values in (("step", clock.durations), ("compute", clock.compute),
                                ("exchange", clock.exchange)):
                samples[name][key] += [
                    v for v, s in zip(values[keep], clock.synced[keep]) if between or not s
                ]
    if IS_CHIEF:
        print("TTA_PER_STEP " + json.dumps({
            "model": model_name, "params": model.count_params(),
            "load": os.getloadavg(),
            "sections": {
                name: {k: float(np.median(v)) * 1e3 for k, v in s.items()} | {"n": len(s["step"])}
                for name, s in samples.items()
            },
        }), flush=True)


def main():
    for model_name in SPEC["models"]:
        if SPEC["mode"] == "per_step":
            run_per_step(model_name)
            continue
        for strategy in SPEC["strategies"]:
            (run_strategy if SPEC["mode"] == "strategy" else run_tta)(model_name, strategy)


if __name__ == "__main__":
    main()
