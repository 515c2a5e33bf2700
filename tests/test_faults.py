"""Faults across real worker processes: each must end in a clear error, never a hang."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, launch
from keras_fda.runtime import launch as launch_lib

WORKER = "tests/workers/fit_worker.py"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hidden_on_last", 17], "Workers disagree on the number of averaged weights"),
        (["--dtype_on_last", "float64"], "Workers disagree on the weight shapes and dtypes"),
        (["--extra_rows_on_last", 32], "Workers disagree on the number of steps per epoch: [8, 10]"),
        (["--unknown_length"], "FDACallback cannot tell how many steps this worker will run"),
        (["--repeat"], "FDACallback cannot tell how many steps this worker will run: the "
         "dataset is an infinite dataset (dataset.repeat())"),
    ],
)
def test_mismatch_is_a_clear_error_on_every_worker_before_training(tmp_path, args, message):
    result = launch(2, WORKER, "--out", tmp_path, "--threshold", 1.0, *args, timeout=90)
    assert result.returncode == 3, result.stdout[-3000:]
    for worker in (0, 1):
        assert f"[worker {worker}] ValueError: {message}" in result.stdout
    assert not list(tmp_path.iterdir())  # nobody trained


def wait_for_file(path, proc_list, deadline_s=90):
    """Polls for `path` (bounded), failing early if a worker already exited."""
    deadline = time.monotonic() + deadline_s
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in proc_list):
            raise AssertionError(f"{path.name} never appeared")
        time.sleep(0.05)
    return int(path.read_text())


def long_run_args(out, timeout, trigger=("--threshold", 1.0)):
    return [
        "--out", out, *trigger, "--repeat", "--steps_per_epoch", 100,
        "--epochs", 1000, "--collective_timeout", timeout, "--pid_after_step", 20,
    ]


@contextlib.contextmanager
def workers_without_launcher(args, script=WORKER):
    """Two workers started as the launcher would, but left alone when one fails."""
    ports = launch_lib.free_ports(2)
    procs = [
        subprocess.Popen(
            [sys.executable, script, *map(str, args)],
            cwd=REPO, env=launch_lib.worker_env(ports, i), start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.mark.parametrize(
    "trigger",
    [
        ("--threshold", 1.0),  # FDA: the overlapped per-step exchange
        ("--trigger", "periodic", "--tau", 10),  # nothing sent between syncs
    ],
    ids=["fda", "periodic"],
)
def test_a_killed_worker_makes_the_survivor_fail_with_a_clear_error(tmp_path, trigger):
    """Without the launcher: the survivor must notice by itself, within the timeout."""
    timeout = 20
    with workers_without_launcher(long_run_args(tmp_path, timeout, trigger)) as procs:
        victim = wait_for_file(tmp_path / "pid1", procs)
        os.kill(victim, signal.SIGKILL)
        output, _ = procs[0].communicate(timeout=timeout + 60)
    assert procs[0].returncode != 0
    assert "PeerFailureError: Worker 0 of 2 could not complete the collective after step" in output
    assert "Another worker probably died" in output
    # The error names TF's cause, not the "Graph execution error:" header of every graph error.
    error_line = output.split("PeerFailureError:")[1].splitlines()[0]
    assert "Graph execution error" not in error_line, error_line


def test_a_live_but_silent_peer_makes_the_survivor_fail_within_the_timeout(tmp_path):
    """Worker 1 stops answering (paused, connection open): worker 0's watchdog fires."""
    timeout = 8
    args = long_run_args(tmp_path, timeout)
    args[args.index("--pid_after_step")] = "--pause_after_step"
    with workers_without_launcher([*args, "--pause_only_last"]) as procs:
        wait_for_file(tmp_path / "pid1", procs)
        output, _ = procs[0].communicate(timeout=timeout + 60)
    assert procs[0].returncode != 0
    assert "PeerFailureError: Worker 0 of 2 could not complete the collective" in output
    assert f"no answer from the other workers within {timeout} s" in output


