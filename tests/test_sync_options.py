"""Sync options under ordinary Keras use, in one process (issue 21's review).

What a sync touches (only the weights that train, only the optimizer's
moments), what it sends (values a payload dtype cannot hold are not sent in
it), and what a fit ends with when a callback set the weights. The
multi-replica and multi-worker halves are in test_strategy.py and
test_callback_multiworker.py.
"""

import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fda
from keras_fda.policies.outer import moment_variables


def data(rows=128, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 4)) * scale).astype("float32")
    return x, (x[:, :1] * 0.5 - x[:, 1:2] / max(scale, 1.0)).astype("float32")


def mlp(dtype=None, frozen=False, batch_norm=False):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,))]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(dtype=dtype))
    layers += [keras.layers.Dense(8, "tanh", dtype=dtype), keras.layers.Dense(1, dtype=dtype)]
    model = keras.Sequential(layers)
    if frozen:
        model.layers[-2].trainable = False
    return model


def fit(model, fda, optimizer="adam", epochs=2, x=None, y=None, callbacks=()):
    if x is None:
        x, y = data()
    model.compile(optimizer=optimizer, loss="mse")
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=[fda, *callbacks])


# --- 21.2: only the moments ---------------------------------------------------


def test_moments_of_a_loss_scale_optimizer_are_its_inner_slots():
    model = mlp()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01))
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    inner = optimizer.inner_optimizer
    expected = [v.value for v in inner._momentums + inner._velocities]
    assert {id(v) for v in moment_variables(optimizer)} == {id(v) for v in expected}


@pytest.mark.parametrize("state", ["reset", "average"])
def test_reset_under_mixed_float16_keeps_the_loss_scale_and_learning_rate(state):
    """Issue 21.2: reset zeroed the dynamic loss scale and the learning rate: NaN at step ~17."""
    model = mlp(dtype="mixed_float16")
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01))
    fda = keras_fda.FDACallback(trigger="synchronous", optimizer_state=state)
    history = fit(model, fda, optimizer=optimizer, epochs=4)
    assert np.isfinite(history.history["loss"]).all()
    assert float(optimizer.dynamic_scale.numpy()) > 1.0
    assert float(optimizer.inner_optimizer.learning_rate.numpy()) == pytest.approx(0.01)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_reset_leaves_the_ema_weights_alone():
    """Issue 21.2: the EMA copies were zeroed at each sync, then swapped in at the end."""
    finals = {}
    for state in ("local", "reset"):
        model = mlp()
        optimizer = keras.optimizers.Adam(0.01, use_ema=True, ema_overwrite_frequency=None)
        fda = keras_fda.FDACallback(trigger="synchronous", optimizer_state=state)
        fit(model, fda, optimizer=optimizer, epochs=3)
        ema = optimizer._model_variables_moving_average
        assert all(np.any(v.numpy() != 0) for v in ema)
        assert not {id(v.value) for v in ema} & {id(m) for m in moment_variables(optimizer)}
        finals[state] = np.concatenate([w.ravel() for w in model.get_weights()])
    # One worker: the syncs average nothing, only the moments differ.
    assert np.linalg.norm(finals["reset"]) > 0.5 * np.linalg.norm(finals["local"])


def test_reset_returns_adagrad_accumulators_to_their_initial_value():
    model = mlp()
    optimizer = keras.optimizers.Adagrad(0.05, initial_accumulator_value=0.25)
    fit(model, keras_fda.FDACallback(trigger="synchronous", optimizer_state="reset"),
        optimizer=optimizer)  # fmt: skip
    for accumulator in moment_variables(optimizer):
        np.testing.assert_array_equal(accumulator.numpy(), 0.25)
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.05)


# --- 21.3: EarlyStopping(restore_best_weights) with an outer optimizer ---------


def test_restored_best_weights_survive_the_final_sync_of_an_outer_optimizer():
    """Issue 21.3: the final sync took an outer step from w0 toward the restored weights."""
    model = mlp()
    early_stopping = keras.callbacks.EarlyStopping("loss", patience=100, restore_best_weights=True)
    # Worse with each epoch after the first: the best epoch is not the last.
    x, y = data()
    fda = keras_fda.FDACallback(threshold="auto", outer_optimizer="nesterov")
    fit(model, fda, optimizer=keras.optimizers.SGD(0.3), epochs=4, x=x, y=y,
        callbacks=[early_stopping])  # fmt: skip
    assert early_stopping.best_weights is not None
    for found, best in zip(model.get_weights(), early_stopping.best_weights):
        np.testing.assert_array_equal(found, best)
    # The next sync is the outer step again.
    assert float(fda._averager.replaced.numpy()) == 0.0


