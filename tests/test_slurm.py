"""A real SLURM job: `sbatch examples/slurm/train.sbatch` runs a small FDA fit as a 2-task step.

Needs a running SLURM cluster (tests/slurm/setup_slurm.sh starts one on this
machine; .ci/run does). Where SLURM is not running the test is skipped with
that reason, unless KERAS_FDA_REQUIRE_SLURM=1, which makes it fail instead.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
JOB_SECONDS = 300


def slurm_missing():
    """Why no SLURM job can run here, or None."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "SLURM is not installed (tests/slurm/setup_slurm.sh start installs and starts it)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    if ping.returncode or " is UP" not in ping.stdout:
        return f"SLURM is not running (scontrol ping: {(ping.stdout + ping.stderr).strip()!r})"
    return None


@pytest.fixture
def slurm():
    why = slurm_missing()
    if why and os.environ.get("KERAS_FDA_REQUIRE_SLURM") == "1":
        pytest.fail(f"KERAS_FDA_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(why)


def test_an_sbatch_job_of_two_tasks_trains_one_model(slurm, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM")}
    # `python` in the batch script: this interpreter.
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    log = tmp_path / "slurm.out"
    sbatch = subprocess.Popen(
        ["sbatch", "--parsable", "--wait", "--ntasks=2", "--cpus-per-task=1", "--time=10",
         f"--output={log}", f"--chdir={ROOT}", "examples/slurm/train.sbatch",
         "tests/launch_scripts/fda_fit.py", "--out", str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    job = sbatch.stdout.readline().strip().split(";")[0]
    try:
        _, errors = sbatch.communicate(timeout=JOB_SECONDS)
    finally:
        if sbatch.poll() is None:
            subprocess.run(["scancel", job], timeout=60)
            sbatch.send_signal(signal.SIGTERM)
            sbatch.wait(timeout=60)
    output = log.read_text() if log.exists() else ""
    assert sbatch.returncode == 0, (errors, output[-4000:])
    assert not re.search(r"E0000|Connection refused|StartAbort", output), output[-4000:]
    reports = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in (0, 1)]
    node = socket.gethostname().split(".")[0]
    for index, report in enumerate(reports):
        assert (report["num_workers"], report["worker_index"]) == (2, index)
        hosts, ports = zip(*(a.split(":") for a in report["addresses"]))
        assert hosts == (node, node)
        # The step's reserved ports (slurm.conf MpiParams=ports=30000-30999), one per task.
        assert 30000 <= int(ports[0]) and int(ports[1]) == int(ports[0]) + 1
    assert reports[0]["final"] == reports[1]["final"]
    assert reports[0]["fda_logs"] == reports[1]["fda_logs"]
    assert len(reports[0]["fda_logs"]) == 24 and reports[0]["fda_logs"][-1]["fda/syncs"] >= 1
    for index in (0, 1):  # srun --label: every line names its task
        assert f"{index}: worker {index} done" in output
