"""keras_fda.policies.outer: what a sync sends (payload dtype) and does (outer optimizer, moments)."""

import pathlib
import sys

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import keras_fda
from keras_fda.policies.outer import SyncRule, moment_variables
from keras_fda.drivers.simulation import Simulation
from keras_fda.partition import batch_schedule

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sim_vs_real_worker as setup  # noqa: E402

K = 3
BF16 = ml_dtypes.bfloat16
NEVER = 2**62  # a period no run reaches: the workers' weights are left unsynchronized


@pytest.fixture(scope="module")
def data():
    return setup.make_data()


@pytest.fixture(scope="module")
def sim():
    return Simulation(setup.make_model(), K)


def _parts(x):
    return keras_fda.partition.iid(len(x), K, seed=0)


def _worker_weights(sim):
    return [w.model.get_weights() for w in sim._workers]


def _worker_moments(sim):
    return [[m.numpy() for m in moment_variables(w.model.optimizer)] for w in sim._workers]


# --- numpy replays of the Keras outer optimizers (gradient g = w0 - mean) ---


def _sgd(lr, momentum=0.0, nesterov=False):
    def update(w, g, slots, t):
        m = slots.setdefault("m", np.zeros_like(w))
        m[...] = momentum * m - lr * g
        return w + (momentum * m - lr * g if nesterov else m)

    return update


