"""FDACallback across 2 and 3 real worker processes (TF collectives over gRPC on 127.0.0.1).

Each configuration runs once through the launcher, those with the same number
of workers one after another in the same worker processes;
`tests/workers/fit_worker.py` records the weights before and after FDA acted on
every step, and the tests check them against numpy.
"""

import json

import numpy as np
import pytest

from conftest import launch

WORKER = "tests/workers/fit_worker.py"
LINEAR_THRESHOLD = 0.05
SGD_LR, BATCH = 0.01, 16  # the synchronous run's, replayed in numpy
KAMP_THRESHOLD = 0.03


def load_runs(out, num_workers):
    runs = [dict(np.load(out / f"worker{i}.npz")) for i in range(num_workers)]
    for r in runs:
        r["stats"] = json.loads(str(r["stats"]))
        r["saved_keys"] = json.loads(str(r["saved_keys"]))
        r["trainable_shapes"] = json.loads(str(r["trainable_shapes"]))
    return runs


# The configurations, each one fit of a new model with a new FDACallback. Those
# with the same number of workers run one after another in one launch: a TF
# worker's start costs more than most of these fits.
TWO_WORKERS = {
    "linear": ["--variant", "linear", "--threshold", LINEAR_THRESHOLD],
    "sketch": ["--variant", "sketch", "--threshold", 0.05],
    "blocking": ["--variant", "linear", "--threshold", LINEAR_THRESHOLD, "--blocking"],
    # A quantized drift: int8 blocks with error feedback, all-gathered.
    "int8": ["--variant", "linear", "--threshold", LINEAR_THRESHOLD, "--sync_dtype", "int8"],
    "synchronous": [
        "--trigger", "synchronous", "--model", "linear", "--optimizer", "sgd", "--lr", SGD_LR,
        "--batch_size", BATCH, "--epochs", 1,
    ],
    "periodic": ["--trigger", "periodic", "--tau", 3],
    "kamp": ["--trigger", "kamp", "--threshold", KAMP_THRESHOLD],
    # Two fits of one model, EarlyStopping(restore_best_weights) after FDACallback, save.
    "keras_user": [
        "--variant", "linear", "--threshold", LINEAR_THRESHOLD, "--fits", 2,
        "--early_stopping_after_fda", "--save_after_fit",
    ],
    # EarlyStopping(restore_best_weights) with the recommended outer Nesterov step.
    "early_stop_outer": [
        "--variant", "linear", "--threshold", LINEAR_THRESHOLD, "--early_stopping_after_fda",
        "--outer", "nesterov",
    ],
    # By default the period follows the measured round trip ("auto").
    "default_cadence": [
        "--variant", "linear", "--threshold", LINEAR_THRESHOLD, "--exchange_every", "default",
    ],
}
THREE_WORKERS = {
    "exact": ["--variant", "exact", "--threshold", 0.2],
    "every3": ["--variant", "exact", "--threshold", 0.1, "--exchange_every", 3],
    # DiLoCo's outer Nesterov on a bfloat16 drift, Adam moments averaged at each sync.
    "outer": [
        "--variant", "linear", "--threshold", LINEAR_THRESHOLD, "--outer", "nesterov",
        "--sync_dtype", "bfloat16", "--optimizer_state", "average",
    ],
}


def run_all(tmp_path_factory, configurations, num_workers):
    """{name: each worker's record} for configurations run in one launch."""
    out = tmp_path_factory.mktemp("runs")
    cases = json.dumps([list(map(str, flags)) for flags in configurations.values()])
    result = launch(num_workers, WORKER, "--out", out, "--cases", cases, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:]
    return {
        name: load_runs(out / f"case{j}", num_workers) for j, name in enumerate(configurations)
    }


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    return run_all(tmp_path_factory, TWO_WORKERS, 2)


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory):
    return run_all(tmp_path_factory, THREE_WORKERS, 3)


