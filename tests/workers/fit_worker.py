"""A worker for the multi-process tests: trains with FDACallback and records everything.

Started by `python -m keras_fda.launch --workers N tests/workers/fit_worker.py --out DIR ...`.
Writes `DIR/worker{i}.npz` with this worker's data, the weights after each local
step (before FDA acts), the weights after FDA acted, the logged statistic and
sync count per step, the initial and final weights and the communication totals.
"""

import argparse
import hashlib
import json
import os
import signal
import sys

import keras_fda

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--trigger", default="fda")
parser.add_argument("--variant", default=None)
parser.add_argument("--threshold", type=float, default=None)
parser.add_argument("--tau", type=int, default=None)
parser.add_argument("--threshold_on_last", type=float, default=None,
                    help="the last worker's threshold (a misconfigured worker)")
parser.add_argument("--blocking", action="store_true", help="FDACallback(overlap=False)")
parser.add_argument("--exchange_every", default="1",
                    help='an int, "auto", or "default" (the callback\'s default)')
parser.add_argument("--sync_dtype", default=None)
parser.add_argument("--outer", choices=["none", "nesterov"], default="none",
                    help="nesterov: outer SGD(0.7, momentum=0.9, nesterov=True) (DiLoCo)")
parser.add_argument("--optimizer_state", default="local")
parser.add_argument("--model", choices=["mlp", "linear"], default="mlp")
parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--rows", type=int, default=128, help="samples on this worker")
parser.add_argument("--extra_rows_on_last", type=int, default=0)
parser.add_argument("--hidden_on_last", type=int, default=16, help="hidden units, last worker")
parser.add_argument("--dtype_on_last", default="float32", help="layer dtype, last worker")
parser.add_argument("--batch_size", type=int, default=16)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--steps_per_epoch", type=int, default=None)
parser.add_argument("--repeat", action="store_true")
parser.add_argument("--stop_at_step_on_last", type=int, default=None,
                    help="the last worker stops training after this step (like EarlyStopping)")
parser.add_argument("--nan_at_step_on_last", type=int, default=None,
                    help="the last worker's first weight becomes NaN at this step")
parser.add_argument("--backup_dir", default=None,
                    help="use keras.callbacks.BackupAndRestore in DIR/worker{i}")
parser.add_argument("--pause_after_step", type=int, default=None,
                    help="write DIR/pid{i} after this step and wait to be killed")
parser.add_argument("--pause_only_last", action="store_true",
                    help="only the last worker pauses at --pause_after_step")
parser.add_argument("--unknown_length", action="store_true",
                    help="hide the dataset's length from Keras (as a generator would)")
parser.add_argument("--collective_timeout", type=float, default=60)
parser.add_argument("--wanted_lag", type=float, default=None,
                    help='with --exchange_every auto: the lag every worker asks for, in place '
                    "of the one its timings give (a slow link's cadence, deterministic)")
parser.add_argument("--early_stopping_after_fda", action="store_true",
                    help="EarlyStopping(restore_best_weights=True) listed after FDACallback")
parser.add_argument("--fits", type=int, default=1, help="call fit this many times")
parser.add_argument("--save_after_fit", action="store_true",
                    help="model.save() after fit; record the weight groups of the file")
parser.add_argument("--pause_at_epoch_end_on_last", type=int, default=None,
                    help="every worker writes DIR/pid{i} at the end of this epoch (1-based), "
                    "before BackupAndRestore saves; the last one then waits to be killed")
parser.add_argument("--pid_after_step", type=int, default=None,
                    help="write DIR/pid{i} after this step (for tests that kill workers)")
parser.add_argument("--cases", default=None,
                    help="a JSON list of flag lists: one fit per case, one after another in "
                    "these processes, each with the flags above and its own (a case's "
                    "--collective_timeout is ignored: the cluster is already connected), "
                    "writing DIR/case{j}/worker{i}.npz")
args = parser.parse_args()

cluster = keras_fda.connect(timeout_seconds=args.collective_timeout)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_fda.policies import cadence  # noqa: E402

measured_lag = cadence.StepTiming.wanted


def flat_weights(model, trainable_only=False):
    weights = model.trainable_weights if trainable_only else model.weights
    return np.concatenate([np.ravel(w.numpy()) for w in weights])


class AfterLocalStep:
    """The model's weights right after each local step, before FDA acts on them.

    FDACallback acts inside the compiled step, so no callback sees these
    weights: the wrapped `train_step` copies them there, before FDA's part.
    """

    def __init__(self, model):
        self.model = model
        self.copies = [tf.Variable(w.value, trainable=False) for w in model.weights]
        train_step = model.train_step

        def copying_train_step(data):
            logs = train_step(data)
            for copy, w in zip(self.copies, model.weights):
                copy.assign(w.value)
            return logs

        model.train_step = copying_train_step

    @property
    def weights(self):
        return list(zip(self.model.weights, self.copies))


