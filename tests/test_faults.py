"""Faults across real worker processes: each must end in a clear error, never a hang."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, launch
from keras_fda import launch as launch_lib

WORKER = "tests/workers/fit_worker.py"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hidden_on_last", 17], "Workers disagree on the number of averaged weights"),
        (["--dtype_on_last", "float64"], "Workers disagree on the weight shapes and dtypes"),
        (["--extra_rows_on_last", 32], "Workers disagree on the number of steps per epoch: [8, 10]"),
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


def long_run_args(out, timeout):
    return [
        "--out", out, "--threshold", 1.0, "--repeat", "--steps_per_epoch", 100,
        "--epochs", 1000, "--collective_timeout", timeout, "--pid_after_step", 20,
    ]


def test_a_killed_worker_makes_the_survivor_fail_with_a_clear_error(tmp_path):
    """Without the launcher: the survivor must notice by itself, within the timeout."""
    timeout = 20
    ports = launch_lib.free_ports(2)
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, *map(str, long_run_args(tmp_path, timeout))],
            cwd=REPO, env=launch_lib.worker_env(ports, i), start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        victim = wait_for_file(tmp_path / "pid1", procs)
        os.kill(victim, signal.SIGKILL)
        output, _ = procs[0].communicate(timeout=timeout + 60)
        assert procs[0].returncode != 0
        assert "PeerFailureError: Worker 0 of 2 could not complete the collective after step" in output
        assert "Another worker probably died" in output
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


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
