"""One FDAStrategy scenario on N logical CPU devices, in a fresh process.

Logical devices must be configured before TensorFlow initializes, which the
pytest process has already done, so tests/test_strategy.py runs this script.

    python strategy_worker.py --devices 2 --scenario simulator --trigger fda --out DIR

Scenarios (results in DIR/result.npz):
  simulator: digits (the quickstart data), non-IID shares; FDAStrategy and
      keras_fda.Simulation train from the same weights on the same batches.
      Saves per-step syncs and statistics of both, the largest difference
      between replicas after each step, and the test accuracy of both. The
      strategy writes its dashboard and keras.callbacks.TensorBoard its logs
      to DIR/logs.
  mirrored: trigger "synchronous" with SGD vs plain MirroredStrategy (the
      same math: the average of local SGD steps is the step on the mean
      gradient). Saves the largest weight difference.
  multiworker: the simulator scenario over a MultiWorkerMirroredStrategy, one
      replica per worker process (run under `python -m keras_fda.launch`).
      Each worker saves its per-step weights to DIR/result_<index>.npz; the
      test compares the workers.
  keras_user: what Keras users do besides one fit (tests/test_keras_user.py):
      other weight dtypes, recompiling, several fits, set_weights, a NaN
      replica. Each check's findings go to DIR/<check>.json.
  callbacks: over a MultiWorkerMirroredStrategy (under the launcher), fit with
      EarlyStopping(restore_best_weights=True), ModelCheckpoint(save_best_only)
      and ReduceLROnPlateau, which decide from the epoch's logs. Each worker
      saves its History and final weights to DIR/callbacks_<index>.npz.
  sync: the sync options (`sync_dtype`, `outer_optimizer`, `optimizer_state`)
      on N logical devices, periodic averaging. Per option, DIR/sync_<option>.npz
      holds the spread between the replicas' weights and moments after each
      step, and, for fits of a few steps with no sync but the one ending each
      fit, every replica's weights before that sync and the model after it
      (for a numpy replay of the outer optimizer), the byte counts, and the
      moments' spread after a recompile.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=2)
parser.add_argument(
    "--scenario",
    choices=["simulator", "mirrored", "multiworker", "keras_user", "callbacks", "sync", "settings"],
    default="simulator",
)
parser.add_argument("--trigger", default="fda", help="fda, auto, periodic, synchronous or moments")
parser.add_argument("--threshold", type=float, default=1.5)
parser.add_argument("--tau", type=int, default=5)
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd_clipped"])
parser.add_argument("--model", default="sequential", choices=["sequential", "functional", "subclassed"])
parser.add_argument(
    "--read", default="none", choices=["none", "predict", "save"],
    help="after the last step, inside fit, read the drifted model this way (it must be "
    "averaged first); with none, the end of fit averages it",
)
parser.add_argument(
    "--die_at_step", type=int, default=0,
    help="multiworker: worker 1 exits abruptly after this step (a crashed peer)",
)
parser.add_argument(
    "--sync", default="plain",
    help="simulator/multiworker: the sync options (a key of SYNC_OPTIONS) of the strategy "
    "and the simulator",
)
parser.add_argument("--out", required=True)
args = parser.parse_args()

import json  # noqa: E402
import traceback  # noqa: E402

import tensorflow as tf  # noqa: E402

MULTI_WORKER = args.scenario in ("multiworker", "callbacks", "settings")
if MULTI_WORKER:
    # Before any other TF op: the collective runtime is configured at startup.
    base_strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=120)
    )
    TASK = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
else:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices
    )
    base_strategy = tf.distribute.MirroredStrategy()
    TASK = 0

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_fda import partition, triggers  # noqa: E402
from keras_fda.drivers.simulation import Simulation  # noqa: E402
from keras_fda.partition import batch_schedule  # noqa: E402
from keras_fda.drivers.strategy import FDAStrategy  # noqa: E402

K, BATCH = base_strategy.num_replicas_in_sync, 16


def record_all_reduces():
    """Every all-reduce TF's collectives emit, as (origin, number of values).

    Instrumentation of a TF internal, for the test only: it runs when a
    function is traced, so what the first train step records is what every
    compiled train step all-reduces. Origins: "input" (TF's distributed
    input pipeline), "fda" (keras_fda's strategy), "other" (anything else,
    e.g. Keras all-reducing logged metrics).
    """
    from tensorflow.python.distribute import cross_device_utils

    launcher = cross_device_utils.CollectiveReplicaLauncher
    original = launcher.all_reduce
    calls = []

    def all_reduce(self, value, *args, **kwargs):
        files = [frame.filename for frame in traceback.extract_stack()]
        if any(f.endswith("input_lib.py") for f in files):
            origin = "input"
        elif any(f.endswith(os.path.join("keras_fda", "drivers", "strategy.py")) for f in files):
            origin = "fda"
        else:
            origin = "other"
        calls.append((origin, int(value.shape.num_elements())))
        return original(self, value, *args, **kwargs)

    launcher.all_reduce = all_reduce
    return calls


ALL_REDUCES = record_all_reduces() if MULTI_WORKER else []


def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32").reshape(-1, 64)
    y = data.target.astype("int32")
    order = np.random.default_rng(1234).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


@keras.saving.register_keras_serializable("strategy_worker")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(32, activation="relu")
        self.out = keras.layers.Dense(10)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def make_model():
    keras.utils.set_random_seed(0)
    if args.model == "functional":
        inputs = keras.Input((64,))
        hidden = keras.layers.Dense(32, activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Dense(10)(hidden))
    if args.model == "subclassed":
        model = Subclassed()
        model(np.zeros((1, 64), "float32"))
        return model
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )


def make_optimizer():
    if args.optimizer == "sgd_clipped":
        # Clipping and decay must see each replica's own, unscaled gradient
        # (per-tensor norms here are 0.1-0.5 at the start: the clip is active).
        return keras.optimizers.SGD(0.1, momentum=0.9, clipnorm=0.1, weight_decay=0.01)
    return keras.optimizers.Adam()


def compile_model(model, optimizer=None):
    model.compile(
        optimizer=optimizer or make_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,
    )


def make_trigger():
    if args.trigger == "auto":  # short rounds, so that a short run adapts them
        return triggers.AutoFDA("linear", horizon=8, first_round=8)
    if args.trigger == "periodic":
        return triggers.get("periodic", tau=args.tau)
    if args.trigger == "synchronous":
        return triggers.get("synchronous")
    if args.trigger == "moments":
        # A custom trigger that reads each replica's own optimizer moments.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from sim_vs_real_worker import moment_weighted

        return moment_weighted(args.threshold)
    return triggers.get(args.trigger, threshold=args.threshold)


class Recorder(keras.callbacks.Callback):
    """Per step: fda logs, the largest difference between this process's
    replicas and this process's first replica's weights."""

    def __init__(self, x_test):
        super().__init__()
        self.syncs, self.statistic, self.spread, self.weights = [], [], [], []
        self.loss = []
        self.x_test = x_test
        self.read = {}
        self.first_step_all_reduces = []

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self._recorded = len(ALL_REDUCES)

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.first_step_all_reduces = ALL_REDUCES[self._recorded:]
        if TASK == 1 and batch + 1 == args.die_at_step:
            os._exit(3)
        self.loss.append(float(logs["loss"]))
        self.syncs.append(float(logs["fda/syncs"]))
        self.statistic.append(float(logs["fda/variance"]))
        self.spread.append(spread(self.model))
        self.weights.append(local_weights(self.model))
        if args.read != "none" and batch + 1 == args.steps:
            self.read_drifted_model()

    def read_drifted_model(self):
        """predict() or save() must see the average of the drifted replicas."""
        model = self.model
        average = [np.mean([c.numpy() for c in w.value.values], axis=0) for w in model.weights]
        before = spread(model)
        if args.read == "save":
            path = os.path.join(args.out, "model.keras")
            model.save(path)
            read = keras.models.load_model(path).predict(self.x_test, verbose=0)
        else:
            read = model.predict(self.x_test, verbose=0)
        plain = make_model()
        plain.set_weights(average)
        self.read = dict(
            spread_before_read=before,
            spread_after_read=spread(model),
            read_error=float(np.max(np.abs(read - plain.predict(self.x_test, verbose=0)))),
        )


def local_weights(model):
    """This process's first replica's trainable weights, without a sync."""
    return np.concatenate([w.value.values[0].numpy().ravel() for w in model.trainable_weights])


def spread(model):
    return max(
        (
            float(np.max(np.abs(c.numpy() - w.value.values[0].numpy())))
            for w in model.trainable_weights
            for c in w.value.values[1:]
        ),
        default=0.0,
    )


def simulator_scenario():
    x, y, x_test, y_test = digits()
    parts = partition.sorted_by_label(y, K, fraction=0.5, seed=0)
    schedule = batch_schedule(parts, BATCH, args.steps, seed=0)  # [steps, K, BATCH]
    # Global batch t = the K workers' batches of step t, replica k gets slice k.
    flat = schedule.reshape(-1)
    dataset = tf.data.Dataset.from_tensor_slices((x[flat], y[flat])).batch(K * BATCH)
    # Every worker reads the same global batches and keeps its replicas'
    # slice of each, as the replicas of one process do.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)

    log_dir = os.path.join(args.out, "logs")
    strategy = FDAStrategy(
        base_strategy, trigger=make_trigger(), average_non_trainable=True, log_dir=log_dir,
        **SYNC_OPTIONS[args.sync],
    )
    try:
        FDAStrategy(base_strategy, threshold=1.0)
        second_error = ""
    except ValueError as error:  # expected for a multi-worker base: one runtime per process
        second_error = str(error)
    with strategy.scope():
        model = make_model()
        compile_model(model)
    initial = model.get_weights()
    recorder = Recorder(x_test)
    callbacks = [recorder]
    if args.scenario == "simulator":
        # Keras' own TensorBoard on the same log_dir (one process only).
        callbacks.append(keras.callbacks.TensorBoard(log_dir, update_freq=1))
    model.fit(dataset, epochs=1, verbose=0, callbacks=callbacks)
    after_fit = dict(
        spread_after_fit=spread(model),
        weights_after_fit=local_weights(model),
        syncs_after_fit=strategy.communication.syncs,
    )
    # Every worker's share of the test set, gathered.
    predict_rows = len(model.predict(x_test, verbose=0))
    strategy_eval = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    stats = strategy.communication

    reference = make_model()
    compile_model(reference)
    reference.set_weights(initial)
    history = Simulation(reference, K).run(
        make_trigger(), x, y, parts, batch_size=BATCH, steps=args.steps, seed=0,
        validation_data=(x_test, y_test), **SYNC_OPTIONS[args.sync],
    )
    sim_accuracy = float(history.evaluations["accuracy"][-1])
    name = "result.npz" if args.scenario == "simulator" else f"result_{TASK}.npz"
    np.savez(
        os.path.join(args.out, name),
        weights=np.array(recorder.weights),
        syncs=np.array(recorder.syncs),
        second_error=second_error,
        loss=np.array(recorder.loss),
        statistic=np.array(recorder.statistic),
        spread=np.array(recorder.spread),
        **recorder.read,
        all_reduce_origins=np.array([o for o, _ in recorder.first_step_all_reduces], dtype=str),
        all_reduce_sizes=np.array([n for _, n in recorder.first_step_all_reduces], dtype=int),
        **after_fit,
        predict_rows=predict_rows,
        accuracy=strategy_eval["accuracy"],
        sim_synced=history.synced,
        sim_statistic=history.statistic,
        sim_accuracy=sim_accuracy,
        comm=np.array([stats.steps, stats.syncs, stats.paper_bytes, stats.num_params]),
        sim_comm=np.array([
            history.communication().steps, history.communication().syncs,
            history.communication().paper_bytes, history.num_params,
        ]),
    )


def mirrored_scenario():
    x, y, _, _ = digits()
    n = args.steps * K * BATCH
    dataset = tf.data.Dataset.from_tensor_slices((x[:n], y[:n])).batch(K * BATCH)
    results = []
    for strategy in (
        FDAStrategy(tf.distribute.MirroredStrategy(), trigger="synchronous"),
        tf.distribute.MirroredStrategy(),
    ):
        with strategy.scope():
            model = make_model()
            compile_model(model, keras.optimizers.SGD(0.1))
        model.fit(dataset, epochs=1, verbose=0)
        results.append(model.get_weights())
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(*results))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(results[0], make_model().get_weights()))
    np.savez(os.path.join(args.out, "result.npz"), diff=diff, moved=moved)


def callbacks_scenario():
    """Callbacks that decide from the epoch's logs, on every worker of a cluster."""
    x, y, _, _ = digits()
    # Each worker its own half of the classes: the workers' losses differ a lot.
    mine = (y < 5) if TASK == 0 else (y >= 5)
    x, y = x[mine][:320], y[mine][:320]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = dataset.with_options(options)
    strategy = FDAStrategy(base_strategy, trigger=make_trigger())
    with strategy.scope():
        model = make_model()
        compile_model(model, keras.optimizers.SGD(0.05))
    callbacks = [
        keras.callbacks.EarlyStopping(
            "loss", min_delta=0.15, patience=1, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            os.path.join(args.out, f"best_{TASK}.weights.h5"), "loss", save_best_only=True,
            save_weights_only=True,
        ),
        keras.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=0, min_delta=0.19),
    ]
    history = model.fit(dataset, epochs=10, verbose=0, callbacks=callbacks)
    np.savez(
        os.path.join(args.out, f"callbacks_{TASK}.npz"),
        loss=np.array(history.history["loss"]),
        accuracy=np.array(history.history["accuracy"]),
        lr=np.array(history.history["learning_rate"]),
        final=np.concatenate([np.ravel(w) for w in model.get_weights()]),
        stopped_epoch=callbacks[0].stopped_epoch,
    )


