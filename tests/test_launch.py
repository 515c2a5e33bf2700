"""`python -m keras_fda.launch` with real worker processes.

Most tests run launch.py as a file with stand-in workers (launch_scripts/worker.py)
that do not import TensorFlow: `python -m keras_fda.launch` imports the
keras_fda package and with it TensorFlow, which takes seconds. One test runs a
real TensorFlow cluster through `python -m keras_fda.launch`.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "keras_fda" / "launch.py"
SCRIPTS = pathlib.Path(__file__).resolve().parent / "launch_scripts"
WORKER = SCRIPTS / "worker.py"
TIMEOUT = 30  # seconds any launcher run may take before the test fails


@pytest.fixture
def pid_dir(tmp_path):
    """Where workers write their PIDs; kills leftovers so a failing test leaks nothing."""
    yield tmp_path
    for pid in read_pids(tmp_path):
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)  # each worker leads its own process group


def read_pids(pid_dir):
    return [int(p.read_text()) for p in sorted(pid_dir.glob("*.pid"))]


def wait_for_pids(pid_dir, n):
    deadline = time.monotonic() + TIMEOUT
    while len(read_pids(pid_dir)) < n:
        assert time.monotonic() < deadline, f"workers did not all start within {TIMEOUT} s"
        time.sleep(0.02)
    return read_pids(pid_dir)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def launch(*args):
    return subprocess.run(
        [sys.executable, str(LAUNCH), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def worker_reports(stdout):
    """{worker index: the JSON report it printed}, checking each line's prefix."""
    reports = {}
    for line in stdout.splitlines():
        prefix, _, rest = line.partition("] ")
        index = int(prefix.removeprefix("[worker "))
        if rest.startswith("{"):
            reports[index] = json.loads(rest)
    return reports


def test_exit_code_of_failed_worker_is_returned(pid_dir):
    result = launch("--workers", 2, WORKER, pid_dir, "0,3")
    assert result.returncode == 3, result
    assert "worker 1 exited with code 3" in result.stderr


def test_failed_worker_stops_the_others(pid_dir):
    start = time.monotonic()
    result = launch("--workers", 2, WORKER, pid_dir, "wait_then_5,hang")
    assert result.returncode == 5, result
    assert time.monotonic() - start < 15
    pids = read_pids(pid_dir)
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_worker_ignoring_sigterm_is_killed(pid_dir):
    result = launch("--workers", 2, WORKER, pid_dir, "wait_then_1,stubborn")
    assert result.returncode == 1, result
    assert not any(alive(pid) for pid in read_pids(pid_dir))


def test_output_is_prefixed_and_arguments_pass_verbatim(pid_dir):
    script_args = ["--my_flag=x", "--workers", "7", "--", "-h", "two words"]
    result = launch("--workers", 2, WORKER, pid_dir, "0,0", *script_args)
    assert result.returncode == 0, result
    reports = worker_reports(result.stdout)
    assert sorted(reports) == [0, 1]
    for index, report in reports.items():
        assert report["tf_config"]["task"] == {"type": "worker", "index": index}
        assert report["argv"] == script_args
    # Worker stderr goes to the launcher's stdout, prefixed too.
    for index in (0, 1):
        assert f"[worker {index}] stderr of worker {index}" in result.stdout.splitlines()


def test_tf_config_lists_distinct_free_ports(pid_dir):
    result = launch("--workers", 3, WORKER, pid_dir, "0,0,0")
    assert result.returncode == 0, result
    reports = worker_reports(result.stdout)
    assert sorted(reports) == [0, 1, 2]
    clusters = [r["tf_config"]["cluster"] for r in reports.values()]
    assert clusters[0] == clusters[1] == clusters[2]
    addresses = clusters[0]["worker"]
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert len({a.split(":")[1] for a in addresses}) == 3


def test_port_base(pid_dir):
    result = launch("--workers", 2, "--port_base", 23456, WORKER, pid_dir, "0,0")
    assert result.returncode == 0, result
    for report in worker_reports(result.stdout).values():
        assert report["tf_config"]["cluster"]["worker"] == ["127.0.0.1:23456", "127.0.0.1:23457"]


def test_timeout_stops_all_workers(pid_dir):
    result = launch("--workers", 2, "--timeout", 1, WORKER, pid_dir, "hang,hang")
    assert result.returncode == 124, result
    assert "timed out" in result.stderr
    pids = read_pids(pid_dir)
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_launcher_stops_all_workers(pid_dir, sig):
    launcher = subprocess.Popen(
        [sys.executable, str(LAUNCH), "--workers", "2", str(WORKER), str(pid_dir), "hang,hang"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        pids = wait_for_pids(pid_dir, 2)
        launcher.send_signal(sig)
        launcher.communicate(timeout=TIMEOUT)
        assert launcher.returncode == 128 + sig
        assert not any(alive(pid) for pid in pids)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0", WORKER], "--workers must be at least 1"),
        (["--workers", "2"], "required: script"),
        (["--workers", "2", "no_such_script.py"], "is not a file"),
        (["--workers", "2", "--timeout", "0", WORKER], "--timeout must be positive"),
        (["--workers", "2", "--port_base", "65535", WORKER], "leaves no room"),
    ],
)
def test_bad_input(args, message):
    result = launch(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_real_tensorflow_cluster_all_reduces():
    result = subprocess.run(
        # --timeout: the launcher, unlike subprocess.run, stops the workers too.
        [sys.executable, "-m", "keras_fda.launch", "--workers", "2", "--timeout", "120"]
        + [str(SCRIPTS / "all_reduce.py")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    for index in (0, 1):
        assert f"[worker {index}] mean of worker indices: [0.5]" in lines, result.stdout
