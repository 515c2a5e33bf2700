"""Triggers, accounting and the single-worker averager (no collectives involved)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_fda.policies import triggers
from keras_fda.engine.accounting import CommunicationStats
from keras_fda.engine.averager import WorkerAverager
from keras_fda.runtime.transport import LocalTransport


def test_fda_boundary_equal_does_not_sync_just_above_does():
    trigger = triggers.FDA("naive", threshold=4.0)
    assert not bool(trigger.should_sync(tf.constant(4.0), 1))
    assert bool(trigger.should_sync(tf.constant(np.nextafter(np.float32(4.0), np.float32(5))), 1))


def test_averager_boundary_on_real_drift():
    """||u||^2 == threshold exactly does not sync; the next float above does."""
    var = tf.Variable([0.0, 0.0])
    averager = WorkerAverager(triggers.FDA("naive", threshold=4.0), LocalTransport(), [var])
    var.assign([2.0, 0.0])  # ||u||^2 = 4.0 exactly in float32
    result = averager.step()
    assert float(result["statistic"]) == 4.0 and not bool(result["synced"])
    var.assign([np.nextafter(np.float32(2.0), np.float32(3.0)), 0.0])
    result = averager.step()
    assert float(result["statistic"]) > 4.0 and bool(result["synced"])
    assert int(averager.syncs.numpy()) == 1 and int(averager.steps_since_sync.numpy()) == 0


@pytest.mark.parametrize("tau", [1, 3, 5])
def test_periodic_syncs_every_tau_steps(tau):
    var = tf.Variable([0.0])
    averager = WorkerAverager(triggers.Periodic(tau), LocalTransport(), [var])
    synced = [bool(averager.step()["synced"]) for _ in range(12)]
    assert [i + 1 for i, s in enumerate(synced) if s] == list(range(tau, 13, tau))


def test_synchronous_syncs_every_step_and_sends_no_state():
    averager = WorkerAverager(triggers.Synchronous(), LocalTransport(), [tf.Variable([1.0])])
    assert all(bool(averager.step()["synced"]) for _ in range(4))
    assert averager.communication().state_bytes == 0


def test_kamp_is_a_local_condition():
    trigger = triggers.Kamp(threshold=1.0)
    inside = trigger.local_state([tf.constant([1.0, 0.0])], [])
    outside = trigger.local_state([tf.constant([1.0, 0.5])], [])
    assert float(inside[0]) == 0.0 and float(outside[0]) == 1.0
    # One violating worker out of four is enough.
    mean = tf.reduce_mean(tf.stack([inside, inside, inside, outside]), 0)
    assert bool(trigger.should_sync(trigger.statistic(mean, 1), 1))


def test_finish_syncs_only_if_steps_remain():
    var = tf.Variable([0.0])
    averager = WorkerAverager(triggers.Periodic(2), LocalTransport(), [var])
    averager.step()
    assert bool(averager.finish(False)["synced"])
    assert not bool(averager.finish(False)["synced"])
    assert bool(averager.finish(True)["synced"])


def test_linear_round_state_follows_the_global_step():
    var = tf.Variable([0.0, 0.0])
    averager = WorkerAverager(triggers.FDA("linear", threshold=0.5), LocalTransport(), [var])
    var.assign([3.0, 4.0])
    assert bool(averager.step()["synced"])
    np.testing.assert_allclose(averager.round_state[0].numpy(), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(averager.reference[0].numpy(), [3.0, 4.0])


def test_custom_policy_is_one_method():
    class EveryOther(triggers.SyncTrigger):
        def should_sync(self, statistic, steps_since_sync):
            return steps_since_sync >= 2

    averager = WorkerAverager(EveryOther(), LocalTransport(), [tf.Variable([0.0])])
    assert [bool(averager.step()["synced"]) for _ in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", True, None])
def test_fda_rejects_bad_thresholds(bad):
    with pytest.raises(ValueError, match="threshold"):
        triggers.get("fda", threshold=bad)


@pytest.mark.parametrize("bad", [0, 2.5, -3, True])
def test_periodic_rejects_bad_tau(bad):
    with pytest.raises(ValueError, match="tau"):
        triggers.Periodic(bad)


def test_get_names_and_errors():
    assert isinstance(triggers.get("synchronous"), triggers.Synchronous)
    assert triggers.get("periodic", tau=4).tau == 4
    fda = triggers.get(threshold=2.0, variant="sketch")
    assert fda.threshold == 2.0 and fda.estimator.name == "sketch" and fda.name == "fda-sketch"
    with pytest.raises(ValueError, match="Unknown trigger 'gossip'"):
        triggers.get("gossip")
    with pytest.raises(ValueError, match="needs tau"):
        triggers.get("periodic")


def test_threshold_auto_resolves_to_auto_fda():
    auto = triggers.get("fda", threshold="auto")
    assert isinstance(auto, triggers.AutoFDA) and auto.estimator.name == "linear"
    assert triggers.get(threshold="auto", variant="exact").estimator.name == "exact"
    assert auto.state_size == auto.estimator.state_size + 2
    with pytest.raises(ValueError, match="numeric threshold"):
        triggers.get("kamp", threshold="auto")
    for bad in (0, 0.5, True, "10"):
        with pytest.raises(ValueError, match="horizon"):
            triggers.AutoFDA(horizon=bad)


def test_end_round_defaults_to_next_round_state():
    class Counting(triggers.SyncTrigger):
        def next_round_state(self, round_state, global_step):
            return [round_state[0] + 1.0]

    trigger = Counting()
    got = trigger.end_round([tf.constant(1.0)], [tf.zeros([2])], tf.zeros([3]), tf.constant(5))
    assert float(got[0]) == 2.0


def _auto_after_one_round(horizon=100.0, steps=10):
    """An exact-estimator AutoFDA after a round of `steps` steps with mean update
    (3, 4) (||mean u||^2 = 25) and exact variance 50, so rho = 2."""
    trigger = triggers.AutoFDA("exact", horizon=horizon, first_round=4)
    trigger.build([tf.TensorShape([2])])
    round_state = trigger.initial_round_state()
    mean_state = tf.constant([75.0, 3.0, 4.0, *round_state[-1].numpy()])
    return trigger, trigger.end_round(round_state, [tf.constant([3.0, 4.0])], mean_state,
                                      tf.constant(steps, tf.int64))


def test_auto_first_round_ends_at_first_round_steps():
    trigger = triggers.AutoFDA("naive", first_round=4)
    control = trigger.initial_round_state()[-1].numpy()
    state = lambda v: tf.constant([v, *control])  # noqa: E731
    assert float(trigger.statistic(state(1e9), 3)) < 1.0  # no threshold yet: Theta = inf
    assert bool(trigger.should_sync(trigger.statistic(state(0.0), 4), 4))


def test_auto_sets_the_next_threshold_from_rho_and_the_round_length():
    trigger, next_state = _auto_after_one_round(horizon=100.0, steps=10)
    # rho = 50 / 25 = 2: the next round lasts L = 100 / sqrt(2) steps unless the
    # variance outgrows the round's 50 extrapolated quadratically to L steps.
    length = 100.0 / math.sqrt(2.0)
    inverse_theta, inverse_length = next_state[-1].numpy()
    theta = 50.0 * (length / 10.0) ** 2
    np.testing.assert_allclose(1.0 / inverse_theta, theta, rtol=1e-5)
    np.testing.assert_allclose(1.0 / inverse_length, length, rtol=1e-5)
    mean_state = lambda v: tf.constant([v, 0.0, 0.0, inverse_theta, inverse_length])  # noqa: E731
    assert not bool(trigger.should_sync(trigger.statistic(mean_state(theta - 1), 10), 10))
    assert bool(trigger.should_sync(trigger.statistic(mean_state(theta + 1), 10), 10))
    assert not bool(trigger.should_sync(trigger.statistic(mean_state(0.0), 70), 70))
    assert bool(trigger.should_sync(trigger.statistic(mean_state(0.0), 71), 71))
    # Twice the horizon, twice the round length: Theta grows 4x.
    _, longer = _auto_after_one_round(horizon=200.0, steps=10)
    np.testing.assert_allclose(inverse_theta / longer[-1].numpy()[0], 4.0, rtol=1e-5)


def test_auto_rounds_never_get_shorter():
    trigger, state = _auto_after_one_round(horizon=100.0, steps=10)
    length = 1.0 / state[-1].numpy()[1]
    # Workers that disagree 10^4 times more than they agree: horizon / sqrt(rho) = 1
    # step, but the round keeps the last one's length; Theta follows it.
    mean_state = tf.constant([1e4 + 1.0, 0.6, 0.8, *state[-1].numpy()])
    after = trigger.end_round(state, [tf.constant([0.6, 0.8])], mean_state,
                              tf.constant(20, tf.int64))
    inverse_theta, inverse_length = after[-1].numpy()
    np.testing.assert_allclose(1.0 / inverse_length, length, rtol=1e-5)
    np.testing.assert_allclose(1.0 / inverse_theta, 1e4 * (length / 20.0) ** 2, rtol=1e-4)
    # Workers that agree (rho = 1/4): the rounds lengthen to horizon / sqrt(rho).
    mean_state = tf.constant([1.25, 0.6, 0.8, *after[-1].numpy()])
    longer = trigger.end_round(after, [tf.constant([0.6, 0.8])], mean_state,
                               tf.constant(20, tf.int64))
    np.testing.assert_allclose(1.0 / longer[-1].numpy()[1], 200.0, rtol=1e-5)


def test_auto_first_round_lasts_first_round_steps_and_bounds_the_rest():
    trigger = triggers.AutoFDA("exact", horizon=1, first_round=8)
    trigger.build([tf.TensorShape([2])])
    state = trigger.initial_round_state()
    mean_state = tf.constant([75.0, 3.0, 4.0, *state[-1].numpy()])
    after = trigger.end_round(state, [tf.constant([3.0, 4.0])], mean_state,
                              tf.constant(8, tf.int64))
    np.testing.assert_allclose(1.0 / after[-1].numpy()[1], 8.0, rtol=1e-6)


def test_auto_keeps_its_threshold_when_no_statistic_decided_the_sync():
    trigger = triggers.AutoFDA("naive", first_round=4)
    trigger.build([tf.TensorShape([2])])
    state = trigger.initial_round_state()
    kept = trigger.end_round(state, [tf.constant([1.0, 1.0])], None, None)
    np.testing.assert_array_equal(kept[-1].numpy(), state[-1].numpy())


def test_auto_learns_nothing_from_a_round_that_ends_in_a_warmup():
    """In a warmup the workers still learn what they share: a round calibrated there
    outlasted the run (the example language model synced once before its final sync)."""
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(0.0, 100, warmup_target=0.1,
                                                      warmup_steps=10)
    optimizer = keras.optimizers.SGD(schedule)
    optimizer.build([keras.Variable(np.zeros(2, np.float32))])
    trigger = triggers.AutoFDA("exact", horizon=100.0, first_round=4)
    trigger.build([tf.TensorShape([2])])
    trigger.watch(optimizer)
    state = trigger.initial_round_state()
    mean_state = tf.constant([75.0, 3.0, 4.0, *state[-1].numpy()])

    def end_round_at(iteration):
        optimizer.iterations.assign(iteration)
        return trigger.end_round(state, [tf.constant([3.0, 4.0])], mean_state,
                                 tf.constant(4, tf.int64))[-1].numpy()

    np.testing.assert_array_equal(end_round_at(4), state[-1].numpy())  # rising: first_round again
    _, unwatched = _auto_after_one_round(horizon=100.0, steps=4)
    np.testing.assert_allclose(end_round_at(12), unwatched[-1].numpy(), rtol=1e-6)  # decaying


def test_accounting_paper_formula_and_wire_bytes():
    stats = CommunicationStats(num_workers=10, num_params=61706, state_bytes=8, steps=3188, syncs=9)
    assert stats.paper_bytes == 10 * 2 * 10 * 4 * 61706 + 8 * 3188 * 10
    assert stats.synchronous_paper_bytes == 3189 * 2 * 10 * 4 * 61706
    per_worker = 2 * 9 / 10 * (10 * 4 * 61706 + 3188 * 8)
    assert stats.wire_bytes_per_worker == pytest.approx(per_worker)
    assert stats.wire_bytes == pytest.approx(10 * per_worker)
    assert stats.savings == pytest.approx(stats.synchronous_paper_bytes / stats.paper_bytes)
    assert "times more" in stats.summary()


def test_accounting_single_worker_sends_nothing_on_the_wire():
    stats = CommunicationStats(num_workers=1, num_params=100, state_bytes=8, steps=10, syncs=2)
    assert stats.wire_bytes == 0


def test_nan_drift_is_reported_and_never_averaged():
    var = tf.Variable([0.0, 0.0])
    averager = WorkerAverager(triggers.FDA("linear", threshold=1.0), LocalTransport(), [var])
    var.assign([np.nan, 1.0])
    result = averager.step()
    assert not bool(result["healthy"]) and not bool(result["synced"])
    np.testing.assert_array_equal(averager.reference[0].numpy(), [0.0, 0.0])


def test_nan_weights_are_never_adopted_by_a_sync():
    var = tf.Variable([0.0, 0.0])
    averager = WorkerAverager(triggers.Synchronous(), LocalTransport(), [var])
    var.assign([np.inf, 1.0])
    result = averager.step()
    assert not bool(result["healthy"]) and not bool(result["synced"])
    assert int(averager.syncs.numpy()) == 0
    np.testing.assert_array_equal(averager.reference[0].numpy(), [0.0, 0.0])


def test_a_stopped_peer_is_seen_and_nothing_is_averaged():
    """With one worker, `stop` reports nobody else training; `step` is active."""
    averager = WorkerAverager(triggers.Synchronous(), LocalTransport(), [tf.Variable([1.0])])
    assert bool(averager.step()["peers_active"])
    assert not bool(averager.stop()["others_active"])


# --- Triggers that follow the optimizer's learning rate or step count ---


def _scheduled_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([10, 20], [0.1, 0.05, 0.02])
    model.compile(keras.optimizers.SGD(schedule), "mse")
    return model


# Schedule-driven triggers and the steps (0-based) after which they sync. A
# round's period is set by the rate at its first step (iteration s; the
# schedule gives 0.1 up to iteration 10, 0.05 up to 20, then 0.02).
SCHEDULED = {
    # QSR(0.2): rounds from 0, 4, 8 (rate 0.1: 4 steps), 12 (0.05: 16), 28 (0.02: 100).
    "qsr": (lambda: triggers.QSR(alpha=0.2, base_period=2), [3, 7, 11, 27]),
    # Every step while the optimizer has taken <= 5 steps, then every 8.
    "post-local": (lambda: triggers.PostLocal(tau=8, switch_step=5),
                   [0, 1, 2, 3, 4, 12, 20, 28, 36]),
}


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_scheduled_triggers_sync_at_the_same_steps_in_every_driver(name):
    import keras
    import keras_fda

    make, expected = SCHEDULED[name]
    x = np.random.default_rng(0).normal(size=(40 * 8, 4)).astype(np.float32)
    y = x[:, :2]
    found = {}
    sim = keras_fda.Simulation(_scheduled_model(), 2)
    history = sim.run(make(), x, y, keras_fda.partition.iid(len(x), 2), batch_size=8, steps=40)
    found["simulation"] = np.flatnonzero(history.synced).tolist()

    class Syncs(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.syncs = []

        def on_train_batch_end(self, batch, logs=None):
            self.syncs.append(int(logs["fda/syncs"]))

    for driver in ("callback", "strategy"):
        syncs = Syncs()
        if driver == "callback":
            model = _scheduled_model()
            callbacks = [keras_fda.FDACallback(trigger=make()), syncs]
        else:
            strategy = keras_fda.FDAStrategy(
                tf.distribute.MirroredStrategy(["/cpu:0"]), trigger=make()
            )
            with strategy.scope():
                model = _scheduled_model()
            callbacks = [syncs]
        model.fit(x, y, batch_size=8, epochs=1, steps_per_epoch=40, shuffle=False, verbose=0,
                  callbacks=callbacks)  # fmt: skip
        found[driver] = np.flatnonzero(np.diff([0] + syncs.syncs)).tolist()
    assert found == {driver: expected for driver in found}


def test_a_round_that_starts_in_a_warmup_keeps_the_base_period():
    """Under a warmup the rate is low because it has not risen yet: QSR's period would be
    (nearly) endless; it keeps its base period there."""
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, 100, warmup_target=0.1, warmup_steps=10
    )
    optimizer = keras.optimizers.SGD(schedule)
    optimizer.build([keras.Variable(np.zeros(2, np.float32))])
    qsr = triggers.QSR(alpha=0.2, base_period=2)
    qsr.watch(optimizer)
    for iteration, since in [(1, 1), (4, 2), (10, 1)]:  # rounds from iterations 0, 2, 9
        optimizer.iterations.assign(iteration)
        assert float(qsr.period(since)) == 2.0
    optimizer.iterations.assign(61)  # a round from iteration 60, after the peak
    lr = float(schedule(60))
    assert 0 < lr < 0.1
    assert float(qsr.period(1)) == max(2, math.floor((0.2 / np.float32(lr)) ** 2)) > 2


def test_qsr_by_name_is_the_built_in_trigger():
    trigger = triggers.get("qsr", threshold=0.2, tau=2)
    assert isinstance(trigger, triggers.QSR) and trigger.alpha == 0.2
    assert trigger.base_period == 2


def test_qsr_with_a_constant_rate_is_periodic_and_never_shorter_than_its_base():
    import keras

    for rate, alpha, base, period in [(0.1, 0.2, 2, 4), (0.1, 0.05, 3, 3), (0.01, 0.1, 1, 100)]:
        trigger = triggers.QSR(alpha=alpha, base_period=base)
        trigger.watch(keras.optimizers.SGD(rate))
        assert float(trigger.period(0)) == period
        assert not bool(trigger.should_sync(None, period - 1)) and bool(
            trigger.should_sync(None, period)
        )
        assert float(trigger.statistic(None, period)) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trigger="qsr", tau=2), "needs threshold= \\(its alpha\\) and tau="),
        (dict(trigger="qsr", threshold=0.1), "needs threshold= \\(its alpha\\) and tau="),
        (dict(trigger="qsr", threshold=-1.0, tau=2), "threshold must be a positive"),
        (dict(trigger="qsr", threshold=0.1, tau=0), "base_period must be an integer >= 1"),
        (dict(trigger="qsr", threshold=0.1, tau=2, variant="linear"), "does not use variant"),
    ],
)
def test_qsr_bad_arguments_say_what_to_pass(kwargs, match):
    with pytest.raises(ValueError, match=match):
        triggers.get(**kwargs)


def test_qsr_without_an_optimizer_says_to_compile():
    with pytest.raises(ValueError, match="compile the model with an optimizer"):
        triggers.QSR(alpha=0.1, base_period=2).period(0)
