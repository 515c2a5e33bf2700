"""keras_fda.drivers.simulation: the in-process K-worker driver."""

import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_fda
from conftest import launch
from keras_fda.drivers.simulation import Simulation
from keras_fda.partition import batch_schedule

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sim_vs_real_worker as setup  # noqa: E402  (shared with the real workers)
from test_tensorboard import read_run  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_RUN_TIMEOUT = 120  # seconds for two TensorFlow worker processes


@pytest.fixture(scope="module")
def data():
    return setup.make_data()


SIM_VS_REAL = [
    ("linear", 1, None), ("auto", 1, None), ("linear", 0, None), ("linear", 1, "int4"),
    ("moments", 1, None),
]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Every case of SIM_VS_REAL, one fit after another in the same 2 worker processes."""
    out = tmp_path_factory.mktemp("sim_vs_real")
    result = launch(
        setup.NUM_WORKERS, "tests/sim_vs_real_worker.py", f"--out={out}", "--cases",
        *(setup.case_name(*case) for case in SIM_VS_REAL), timeout=REAL_RUN_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.parametrize("trigger, lag, sync_dtype", SIM_VS_REAL)
def test_simulator_matches_two_real_worker_processes(real_runs, data, trigger, lag, sync_dtype):
    """Same data order, seeds and trigger: same sync steps, same final weights.

    lag 1 is FDACallback's default overlapped exchange, lag 0 its blocking one.
    "auto" runs the recommended setting, with the outer Nesterov step (the
    final weights then also check that a run ends with the callback's final
    sync), and checks that FDACallback hands AutoFDA what the simulator does at
    each sync (the deciding state and the round length): without them its
    rounds would all keep the first round's length. "int4" checks that the
    all-gathered quantized drift and each worker's error-feedback residual
    are the same in both. "moments" checks that a trigger reading the
    optimizer sees each worker's own moments, as the simulator hands it each copy's.
    The real workers run the cases one after another, each with a new model and
    a new FDACallback, so each case after the first also checks that a fit
    starts clean after an earlier one in the same job.
    """
    x, y = data
    sim = Simulation(setup.make_model(), setup.NUM_WORKERS)
    history = sim.run(
        setup.make_trigger(trigger), x, y, setup.make_partitions(),
        batch_size=setup.BATCH_SIZE, steps=setup.STEPS, seed=setup.DATA_SEED, lag=lag,
        outer_optimizer=setup.outer_optimizer(trigger), sync_dtype=sync_dtype,
    )  # fmt: skip
    sim_syncs = np.cumsum(history.synced)
    assert 0 < sim_syncs[-1] < setup.STEPS // 2  # the comparison exercises both branches
    if trigger == "auto":
        rounds = np.diff(np.flatnonzero(history.synced), prepend=-1)
        assert len(set(rounds[1:].tolist())) > 1, rounds  # the rounds adapted
    case = setup.case_name(trigger, lag, sync_dtype)
    for worker in range(setup.NUM_WORKERS):
        real = np.load(real_runs / f"{case}_worker{worker}.npz")
        np.testing.assert_array_equal(real["syncs"], sim_syncs)
        np.testing.assert_allclose(real["statistic"], history.statistic, rtol=1e-5, atol=1e-7)
        for i, weight in enumerate(sim.model.get_weights()):
            np.testing.assert_allclose(real[f"weight{i}"], weight, rtol=1e-5, atol=1e-6)


def test_synchronous_equals_plain_averaging_after_every_step(data):
    x, y = data
    num_workers, batch_size, steps = 3, 8, 6
    parts = keras_fda.partition.iid(len(x), num_workers, seed=0)
    sim = Simulation(setup.make_model(), num_workers)
    history = sim.run(keras_fda.Synchronous(), x, y, parts, batch_size=batch_size, steps=steps)
    assert history.synced.all()

    # The same thing by hand: K models with their own optimizers, averaged eagerly.
    models = [setup.make_model() for _ in range(num_workers)]
    order = batch_schedule(parts, batch_size, steps)
    for t in range(steps):
        for k, model in enumerate(models):
            model.train_on_batch(x[order[t, k]], y[order[t, k]])
        mean = [np.mean(ws, axis=0) for ws in zip(*(m.get_weights() for m in models))]
        for model in models:
            model.set_weights(mean)
    for got, want in zip(sim.model.get_weights(), models[0].get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sketch_shortcut_keeps_the_decisions_of_one_sketch_per_worker(data):
    """FDA sketch sketches the mean drift once (linearity); a subclass takes the K-sketch path."""

    class PerWorkerSketch(keras_fda.SketchEstimator):
        # The general path: one sketch per worker, then the mean.
        mean_local_state = keras_fda.estimators.VarianceEstimator.mean_local_state

    x, y = data
    parts = keras_fda.partition.iid(len(x), 3, seed=0)
    sim = Simulation(setup.make_model(), 3)
    runs = {}
    for name, estimator in [("fast", keras_fda.SketchEstimator(depth=3, width=20, seed=1)),
                            ("general", PerWorkerSketch(depth=3, width=20, seed=1))]:
        runs[name] = sim.run(keras_fda.FDA(estimator, threshold=0.05), x, y, parts,
                             batch_size=8, steps=30)  # fmt: skip
    assert 0 < runs["fast"].synced.sum() < 30  # both branches exercised
    np.testing.assert_array_equal(runs["fast"].synced, runs["general"].synced)
    np.testing.assert_allclose(runs["fast"].statistic, runs["general"].statistic,
                               rtol=1e-4, atol=1e-6)  # fmt: skip


def test_history_accounting_csv_and_tensorboard(tmp_path, data):
    x, y = data
    model = setup.make_model()
    model.compile(
        optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"], jit_compile=False
    )
    parts = keras_fda.partition.iid(len(x), 4, seed=0)
    sim = Simulation(model, 4)
    history = sim.run(
        keras_fda.Periodic(3), x, y, parts, batch_size=6, epochs=2, evaluations_per_epoch=2,
        validation_data=(x, y), csv_path=tmp_path / "h.csv", tensorboard_dir=tmp_path / "tb",
    )  # fmt: skip
    assert history.steps_per_epoch == 10
    np.testing.assert_array_equal(np.flatnonzero(history.synced) + 1, np.arange(3, 21, 3))
    ev = history.evaluations
    np.testing.assert_array_equal(ev["step"], [0, 5, 10, 15, 20])
    np.testing.assert_array_equal(ev["epoch"], [0, 0.5, 1, 1.5, 2])
    # Steps 19 and 20 trained after the last periodic sync: the run's final
    # sync averages them, and the last row, which evaluates that average, counts it.
    assert history.final_syncs == 1
    np.testing.assert_array_equal(ev["syncs"], [0, 1, 3, 5, 7])
    stats = history.communication()
    assert stats.syncs == 7 and stats.steps == 20
    assert history.communication(19).syncs == 6
    assert ev["paper_bytes"][-1] == stats.paper_bytes == 8 * 2 * 4 * 4 * history.num_params
    assert 0 <= ev["accuracy"][-1] <= 1 and np.isfinite(ev["loss"]).all()
    assert history.first_reaching("accuracy", 0.0)["step"] == 0
    assert history.first_reaching("accuracy", 1.1) is None
    assert (tmp_path / "h.csv").read_text().splitlines()[0].startswith("step,epoch,syncs")
    dashboard = read_run(str(tmp_path / "tb" / "fda"))
    # The final sync is written at the last step again, as FDACallback's dashboard does.
    assert [step for step, _ in dashboard["fda/syncs"]] == list(range(1, 21)) + [20]
    assert float(dashboard["fda/syncs"][-1][1]) == 7
    assert float(dashboard["fda/bytes_sent"][-1][1]) == pytest.approx(stats.paper_bytes, rel=1e-6)
    assert len(dashboard["fda/round_length"]) == 7
    evaluations = read_run(str(tmp_path / "tb" / "simulation"))
    assert [step for step, _ in evaluations["simulation/accuracy"]] == [0, 5, 10, 15, 20]

    # A second run starts afresh: same trigger and seed, same history.
    again = sim.run(keras_fda.Periodic(3), x, y, parts, batch_size=6, epochs=2,
                    evaluations_per_epoch=2, validation_data=(x, y))  # fmt: skip
    np.testing.assert_allclose(again.evaluations["loss"], ev["loss"], rtol=1e-6)


def fit_with_callback(trigger, lag, steps, batch_size=8):
    """FDACallback on one local worker, fed the order the simulator gives one worker."""
    x, y = setup.make_data()
    order = batch_schedule([np.arange(len(x))], batch_size, steps)[:, 0].reshape(-1)
    model = setup.make_model()
    fda = keras_fda.FDACallback(trigger=trigger, overlap=lag == 1)
    model.fit(x[order], y[order], batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=[fda])  # fmt: skip
    return fda.communication, model.get_weights()


# (trigger, lag, steps, final syncs): thresholds for one worker of the shared
# setup. 1e-9 fires on every state that drifted; with lag 1 it decides every
# other step, so an odd run ends on the pending decision (settle) and an even
# one on a synced step, with nothing left to sync.
@pytest.mark.parametrize(
    "threshold, lag, steps, final",
    [(1e9, 0, 5, 1), (1e9, 1, 5, 1), (1e-9, 1, 5, 1), (1e-9, 1, 6, 0), (0.02, 0, 6, 1)],
)
def test_history_counts_the_final_sync_as_fda_callback_does(data, threshold, lag, steps, final):
    """Same run, same totals: the sync a run ends with is in both drivers' counts."""
    x, y = data
    sim = Simulation(setup.make_model(), 1)
    history = sim.run(keras_fda.FDA("linear", threshold=threshold), x, y, [np.arange(len(x))],
                      batch_size=8, steps=steps, lag=lag)  # fmt: skip
    stats = history.communication()
    assert history.final_syncs == final
    assert stats.syncs == history.synced.sum() + final
    if threshold == 1e9:
        assert stats.syncs == 1  # never fired: only the sync at the end
    # The last row evaluates the average that sync makes, and counts it.
    assert history.evaluations["syncs"][-1] == stats.syncs
    assert history.evaluations["paper_bytes"][-1] == stats.paper_bytes

    real, weights = fit_with_callback(keras_fda.FDA("linear", threshold=threshold), lag, steps)
    assert (real.steps, real.syncs) == (stats.steps, stats.syncs)
    assert real.paper_bytes == stats.paper_bytes
    for got, want in zip(sim.model.get_weights(), weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# The benchmark's data lives next to the checkout (../shared/data), not in it.
BENCHMARK_DATA = ROOT.parent / "shared" / "data" / "femnist_subset.npz"


@pytest.mark.skipif(not BENCHMARK_DATA.exists(), reason=f"no benchmark data at {BENCHMARK_DATA}")
def test_benchmark_smoke_run_writes_table_csv_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/comm_to_accuracy.py", "--preset=smoke",
         f"--out_dir={tmp_path}", "--name=smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "smoke.md").read_text()
    assert "| target | synchronous |" in report and "efficiency" in report
    assert "## Summary: fda-auto+nesterov against tuned periodic+nesterov" in report
    assert "| periodic+nesterov tau=4 |" in report
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert (tmp_path / "smoke.csv").read_text().startswith("task,model,workers,family")


def test_bad_arguments_say_what_to_do(data):
    x, y = data
    model = setup.make_model()
    with pytest.raises(ValueError, match="compile"):
        Simulation(keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)]), 2)
    with pytest.raises(ValueError, match="num_workers"):
        Simulation(model, 0)
    sim = Simulation(model, 2)
    parts = keras_fda.partition.iid(len(x), 2)
    with pytest.raises(ValueError, match="one index array per worker"):
        sim.run(keras_fda.Synchronous(), x, y, parts[:1])
    with pytest.raises(TypeError, match="SyncTrigger"):
        sim.run("fda", x, y, parts)
    with pytest.raises(ValueError, match="no samples"):
        sim.run(keras_fda.Synchronous(), x, y, [parts[0], np.array([], int)])