def _adam(lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    def update(w, g, slots, t):
        m = slots.setdefault("m", np.zeros_like(w))
        v = slots.setdefault("v", np.zeros_like(w))
        m += (g - m) * (1 - beta_1)
        v += (g * g - v) * (1 - beta_2)
        alpha = lr * np.sqrt(1 - beta_2 ** (t + 1)) / (1 - beta_1 ** (t + 1))
        return w - m * alpha / (np.sqrt(v) + epsilon)

    return update


OUTER = {
    "diloco": (lambda: keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
               _sgd(0.7, 0.9, nesterov=True)),
    "fedavgm": (lambda: keras.optimizers.SGD(1.0, momentum=0.9), _sgd(1.0, 0.9)),
    "fedadam": (lambda: keras.optimizers.Adam(0.05), _adam(0.05)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OUTER))
def test_outer_step_in_a_compiled_cond_equals_numpy(name):
    """The SyncState as a driver calls it: in a tf.function, inside tf.cond."""
    make, replay = OUTER[name]
    rng = np.random.default_rng(1)
    w0 = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    reference = [tf.Variable(w) for w in w0]
    sync = SyncRule(outer_optimizer=make()).build(reference, tf.float32)

    @tf.function
    def sync_step(mean, decided):
        def apply():
            new = sync.step(sync.mean_weights(sync.payload(mean, [r.read_value() for r in reference])))
            for r, value in zip(reference, new):
                r.assign(value)
            return tf.constant(True)

        return tf.cond(decided, apply, lambda: tf.constant(False))

    expected = [w.copy() for w in w0]
    slots = [{} for _ in w0]
    for t in range(4):
        mean = [w + rng.normal(scale=0.1, size=w.shape).astype(np.float32) for w in expected]
        sync_step(mean, tf.constant(True))
        expected = [replay(w, w - m, s, t) for w, m, s in zip(expected, mean, slots)]
        sync_step(mean, tf.constant(False))  # no sync: nothing moves
        for got, want in zip(reference, expected):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert int(sync.optimizer.iterations.numpy()) == 4
    assert sync.state_variables() == list(sync.optimizer.variables)


@pytest.mark.parametrize("name", ["diloco", "fedadam"])
def test_simulator_outer_optimizer_equals_a_replay_by_hand(data, name):
    """K models trained one by one; every tau steps w0 takes the numpy outer step, and the
    final sync after the last, partial round is the plain average."""
    make, replay = OUTER[name]
    x, y = data
    tau, steps = 2, 7
    parts = _parts(x)
    sim = Simulation(setup.make_model(), K)
    history = sim.run(keras_fda.Periodic(tau), x, y, parts, batch_size=8, steps=steps,
                      outer_optimizer=make())  # fmt: skip
    assert history.synced.tolist() == [False, True] * (steps // tau) + [False]
    assert history.final_syncs == 1

    models = [setup.make_model() for _ in range(K)]
    w0 = [w.astype(np.float64) for w in models[0].get_weights()]
    slots = [{} for _ in w0]
    order = batch_schedule(parts, 8, steps)
    for t in range(steps):
        for k, model in enumerate(models):
            model.train_on_batch(x[order[t, k]], y[order[t, k]])
        if (t + 1) % tau == 0:
            mean = [np.mean(ws, axis=0) for ws in zip(*(m.get_weights() for m in models))]
            w0 = [replay(w, w - m, s, t // tau) for w, m, s in zip(w0, mean, slots)]
            for model in models:
                model.set_weights([w.astype(np.float32) for w in w0])
    final = [np.mean(ws, axis=0) for ws in zip(*(m.get_weights() for m in models))]
    for got, want in zip(sim.model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bfloat16_payload_is_the_rounded_drift_summed_as_the_ring_does(data, sim):
    """After one step and a sync: w0 + ((bf16(d0) + bf16(d1)) + bf16(d2)) / 3, in bfloat16."""
    x, y = data
    parts = _parts(x)
    w0 = sim.model.get_weights()
    # Each worker's first step, by the simulator's own compiled step (a run
    # would end with a final sync, averaging them).
    sim._reset()  # noqa: SLF001
    sim._train_step(tf.constant(x), tf.constant(y), batch_schedule(parts, 8, 1)[0])  # noqa: SLF001
    local = _worker_weights(sim)
    history = sim.run(keras_fda.Synchronous(), x, y, parts, batch_size=8, steps=1,
                      sync_dtype="bfloat16")  # fmt: skip
    assert history.synced.all()
    synced = _worker_weights(sim)
    for i, reference in enumerate(w0):
        drifts = [(local[k][i] - reference).astype(np.float32).astype(BF16) for k in range(K)]
        total = drifts[0]
        for d in drifts[1:]:
            total = total + d
        want = reference + (total / BF16(K)).astype(np.float32)
        for k in range(K):
            np.testing.assert_array_equal(synced[k][i], want)
        exact = np.mean([local[k][i] for k in range(K)], axis=0)
        drift = np.abs(exact - reference).max()
        # Rounded drift, not rounded weights: the error is a fraction of the drift.
        assert 0 < np.abs(want - exact).max() <= 2**-6 * drift


def test_float32_sync_dtype_of_float32_weights_is_the_plain_average(data, sim):
    x, y = data
    parts = _parts(x)
    trigger = keras_fda.Periodic(3)
    plain = sim.run(trigger, x, y, parts, batch_size=8, steps=7)
    plain_weights = _worker_weights(sim)
    same = sim.run(trigger, x, y, parts, batch_size=8, steps=7, sync_dtype="float32")
    assert same.synced.tolist() == plain.synced.tolist()
    for a, b in zip(plain_weights, _worker_weights(sim)):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert same.communication().paper_bytes == plain.communication().paper_bytes


def test_a_plain_outer_sgd_is_the_plain_average(data, sim):
    """SGD(1.0) without momentum moves w0 to the mean: the plain average, to rounding."""
    x, y = data
    parts = _parts(x)
    sim.run(keras_fda.Periodic(3), x, y, parts, batch_size=8, steps=6)
    plain = _worker_weights(sim)
    sim.run(keras_fda.Periodic(3), x, y, parts, batch_size=8, steps=6,
            outer_optimizer=keras.optimizers.SGD(1.0))  # fmt: skip
    for a, b in zip(plain, _worker_weights(sim)):
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_one_outer_optimizer_serves_several_runs_untouched(data, sim):
    x, y = data
    parts = _parts(x)
    outer = keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)
    runs = []
    for _ in range(2):
        sim.run(keras_fda.Periodic(2), x, y, parts, batch_size=8, steps=4, outer_optimizer=outer)
        runs.append(_worker_weights(sim))
    for a, b in zip(*runs):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert not outer.built and int(outer.iterations.numpy()) == 0


def test_optimizer_state_average_reset_and_local(data, sim):
    """One sync at the last step: moments averaged (the mean of the local ones), zeroed, kept."""
    x, y = data
    parts = _parts(x)
    sim.run(keras_fda.Periodic(NEVER), x, y, parts, batch_size=8, steps=3)
    local = _worker_moments(sim)
    assert len(local[0]) == 2 * len(sim.model.trainable_weights)  # Adam: momentum, velocity
    assert not all(np.array_equal(a, b) for a, b in zip(local[0], local[1]))

    sim.run(keras_fda.Periodic(3), x, y, parts, batch_size=8, steps=3, optimizer_state="average")
    averaged = _worker_moments(sim)
    for i, per_worker in enumerate(zip(*local)):
        want = np.mean(per_worker, axis=0)
        for k in range(K):
            np.testing.assert_allclose(averaged[k][i], want, rtol=1e-5, atol=1e-10)
            np.testing.assert_array_equal(averaged[k][i], averaged[0][i])

    sim.run(keras_fda.Periodic(3), x, y, parts, batch_size=8, steps=3, optimizer_state="reset")
    assert all(not m.any() for moments in _worker_moments(sim) for m in moments)
    # The iteration count (the learning-rate schedule) is not reset.
    assert all(int(w.model.optimizer.iterations.numpy()) == 3 for w in sim._workers)

    sim.run(keras_fda.Periodic(3), x, y, parts, batch_size=8, steps=3)
    for a, b in zip(local, _worker_moments(sim)):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_reset_moments_change_training_and_average_keeps_it_finite(data, sim):
    x, y = data
    parts = _parts(x)
    final = {}
    for state in ("local", "average", "reset"):
        history = sim.run(keras_fda.Periodic(2), x, y, parts, batch_size=8, steps=8,
                          optimizer_state=state)  # fmt: skip
        assert history.synced.sum() == 4
        final[state] = sim.model.get_weights()
        assert all(np.isfinite(w).all() for w in final[state])
    for other in ("average", "reset"):
        assert not all(np.allclose(a, b) for a, b in zip(final["local"], final[other]))


def test_bytes_equal_the_formula(data, sim):
    x, y = data
    d = sim.num_params
    steps, tau = 8, 2
    for kwargs, per_sync in [
        ({}, 4 * d),
        ({"sync_dtype": "float32"}, 4 * d),
        ({"sync_dtype": "bfloat16"}, 2 * d),
        ({"sync_dtype": "float16"}, 2 * d),
        ({"outer_optimizer": keras.optimizers.SGD(0.7, momentum=0.9)}, 4 * d),
        # Adam's momentum and velocity of every weight, float32, on top of the weights.
        ({"optimizer_state": "average"}, 4 * d + 2 * 4 * d),
        ({"sync_dtype": "bfloat16", "optimizer_state": "average"}, 2 * d + 2 * 4 * d),
        ({"optimizer_state": "reset"}, 4 * d),
    ]:
        history = sim.run(keras_fda.Periodic(tau), x, y, _parts(x), batch_size=8, steps=steps,
                          **kwargs)  # fmt: skip
        syncs = steps // tau
        stats = history.communication()
        assert stats.bytes_per_sync == per_sync, kwargs
        # Periodic all-reduces no state; the initial broadcast sends the float32 model.
        assert stats.paper_bytes == 2 * K * (4 * d + syncs * per_sync), kwargs
        assert history.evaluations["paper_bytes"][-1] == stats.paper_bytes
        assert stats.synchronous_paper_bytes == 2 * K * (4 * d + steps * per_sync)


def test_fda_with_bfloat16_and_outer_optimizer_runs(data, sim):
    x, y = data
    history = sim.run(setup.make_trigger(), x, y, _parts(x), batch_size=8, steps=20,
                      sync_dtype="bfloat16", optimizer_state="average",
                      outer_optimizer=keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True))  # fmt: skip
    assert 0 < history.synced.sum() < 20
    weights = _worker_weights(sim)
    for k in range(1, K):  # the last sync left them equal, or they trained apart since
        assert len(weights[k]) == len(weights[0])
    assert np.isfinite(history.statistic).all()


# --- validation ---


def test_nesterov_names_diloco_outer_step():
    outer = SyncRule(outer_optimizer="nesterov").outer_optimizer
    assert isinstance(outer, keras.optimizers.SGD)
    assert (float(outer.learning_rate), outer.momentum, outer.nesterov) == (
        pytest.approx(0.7), 0.9, True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sync_dtype": "int2"}, ValueError, "sync_dtype must be"),
        ({"sync_dtype": "float8"}, ValueError, "sync_dtype must be"),
        ({"sync_dtype": "float64"}, ValueError, "sync_dtype must be"),
        ({"optimizer_state": "mean"}, ValueError, "optimizer_state must be"),
        ({"error_feedback": 1}, TypeError, "error_feedback must be True or False"),
        ({"outer_optimizer": "sgd"}, TypeError, "Keras optimizer instance"),
        ({"outer_optimizer": tf.keras.optimizers.SGD}, TypeError, "Keras optimizer instance"),
        ({"outer_optimizer": keras.optimizers.SGD(0.7, use_ema=True)}, ValueError, "use_ema"),
        ({"outer_optimizer": keras.optimizers.SGD(0.7, gradient_accumulation_steps=2)},
         ValueError, "gradient_accumulation_steps"),
        ({"outer_optimizer": keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())},
         TypeError, "LossScaleOptimizer"),
    ],
)  # fmt: skip
def test_bad_options_fail_with_a_clear_error(data, sim, kwargs, error, match):
    with pytest.raises(error, match=match):
        SyncRule(**kwargs)
    x, y = data
    with pytest.raises(error, match=match):
        sim.run(keras_fda.Synchronous(), x, y, _parts(x), steps=1, **kwargs)


def test_dtype_names_and_dtypes_are_accepted():
    assert SyncRule(sync_dtype=tf.bfloat16).sync_dtype == "bfloat16"
    assert SyncRule(sync_dtype=np.float16).sync_dtype == "float16"
    assert SyncRule().sync_dtype is None


def test_half_precision_drift_of_float64_weights_is_refused():
    reference = [tf.Variable(np.zeros(3))]
    with pytest.raises(ValueError, match="float64 weights"):
        SyncRule(sync_dtype="bfloat16").build(reference, tf.float64)
    # float32 halves their bytes; None keeps float64.
    assert SyncRule(sync_dtype="float32").build(reference, tf.float64).sends_drift
    assert not SyncRule().build(reference, tf.float64).sends_drift


# --- quantized syncs (int8, int4) ---


def _quantized(x, levels, block=64):
    """numpy: x's dequantized int8/int4 blocks (absmax scales, round half to even)."""
    flat = np.asarray(x, np.float32).reshape(-1)
    n = len(flat)
    blocks = np.pad(flat, (0, -n % block)).reshape(-1, block)
    scale = np.max(np.abs(blocks), axis=1) / np.float32(levels)
    divisor = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(blocks / divisor[:, None]), -levels, levels)
    return (q * scale[:, None]).reshape(-1)[:n].reshape(np.shape(x)).astype(np.float32)


