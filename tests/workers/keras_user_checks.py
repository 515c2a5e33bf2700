"""FDAStrategy used the way Keras users train, on this process's logical devices.

`strategy_worker.py --scenario keras_user` calls `run_checks` after configuring
the devices. Each check writes what it saw to `<out>/<check>.json`, or the
exception it met (`{"error": ...}`), so one failing check does not hide the
others; tests/test_keras_user.py asserts on them.
"""

import json
import os
import traceback

import keras
import numpy as np
import tensorflow as tf

from keras_fda import FDAStrategy

BATCH = 16


def _data(num_replicas, steps, seed=0):
    """Rows whose labels depend on the replica's slice of each global batch (non-IID)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps * num_replicas * BATCH, 8)).astype("float32")
    shard = (np.arange(len(x)) // BATCH) % num_replicas
    y = ((x[:, 0] + shard * x[:, 1]) > 0).astype("int32")
    return x, y


def _dataset(x, y, num_replicas):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(num_replicas * BATCH)


def _model(dtype=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, "tanh", dtype=dtype),
            keras.layers.BatchNormalization(dtype=dtype),
            keras.layers.Dense(2, dtype=dtype),
        ]
    )


def _compile(model, **kwargs):
    kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1))
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,
        **kwargs,
    )


def _copies(model):
    """Each replica's trainable weights, flattened (no sync), in float64."""
    per_replica = zip(*[w.value.values for w in model.trainable_weights])
    return [np.concatenate([np.ravel(c.numpy()).astype(np.float64) for c in copies])
            for copies in per_replica]


class _Spread(keras.callbacks.Callback):
    """Per step: the largest difference between the replicas, and fda/variance."""

    def __init__(self):
        super().__init__()
        self.spread, self.variance, self.syncs = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        copies = _copies(self.model)
        self.spread.append(max(float(np.max(np.abs(c - copies[0]))) for c in copies))
        self.variance.append(float(logs["fda/variance"]))
        self.syncs.append(float(logs["fda/syncs"]))


def check_dtypes(base, num_replicas):
    """float64 weights (floatx), float16 / bfloat16 dtype policies, with each estimator."""
    x, y = _data(num_replicas, 12)
    found = {}
    for dtype in ("float64", "float16", "bfloat16"):
        for variant in ("naive", "linear", "sketch"):
            name = f"{dtype}-{variant}"
            try:
                strategy = FDAStrategy(base, threshold=0.02, variant=variant)
                with strategy.scope():
                    model = _model(dtype)
                    _compile(model)
                spread = _Spread()
                model.fit(_dataset(x, y, num_replicas), epochs=1, verbose=0, callbacks=[spread])
                weights = np.concatenate([np.ravel(w) for w in model.get_weights()])
                found[name] = dict(
                    dtypes=sorted({w.dtype for w in model.weights}),
                    syncs=strategy.communication.syncs,
                    finite=bool(np.isfinite(weights.astype(np.float64)).all()),
                    # float64 weights averaged in float32 would all be float32 values.
                    float32_exact=bool(
                        np.all(weights.astype(np.float32).astype(weights.dtype) == weights)
                    ),
                    max_spread=max(spread.spread),
                )
            except Exception as error:  # noqa: BLE001 - recorded for the test
                found[name] = dict(error=f"{type(error).__name__}: {error}"[:2000])
    return found


def check_recompile(base, num_replicas):
    """fit, compile again (new optimizer), fit: the second fit must still run FDA."""
    x, y = _data(num_replicas, 20)
    strategy = FDAStrategy(base, threshold=0.05, variant="linear")
    with strategy.scope():
        model = _model()
        _compile(model)
    first = _Spread()
    model.fit(_dataset(x, y, num_replicas), epochs=1, verbose=0, callbacks=[first])
    with strategy.scope():
        _compile(model, optimizer=keras.optimizers.Adam(0.01))
    second = _Spread()
    model.fit(_dataset(x, y, num_replicas), epochs=1, verbose=0, callbacks=[second])
    stats = strategy.communication
    found = dict(
        first_spread=first.spread, second_spread=second.spread,
        second_variance=second.variance, second_syncs=second.syncs,
        steps=stats.steps, optimizer_iterations=int(model.optimizer.iterations.numpy()),
        first_steps=len(first.spread), second_steps=len(second.spread),
    )
    # Recompiling outside the scope, and with settings FDAStrategy refuses.
    for name, kwargs in (
        ("steps_per_execution", dict(steps_per_execution=4)),
        ("jit_compile", dict(jit_compile=True)),
    ):
        try:
            with strategy.scope():
                model.compile(
                    optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy",
                    **{"jit_compile": False, **kwargs},
                )
            model.fit(_dataset(x, y, num_replicas), epochs=1, verbose=0)
            found[name] = "no error"
        except Exception as error:  # noqa: BLE001 - recorded for the test
            found[name] = f"{type(error).__name__}: {error}"[:2000]
    return found


def check_two_fits(base, num_replicas):
    """Two fits of one model, set_weights between: counts add up, a new round starts."""
    x, y = _data(num_replicas, 10)
    strategy = FDAStrategy(base, threshold=1e6, variant="naive")  # only fit's end syncs
    with strategy.scope():
        model = _model()
        _compile(model)
    first = _Spread()
    model.fit(_dataset(x, y, num_replicas), epochs=1, verbose=0, callbacks=[first])
    after_first = strategy.communication.steps
    model.set_weights(_model().get_weights())  # every replica: the initial weights again
    second = _Spread()
    model.fit(_dataset(x, y, num_replicas), epochs=1, verbose=0, callbacks=[second])
    return dict(
        after_first=after_first, steps=strategy.communication.steps,
        syncs=strategy.communication.syncs, iterations=int(model.optimizer.iterations.numpy()),
        # The naive estimate is the mean squared drift from the round's start.
        first_variance=first.variance, second_variance=second.variance,
    )


class _PoisonReplica(keras.callbacks.Callback):
    """Makes the last replica's first weight NaN after step `at`."""

    def __init__(self, at):
        super().__init__()
        self.at, self.step = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == self.at:
            kernel = self.model.trainable_weights[0].value.values[-1]
            kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [np.nan]))


def check_nan(base, num_replicas):
    """A replica whose weights became NaN: a clear error, healthy replicas untouched."""
    x, y = _data(num_replicas, 10)
    found = {}
    for trigger, kwargs in (("fda", dict(threshold=10.0)), ("periodic", dict(tau=3))):
        strategy = FDAStrategy(base, trigger=trigger, **kwargs)
        with strategy.scope():
            model = _model()
            _compile(model)
        try:
            model.fit(_dataset(x, y, num_replicas), epochs=1, verbose=0,
                      callbacks=[_PoisonReplica(4)])
            error = "no error"
        except Exception as e:  # noqa: BLE001 - recorded for the test
            # The whole message: TF puts the op's own after a traceback.
            error = f"{type(e).__name__}: {e}"
        copies = _copies(model)
        found[trigger] = dict(
            error=error, first_replica_finite=bool(np.isfinite(copies[0]).all()),
            steps=strategy.communication.steps,
        )
    return found


CHECKS = {
    "dtypes": check_dtypes,
    "recompile": check_recompile,
    "two_fits": check_two_fits,
    "nan": check_nan,
}


def run_checks(out, base):
    num_replicas = base.num_replicas_in_sync
    for name, check in CHECKS.items():
        try:
            found = check(base, num_replicas)
        except Exception:  # noqa: BLE001 - recorded for the test
            found = {"error": traceback.format_exc()[-4000:]}
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(found, f, default=str)