@pytest.fixture(scope="module")
def linear2(two_workers):
    return two_workers["linear"]


@pytest.fixture(scope="module")
def exact3(three_workers):
    return three_workers["exact"]


@pytest.fixture(scope="module")
def sketch2(two_workers):
    return two_workers["sketch"]


def sync_steps(r):
    """Steps (0-based) after which FDA synchronized, from the logged counts."""
    return np.flatnonzero(np.diff(np.concatenate([[0], r["syncs"]])) > 0)


def assert_sync_structure(runs):
    """Identical start, identical after each sync, different between syncs, identical end."""
    first = runs[0]
    synced = sync_steps(first)
    assert 0 < len(synced) < len(first["syncs"]), "the run should sync sometimes, not always"
    for other in runs[1:]:
        np.testing.assert_array_equal(other["initial"], first["initial"])
        np.testing.assert_array_equal(sync_steps(other), synced)
        np.testing.assert_array_equal(other["statistic"], first["statistic"])
        for t in range(len(first["syncs"])):
            if t in synced:
                np.testing.assert_array_equal(other["after"][t], first["after"][t])
            else:
                assert not np.array_equal(other["after"][t], first["after"][t]), t
        np.testing.assert_array_equal(other["final"], first["final"])


def assert_syncs_exactly_when_above_threshold(runs):
    r = runs[0]
    above = np.flatnonzero(r["statistic"] > r["threshold"])
    np.testing.assert_array_equal(sync_steps(r), above)


def numpy_statistics(runs, statistic_fn, initial_w0, lag=1, every=1, steps_per_epoch=8):
    """Replays FDACallback's exchange schedule in numpy from the recorded weights.

    `statistic_fn(drifts, w0, w_prev)` gets the K drifts (rows), the
    reference w0 and the previous reference; the reference moves to the
    averaged weights after each logged sync. With `lag=0` (the blocking
    exchange) step t's state is computed from the weights after the local
    step, before FDA acted, and decides at step t. With `lag=1` (overlap) a
    state is computed after FDA acted at the step it is sent, and decides
    `every` steps later, or after the next step if an epoch ended meanwhile
    (the callback takes the result at an epoch's end).

    Returns:
        The statistic each step's decision used (NaN where none was made).
    """
    synced = set(sync_steps(runs[0]))
    steps = len(runs[0]["syncs"])
    w0, w_prev = initial_w0, initial_w0
    values = np.full(steps, np.nan)
    in_flight = pending = None

    def state(key, t):
        drifts = np.stack([r[key][t] for r in runs]).astype(np.float64) - w0
        return statistic_fn(drifts, w0, w_prev)

    for t in range(steps):
        if lag == 0:
            values[t] = state("before_trainable", t)
        else:
            if in_flight is not None:
                in_flight[1] += 1
                if in_flight[1] >= every:
                    pending, in_flight = in_flight[0], None
            if pending is not None:
                values[t], pending = pending, None
        if t in synced:
            w_prev, w0 = w0, runs[0]["after_trainable"][t].astype(np.float64)
        if lag and in_flight is None:
            in_flight = [state("after_trainable", t), 0]
        if lag and (t + 1) % steps_per_epoch == 0 and in_flight is not None:
            pending, in_flight = in_flight[0], None
    return values


def assert_statistics_replayed(runs, expected, rtol=2e-3):
    """The logged statistics are the replayed ones; the syncs, those above threshold."""
    r = runs[0]
    decided = np.flatnonzero(~np.isnan(expected))
    np.testing.assert_allclose(r["statistic"][decided], expected[decided], rtol=rtol, atol=1e-6)
    above = decided[r["statistic"][decided] > r["threshold"][decided]]
    np.testing.assert_array_equal(sync_steps(r), above)


def exact_variance(drifts, w0, w_prev):
    return np.mean(np.sum((drifts - drifts.mean(0)) ** 2, axis=1))