def test_a_crashed_peer_under_fda_strategy_fails_the_survivor(tmp_path):
    """FDAStrategy over MultiWorkerMirroredStrategy: TF's own collective error, no hang."""
    args = [
        "--scenario", "multiworker", "--threshold", 0.3, "--steps", 150, "--die_at_step", 20,
        "--out", tmp_path,
    ]
    with workers_without_launcher(args, script="tests/workers/strategy_worker.py") as procs:
        output, _ = procs[0].communicate(timeout=150)
        procs[1].wait(timeout=30)
    assert procs[1].returncode == 3  # crashed on purpose after step 20
    assert procs[0].returncode != 0
    assert "Collective ops is aborted by" in output
    assert not list(tmp_path.glob("result_*.npz"))  # nobody finished


def test_collective_timeouts_do_not_cost_a_thread_per_step(tmp_path):
    """TF gives every collective with its own timeout a thread sleeping that long;
    at one collective per step that exhausted the process's threads in minutes."""
    result = launch(
        2, WORKER, "--out", tmp_path, "--threshold", 1e9, "--repeat",
        "--steps_per_epoch", 150, "--epochs", 2, "--collective_timeout", 600, timeout=150,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    for i in range(2):
        run = load(tmp_path, i)
        assert len(run["syncs"]) == 300
        assert run["threads"] < 150, run["threads"]


def test_the_launcher_names_the_worker_that_died_and_stops_the_rest(tmp_path):
    command = [
        sys.executable, "-m", "keras_fda.launch", "--workers", "2", "--timeout", "150",
        WORKER, *map(str, long_run_args(tmp_path, 60)),
    ]
    launcher = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        victim = wait_for_file(tmp_path / "pid1", [launcher])
        survivor = int((tmp_path / "pid0").read_text()) if (tmp_path / "pid0").exists() else None
        os.kill(victim, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=90)
        assert launcher.returncode == 128 + signal.SIGKILL
        assert "worker 1 was killed by SIGKILL; stopping the other workers" in output
        if survivor is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(survivor, 0)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)