SYNC_OPTIONS = {
    "plain": {},
    "bfloat16": dict(sync_dtype="bfloat16"),
    "float16": dict(sync_dtype="float16"),
    "nesterov": dict(outer_optimizer=keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)),
    "nesterov_bfloat16": dict(
        sync_dtype="bfloat16",
        outer_optimizer=keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
    ),
    "nesterov_int8": dict(
        sync_dtype="int8",
        outer_optimizer=keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
    ),
    "average": dict(optimizer_state="average"),
    "reset": dict(optimizer_state="reset"),
    # Issue 21.1: a half-precision drift and float32 moments in one sync.
    "bfloat16_average": dict(sync_dtype="bfloat16", optimizer_state="average"),
    "float16_average": dict(sync_dtype="float16", optimizer_state="average"),
}


def moment_spread(model):
    """The largest difference between the replicas' copies of the optimizer's moments."""
    from keras_fda.policies.outer import moment_variables

    return max(
        (
            float(np.max(np.abs(c.numpy() - m.values[0].numpy())))
            for m in moment_variables(model.optimizer)
            for c in m.values[1:]
        ),
        default=0.0,
    )


def replicas(model):
    """[replica][weight] values of the trainable weights, without a sync."""
    copies = [w.value.values for w in model.trainable_weights]
    return [[c[k].numpy() for c in copies] for k in range(len(copies[0]))]