def linear_statistic(shapes):
    """Linear FDA's estimate in numpy, with its direction from the last round's step."""
    from keras_fda.policies.estimators import LinearEstimator

    est = LinearEstimator(seed=0)
    est.build(shapes)
    xi = {"v": np.concatenate([np.ravel(x) for x in est.initial_round_state()])}

    def linear(drifts, w0, w_prev):
        step = w0 - w_prev
        if np.any(step):
            xi["v"] = step / np.linalg.norm(step)
        s1 = np.mean(np.sum(drifts**2, axis=1))
        return s1 - np.mean(drifts @ xi["v"]) ** 2

    return linear


def test_two_workers_linear_sync_structure(linear2):
    assert_sync_structure(linear2)


def test_two_workers_linear_syncs_exactly_above_threshold(linear2):
    assert_syncs_exactly_when_above_threshold(linear2)
    assert (linear2[0]["threshold"] == LINEAR_THRESHOLD).all()


def test_three_workers_exact_sync_structure_and_decisions(exact3):
    assert_sync_structure(exact3)
    assert_syncs_exactly_when_above_threshold(exact3)


def test_three_workers_exact_lagged_decisions_equal_numpy_replay(exact3):
    """Overlap (the default): step t's variance decides after step t+1."""
    expected = numpy_statistics(exact3, exact_variance, exact3[0]["initial_trainable"])
    assert np.isnan(expected[0]) and not np.isnan(expected[1:]).any()
    assert_statistics_replayed(exact3, expected)


def test_two_workers_linear_lagged_decisions_equal_numpy(linear2):
    linear = linear_statistic(linear2[0]["trainable_shapes"])
    expected = numpy_statistics(linear2, linear, linear2[0]["initial_trainable"])
    assert_statistics_replayed(linear2, expected)


def test_blocking_exchange_decides_on_the_same_step(two_workers):
    """overlap=False: the state of step t decides after step t."""
    runs = two_workers["blocking"]
    assert_sync_structure(runs)
    linear = linear_statistic(runs[0]["trainable_shapes"])
    expected = numpy_statistics(runs, linear, runs[0]["initial_trainable"], lag=0)
    assert not np.isnan(expected).any()
    assert_statistics_replayed(runs, expected)


def test_exchange_every_three_steps_decides_on_the_replayed_schedule(three_workers):
    runs = three_workers["every3"]
    assert_sync_structure(runs)
    expected = numpy_statistics(runs, exact_variance, runs[0]["initial_trainable"], every=3)
    # Decisions every 3 steps and one step after each epoch's end (8 steps per epoch).
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(expected)), [3, 6, 8, 11, 14])
    assert_statistics_replayed(runs, expected)
    # Sent after steps 0, 3, 6, 8, 11, 14: the state bytes of 6 exchanges, not 16.
    stats = runs[0]["stats"]
    assert stats["paper_bytes"] == (stats["syncs"] + 1) * 2 * 3 * 4 * stats["num_params"] + (
        stats["state_bytes"] * 6 * 3
    )


@pytest.fixture(scope="module")
def outer3(three_workers):
    return three_workers["outer"]


def test_outer_optimizer_keeps_weights_and_moments_identical_after_each_sync(outer3):
    assert_sync_structure(outer3)
    synced = sync_steps(outer3[0])
    for other in outer3[1:]:
        np.testing.assert_array_equal(
            other["after_moments"][synced], outer3[0]["after_moments"][synced]
        )


def test_outer_nesterov_update_equals_numpy_replay(outer3):
    """w0 <- SGD(0.7, momentum 0.9, nesterov) step with gradient w0 - (w0 + mean bf16 drift)."""
    import ml_dtypes

    lr, momentum = 0.7, 0.9
    w0 = outer3[0]["initial_trainable"].astype(np.float64)
    velocity = np.zeros_like(w0)
    for t in sync_steps(outer3[0]):
        drifts = [
            (r["before_trainable"][t].astype(np.float32) - w0.astype(np.float32))
            .astype(ml_dtypes.bfloat16).astype(np.float64)
            for r in outer3
        ]
        gradient = -np.mean(drifts, axis=0)
        velocity = momentum * velocity - lr * gradient
        w0 = w0 + momentum * velocity - lr * gradient
        for r in outer3:
            np.testing.assert_allclose(r["after_trainable"][t], w0, rtol=2e-3, atol=2e-3)


