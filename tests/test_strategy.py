"""FDAStrategy on 2 and 4 logical CPU devices, and over 2 worker processes.

Each scenario runs tests/workers/strategy_worker.py in a fresh process (the
logical devices must be configured before TensorFlow initializes); the
scenarios start together and the tests read their results. The multi-worker
scenario runs the same script in 2 processes under a real
MultiWorkerMirroredStrategy (TF_CONFIG, gRPC on 127.0.0.1).
"""

import concurrent.futures
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fda.drivers.strategy import FDAStrategy
from keras_fda.engine.core import Engine
from keras_fda.policies.outer import SyncState
from conftest import SCALAR_TAGS, check_layout, launch, read_dashboard, read_run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "workers", "strategy_worker.py")

SCENARIOS = {
    # 2 replicas, linear FDA, against keras_fda.Simulation on the same batches.
    "fda2": [
        "--devices", "2", "--trigger", "fda", "--threshold", "0.3", "--steps", "150",
        "--read", "predict",
    ],
    # 2 replicas, threshold="auto" (AutoFDA, short rounds), against the simulator.
    "auto2": ["--devices", "2", "--trigger", "auto", "--steps", "100"],
    # 2 replicas, linear FDA with DiLoCo's outer Nesterov step at each sync it decides.
    "nesterov2": [
        "--devices", "2", "--trigger", "fda", "--threshold", "0.3", "--steps", "100",
        "--sync", "nesterov",
    ],
    # 2 replicas, a custom trigger that reads each replica's own optimizer moments.
    "moments2": [
        "--devices", "2", "--trigger", "moments", "--threshold", "1.5e-5", "--steps", "100",
    ],
    # 4 replicas, periodic averaging every 5 steps.
    "periodic4": ["--devices", "4", "--trigger", "periodic", "--tau", "5", "--steps", "30"],
    # Synchronous trigger + SGD vs plain MirroredStrategy.
    "mirrored2": ["--devices", "2", "--scenario", "mirrored", "--steps", "30"],
    # A functional model, SGD with momentum, clipping and weight decay; read by save().
    "functional2": [
        "--devices", "2", "--model", "functional", "--optimizer", "sgd_clipped", "--read", "save",
        "--threshold", "0.3", "--steps", "60",
    ],
    # A subclassed model.
    "subclassed2": [
        "--devices", "2", "--model", "subclassed", "--threshold", "0.1", "--steps", "50",
    ],
}
# Compared with keras_fda.Simulation on the same batches and initial weights.
AGAINST_SIMULATOR = ["fda2", "functional2", "subclassed2", "auto2", "moments2", "nesterov2"]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """Every one-process scenario of this file, run at most one per core at a time.

    Started all at once on two cores, the eight SCENARIOS took 312 s; two at a
    time, 83 s: each TensorFlow process sizes its thread pools to every core.
    The two longest runs go first so the pool ends together.
    """
    runs = {
        "sync": [
            "--scenario", "sync", "--devices", "2", "--trigger", "periodic", "--tau", "3",
            "--steps", "12",
        ],
        "keras_user": ["--scenario", "keras_user", "--devices", "2"],
        **SCENARIOS,
    }
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"

    outs = {name: tmp_path_factory.mktemp(name) for name in runs}

    def run(name):
        result = subprocess.run(
            [sys.executable, WORKER, *runs[name], "--out", str(outs[name])], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=480,
        )  # fmt: skip
        assert result.returncode == 0, f"{name}:\n{result.stdout[-4000:]}"

    with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(run, runs))
    return outs


@pytest.fixture(scope="module")
def results(one_process_runs):
    return {
        name: dict(np.load(one_process_runs[name] / "result.npz"), out=one_process_runs[name])
        for name in SCENARIOS
    }