def sync_scenario():
    x, y, _, _ = digits()
    parts = partition.sorted_by_label(y, K, fraction=0.5, seed=0)
    schedule = batch_schedule(parts, BATCH, args.steps, seed=0)
    flat = schedule.reshape(-1)
    dataset = tf.data.Dataset.from_tensor_slices((x[flat], y[flat])).batch(K * BATCH)

    class Spread(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.syncs, self.spread, self.moments, self.moment_norm = [], [], [], []
            self.before_sync = None

        def on_train_batch_end(self, batch, logs=None):
            self.syncs.append(float(logs["fda/syncs"]))
            self.spread.append(spread(self.model))
            self.moments.append(moment_spread(self.model))
            from keras_fda.policies.outer import moment_variables

            self.moment_norm.append(max(
                (
                    float(np.max(np.abs(m.values[0].numpy())))
                    for m in moment_variables(self.model.optimizer)
                ),
                default=0.0,
            ))
            self.before_sync = replicas(self.model)

    for name, options in SYNC_OPTIONS.items():
        found = {}
        # Periodic syncs inside the compiled step.
        strategy = FDAStrategy(base_strategy, trigger=make_trigger(), **options)
        with strategy.scope():
            model = make_model()
            compile_model(model)
        recorder = Spread()
        try:
            model.fit(dataset, epochs=1, verbose=0, callbacks=[recorder])
        except ValueError as e:  # a quantized drift on several replicas per worker
            np.savez(os.path.join(args.out, f"sync_{name}.npz"), error=str(e))
            continue
        stats = strategy.communication
        found.update(
            syncs=np.array(recorder.syncs), spread=np.array(recorder.spread),
            moment_spread=np.array(recorder.moments), moment_norm=np.array(recorder.moment_norm),
            sync_bytes=stats.sync_bytes, paper_bytes=stats.paper_bytes,
            comm=np.array([stats.steps, stats.syncs, stats.num_params, stats.state_bytes]),
            moment_params=sum(
                int(np.prod(v.shape)) for v in model.optimizer.variables
                if v is not model.optimizer.iterations and "learning_rate" not in v.path
            ),
        )
        # Recompiled with a new optimizer: the rule acts on its moments. The
        # round goes on: 3 steps, the third a sync.
        with strategy.scope():
            compile_model(model)
        recorder = Spread()
        model.fit(dataset.take(3), epochs=1, verbose=0, callbacks=[recorder])
        found.update(
            recompiled_syncs=np.array(recorder.syncs),
            recompiled_moment_spread=np.array(recorder.moments),
            recompiled_moment_norm=np.array(recorder.moment_norm),
        )
        # Fits of 4 steps that sync only at their end (the final-sync path):
        # each replica's weights just before it, and the model after it.
        strategy = FDAStrategy(base_strategy, trigger="periodic", tau=10**6, **options)
        with strategy.scope():
            model = make_model()
            compile_model(model, keras.optimizers.SGD(0.05))
        initial = [w.numpy() for w in model.trainable_weights]
        before, after = [], []
        for fit in range(3):
            recorder = Spread()
            model.fit(dataset.skip(4 * fit).take(4), epochs=1, verbose=0, callbacks=[recorder])
            before.append(recorder.before_sync)
            after.append([w.value.values[0].numpy() for w in model.trainable_weights])
            found[f"final_spread_{fit}"] = spread(model)
        for i in range(len(initial)):
            found[f"initial_{i}"] = initial[i]
            found[f"before_{i}"] = np.array([[r[i] for r in b] for b in before])
            found[f"after_{i}"] = np.array([a[i] for a in after])
        np.savez(os.path.join(args.out, f"sync_{name}.npz"), **found)


if args.scenario == "settings":
    # Issue 21.6: a differently configured worker must fail at once, not hang.
    try:
        FDAStrategy(base_strategy, threshold=0.001 if TASK == 0 else 1000.0)
    except ValueError as e:
        print(f"ValueError: {e}")
        raise SystemExit(3)
elif args.scenario == "mirrored":
    mirrored_scenario()
elif args.scenario == "sync":
    sync_scenario()
elif args.scenario == "keras_user":
    from keras_user_checks import run_checks  # noqa: E402

    run_checks(args.out, base_strategy)
elif args.scenario == "callbacks":
    callbacks_scenario()
else:
    simulator_scenario()