@contextlib.contextmanager
def running_launcher(*args):
    """The launcher running 2 workers of WORKER with `args`; stopped by PID if still running."""
    command = [
        sys.executable, "-m", "keras_fda.launch", "--workers", "2", "--timeout", "150", WORKER,
        *args,
    ]
    launcher = subprocess.Popen(
        list(map(str, command)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        yield launcher
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)


def kill_workers(pids, launcher):
    """SIGKILLs the workers (as a crash would) and waits for the launcher to end."""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    launcher.communicate(timeout=60)


def load(out, index):
    return dict(np.load(out / f"worker{index}.npz"))


# (flags, steps of the worker that stops, steps of the other one)
STOPS_EARLY = [
    # A finite dataset shorter than steps_per_epoch: Keras ends each of the
    # last worker's epochs after 6 of 8 steps ("ran out of data"). FDA's
    # state exchange overlaps the next step: the other worker learns of
    # the stop from the exchange it collects after its second step more.
    (["--threshold", 0.05, "--steps_per_epoch", 8, "--extra_rows_on_last", -32], 12, 14),
    # A callback (as EarlyStopping would) stops the last worker mid-epoch.
    (["--threshold", 0.05, "--steps_per_epoch", 8, "--repeat", "--stop_at_step_on_last", 5],
     5, 7),
    # exchange_every="auto" at a lag of 2 (every worker asks for 2, as on
    # a slow link): the exchanges run in the background. The stop message
    # meets the other worker's exchange sent after its step 6 and asks for
    # no lag, which shortens the lag to 1 at step 8, the step that decides
    # on it. The stop was dropped there, and the other worker's next
    # exchange waited for a peer already in its final sync until the
    # collective timeout (BENCHMARKS 7's hang on a 10 Mbit/s link).
    (["--threshold", 0.05, "--steps_per_epoch", 16, "--repeat", "--exchange_every", "auto",
      "--wanted_lag", 2, "--stop_at_step_on_last", 5], 5, 8),
    # The blocking exchange: in its next step's collective.
    (["--threshold", 0.05, "--steps_per_epoch", 8, "--repeat", "--stop_at_step_on_last", 5,
      "--blocking"], 5, 6),
    # Stateless triggers send nothing between syncs: the stop meets the
    # others' next sync, every step for synchronous, step 6 for tau 3.
    (["--trigger", "synchronous", "--repeat", "--steps_per_epoch", 8,
      "--stop_at_step_on_last", 5], 5, 6),
    (["--trigger", "periodic", "--tau", 3, "--repeat", "--steps_per_epoch", 8,
      "--stop_at_step_on_last", 5], 5, 6),
    (["--trigger", "periodic", "--tau", 3, "--repeat", "--steps_per_epoch", 8,
      "--stop_at_step_on_last", 4], 4, 6),
    # A bfloat16 payload: the stop message has the sync's dtype.
    (["--trigger", "periodic", "--tau", 3, "--repeat", "--steps_per_epoch", 8,
      "--stop_at_step_on_last", 4, "--sync_dtype", "bfloat16"], 4, 6),
]


@pytest.fixture(scope="module")
def stopped_early(tmp_path_factory):
    """Every case of STOPS_EARLY, one fit after another in one pair of workers.

    Returns the output folder and worker 0's output for each case. A hang
    fails within the collective timeout instead of the launcher's.
    """
    out = tmp_path_factory.mktemp("stops_early")
    cases = json.dumps([list(map(str, flags)) for flags, _, _ in STOPS_EARLY])
    result = launch(
        2, WORKER, "--out", out, "--collective_timeout", 30, "--cases", cases, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:]
    first = [line for line in result.stdout.splitlines() if line.startswith("[worker 0] ")]
    return out, "\n".join(first).split("=== case ")[1:]


@pytest.mark.parametrize("case", range(len(STOPS_EARLY)))
def test_a_worker_that_stops_early_stops_everyone_with_identical_weights(stopped_early, case):
    out, outputs = stopped_early
    _, steps_of_last, steps_of_first = STOPS_EARLY[case]
    first, last = load(out / f"case{case}", 0), load(out / f"case{case}", 1)
    assert len(last["syncs"]) == steps_of_last
    assert len(first["syncs"]) == steps_of_first
    assert "another worker stopped training" in outputs[case]
    np.testing.assert_array_equal(first["final"], last["final"])


def test_nan_on_one_worker_is_an_error_naming_the_step_on_every_worker(tmp_path):
    result = launch(
        2, WORKER, "--out", tmp_path, "--threshold", 0.05, "--nan_at_step_on_last", 3, timeout=120
    )
    assert result.returncode == 4, result.stdout[-3000:]
    for worker in (0, 1):
        # Poisoned after step 3, whose FDA part ran inside its compiled step: step
        # 3's (finite) state, all-reduced while step 4 trains, fires a sync after
        # step 4, whose average holds worker 1's NaN weights and is refused.
        assert (
            f"[worker {worker}] FloatingPointError: FDA stopped training at step 4: the "
            "average of the workers' weights is NaN or Inf, so nothing was averaged"
        ) in result.stdout
    healthy = np.load(tmp_path / "nan_final0.npy")
    assert np.isfinite(healthy).all()


@pytest.mark.parametrize(
    "options",
    [(), ("--outer", "nesterov", "--sync_dtype", "int4")],
    ids=["plain", "outer_nesterov_int4"],
)
def test_restart_with_backup_and_restore_resumes_the_same_run(tmp_path, options):
    """Kill all workers mid-epoch 3, restart: same syncs and final weights as no kill.

    BackupAndRestore saves at epoch ends; with a dataset in fixed order the
    resumed run redoes epoch 3 on the same batches, from the saved weights,
    optimizer state and FDA state (reference weights, direction, counters,
    the exchanged state awaiting its decision, the outer optimizer's state,
    each worker's error-feedback residuals of a quantized drift).
    """
    common = ["--threshold", 0.05, "--epochs", 4, *options]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for d in (straight, resumed):
        d.mkdir()
    result = launch(2, WORKER, "--out", straight, "--backup_dir", straight / "b", *common)
    assert result.returncode == 0, result.stdout[-3000:]

    with running_launcher(
        "--out", resumed, "--backup_dir", resumed / "b", "--pause_after_step", 20, *common
    ) as first:
        kill_workers([wait_for_file(resumed / f"pid{i}", [first]) for i in range(2)], first)
    assert first.returncode != 0
    assert (resumed / "b" / "worker0").exists()

    result = launch(2, WORKER, "--out", resumed, "--backup_dir", resumed / "b", *common)
    assert result.returncode == 0, result.stdout[-3000:]
    for i in range(2):
        a, b = load(straight, i), load(resumed, i)
        assert len(b["syncs"]) == 16  # epochs 3 and 4 only
        np.testing.assert_array_equal(b["syncs"], a["syncs"][16:])
        np.testing.assert_allclose(b["statistic"], a["statistic"][16:], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(b["final"], a["final"], rtol=1e-5, atol=1e-6)
        assert json.loads(str(b["stats"])) == json.loads(str(a["stats"]))


def test_restart_after_a_crash_between_the_workers_epoch_end_saves(tmp_path):
    """Issue 12.6: worker 0 saved epoch 2, worker 1 died before saving it.

    Before, every restart failed ('Workers disagree on the step they resumed
    from'). Worker 1 now catches up: it takes worker 0's weights and FDA state
    and both resume at epoch 3.
    """
    common = ["--out", tmp_path, "--backup_dir", tmp_path / "b", "--variant", "linear",
              "--threshold", 0.05, "--epochs", 4]
    metadata = tmp_path / "b" / "worker0" / "training_metadata.json"
    with running_launcher(*common, "--pause_at_epoch_end_on_last", 2) as first:
        pids = [wait_for_file(tmp_path / f"pid{i}", [first]) for i in range(2)]
        # Worker 0 goes on to save epoch 2 (then waits in step 17's collective).
        deadline = time.monotonic() + 90
        while not (metadata.exists() and '"epoch": 2' in metadata.read_text()):
            assert time.monotonic() < deadline and first.poll() is None, "no epoch-2 backup"
            time.sleep(0.05)
        kill_workers(pids, first)
    behind = json.loads((tmp_path / "b" / "worker1" / "training_metadata.json").read_text())
    assert behind["epoch"] == 1

    result = launch(2, WORKER, *common)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "worker 0's backup (step 16, epoch 2) is the latest" in result.stdout
    runs = [load(tmp_path, i) for i in range(2)]
    for run in runs:
        assert len(run["syncs"]) == 16  # epochs 3 and 4, on both
    np.testing.assert_array_equal(runs[0]["initial"], runs[1]["initial"])
    np.testing.assert_array_equal(runs[0]["syncs"], runs[1]["syncs"])
    np.testing.assert_array_equal(runs[0]["final"], runs[1]["final"])
    assert json.loads(str(runs[0]["stats"])) == json.loads(str(runs[1]["stats"]))


@pytest.mark.parametrize(
    "num_workers, fail_how", [(2, "raise"), (3, "sigkill")], ids=["raise", "sigkill_1_of_3"]
)
def test_healthy_workers_leave_soon_and_quietly_when_a_peer_fails_after_fit(
    tmp_path, num_workers, fail_how
):
    """Issue 21.5: plain TF_CONFIG (as SLURM or Kubernetes start it), worker 1 fails after
    fit returned. The healthy workers' exit used to wait for TF's coordination service to
    miss a minute of the peer's heartbeats (worker 0 held ~54 s) and then print `E0000 ...
    StartAbort UNAVAILABLE ... stopped sending heartbeats`."""
    ports = launch_lib.free_ports(num_workers)
    logs = [tmp_path / f"log{i}" for i in range(num_workers)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, "tests/launch_scripts/fda_fit.py", "--out", str(tmp_path),
                     "--fail_on", "1", "--fail_how", fail_how],
                    cwd=REPO, env=launch_lib.worker_env(ports, i), stdout=f,
                    stderr=subprocess.STDOUT, start_new_session=True,
                ))
        assert procs[1].wait(timeout=240) != 0
        died = time.monotonic()
        for i, proc in enumerate(procs):
            if i != 1:
                assert proc.wait(timeout=120) == 0, logs[i].read_text()[-3000:]
        left = time.monotonic() - died
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert f"worker 1 fails ({fail_how})" in logs[1].read_text()
    for i in (0, *range(2, num_workers)):
        output = logs[i].read_text()
        assert f"worker {i} done" in output
        assert not re.search(r"E0000|StartAbort|stopped sending heartbeats", output), output
    # Before the fix: ~54 s. After: about a second (generous for a loaded 2-core machine).
    assert left < 20, left
