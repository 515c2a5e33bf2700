"""FDACallback and connect() in one process: logs, History/CSVLogger, and clear errors."""

import csv
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fda
from keras_fda.runtime import cluster as cluster_lib
from conftest import launch


def compiled_model(**compile_kwargs):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse", **compile_kwargs)
    return model


def data(rows=64):
    rng = np.random.default_rng(0)
    return rng.standard_normal((rows, 4)).astype("float32"), rng.standard_normal((rows, 3))


def test_logs_reach_history_and_csv_logger(tmp_path):
    model = compiled_model()
    x, y = data()
    fda = keras_fda.FDACallback(threshold=1e-3, variant="naive")
    path = tmp_path / "log.csv"
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0,
        callbacks=[fda, keras.callbacks.CSVLogger(str(path))],
    )
    for key in ("fda/variance", "fda/threshold", "fda/syncs", "fda/comm_bytes"):
        assert len(history.history[key]) == 2
    assert history.history["fda/threshold"] == [1e-3, 1e-3]
    rows = list(csv.DictReader(open(path)))
    assert [float(r["fda/syncs"]) for r in rows] == history.history["fda/syncs"]
    stats = fda.communication
    assert stats.steps == 8 and stats.num_workers == 1
    # One worker: a sync is the identity, but the decisions are still made.
    assert stats.syncs >= 1


def test_communication_before_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="has not been used in fit"):
        keras_fda.FDACallback(threshold=1.0).communication


@pytest.mark.parametrize("compiled", [False, True])
def test_rejects_models_that_are_not_compiled_or_not_built(compiled):
    model = keras.Sequential([keras.layers.Dense(3)])  # no Input: not built
    if compiled:
        model.compile(optimizer="adam", loss="mse")
    fda = keras_fda.FDACallback(threshold=1.0)
    fda.set_model(model)
    with pytest.raises(ValueError, match="compiled model" if not compiled else "built model"):
        fda.on_train_begin()


def test_rejects_steps_per_execution_above_one():
    model = compiled_model(steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        model.fit(*data(), epochs=1, verbose=0, callbacks=[keras_fda.FDACallback(threshold=1.0)])


def test_rejects_models_built_in_a_strategy_scope():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = compiled_model()
    with pytest.raises(ValueError, match="outside any tf.distribute strategy"):
        model.fit(*data(), epochs=1, verbose=0, callbacks=[keras_fda.FDACallback(threshold=1.0)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=None), "needs a threshold"),
        (dict(threshold=-1.0), "positive finite"),
        (dict(threshold=1.0, variant="cubic"), "Unknown FDA variant"),
        (dict(trigger="gossip"), "Unknown trigger"),
        (dict(trigger="periodic"), "needs tau"),
        (dict(trigger="synchronous", threshold=1.5), "does not use threshold"),
        (dict(trigger="periodic", tau=4, threshold=1.0, variant="naive"),
         "does not use threshold, variant"),
        (dict(trigger="kamp", threshold=1.0, tau=3), "does not use tau"),
        (dict(threshold=1.0, tau=3), "does not use tau"),
        (dict(trigger=keras_fda.Periodic(4), threshold=1.0), "does not use threshold"),
        (dict(threshold=1.0, exchange_every=0), "integer >= 1, \"auto\" or None"),
        (dict(threshold=1.0, exchange_every="fast"), "integer >= 1, \"auto\" or None"),
        (dict(threshold=1.0, exchange_every=2.5), "integer >= 1, \"auto\" or None"),
        (dict(threshold=1.0, exchange_every=4, overlap=False), "needs overlap=True"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_fda.FDACallback(**kwargs)


@pytest.mark.parametrize(
    "ratio, period", [(0.0, 1), (0.8, 1), (1.0, 2), (8.0, 10), (1e6, 100), (float("nan"), 100)]
)
def test_exchange_period_hides_the_measured_round_trip(ratio, period):
    from keras_fda.policies.cadence import exchange_period

    assert exchange_period(ratio) == period


def test_auto_wants_the_lag_that_hides_the_round_trip_and_bounds_the_cost():
    from keras_fda.policies.cadence import StepTiming, agreed_lag

    def step(timing, exchange_s=0.0, fda_s=0.0, in_graph=True):
        timing.measured({"train_s": 0.010, "exchange_s": exchange_s, "fda_s": fda_s,
                         "received": True, "composed": True, "synced": False}, in_graph)

    cheap = StepTiming()
    step(cheap, exchange_s=0.0002, fda_s=0.0004)  # 4% of the step: every step
    assert cheap.wanted() == 1.0
    costly = StepTiming()
    step(costly, exchange_s=0.0005, fda_s=0.0013)  # 13% of a step per message
    assert costly.wanted() == 3.0
    costly.measured({"train_s": 0.010, "exchange_s": 0.0, "fda_s": 0.400, "received": True,
                     "composed": True, "synced": True}, True)
    assert costly.wanted() == 3.0  # a sync's own time is not a message's cost
    slow_link = StepTiming()
    step(slow_link, exchange_s=0.050)  # a 50 ms round trip on a 10 ms step
    # 1.25 x 5 -> 7 steps to hide it, in the background: received one call later.
    assert slow_link.wanted() == 8.0
    background = StepTiming()
    background.step_ended(), background.step_ended()
    background._step = 0.010
    background.exchanged(round_trip=0.050, waited=0.0)  # on the background thread
    assert background.wanted() == 8.0
    lags = [agreed_lag(x, 64) for x in (1.0, 1.5, 4.0, float("nan"), 1e9)]
    assert lags == [1, 2, 4, 100, 100]
    assert [agreed_lag(100.0, lag) for lag in (1, 2, 8, 60)] == [2, 4, 16, 100]


@pytest.mark.parametrize("exchange_every", [1, 3, "auto"])
def test_overlapped_exchange_decides_one_exchange_later(exchange_every):
    """One worker: every decision uses a state sent `exchange_every` steps before."""
    model = compiled_model()
    x, y = data()
    fda = keras_fda.FDACallback(threshold=1e9, variant="naive", exchange_every=exchange_every)
    logged = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: logged.append(logs["fda/variance"])
    )
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[fda, record])
    # "auto" starts at 1 and measures; the first state is sent after step 0.
    first_decision = 3 if exchange_every == 3 else 1
    assert np.isnan(logged[:first_decision]).all()
    assert not np.isnan(logged[first_decision:]).any()
    assert fda._exchange.in_flight is None  # collected at the end
    assert fda.communication.steps == 8