@pytest.fixture(scope="module")
def multiworker(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiworker")
    result = launch(
        2, "tests/workers/strategy_worker.py", "--scenario", "multiworker",
        "--trigger", "fda", "--threshold", "0.3", "--steps", "150", "--out", out,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [dict(np.load(out / f"result_{i}.npz"), out=out) for i in range(2)]


@pytest.fixture(scope="module")
def sync_options(one_process_runs):
    """The sync options on 2 logical devices (strategy_worker.py --scenario sync)."""
    out = one_process_runs["sync"]
    return {f.stem[len("sync_"):]: dict(np.load(f)) for f in out.glob("sync_*.npz")}


def _multiworker_sync(tmp_path_factory, sync):
    """Periodic averaging with the `sync` option of strategy_worker.py on 2 worker processes."""
    out = tmp_path_factory.mktemp(f"multiworker_{sync}")
    result = launch(
        2, "tests/workers/strategy_worker.py", "--scenario", "multiworker",
        "--trigger", "periodic", "--tau", "5", "--steps", "40", "--sync", sync,
        "--out", out, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [dict(np.load(out / f"result_{i}.npz"), out=out) for i in range(2)]


@pytest.fixture(scope="module")
def multiworker_sync(tmp_path_factory):
    return _multiworker_sync(tmp_path_factory, "nesterov_bfloat16")


@pytest.fixture(scope="module")
def multiworker_int8(tmp_path_factory):
    return _multiworker_sync(tmp_path_factory, "nesterov_int8")


@pytest.fixture(scope="module")
def keras_user(one_process_runs):
    """tests/workers/keras_user_checks.py on 2 logical devices: {check: findings}."""
    found = one_process_runs["keras_user"].glob("*.json")
    return {f.stem: json.loads(f.read_text()) for f in found}


@pytest.fixture(scope="module")
def cluster_callbacks(tmp_path_factory):
    """EarlyStopping, ModelCheckpoint(save_best_only), ReduceLROnPlateau on 2 workers."""
    out = tmp_path_factory.mktemp("callbacks")
    result = launch(
        2, "tests/workers/strategy_worker.py", "--scenario", "callbacks", "--threshold", "0.3",
        "--out", out, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [dict(np.load(out / f"callbacks_{i}.npz")) for i in range(2)]


def _sync_steps(result):
    return np.diff(np.concatenate([[0.0], result["syncs"]])) > 0


@pytest.mark.parametrize("name", AGAINST_SIMULATOR)
def test_fda_decisions_and_statistic_match_the_simulator(results, name):
    r = results[name]
    synced = _sync_steps(r)
    assert 2 <= synced.sum() < len(synced)
    np.testing.assert_array_equal(synced, r["sim_synced"])
    np.testing.assert_allclose(r["statistic"], r["sim_statistic"], rtol=1e-4, atol=1e-5)
    if name == "auto2":  # FDAStrategy hands AutoFDA each round's state: the rounds adapt
        rounds = np.diff(np.flatnonzero(synced), prepend=-1)
        assert len(set(rounds.tolist())) > 1, rounds


def test_replicas_diverge_between_syncs_and_are_equal_after(results):
    for name in ("fda2", "periodic4"):
        r = results[name]
        synced = _sync_steps(r)
        assert np.all(r["spread"][synced] == 0.0), name
        assert np.all(r["spread"][~synced] > 0.0), name


@pytest.mark.parametrize("name", ["fda2", "functional2"])
def test_predict_and_save_see_the_average_of_the_drifted_replicas(results, name):
    r = results[name]  # fda2 reads with predict(), functional2 with save() + load_model()
    assert r["spread_before_read"] > 0.0
    assert r["spread_after_read"] == 0.0
    assert r["read_error"] < 1e-5
    assert r["predict_rows"] == 360


@pytest.mark.parametrize("name", AGAINST_SIMULATOR)
def test_fit_ends_with_one_averaged_model(results, name):
    r = results[name]
    assert r["spread_after_fit"] == 0.0
    if name == "subclassed2":  # nothing read the model inside fit: fit's end synced it
        assert not _sync_steps(r)[-1]
        assert r["syncs_after_fit"] == r["syncs"][-1] + 1


def test_periodic_on_4_devices_syncs_every_tau_steps(results):
    r = results["periodic4"]
    synced = _sync_steps(r)
    np.testing.assert_array_equal(np.flatnonzero(synced) + 1, np.arange(5, 31, 5))
    np.testing.assert_array_equal(synced, r["sim_synced"])
    np.testing.assert_array_equal(r["statistic"], r["sim_statistic"])


@pytest.mark.parametrize("name", AGAINST_SIMULATOR)
def test_training_reaches_the_simulator_accuracy(results, name):
    r = results[name]
    assert r["accuracy"] > 0.2  # 10 classes: chance is 0.1; 50-150 non-IID steps
    assert abs(r["accuracy"] - r["sim_accuracy"]) < 0.02
    assert results["fda2"]["accuracy"] > 0.6


def test_communication_matches_the_simulator_accounting(results):
    r = results["fda2"]
    steps, syncs, paper_bytes, num_params = r["comm"]
    sim_steps, sim_syncs, sim_paper_bytes, sim_params = r["sim_comm"]
    assert (steps, num_params) == (sim_steps, sim_params)
    # predict() inside fit, after the last step, averaged the last round's
    # drift; the simulator's final sync does too (issue 21.7).
    assert syncs == sim_syncs
    assert paper_bytes == sim_paper_bytes
    # The logged fda/comm_bytes is the same formula, in the graph.
    assert r["syncs"][-1] == syncs - 1


def test_synchronous_trigger_equals_mirrored_strategy_with_sgd(results):
    r = results["mirrored2"]
    assert r["moved"] > 0.05
    assert r["diff"] < 1e-5


def test_multiworker_decisions_and_accuracy_match_the_simulator(multiworker):
    first, second = multiworker
    synced = _sync_steps(first)
    assert 2 <= synced.sum() < len(synced)
    np.testing.assert_array_equal(synced, first["sim_synced"])
    np.testing.assert_allclose(first["statistic"], first["sim_statistic"], rtol=1e-4, atol=1e-5)
    # The FDA decision is one value all-reduced: bit-identical on every worker.
    np.testing.assert_array_equal(first["statistic"], second["statistic"])
    assert abs(first["accuracy"] - first["sim_accuracy"]) < 0.02
    assert first["accuracy"] == second["accuracy"]
    # predict() gathers every worker's share of the test set.
    assert first["predict_rows"] == second["predict_rows"] == 360


def test_multiworker_replicas_diverge_between_syncs_and_are_equal_after(multiworker):
    first, second = multiworker
    synced = _sync_steps(first)
    difference = np.max(np.abs(first["weights"] - second["weights"]), axis=1)
    assert np.all(difference[synced] == 0.0)
    assert np.all(difference[~synced] > 0.0)
    # The end of fit synchronized the last round: one model on every worker.
    assert not synced[-1]
    np.testing.assert_array_equal(first["weights_after_fit"], second["weights_after_fit"])
    assert first["syncs_after_fit"] == first["syncs"][-1] + 1


def test_multiworker_base_strategy_is_taken_over_once(multiworker):
    assert "already taken over" in str(multiworker[0]["second_error"])


def test_multiworker_train_step_all_reduces_only_fda_state_weights_and_input_check(multiworker):
    first, _ = multiworker
    origins, sizes = list(first["all_reduce_origins"]), list(first["all_reduce_sizes"])
    num_params = int(first["comm"][3])
    # Traced (Keras traces the replica step twice here): FDA's 2-value state,
    # the weights (in the sync branch, run only on a sync) and TF's one-value
    # input check; no all-reduce of logged metrics.
    assert "other" not in origins, list(zip(origins, sizes))
    fda = [n for o, n in zip(origins, sizes) if o == "fda"]
    assert set(fda) == {2, num_params} and fda.count(2) == fda.count(num_params)
    assert {n for o, n in zip(origins, sizes) if o == "input"} == {1}


def test_multiworker_logs_are_each_workers_own_and_totals_match(multiworker):
    first, second = multiworker
    # No per-step all-reduce of the metrics: each worker logs its own loss.
    assert np.any(first["loss"] != second["loss"])
    steps, syncs, paper_bytes, num_params = first["comm"]
    sim_steps, sim_syncs, sim_paper_bytes, _ = first["sim_comm"]
    assert (steps, syncs) == (sim_steps, sim_syncs)  # both count the sync at the end of fit
    assert paper_bytes == sim_paper_bytes
    np.testing.assert_array_equal(first["comm"], second["comm"])


def check_dashboard(result):
    """The chief's dashboard holds the strategy's own per-step values and totals."""
    run = os.path.join(result["out"], "logs", "fda")
    events = read_dashboard(run)
    assert set(SCALAR_TAGS) | {"fda/round_length"} <= set(events)
    check_layout(events)
    steps = len(result["syncs"])
    assert [step for step, _ in events["fda/variance"]] == list(range(1, steps + 1))
    np.testing.assert_allclose(
        [v for _, v in events["fda/variance"]], result["statistic"], rtol=1e-6
    )
    np.testing.assert_array_equal([v for _, v in events["fda/syncs"]], result["syncs"])
    # Totals of the steps: `communication` less the sync after the last step.
    _, syncs, paper_bytes, num_params = result["comm"]
    assert events["fda/syncs"][-1][1] == syncs - 1
    assert events["fda/bytes_sent"][-1][1] == np.float32(paper_bytes - 2 * 2 * 4 * num_params)
    # One histogram per sync in fit; the last one counts every round.
    assert len(events["fda/round_length"]) == syncs - 1
    assert events["fda/round_length"][-1][1][:, 2].sum() == syncs - 1
    return events


def test_dashboard_on_devices_shares_keras_tensorboard_log_dir(results):
    r = results["fda2"]
    fda_events = check_dashboard(r)
    # keras.callbacks.TensorBoard wrote its own run, on the same step axis.
    train_events = read_run(os.path.join(r["out"], "logs", "train"))
    assert not any(tag.startswith("fda/") for tag in train_events)
    keras_steps = [step for step, _ in train_events["batch_loss"]]
    assert keras_steps == [step for step, _ in fda_events["fda/variance"]]


def test_dashboard_on_a_cluster_is_written_by_the_chief_only(multiworker):
    chief, _ = multiworker
    check_dashboard(chief)
    run = os.path.join(chief["out"], "logs", "fda")
    assert len([f for f in os.listdir(run) if f.startswith("events.out")]) == 1


def test_unsupported_strategies_and_settings_raise_clear_errors():
    with pytest.raises(TypeError, match="MirroredStrategy"):
        FDAStrategy(tf.distribute.OneDeviceStrategy("/cpu:0"), threshold=1.0)
    with pytest.raises(ValueError, match="threshold"):
        FDAStrategy(tf.distribute.MirroredStrategy(["/cpu:0"]))
    with pytest.raises(ValueError, match="number of steps"):
        FDAStrategy(tf.distribute.MirroredStrategy(["/cpu:0"]), threshold=1.0, update_freq="epoch")
    with pytest.raises(ValueError, match="update_freq"):
        FDAStrategy(tf.distribute.MirroredStrategy(["/cpu:0"]), threshold=1.0, update_freq=0)
    strategy = FDAStrategy(tf.distribute.MirroredStrategy(["/cpu:0"]), threshold=1.0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse", steps_per_execution=2, jit_compile=False)
    with pytest.raises(ValueError, match="steps_per_execution"):
        model.fit(np.zeros((8, 3)), np.zeros((8, 1)), batch_size=4, verbose=0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(
            optimizer=keras.optimizers.SGD(use_ema=True), loss="mse", jit_compile=False
        )
    with pytest.raises(ValueError, match="use_ema=False"):
        model.fit(np.zeros((8, 3)), np.zeros((8, 1)), batch_size=4, verbose=0)


SYNC_OPTIONS = [
    "plain", "bfloat16", "float16", "nesterov", "nesterov_bfloat16", "average", "reset",
    "bfloat16_average", "float16_average",
]
AVERAGED_MOMENTS = ("average", "bfloat16_average", "float16_average")


@pytest.mark.parametrize("option", SYNC_OPTIONS)
def test_each_sync_option_leaves_identical_replicas_after_each_sync(sync_options, option):
    found = sync_options[option]
    synced = _sync_steps(found)
    assert synced.tolist() == [False, False, True] * 4  # periodic, tau 3
    assert np.all(found["spread"][synced] == 0.0)
    assert np.all(found["spread"][~synced] > 0.0)
    # The syncs at the end of fits (the final-sync path) too.
    assert [found[f"final_spread_{fit}"] for fit in range(3)] == [0.0] * 3
    moments_equal = found["moment_spread"][synced] == 0.0
    if option in AVERAGED_MOMENTS + ("reset",):
        assert np.all(moments_equal)
    else:  # "local": each replica keeps its own
        assert not np.any(moments_equal)
    zeroed = found["moment_norm"][synced] == 0.0
    if option == "reset":
        assert np.all(zeroed)
    else:
        assert not np.any(zeroed)
    # After a recompile the rule acts on the new optimizer's moments.
    assert found["recompiled_syncs"].tolist() == [4, 4, 5]
    spread, norm = found["recompiled_moment_spread"], found["recompiled_moment_norm"]
    assert spread[0] > 0.0 and norm[0] > 0.0
    assert (spread[-1] == 0.0) == (option in AVERAGED_MOMENTS + ("reset",))
    assert (norm[-1] == 0.0) == (option == "reset")


def _replay(found, outer):
    """The models after each fit's final sync by numpy, from each replica's weights before it.

    `outer`: None (the plain mean) or Keras SGD's (learning_rate, momentum), Nesterov.
    """
    count = len([k for k in found if k.startswith("initial_")])
    w0 = [found[f"initial_{i}"].astype(np.float64) for i in range(count)]
    velocity = [np.zeros_like(w) for w in w0]
    replayed, drifts, mean_drifts = [], [], []
    for fit in range(3):
        drift = mean_drift = 0.0
        for i in range(count):
            replicas = found[f"before_{i}"][fit].astype(np.float64)
            drift = max(drift, float(np.max(np.abs(replicas - w0[i]))))
            mean = replicas.mean(axis=0)
            mean_drift = max(mean_drift, float(np.max(np.abs(mean - w0[i]))))
            if outer is None:
                w0[i] = mean
                continue
            rate, momentum = outer
            gradient = w0[i] - mean
            velocity[i] = momentum * velocity[i] - rate * gradient
            w0[i] = w0[i] + momentum * velocity[i] - rate * gradient
        replayed.append([w.copy() for w in w0])
        drifts.append(drift)
        mean_drifts.append(mean_drift)
    return replayed, drifts, mean_drifts


@pytest.mark.parametrize("option", ["plain", "nesterov", "bfloat16", "nesterov_bfloat16"])
def test_a_sync_before_a_read_is_the_plain_average_also_with_an_outer_step(sync_options, option):
    """Only the syncs the trigger decides take the outer step (the simulator's, compared in
    `nesterov2`); the one before a read averages plainly, the half payload within its rounding."""
    found = sync_options[option]
    replayed, drifts, _ = _replay(found, None)
    stepped, _, mean_drifts = _replay(found, (0.7, 0.9))
    for fit in range(3):
        moved = 0.0
        for i, expected in enumerate(replayed[fit]):
            after = found[f"after_{i}"][fit]
            if option.endswith("bfloat16"):
                # Each drift rounded to 8 bits (relative error 2^-9), then
                # their sum and mean in bfloat16: a few such roundings.
                tolerance = 2.0 ** -7 * drifts[fit]
            else:
                tolerance = 1e-6  # float32 arithmetic
            np.testing.assert_allclose(after, expected, rtol=0, atol=tolerance)
            moved = max(moved, float(np.max(np.abs(after - stepped[fit][i]))))
        # Not the outer step's model: the first step moves 1.33x the mean drift.
        assert moved > 0.1 * mean_drifts[fit]


def test_sync_bytes_follow_the_payload_and_moments(sync_options):
    num_params = int(sync_options["plain"]["comm"][2])
    moments = int(sync_options["average"]["moment_params"])  # Adam: 2 per parameter
    assert moments == 2 * num_params
    expected = {
        "plain": 4 * num_params, "nesterov": 4 * num_params, "reset": 4 * num_params,
        "bfloat16": 2 * num_params, "float16": 2 * num_params,
        "nesterov_bfloat16": 2 * num_params,  # the outer optimizer sends nothing
        "average": 4 * num_params + 4 * moments,
        "bfloat16_average": 2 * num_params + 4 * moments,
        "float16_average": 2 * num_params + 4 * moments,
    }
    for option, sync_bytes in expected.items():
        found = sync_options[option]
        steps, syncs, _, state_bytes = found["comm"]
        assert (steps, syncs, state_bytes) == (12, 4, 0)
        assert found["sync_bytes"] == sync_bytes, option
        # The paper formula: the initial broadcast sends the model, each sync its payload.
        assert found["paper_bytes"] == 2 * 2 * (4 * num_params + syncs * sync_bytes), option


def _assert_identical_after_each_sync(first, second):
    synced = _sync_steps(first)
    assert synced.tolist() == ([False] * 4 + [True]) * 8
    np.testing.assert_array_equal(synced, first["sim_synced"])
    difference = np.max(np.abs(first["weights"] - second["weights"]), axis=1)
    assert np.all(difference[synced] == 0.0)
    assert np.all(difference[~synced] > 0.0)
    np.testing.assert_array_equal(first["weights_after_fit"], second["weights_after_fit"])
    assert abs(first["accuracy"] - first["sim_accuracy"]) < 0.03
    steps, syncs, paper_bytes, num_params = first["comm"]
    assert (steps, syncs) == (40, 8)  # no steps after the last sync: no sync at the end
    return paper_bytes, num_params


def test_multiworker_outer_nesterov_with_bfloat16_keeps_workers_identical(multiworker_sync):
    paper_bytes, num_params = _assert_identical_after_each_sync(*multiworker_sync)
    assert paper_bytes == 2 * 2 * (4 * num_params + 8 * 2 * num_params)


def test_multiworker_outer_nesterov_with_int8_keeps_workers_identical(multiworker_int8):
    """The quantized drifts are all-gathered through the strategy: same bits everywhere."""
    paper_bytes, num_params = _assert_identical_after_each_sync(*multiworker_int8)
    per_sync = (paper_bytes / (2 * 2) - 4 * num_params) / 8
    assert num_params < per_sync < 2 * num_params  # int8 levels, scales and block padding


def test_quantized_sync_with_several_replicas_per_worker_is_a_clear_error(sync_options):
    """One error-feedback residual per worker: 2 replicas in one process are refused."""
    error = str(sync_options["nesterov_int8"]["error"])
    assert "sync_dtype='int8'" in error and "2 replicas per worker" in error


@pytest.mark.parametrize(
    "sync", [{"sync_dtype": "int8"}, {"sync_dtype": "bfloat16", "optimizer_state": "average"}]
)
def test_the_payload_is_built_only_when_a_sync_happens(monkeypatch, sync):
    """Issue 25: every train (and test) step quantized the drift that only a sync sends."""
    built = {"weights": tf.Variable(0, dtype=tf.int64), "moments": tf.Variable(0, dtype=tf.int64)}

    def counted(method, key):
        def wrapper(*args, **kwargs):
            # In the graph: counts the runs, not the traces.
            built[key].assign_add(1)
            return method(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(Engine, "payload", counted(Engine.payload, "weights"))
    monkeypatch.setattr(SyncState, "moments_payload", counted(SyncState.moments_payload, "moments"))
    strategy = FDAStrategy(
        tf.distribute.MirroredStrategy(["/cpu:0"]), trigger="periodic", tau=3, **sync
    )
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss="mse", jit_compile=False)
    x = np.random.default_rng(0).normal(size=(56, 3)).astype("float32")
    y = x[:, :2]
    model.fit(x, y, batch_size=4, verbose=0)  # 14 steps: syncs after 3, 6, 9, 12 and at the end
    model.evaluate(x, y, batch_size=4, verbose=0)  # nothing drifted: no sync
    assert strategy.communication.syncs == 5
    assert int(built["weights"].numpy()) == int(built["moments"].numpy()) == 5


def test_bad_sync_options_raise_clear_errors():
    base = tf.distribute.MirroredStrategy(["/cpu:0"])
    with pytest.raises(ValueError, match="sync_dtype must be None or one of"):
        FDAStrategy(base, threshold=1.0, sync_dtype="int2")
    with pytest.raises(TypeError, match='must be None, "nesterov" or a Keras optimizer'):
        FDAStrategy(base, threshold=1.0, outer_optimizer="sgd")
    with pytest.raises(ValueError, match="use_ema=False"):
        FDAStrategy(base, threshold=1.0, outer_optimizer=keras.optimizers.SGD(use_ema=True))
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        FDAStrategy(base, threshold=1.0, optimizer_state="shared")


def test_epoch_logs_are_the_same_on_every_worker_so_callbacks_decide_alike(cluster_callbacks):
    """Issue 12.1: each worker's own epoch loss made EarlyStopping stop one worker only."""
    first, second = cluster_callbacks
    # The workers train on different classes: their own losses differ; the
    # epoch logs are the mean over the workers, identical on both.
    np.testing.assert_array_equal(first["loss"], second["loss"])
    np.testing.assert_array_equal(first["accuracy"], second["accuracy"])
    np.testing.assert_array_equal(first["lr"], second["lr"])
    assert first["lr"][-1] < first["lr"][0]  # ReduceLROnPlateau acted, on both
    assert 0 < first["stopped_epoch"] == second["stopped_epoch"] < 9  # EarlyStopping, on both
    np.testing.assert_array_equal(first["final"], second["final"])


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", ["naive", "linear", "sketch"])
def test_weights_of_any_float_dtype_train_and_average_in_their_precision(keras_user, dtype, variant):
    """Issue 12.3: float32 direction times float64 drift was a TypeError."""
    found = keras_user["dtypes"][f"{dtype}-{variant}"]
    assert "error" not in found, found["error"]
    assert found["dtypes"] == [dtype] and found["finite"]
    assert 0 < found["syncs"]
    if dtype == "float64":  # not rounded to float32 at the syncs
        assert not found["float32_exact"]


def test_recompiling_keeps_fda_and_its_checks(keras_user):
    """Issue 12.2: the second compile's optimizer all-reduced gradients, unchecked."""
    found = keras_user["recompile"]
    assert found["first_steps"] == found["second_steps"] == 20
    spread = np.array(found["second_spread"])
    synced = np.diff(np.concatenate([[found["second_syncs"][0]], found["second_syncs"]])) > 0
    # The new optimizer trains each replica on its own: they drift between syncs.
    assert np.all(spread[~synced] > 0) and np.any(~synced)
    assert max(found["second_variance"]) > 0
    assert found["steps"] == 40 == found["optimizer_iterations"] + 20
    assert found["steps_per_execution"].startswith("ValueError: FDAStrategy checks after every")
    assert found["jit_compile"].startswith("ValueError: FDAStrategy's train step uses merge_call")


def test_two_fits_count_together_and_set_weights_starts_a_new_round(keras_user):
    """Issue 12.9 (FDAStrategy side) and the sweep: set_weights left a stale reference."""
    found = keras_user["two_fits"]
    assert (found["after_first"], found["steps"], found["iterations"]) == (10, 20, 20)
    assert found["syncs"] == 2  # the end of each fit
    # After set_weights the naive estimate measures the drift from the new
    # weights, as at the start of the first fit, not from the old reference.
    first, second = found["first_variance"], found["second_variance"]
    np.testing.assert_allclose(second[0], first[0], rtol=0.5)


@pytest.mark.parametrize("trigger", ["fda", "periodic"])
def test_a_nan_replica_is_an_error_before_anything_is_averaged(keras_user, trigger):
    """Issue 12.4: a NaN statistic was taken for 'no sync' and the final sync skipped."""
    found = keras_user["nan"][trigger]
    what = "the fda-linear statistic" if trigger == "fda" else "the average of the weights of"
    assert "FDA stopped training at step" in found["error"] and what in found["error"]
    assert found["error"].startswith("InvalidArgumentError")
    assert found["first_replica_finite"]  # the healthy replica was never mixed with NaN
    assert found["steps"] == (5 if trigger == "fda" else 6)


def test_multiworker_workers_with_different_settings_fail_at_construction(tmp_path):
    """Issue 21.6 (FDAStrategy side): each worker's graph followed its own threshold: a hang."""
    result = launch(
        2, "tests/workers/strategy_worker.py", "--scenario", "settings", "--out", tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    for index in range(2):
        assert any(
            line.startswith(f"[worker {index}] ValueError: Workers disagree on the FDAStrategy "
                            "setting trigger")
            for line in result.stdout.splitlines()
        ), result.stdout[-3000:]