@pytest.mark.parametrize("sync_dtype, levels, bytes_per_block", [("int8", 127, 68), ("int4", 7, 36)])
def test_quantized_payload_round_trips_within_half_a_level(sync_dtype, levels, bytes_per_block):
    rng = np.random.default_rng(0)
    w0 = [rng.normal(size=(50, 7)).astype(np.float32), np.zeros(3, np.float32)]
    reference = [tf.Variable(w) for w in w0]
    sync = SyncRule(sync_dtype=sync_dtype).build(reference, tf.float32)
    assert sync.quantized and sync.sends_drift
    # Drift of very different magnitudes in different blocks, and a zero drift.
    drift = [rng.normal(size=(50, 7)).astype(np.float32) * np.logspace(-6, 0, 350).reshape(50, 7)
             .astype(np.float32), np.zeros(3, np.float32)]  # fmt: skip
    weights = [w + d for w, d in zip(w0, drift)]
    drift = [w - r for w, r in zip(weights, w0)]  # as float32 rounds it
    residuals = sync.new_residuals()
    payload = sync.payload(weights, w0, [e.read_value() for e in residuals])
    assert [p.dtype for p in payload] == [tf.int32, tf.int32]
    # ceil(350 / 64) = 6 blocks and ceil(3 / 64) = 1: levels and a float32 scale each.
    assert [4 * int(p.shape[0]) for p in payload] == [6 * bytes_per_block, bytes_per_block]
    assert sync.gathered_bytes() == sync.sync_bytes(353) == 7 * bytes_per_block
    # One worker alone: the average is w0 + its dequantized drift, per block within half a level.
    mean = sync.mean_weights([tf.expand_dims(p, 0) for p in payload])
    for got, w, d in zip(mean, w0, drift):
        np.testing.assert_allclose(got.numpy(), w + _quantized(d, levels), rtol=0, atol=1e-6)
        blocks = np.pad(d.reshape(-1), (0, -d.size % 64)).reshape(-1, 64)
        bound = np.repeat(np.abs(blocks).max(axis=1) / (2 * levels), 64)[: d.size]
        assert np.all(np.abs(got.numpy() - w - d).reshape(-1) <= bound * 1.0001 + 1e-7)
    assert bool(sync.finite([tf.expand_dims(p, 0) for p in payload]))
    poisoned = [weights[0] + np.float32("nan"), weights[1]]
    assert not bool(sync.finite([tf.expand_dims(p, 0) for p in sync.payload(poisoned, w0)]))


