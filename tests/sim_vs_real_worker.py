"""One real worker of the simulator-vs-real test (tests/test_simulation.py).

Run as `python -m keras_fda.launch --workers 2 tests/sim_vs_real_worker.py --out=DIR
--cases CASE...`. For each case, one after another in the same processes (as a
user's job runs several fits), each worker trains a fresh model of the shared
setup below with a new `FDACallback` on its partition, in the data order
`keras_fda.partition.batch_schedule` gives the simulator, and writes
`DIR/{case}_worker{i}.npz`: the per-step statistic and sync count from the
batch logs, and the final weights. The test imports the same setup to run the
simulator, so both sides see one definition of data, model and trigger.
"""

import argparse
import pathlib

NUM_WORKERS = 2
NUM_SAMPLES = 240
BATCH_SIZE = 8
STEPS = 40
DATA_SEED = 3
# Calibrated so that the linear trigger fires a few times in STEPS steps,
# neither never nor every step.
THRESHOLD = 0.02
MOMENT_THRESHOLD = 3e-5


def make_data():
    import numpy as np

    rng = np.random.default_rng(DATA_SEED)
    x = rng.standard_normal((NUM_SAMPLES, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype("int32") + (x[:, 3] > 1).astype("int32")
    return x, y


def make_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    return model


def moment_weighted(threshold):
    """A custom trigger that reads each local copy's optimizer, as `SyncTrigger.watch` allows:
    sync when the workers' mean of `sum(v * u^2)` (drift u, the worker's own Adam second
    moments v) exceeds `threshold`."""
    import tensorflow as tf

    import keras_fda

    class MomentWeighted(keras_fda.SyncTrigger):
        name = "moment-weighted"
        state_size = 1
        threshold = 1.0  # the statistic is in units of `threshold`, so tolerances are relative

        def watch(self, *optimizers):
            self.optimizers = optimizers

        @staticmethod
        def _state(drift, optimizer):
            total = tf.add_n([tf.reduce_sum(v * tf.square(u))
                              for u, v in zip(drift, optimizer._velocities)])  # fmt: skip
            return tf.reshape(total, [1])

        def local_state(self, drift, round_state):
            return self._state(drift, self.optimizers[0])

        def mean_local_state(self, drifts, round_state):
            states = [self._state(d, o) for d, o in zip(drifts, self.optimizers, strict=True)]
            return tf.reduce_mean(tf.stack(states), axis=0)

        def statistic(self, mean_state, steps_since_sync):
            return mean_state[0] / threshold

        def should_sync(self, statistic, steps_since_sync):
            return statistic > 1.0

    return MomentWeighted()


def make_trigger(name="linear"):
    """The trigger under test: linear FDA, the self-adapting one (short rounds here), or one
    that reads each worker's own optimizer moments."""
    import keras_fda

    if name == "auto":
        return keras_fda.AutoFDA("linear", horizon=6, first_round=4)
    if name == "moments":
        return moment_weighted(MOMENT_THRESHOLD)
    return keras_fda.FDA("linear", threshold=THRESHOLD)


def outer_optimizer(name="linear"):
    """The recommended pairing: auto with DiLoCo's outer step; linear FDA plain."""
    return "nesterov" if name == "auto" else None


def case_name(trigger, lag, sync_dtype):
    """The `--cases` entry (and file prefix) of one fit."""
    return f"{trigger}-{lag}-{sync_dtype}"


def make_partitions():
    from keras_fda import partition

    return partition.iid(NUM_SAMPLES, NUM_WORKERS, seed=DATA_SEED)


def main():
    import keras_fda

    cluster = keras_fda.connect(timeout_seconds=60)

    import keras
    import numpy as np

    from keras_fda.partition import batch_schedule

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--cases", nargs="+", default=[case_name("linear", 1, None)],
        help="trigger-lag-sync_dtype for each fit, run one after another in this process "
        "(trigger linear, auto or moments; lag 1: the overlapped exchange, 0: overlap=False)",
    )
    args = parser.parse_args()
    out = pathlib.Path(args.out)

    x, y = make_data()
    order = batch_schedule(make_partitions(), BATCH_SIZE, STEPS, seed=DATA_SEED)
    mine = order[:, cluster.worker_index].reshape(-1)
    for case in args.cases:
        trigger, lag, sync_dtype = case.split("-")
        statistic, syncs = [], []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                statistic.append(logs["fda/variance"])
                syncs.append(logs["fda/syncs"])

        model = make_model()
        model.fit(
            x[mine],
            y[mine],
            batch_size=BATCH_SIZE,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras_fda.FDACallback(
                    trigger=make_trigger(trigger),
                    overlap=lag == "1",
                    exchange_every=1,  # decisions that do not depend on timing
                    outer_optimizer=outer_optimizer(trigger),
                    sync_dtype=None if sync_dtype == "None" else sync_dtype,
                ),
                Record(),
            ],
        )
        weights = {f"weight{i}": w for i, w in enumerate(model.get_weights())}
        np.savez(
            out / f"{case}_worker{cluster.worker_index}.npz",
            statistic=np.array(statistic),
            syncs=np.array(syncs),
            **weights,
        )


if __name__ == "__main__":
    main()