def test_the_final_sync_at_train_end_is_a_plain_average_also_with_an_outer_step(outer3):
    """The outer step belongs to the syncs the trigger decides: after a round of any length,
    with momentum from other rounds, it left a language model worse than the average."""
    last = len(outer3[0]["syncs"]) - 1
    assert last not in sync_steps(outer3[0])  # steps remain for the final sync
    synced_at = sync_steps(outer3[0])[-1]
    w0 = outer3[0]["after"][synced_at].astype(np.float64)
    mean = np.mean([r["after"][last].astype(np.float64) for r in outer3], axis=0)
    drift = np.max(np.abs(mean - w0))
    assert drift > 1e-3
    for r in outer3:
        # The drift travels in bfloat16 (relative error 2^-9 per worker).
        np.testing.assert_allclose(r["final"], mean, rtol=0, atol=2.0**-7 * drift)


def test_sync_bytes_count_the_payload_and_the_moments(outer3):
    stats = outer3[0]["stats"]
    d = stats["num_params"]
    moments = outer3[0]["after_moments"].shape[1]
    monitored = sum(int(np.prod(s)) for s in outer3[0]["trainable_shapes"])
    # A bfloat16 drift (2 bytes per trainable parameter), the BatchNorm
    # statistics as float32 values and Adam's two float32 moments.
    sync_bytes = 2 * monitored + 4 * (d - monitored) + 4 * moments
    assert d > monitored and int(outer3[0]["sync_bytes"]) == sync_bytes
    k, syncs, steps = 3, stats["syncs"], stats["steps"]
    expected = 2 * k * (4 * d + syncs * sync_bytes) + stats["state_bytes"] * steps * k
    assert stats["paper_bytes"] == expected


@pytest.fixture(scope="module")
def int8_2(two_workers):
    return two_workers["int8"]


def _dequantized(x, levels=127, block=64):
    """numpy: x's int8 blocks as the workers dequantize them (absmax scales)."""
    n = len(x)
    blocks = np.pad(x, (0, -n % block)).reshape(-1, block)
    scale = np.max(np.abs(blocks), axis=1) / np.float32(levels)
    q = np.clip(np.round(blocks / np.where(scale > 0, scale, np.float32(1))[:, None]),
                -levels, levels)  # fmt: skip
    return (q * scale[:, None]).reshape(-1)[:n]