def test_error_feedback_sends_what_quantization_dropped_at_the_next_sync():
    """A constant drift d every round: the workers' total moves by n * d within one level."""
    w0 = np.zeros(64, np.float32)
    reference = [tf.Variable(w0)]
    sync = SyncRule(sync_dtype="int4").build(reference, tf.float32)
    residuals = sync.new_residuals()
    d = np.linspace(-1, 1, 64).astype(np.float32) ** 3  # far from int4's 15 levels
    weights = tf.Variable(w0)
    sent = np.zeros(64, np.float32)
    for n in range(1, 9):
        weights.assign(reference[0] + d)
        payload = sync.payload([weights.read_value()], [reference[0].read_value()],
                               [e.read_value() for e in residuals])  # fmt: skip
        gathered = [tf.expand_dims(payload[0], 0)]  # one worker
        sync.feed_back([weights.read_value()], residuals, gathered, 0)
        (new,) = sync.mean_weights(gathered)
        sent += new.numpy() - reference[0].numpy()
        reference[0].assign(new)
        # What was sent plus what is held back is exactly what the worker drifted.
        np.testing.assert_allclose(sent + residuals[0].numpy(), n * d, atol=1e-5)
        assert np.abs(residuals[0].numpy()).max() <= 1 / 14 + 1e-6  # half a level
    without = _quantized(d, 7) * 8
    assert np.abs(sent - 8 * d).max() < 0.2 * np.abs(without - 8 * d).max()