def test_a_lag_that_grows_past_one_does_not_retrace_the_step():
    """exchange_every="auto" on a slow link moves from the in-graph exchange to the
    background one mid-fit; that switch retraced the step (15-28 s for a language model)."""
    x, y = data(rows=160)
    traces = {}
    for grow in (False, True):
        # Lag 1 throughout, or grown to 2 at step 3 as "auto" grows it on a slow link.
        fda = keras_fda.FDACallback(threshold=1e9, variant="naive", exchange_every=1)

        def lag_two(batch, logs, fda=fda, grow=grow):
            if grow and batch == 3:
                fda._exchange.every = 2

        model = compiled_model()
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
            fda, keras.callbacks.LambdaCallback(on_train_batch_end=lag_two)])  # fmt: skip
        traces[grow] = fda._step_function.experimental_get_tracing_count()
        assert fda.communication.steps == 10
    assert traces[True] == traces[False]


def test_auto_lag_at_most_doubles_per_exchange(monkeypatch):
    """A collected background message's wishes are agreed on once: the lag grew
    4x per exchange (2, 8, 32) when the compiled step agreed on them again."""
    from keras_fda.policies import cadence

    monkeypatch.setattr(cadence.StepTiming, "wanted", lambda self: 64.0)  # a very slow link
    fda = keras_fda.FDACallback(threshold=1e9, variant="naive", exchange_every="auto")
    lags = []
    compiled_model().fit(*data(rows=1600), batch_size=16, epochs=1, verbose=0, callbacks=[
        fda, keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: lags.append(
            fda._exchange.every))])  # fmt: skip
    assert sorted(set(lags)) == [1, 2, 4, 8, 16, 32, 64]
    # A lag of L holds until its message is collected, L steps later.
    assert [lags.count(lag) for lag in (4, 8, 16, 32)] == [4, 8, 16, 32]


def _trained(fda=None, **compile_kwargs):
    keras.utils.set_random_seed(3)
    model = compiled_model(**compile_kwargs)
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
              callbacks=[fda] if fda else [])
    return model