def test_benchmark_partition_flag_picks_the_partitioner():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import comm_to_accuracy
    from absl import app

    labels = np.repeat(np.arange(4), 10)
    writers = np.arange(40) // 5
    for spec in ("by_writer", "iid", "sorted:1.0", "dirichlet:0.5"):
        parts = comm_to_accuracy.make_partitions(spec, writers, labels, 4, seed=0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(40)), spec
    parts = comm_to_accuracy.make_partitions("sorted:1.0", writers, labels, 4, seed=0)
    assert [np.unique(labels[p]).tolist() for p in parts] == [[0], [1], [2], [3]]
    for bad in ("sorted", "dirichlet", "by_writer:2", "random"):
        with pytest.raises(app.UsageError, match="--partition"):
            comm_to_accuracy.make_partitions(bad, writers, labels, 4, seed=0)


def test_run_trains_on_the_new_partitions_after_the_change(data):
    """Workers swap data at mid-run: worker 0 ends as a model trained on that schedule by hand."""
    x, y = data
    parts = keras_fda.partition.iid(len(x), 2, seed=0)
    change = {3: parts[::-1]}
    sim = Simulation(setup.make_model(), 2)
    sim.run(keras_fda.Periodic(2**62), x, y, parts, batch_size=4, steps=6, repartition=change)
    order = batch_schedule(parts, 4, 6, repartition=change)
    models = [setup.make_model() for _ in range(2)]
    for t in range(6):
        for k, model in enumerate(models):
            model.train_on_batch(x[order[t, k]], y[order[t, k]])
    # No sync before the end; the run ends with one, as a fit does.
    mean = [np.mean(ws, axis=0) for ws in zip(*(m.get_weights() for m in models))]
    for got, want in zip(sim.model.get_weights(), mean):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_auto_threshold_first_round_then_rounds_end_on_variance_or_cap(data):
    x, y = data
    parts = keras_fda.partition.iid(len(x), 2, seed=0)
    sim = Simulation(setup.make_model(), 2)
    history = sim.run(keras_fda.triggers.AutoFDA("exact", horizon=1, first_round=4), x, y,
                      parts, batch_size=4, steps=30)
    synced = np.flatnonzero(history.synced) + 1
    assert synced[0] == 4 and len(synced) >= 3
    # Every sync: the statistic (V / Theta, or steps / cap) reached 1.
    assert np.all(history.statistic[synced - 1] >= 1.0)
    assert np.all(history.statistic[np.flatnonzero(~history.synced)] < 1.0)
    again = sim.run(keras_fda.triggers.AutoFDA("exact", horizon=1, first_round=4), x, y,
                    parts, batch_size=4, steps=30)
    np.testing.assert_array_equal(again.synced, history.synced)