def test_without_error_feedback_what_quantization_drops_is_lost(data, sim):
    x, y = data
    runs = {}
    for feedback in (True, False):
        history = sim.run(keras_fda.Periodic(2), x, y, _parts(x), batch_size=8, steps=8,
                          sync_dtype="int4", error_feedback=feedback)  # fmt: skip
        assert history.synced.sum() == 4
        runs[feedback] = _worker_weights(sim)[0]
    assert SyncRule(sync_dtype="int4", error_feedback=False).build(
        [tf.Variable(np.zeros(3, np.float32))], tf.float32).new_residuals() == []
    assert not all(np.array_equal(a, b) for a, b in zip(runs[True], runs[False]))


def test_quantized_sync_of_float64_weights_is_refused():
    with pytest.raises(ValueError, match="float64"):
        SyncRule(sync_dtype="int8").build([tf.Variable(np.zeros(3))], tf.float64)


@pytest.mark.parametrize("sync_dtype", ["int8", "int4"])
def test_simulator_quantized_sync_is_the_mean_of_dequantized_drifts(data, sim, sync_dtype):
    """One step and a sync of K workers: w0 + the in-order mean of their dequantized drifts."""
    x, y = data
    parts = _parts(x)
    sim._reset()  # noqa: SLF001
    w0 = _worker_weights(sim)[0]
    sim._train_step(tf.constant(x), tf.constant(y), batch_schedule(parts, 8, 1)[0])  # noqa: SLF001
    local = _worker_weights(sim)
    history = sim.run(keras_fda.Synchronous(), x, y, parts, batch_size=8, steps=1,
                      sync_dtype=sync_dtype)  # fmt: skip
    levels = {"int8": 127, "int4": 7}[sync_dtype]
    synced = _worker_weights(sim)
    trainable = len(sim.model.trainable_weights)
    for i, reference in enumerate(w0[:trainable]):
        total = _quantized(local[0][i] - reference, levels)
        for k in range(1, K):
            total = total + _quantized(local[k][i] - reference, levels)
        want = reference + total / np.float32(K)
        for k in range(K):
            np.testing.assert_allclose(synced[k][i], want, rtol=0, atol=1e-6)
    stats = history.communication()
    assert stats.gathered_bytes > 0 and stats.bytes_per_sync < 4 * sim.num_params