@pytest.mark.parametrize(
    "compile_kwargs", [{}, {"jit_compile": True}, {"run_eagerly": True}],
    ids=["graph", "xla", "eager"],
)
def test_the_step_fda_compiles_into_trains_exactly_like_keras_own(compile_kwargs):
    """One worker: FDA's step inside the train function leaves training as Keras does it.

    XLA compiles only the training (collectives stay outside it); eagerly the
    same code runs op by op.
    """
    plain = _trained()
    fda = keras_fda.FDACallback(threshold=1e-12, variant="naive")  # a (no-op) sync every step
    model = _trained(fda, **compile_kwargs)
    for a, b in zip(plain.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The lagged decision: each sync starts a round whose first message has no drift.
    assert fda.communication.steps == 8 and fda.communication.syncs == 4


def test_fit_hands_the_train_function_back_even_after_an_error():
    model = compiled_model()
    x, y = data()
    fda = keras_fda.FDACallback(threshold=1.0)

    class Fail(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("a callback failed")

    with pytest.raises(RuntimeError, match="a callback failed"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[fda, Fail()])
    steps = fda.communication.steps
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # no FDA here
    assert fda.communication.steps == steps
    assert not hasattr(model.train_function, "_fda_keras")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[fda])
    assert fda.communication.steps == steps + 4
    assert not hasattr(model.train_function, "_fda_keras")  # handed back at train end


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "not valid JSON"),
        ('{"cluster": {"worker": ["a:1"]}}', "needs a 'cluster' and a 'task'"),
        ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
        ('{"cluster": {"worker": ["a:1", "b:2"], "ps": ["c:3"]}, '
         '"task": {"type": "worker", "index": 0}}', "'worker' tasks only"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
         r"index must be an integer in \[0, 2\)"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}',
         "task.type must be 'worker'"),
    ],
)
def test_malformed_tf_config_is_rejected(config, message):
    with pytest.raises(ValueError, match=message):
        cluster_lib.parse_tf_config(config)


def test_callback_refuses_to_train_alone_when_tf_config_names_a_cluster(monkeypatch):
    monkeypatch.setattr(cluster_lib, "_current", None)
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}',
    )
    with pytest.raises(RuntimeError, match="keras_fda.connect\\(\\) was not called"):
        keras_fda.FDACallback(threshold=1.0).cluster


def test_connect_after_tensorflow_ran_ops_is_a_clear_error(tmp_path):
    script = tmp_path / "late_connect.py"
    script.write_text(
        "import tensorflow as tf\n"
        "tf.constant(1.0) + 1\n"
        "import keras_fda\n"
        "keras_fda.connect()\n"
    )
    result = launch(2, script, timeout=60)
    assert result.returncode != 0
    assert "must run before TensorFlow executes any op" in result.stdout


def test_connect_without_tf_config_is_one_local_worker(monkeypatch):
    monkeypatch.setattr(cluster_lib, "_current", None)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    cluster = keras_fda.connect()
    assert (cluster.num_workers, cluster.worker_index, cluster.is_chief) == (1, 0, True)
    with pytest.raises(ValueError, match="timeout_seconds"):
        keras_fda.connect(timeout_seconds=0)


def test_missing_tensorflow_gives_an_install_hint():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "import keras_fda\n"
        "try:\n    keras_fda.FDACallback\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install keras-fda[cpu]" in result.stdout


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", ["naive", "linear", "sketch", "exact"])
def test_weights_of_any_float_dtype_train_and_average(dtype, variant):
    """Issue 12.3: a float32 direction or sketch met float64 weights (TypeError)."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype=dtype)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    fda = keras_fda.FDACallback(threshold=1e-4, variant=variant)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[fda])
    assert all(w.dtype == dtype for w in model.weights)
    assert np.isfinite(history.history["fda/variance"]).all()
    assert fda.communication.syncs >= 1
    if dtype == "float64":
        # Averaged in float64: the weights are not rounded to float32 values, and a sync
        # moves 8 bytes per parameter.
        kernel = model.weights[0].numpy()
        assert np.any(kernel.astype(np.float32).astype(np.float64) != kernel)
    assert fda.communication.param_bytes == (8 if dtype == "float64" else 4)


def test_load_weights_saved_without_fda_after_and_during_fit(tmp_path):
    """Issue 12.5: loading pretrained weights into a model trained with FDA failed."""
    pretrained = compiled_model()
    path = str(tmp_path / "pretrained.weights.h5")
    pretrained.save_weights(path)

    model = compiled_model()
    x, y = data()
    fda = keras_fda.FDACallback(threshold=1.0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[fda])
    model.load_weights(path)
    for a, b in zip(model.get_weights(), pretrained.get_weights()):
        np.testing.assert_array_equal(a, b)

    class LoadAtFirstEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.model.load_weights(path)  # the FDA state is attached during fit

    steps = fda.communication.steps
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[fda, LoadAtFirstEpochEnd()])
    assert fda.communication.steps == steps + 8  # the FDA state was left as it was


def test_a_checkpoint_written_during_fit_loads_into_a_plain_model(tmp_path):
    model = compiled_model()
    x, y = data()
    path = str(tmp_path / "during.weights.h5")
    model.fit(
        x, y, batch_size=16, epochs=1, verbose=0,
        callbacks=[keras_fda.FDACallback(threshold=1.0),
                   keras.callbacks.ModelCheckpoint(path, save_weights_only=True)],
    )
    plain = compiled_model()
    plain.load_weights(path)  # the file's extra FDA state is ignored
    for a, b in zip(plain.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