def test_fda_strategy_keeps_restored_best_weights_with_an_outer_optimizer():
    """The sweep of 21.3 through FDAStrategy: its writers start a new round from the weights."""
    x, y = data()
    strategy = keras_fda.FDAStrategy(
        tf.distribute.MirroredStrategy(["/cpu:0"]), threshold="auto", outer_optimizer="nesterov"
    )
    with strategy.scope():
        model = mlp()
        model.compile(optimizer=keras.optimizers.SGD(0.3), loss="mse")
    early_stopping = keras.callbacks.EarlyStopping("loss", patience=100, restore_best_weights=True)
    model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[early_stopping])
    for found, best in zip(model.get_weights(), early_stopping.best_weights):
        np.testing.assert_array_equal(found, best)


# --- 21.4: frozen layers, and values a payload dtype cannot hold --------------


def test_frozen_layers_are_not_sent_touched_or_counted():
    """Issue 21.4: a frozen Dense was averaged, rounded to bfloat16 and sent at every sync."""
    model = mlp(frozen=True)
    frozen = [w.numpy().copy() for w in model.layers[-2].weights]
    fda = keras_fda.FDACallback(threshold=1e-6, sync_dtype="bfloat16")
    fit(model, fda)
    for w, before in zip(model.layers[-2].weights, frozen):
        np.testing.assert_array_equal(w.numpy(), before)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    stats = fda.communication
    assert stats.syncs > 1
    assert stats.num_params == trainable == 9
    assert stats.sync_bytes == 2 * trainable


def test_frozen_layers_are_left_out_by_the_simulator_and_the_strategy():
    x, y = data()
    model = mlp(frozen=True)
    model.compile(optimizer="adam", loss="mse")
    frozen = [w.numpy().copy() for w in model.layers[-2].weights]
    sim = keras_fda.Simulation(model, 2)
    history = sim.run(keras_fda.FDA("linear", 1e-6), x, y, keras_fda.partition.iid(len(x), 2),
                      sync_dtype="bfloat16", steps=8)  # fmt: skip
    assert history.num_params == 9 and history.sync_bytes == 2 * 9
    for w, before in zip(sim.model.layers[-2].weights, frozen):
        np.testing.assert_array_equal(w.numpy(), before)

    strategy = keras_fda.FDAStrategy(
        tf.distribute.MirroredStrategy(["/cpu:0"]), threshold=1e-6, sync_dtype="bfloat16"
    )
    with strategy.scope():
        model = mlp(frozen=True)
        model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert strategy.communication.num_params == 9 and strategy.communication.syncs > 1
    for w, before in zip(model.layers[-2].weights, frozen):
        np.testing.assert_array_equal(w.numpy(), before)


def test_batch_norm_statistics_above_float16_range_are_averaged_not_overflowed():
    """Issue 21.4: a float16 payload turned a BatchNorm variance above 65504 into Inf."""
    model = mlp(batch_norm=True)
    x, y = data(scale=1000.0)
    fda = keras_fda.FDACallback(threshold=1e-6, sync_dtype="float16")
    fit(model, fda, x=x, y=y)
    variance = model.layers[0].moving_variance.numpy()
    assert np.isfinite(variance).all() and variance.max() > 65504
    monitored = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    statistics = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    # The drift in float16, the statistics as values in float32.
    assert fda.communication.sync_bytes == 2 * monitored + 4 * statistics


# --- minor ------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["periodic", "synchronous"])
def test_exchange_every_with_a_trigger_that_sends_nothing_is_an_error(trigger):
    tau = 4 if trigger == "periodic" else None
    with pytest.raises(ValueError, match="sends nothing between syncs.*exchange_every=7"):
        keras_fda.FDACallback(trigger=trigger, tau=tau, exchange_every=7)


def test_evaluate_with_the_callback_leaves_no_fda_state_to_save(tmp_path):
    model = mlp()
    fda = keras_fda.FDACallback(threshold=1.0)
    fit(model, fda, epochs=1)
    x, y = data(rows=32)
    model.evaluate(x, y, verbose=0, callbacks=[fda])
    model.predict(x, verbose=0, callbacks=[fda])
    assert not hasattr(model, "_fda_state") and "set_weights" not in vars(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as f:
        with h5py.File(f, "r") as weights:
            names = []
            weights.visit(names.append)
    assert names and not any("fda" in n for n in names), names


# --- issue 22.3: the exchange cadence adapts by default -------------------------


def test_one_worker_exchanges_every_step_by_default():
    fda = keras_fda.FDACallback(threshold=1.0)
    fit(mlp(), fda, epochs=1)
    assert fda.exchange_every is None and fda._exchange.every == 1 and fda._exchange.timing is None
    # The default is not an explicit cadence: the blocking exchange accepts it.
    keras_fda.FDACallback(threshold=1.0, overlap=False)
    with pytest.raises(ValueError, match="exchange_every='auto' would be ignored"):
        keras_fda.FDACallback(trigger="periodic", tau=4, exchange_every="auto")