def test_int8_sync_is_bit_identical_and_feeds_back_what_it_dropped(int8_2):
    """Every worker adopts w0 + the in-order mean of the dequantized (drift + residual)."""
    assert_sync_structure(int8_2)
    sizes = [int(np.prod(s)) for s in int8_2[0]["trainable_shapes"]]
    w0 = int8_2[0]["initial_trainable"].astype(np.float32)
    residuals = [np.zeros_like(w0) for _ in int8_2]
    for t in sync_steps(int8_2[0]):
        sent = []
        for k, r in enumerate(int8_2):
            fed = r["before_trainable"][t].astype(np.float32) - w0 + residuals[k]
            pieces = np.split(fed, np.cumsum(sizes)[:-1])
            kept = np.concatenate([_dequantized(p) for p in pieces])
            residuals[k] = fed - kept
            sent.append(kept)
        w0 = w0 + (sent[0] + sent[1]) / np.float32(2)
        np.testing.assert_allclose(int8_2[0]["after_trainable"][t], w0, rtol=0, atol=1e-6)
        w0 = int8_2[0]["after_trainable"][t].astype(np.float32)
    assert np.abs(residuals[0]).max() > 0  # something was fed back
    stats = int8_2[0]["stats"]
    d, monitored = stats["num_params"], sum(sizes)
    gathered = sum(-(-n // 64) * (64 + 4) for n in sizes)  # levels and a scale per block
    # The BatchNorm statistics travel as float32 values, all-reduced.
    sync_bytes = gathered + 4 * (d - monitored)
    # Each of this 210-parameter model's tensors pads to a whole block: 0.72x of
    # float32's bytes here; 68 / 256 = 0.27x for tensors of many blocks.
    assert int(int8_2[0]["sync_bytes"]) == sync_bytes < 0.75 * 4 * d
    k, syncs, steps = 2, stats["syncs"], stats["steps"]
    assert stats["paper_bytes"] == 2 * k * (4 * d + syncs * sync_bytes) + (
        stats["state_bytes"] * steps * k
    )


def test_two_workers_sketch_uses_same_hashes_and_tracks_variance(sketch2):
    assert sketch2[0]["sketch_digest"] == sketch2[1]["sketch_digest"]
    assert_sync_structure(sketch2)
    assert_syncs_exactly_when_above_threshold(sketch2)

    def naive(drifts, w0, w_prev):
        return np.mean(np.sum(drifts**2, axis=1))

    initial = sketch2[0]["initial_trainable"]
    exact = numpy_statistics(sketch2, exact_variance, initial)[1:]
    s1 = numpy_statistics(sketch2, naive, initial)[1:]
    # sketch V = S1 - M/(1+eps): between the variance (minus AMS error) and S1.
    stat = sketch2[0]["statistic"][1:]
    assert (stat <= s1 * (1 + 1e-4) + 1e-7).all()
    assert (np.abs(stat - exact) <= 0.5 * (s1 - exact) + 1e-6).all()


def test_communication_totals_follow_the_paper_formula(linear2):
    stats = linear2[0]["stats"]
    k, d, steps, syncs = 2, stats["num_params"], stats["steps"], stats["syncs"]
    assert steps == len(linear2[0]["syncs"])
    # The final sync at train end is counted on top of the logged in-training syncs.
    assert syncs == linear2[0]["syncs"][-1] + 1
    assert stats["paper_bytes"] == (syncs + 1) * 2 * k * 4 * d + 8 * steps * k
    # On the wire each step's message also carries the 4-byte "still training" flag.
    assert stats["wire_bytes"] == pytest.approx(2 * (k - 1) * ((syncs + 1) * 4 * d + 12 * steps))
    assert linear2[0]["comm_bytes"][-1] == (syncs) * 2 * k * 4 * d + 8 * steps * k


def test_synchronous_equals_numpy_averaging_every_step(two_workers):
    lr, batch = SGD_LR, BATCH
    runs = two_workers["synchronous"]
    w = runs[0]["initial"].astype(np.float64)  # [kernel (6), bias (1)]
    for t in range(len(runs[0]["syncs"])):
        updated = []
        for r in runs:
            x = r["x"][t * batch : (t + 1) * batch].astype(np.float64)
            y = r["y"][t * batch : (t + 1) * batch].astype(np.float64)
            error = x @ w[:6, None] + w[6] - y  # Keras MSE: mean over the batch
            grad = np.concatenate([(2 * x.T @ error / batch).ravel(), [2 * error.sum() / batch]])
            updated.append(w - lr * grad)
        w = np.mean(updated, axis=0)
        for r in runs:
            np.testing.assert_allclose(r["after"][t], w, rtol=1e-4, atol=1e-5)
    assert runs[0]["syncs"].tolist() == list(range(1, len(runs[0]["syncs"]) + 1))
    np.testing.assert_array_equal(runs[0]["final"], runs[1]["final"])


def test_periodic_syncs_exactly_every_tau_steps(two_workers):
    runs = two_workers["periodic"]
    steps = len(runs[0]["syncs"])
    np.testing.assert_array_equal(sync_steps(runs[0]), np.arange(2, steps, 3))
    assert_sync_structure(runs)


def test_kamp_syncs_when_any_worker_drifts_past_threshold(two_workers):
    threshold = KAMP_THRESHOLD
    runs = two_workers["kamp"]

    def any_violation(drifts, w0, w_prev):
        return float(np.mean(np.sum(drifts**2, axis=1) > threshold))

    expected = numpy_statistics(runs, any_violation, runs[0]["initial_trainable"])
    np.testing.assert_array_equal(sync_steps(runs[0]), np.flatnonzero(np.nan_to_num(expected) > 0))
    assert_sync_structure(runs)


@pytest.fixture(scope="module")
def keras_user2(two_workers):
    return two_workers["keras_user"]


def test_restore_best_weights_listed_after_fda_still_ends_with_identical_weights(keras_user2):
    """Issue 12.7: EarlyStopping restored each worker's own weights after the final sync."""
    first, second = keras_user2
    np.testing.assert_array_equal(first["final"], second["final"])
    # The average of the workers' restored weights, not worker 0's own.
    assert not np.array_equal(first["final"], first["after"][-1])


def test_a_second_fit_counts_on_and_reuses_the_compiled_step(keras_user2):
    """Issue 12.9: each fit restarted the counters and retraced the step."""
    first, _ = keras_user2
    steps_per_fit = 16  # 2 epochs of 8 steps
    assert first["fit_steps"].tolist() == [steps_per_fit, 2 * steps_per_fit]
    assert first["optimizer_iterations"] == first["stats"]["steps"] == 2 * steps_per_fit
    # Traced in the first fit only (a variant for the first step, one for the others).
    assert first["step_traces"].tolist() == [2, 2]


def test_a_model_saved_after_fit_holds_only_its_own_weights(keras_user2):
    """Issue 12.5: the FDA state (3x the model) rode along in every saved model."""
    first, _ = keras_user2
    keys = first["saved_keys"]
    assert keys and not any("fda" in k for k in keys), keys


@pytest.fixture(scope="module")
def early_stop_outer2(two_workers):
    return two_workers["early_stop_outer"]


def test_restore_best_weights_with_an_outer_optimizer_ends_with_their_plain_average(
    early_stop_outer2,
):
    """Issue 21.3: the final sync took an outer step from w0 toward the restored weights."""
    first, second = early_stop_outer2
    np.testing.assert_array_equal(first["final"], second["final"])
    # The workers' restored best weights, averaged as the all-reduce does (float32).
    expected = (first["best"] + second["best"]) / np.float32(2)
    assert not np.array_equal(first["best"], second["best"])
    np.testing.assert_allclose(first["final"], expected, rtol=0, atol=1e-6)


def test_workers_with_different_settings_fail_at_the_start_naming_the_setting(tmp_path):
    """Issue 21.6: a different threshold on one worker hung both until the timeout."""
    result = launch(
        2, WORKER, "--out", tmp_path, "--variant", "linear", "--threshold", 0.001,
        "--threshold_on_last", 1000, "--collective_timeout", 60,
    )
    assert result.returncode != 0
    for index in range(2):
        lines = [l for l in result.stdout.splitlines() if l.startswith(f"[worker {index}]")]
        assert any("ValueError: Workers disagree on the FDACallback setting trigger" in l
                   for l in lines), result.stdout[-3000:]
    assert "PeerFailureError" not in result.stdout


def test_the_default_exchange_cadence_adapts_on_several_workers(two_workers):
    """Issue 22.3: by default the period follows the measured round trip ("auto")."""
    runs = two_workers["default_cadence"]
    assert all(bool(r["exchange_auto"]) for r in runs)
    np.testing.assert_array_equal(runs[0]["final"], runs[1]["final"])
    np.testing.assert_array_equal(runs[0]["syncs"], runs[1]["syncs"])
    assert runs[0]["stats"]["syncs"] >= 1
