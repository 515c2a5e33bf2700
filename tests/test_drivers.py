"""The pieces the drivers share: hooks on Keras objects, model checks, resuming, the dashboard's rounds."""

import contextlib
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fda

from keras_fda.drivers import hooks
from keras_fda.drivers.checkpoint import resume_source
from keras_fda.drivers.model_checks import check_model
from keras_fda.drivers.tensorboard import Dashboard
from keras_fda.engine.accounting import CommunicationStats


class _Counter:
    def __init__(self):
        self.calls = []

    def work(self, value):
        self.calls.append(("work", value))
        return value * 2


def test_a_hook_runs_around_the_method_and_comes_off_again():
    counter = _Counter()
    hooks.hook(counter, "work", before=lambda: counter.calls.append("before"),
               after=lambda: counter.calls.append("after"))
    assert counter.work(3) == 6
    assert counter.calls == ["before", ("work", 3), "after"]
    assert counter.work.__name__ == "work"
    hooks.unhook(counter, ["work", "missing"])
    counter.calls.clear()
    counter.work(1)
    assert counter.calls == [("work", 1)]
    assert "work" not in vars(counter)


def test_unhook_leaves_methods_it_did_not_hook():
    counter = _Counter()
    own = lambda value: "own"  # noqa: E731
    counter.work = own
    hooks.unhook(counter, ["work"])
    assert counter.work is own


@pytest.mark.parametrize("own", [False, True])
def test_run_once_after_runs_the_action_once_and_restores_the_method(own):
    callback = keras.callbacks.Callback()
    seen = []
    if own:
        callback.on_train_end = lambda logs=None: seen.append(("own", logs))
    original = vars(callback).get("on_train_end")
    hooks.run_once_after(callback, "on_train_end", lambda logs: seen.append(("after", logs)))
    callback.on_train_end({"loss": 1.0})
    callback.on_train_end({"loss": 2.0})
    expected_first = [("own", {"loss": 1.0})] if own else []
    assert seen[: len(expected_first) + 1] == expected_first + [("after", {"loss": 1.0})]
    assert ("after", {"loss": 2.0}) not in seen
    assert vars(callback).get("on_train_end") is original


def test_check_model_names_the_driver_and_the_fix():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="FDAStrategy needs a compiled model"):
        check_model(model, "FDAStrategy")
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="built model with trainable weights"):
        check_model(model, "FDACallback")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=4)
    with pytest.raises(ValueError, match="steps_per_execution=1 .* got 4"):
        check_model(model, "FDACallback")


def test_resume_source_picks_the_most_advanced_backup():
    assert resume_source(np.array([[-1, -1], [-1, -1]])) is None
    assert resume_source(np.array([[40, 2], [40, 2]])) == -1
    assert resume_source(np.array([[40, 2], [60, 3], [-1, -1]])) == 1
    with pytest.raises(ValueError, match=r"resumed from: \[40, 60\].*History callback"):
        resume_source(np.array([[40, 2], [60, 3]]), can_choose=False)


def test_dashboard_record_counts_rounds_from_the_last_sync(tmp_path):
    dashboard = Dashboard(str(tmp_path), update_freq=1)
    dashboard.last_sync = 4  # resumed: the round began at step 4

    def stats(steps, syncs):
        return CommunicationStats(num_workers=2, num_params=10, state_bytes=8, steps=steps,
                                  syncs=syncs)

    assert dashboard.record(stats(5, 1), statistic=0.1, threshold=1.0)
    dashboard.record(stats(7, 2), statistic=2.0, threshold=1.0, synced=True)
    dashboard.record(stats(10, 3), statistic=2.0, threshold=1.0, synced=True)
    assert dashboard.round_lengths == [3, 3]
    assert dashboard.last_sync == 10
    dashboard.close()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_sweep_of_fits_and_runs_logs_no_retracing_warning():
    """Each fit or run makes a new engine whose once-per-run functions (the broadcast,
    the final sync) trace once: by design, not the mistake TensorFlow's warning
    ("5 out of the last 5 calls ... triggered tf.function retracing") describes,
    which a sweep of fits used to print from its fifth fit on."""
    x = np.random.default_rng(0).random((64, 4), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype("int32")

    def compiled(strategy=None):
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
        return model

    records = _Records()
    logger = logging.getLogger("tensorflow")
    logger.addHandler(records)
    try:
        for _ in range(5):
            compiled().fit(x, y, batch_size=16, verbose=0,
                           callbacks=[keras_fda.FDACallback(threshold=0.01)])
            strategy = keras_fda.FDAStrategy(tf.distribute.MirroredStrategy(), threshold=0.01)
            compiled(strategy).fit(x, y, batch_size=16, verbose=0)
        simulation = keras_fda.Simulation(compiled(), 2)
        for _ in range(5):
            simulation.run(keras_fda.FDA(threshold=0.01), x, y, [np.arange(32), np.arange(32, 64)],
                           batch_size=16, steps=4)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "retracing" in m], records.messages