def test_benchmark_regime_flags_build_schedules_and_drifts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import comm_to_accuracy
    from absl import app

    assert comm_to_accuracy.learning_rate("constant:1e-3", 100) == 1e-3
    schedule = comm_to_accuracy.learning_rate("cosine:3e-3", 100)
    rates = [float(schedule(step)) for step in (0, 10, 55, 100)]
    assert rates[0] == 0.0 and abs(rates[1] - 3e-3) < 1e-9 and 0 < rates[2] < 3e-3
    assert rates[3] < 1e-9
    parts = [np.arange(0, 2), np.arange(2, 4), np.arange(4, 6)]
    change = comm_to_accuracy.repartition("rotate:0.5", parts, 10)
    assert list(change) == [5] and [p.tolist() for p in change[5]] == [[2, 3], [4, 5], [0, 1]]
    assert comm_to_accuracy.repartition("none", parts, 10) is None
    for bad in ("cosine", "linear:1e-3", "constant:-1"):
        with pytest.raises(app.UsageError, match="--lr"):
            comm_to_accuracy.learning_rate(bad, 100)
    for bad in ("rotate", "rotate:1.5", "rotate:half", "swap:0.5"):
        with pytest.raises(app.UsageError, match="--drift"):
            comm_to_accuracy.repartition(bad, parts, 10)


@pytest.mark.parametrize("trigger", ["linear", "periodic"])
def test_a_diverged_worker_stops_the_simulation_before_anything_is_averaged(data, trigger):
    """NaN weights: the statistic (FDA) or the average (periodic, no statistic) is caught."""
    x, y = data
    x = x.copy()
    x[::7] = np.nan  # a poisoned sample in most batches: NaN gradients, NaN weights
    sim = Simulation(setup.make_model(), 2)
    chosen = keras_fda.FDA("linear", 1e-3) if trigger == "linear" else keras_fda.Periodic(2)
    with pytest.raises(FloatingPointError, match="is NaN or Inf, so nothing was averaged"):
        sim.run(chosen, x, y, keras_fda.partition.iid(len(x), 2), batch_size=8, steps=20)