def flat_copies(snapshot, trainable_only=False):
    return np.concatenate(
        [np.ravel(c.numpy()) for w, c in snapshot.weights if w.trainable or not trainable_only]
    )


class Recorder(keras.callbacks.Callback):
    """Records flattened weights (and, after FDACallback, its logs) per step.

    With `snapshot` (an `AfterLocalStep`), the weights it copied after the
    local step; otherwise the model's weights at batch end (after FDA).
    """

    def __init__(self, snapshot=None):
        super().__init__()
        self.snapshot = snapshot
        self.weights, self.trainable, self.logs, self.moments = [], [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        # FDACallback takes worker 0's weights just before the first step.
        if not self.logs:
            self.initial = flat_weights(self.model)
            self.initial_trainable = flat_weights(self.model, trainable_only=True)

    def on_train_batch_end(self, batch, logs=None):
        if len(self.logs) in (args.pid_after_step, args.pause_after_step):
            with open(os.path.join(args.out, f"pid{cluster.worker_index}"), "w") as f:
                f.write(str(os.getpid()))
            last = cluster.worker_index == cluster.num_workers - 1
            if len(self.logs) == args.pause_after_step and (last or not args.pause_only_last):
                signal.pause()  # a deterministic point for the test to kill this worker
        if self.snapshot is None:
            self.weights.append(flat_weights(self.model))
            self.trainable.append(flat_weights(self.model, trainable_only=True))
        else:
            self.weights.append(flat_copies(self.snapshot))
            self.trainable.append(flat_copies(self.snapshot, trainable_only=True))
        self.moments.append(
            np.concatenate(
                [np.zeros(0)] + [np.ravel(v.numpy()) for v in self.model.optimizer.variables[2:]]
            )
        )
        self.logs.append(dict(logs))


class PauseAtEpochEnd(keras.callbacks.Callback):
    """Between the end of an epoch and BackupAndRestore's save of it (listed before it)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == args.pause_at_epoch_end_on_last:
            with open(os.path.join(args.out, f"pid{cluster.worker_index}"), "w") as f:
                f.write(str(os.getpid()))
            if cluster.worker_index == cluster.num_workers - 1:
                signal.pause()  # killed here: its backup stays one epoch behind


class Sabotage(keras.callbacks.Callback):
    """On the last worker: stops training early or poisons a weight (fault tests)."""

    def __init__(self):
        super().__init__()
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == args.stop_at_step_on_last:
            self.model.stop_training = True
        if self.step == args.nan_at_step_on_last:
            kernel = self.model.trainable_weights[0]
            kernel.assign(tf.tensor_scatter_nd_update(kernel.value, [[0, 0]], [np.nan]))


def sketch_digest(trigger):
    """A fingerprint of the sketch's hash tables ('' for other estimators)."""
    sketch = getattr(getattr(trigger, "estimator", None), "sketch", None)
    if sketch is None:
        return ""
    ids = np.concatenate([i.numpy() for i in sketch._segment_ids])
    return hashlib.sha256(ids.tobytes()).hexdigest()


def saved_keys(model, path):
    """What `model.save` writes after fit: the weight groups of the .keras file."""
    import h5py
    import zipfile

    model.save(path)
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as f:
        with h5py.File(f, "r") as weights:
            names = []
            weights.visit(names.append)
    return sorted(n for n in names if n.count("/") <= 1)


def main():
    if args.wanted_lag is None:
        cadence.StepTiming.wanted = measured_lag
    else:
        cadence.StepTiming.wanted = lambda self: args.wanted_lag
    index, k = cluster.worker_index, cluster.num_workers
    rows = args.rows + (args.extra_rows_on_last if index == k - 1 else 0)
    rng = np.random.default_rng(100 + index)
    # Worker-specific shift: non-IID data, so the workers' models drift apart.
    x = (rng.standard_normal((rows, 6)) + index).astype("float32")
    keras.utils.set_random_seed(7 + index)  # different inits: the broadcast must fix them
    if args.model == "linear":
        y = (x @ np.arange(1, 7, dtype="float32")[:, None] * (1 + index)).astype("float32")
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
        loss = "mse"
    else:
        y = (x[:, 0] + x[:, 1] * (index - 0.5) > index).astype("int32")
        last = index == k - 1
        dtype = args.dtype_on_last if last else "float32"
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(args.hidden_on_last if last else 16, "tanh", dtype=dtype),
                keras.layers.BatchNormalization(dtype=dtype),
                keras.layers.Dense(2, dtype=dtype),
            ]
        )
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = (
        keras.optimizers.Adam(args.lr)
        if args.optimizer == "adam"
        else keras.optimizers.SGD(args.lr)
    )
    model.compile(optimizer=optimizer, loss=loss)

    data = tf.data.Dataset.from_tensor_slices((x, y))
    if args.repeat:
        data = data.repeat()
    if args.unknown_length:
        data = data.filter(lambda *_: True)
    data = data.batch(args.batch_size)
    threshold = args.threshold
    if args.threshold_on_last is not None and index == k - 1:
        threshold = args.threshold_on_last
    fda = keras_fda.FDACallback(
        threshold=threshold, variant=args.variant, trigger=args.trigger, tau=args.tau,
        overlap=not args.blocking,
        exchange_every=(
            None if args.exchange_every == "default"
            else args.exchange_every if args.exchange_every == "auto"
            else int(args.exchange_every)
        ),
        sync_dtype=args.sync_dtype, optimizer_state=args.optimizer_state,
        outer_optimizer=(
            keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)
            if args.outer == "nesterov" else None
        ),
    )
    before, after = Recorder(AfterLocalStep(model)), Recorder()
    callbacks = [before, fda, after]
    if index == k - 1:
        callbacks.insert(0, Sabotage())
    early_stopping = None
    if args.early_stopping_after_fda:
        early_stopping = keras.callbacks.EarlyStopping(
            "loss", patience=100, restore_best_weights=True
        )
        callbacks.insert(callbacks.index(fda) + 1, early_stopping)
    if args.backup_dir:
        backup = os.path.join(args.backup_dir, f"worker{index}")
        if args.pause_at_epoch_end_on_last:
            callbacks.append(PauseAtEpochEnd())
        callbacks.append(keras.callbacks.BackupAndRestore(backup))
    fit_steps, step_traces = [], []
    try:
        for _ in range(args.fits):
            model.fit(
                data,
                epochs=args.epochs,
                steps_per_epoch=args.steps_per_epoch,
                callbacks=callbacks,
                verbose=0,
            )
            fit_steps.append(fda.communication.steps)
            # The compiled function each step runs.
            step_function = fda._step_function
            step_traces.append(step_function.experimental_get_tracing_count())
    except ValueError as e:
        print(f"ValueError: {e}")
        raise SystemExit(3)
    except FloatingPointError as e:
        print(f"FloatingPointError: {e}")
        np.save(os.path.join(args.out, f"nan_final{index}.npy"), flat_weights(model))
        raise SystemExit(4)

    stats = fda.communication
    np.savez(
        os.path.join(args.out, f"worker{index}.npz"),
        x=x,
        y=y,
        initial=after.initial,
        initial_trainable=after.initial_trainable,
        sketch_digest=sketch_digest(fda.trigger),
        before=np.stack(before.weights),
        after=np.stack(after.weights),
        before_trainable=np.stack(before.trainable),
        after_trainable=np.stack(after.trainable),
        after_moments=np.stack(after.moments),
        sync_bytes=fda.communication.sync_bytes,
        statistic=np.array([l["fda/variance"] for l in after.logs]),
        syncs=np.array([l["fda/syncs"] for l in after.logs]),
        threshold=np.array([l["fda/threshold"] for l in after.logs]),
        comm_bytes=np.array([l["fda/comm_bytes"] for l in after.logs]),
        final=flat_weights(model),
        exchange_auto=fda._exchange.timing is not None,
        best=(
            np.concatenate([np.ravel(w) for w in early_stopping.best_weights])
            if early_stopping is not None else np.zeros(0)
        ),
        fit_steps=np.array(fit_steps),
        step_traces=np.array(step_traces),
        optimizer_iterations=int(model.optimizer.iterations.numpy()),
        saved_keys=json.dumps(
            saved_keys(model, os.path.join(args.out, f"model{index}.keras"))
            if args.save_after_fit else []
        ),
        threads=len(os.listdir("/proc/self/task")),
        trainable_shapes=json.dumps([list(w.shape) for w in model.trainable_weights]),
        stats=json.dumps(
            dict(
                paper_bytes=stats.paper_bytes,
                wire_bytes=stats.wire_bytes,
                syncs=stats.syncs,
                steps=stats.steps,
                num_params=stats.num_params,
                state_bytes=stats.state_bytes,
            )
        ),
    )


if args.cases is None:
    main()
else:
    base = args.out
    for j, case in enumerate(json.loads(args.cases)):
        out = os.path.join(base, f"case{j}")
        os.makedirs(out, exist_ok=True)
        print(f"=== case {j}", flush=True)
        args = parser.parse_args([*sys.argv[1:], *map(str, case), "--out", out])
        main()