def test_float16_payload_of_float16_weights():
    """Half weights are averaged in float32: a float16 payload sends their drift in 2 bytes."""
    w0 = np.array([1.0, -2.0, 0.5], np.float16)
    reference = [tf.Variable(w0)]
    sync = SyncRule(sync_dtype="float16").build(reference, tf.float32)
    assert sync.sends_drift and sync.sync_bytes(3) == 6
    worker = np.array([1.001, -1.999, 0.5], np.float16)
    (payload,) = sync.payload([worker], [w0])
    assert payload.dtype == tf.float16
    (mean,) = sync.mean_weights([payload])
    np.testing.assert_array_equal(tf.cast(mean, tf.float16).numpy(), worker)


# --- the core over TensorFlow's real collectives (3 worker processes) ---

REAL_RUN_TIMEOUT = 150  # seconds for three TensorFlow worker processes, all cases


REAL_CASES = [
    (None, "none", "local"), ("bfloat16", "diloco", "average"), ("float16", "none", "reset"),
]


@pytest.fixture(scope="module")
def real_workers(tmp_path_factory):
    """Every case of REAL_CASES, one after another in the same 3 worker processes."""
    from conftest import launch

    out = tmp_path_factory.mktemp("outer_real")
    cases = [",".join(map(str, case)) for case in REAL_CASES]
    result = launch(
        K, "tests/workers/outer_worker.py", f"--out={out}", "--cases", *cases,
        timeout=REAL_RUN_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        case: [dict(np.load(out / f"{name}_worker{k}.npz")) for k in range(K)]
        for case, name in zip(REAL_CASES, cases)
    }


@pytest.mark.parametrize("sync_dtype, outer, optimizer_state", REAL_CASES)
def test_real_workers_hold_identical_weights_after_each_sync(
    real_workers, sync_dtype, outer, optimizer_state
):
    runs = real_workers[sync_dtype, outer, optimizer_state]
    for name in runs[0]:
        local = optimizer_state == "local" and "_m" in name  # a worker's own moments
        if name.startswith("after") and not local:  # bit-identical on every worker
            for k in range(1, K):
                np.testing.assert_array_equal(runs[k][name], runs[0][name], err_msg=name)

    _, replay = OUTER["diloco"]
    rng = np.random.default_rng(0)
    w0 = [rng.normal(size=s).astype(np.float32) for s in [(5, 4), (4,)]]
    initial = list(w0)
    slots = [{} for _ in w0]
    for r in range(3):
        before = [[run[f"before{r}_w{i}"] for run in runs] for i in range(len(w0))]
        mean = [np.mean(per_worker, axis=0, dtype=np.float64) for per_worker in before]
        if outer == "diloco":
            w0 = [replay(w, w - m, s, r) for w, m, s in zip(w0, mean, slots)]
        else:
            w0 = mean
        for i, want in enumerate(w0):
            got = runs[0][f"after{r}_w{i}"]
            start = runs[0][f"after{r - 1}_ref{i}"] if r else initial[i]
            drift = np.abs(np.asarray(before[i]) - start).max()
            # Half precision: the drift's rounding along the ring, a few of its ulps
            # (times the outer step's 0.7 * (1 + 0.9)).
            atol = 1e-6 if sync_dtype is None else 2**-6 * drift
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
            np.testing.assert_array_equal(runs[0][f"after{r}_ref{i}"], got)
            w0[i] = got  # replay the next round from what the workers hold
        moments = [[run[f"before{r}_m{i}"] for run in runs] for i in range(4)]
        for i, per_worker in enumerate(moments):
            after = runs[0][f"after{r}_m{i}"]
            if optimizer_state == "average":
                np.testing.assert_allclose(after, np.mean(per_worker, axis=0), rtol=1e-6)
            elif optimizer_state == "reset":
                assert not after.any()
    if outer == "diloco":
        assert int(runs[0]["after2_outer0"]) == 3  # the outer optimizer's iterations
