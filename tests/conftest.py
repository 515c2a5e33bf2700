"""Shared helpers for tests that start real worker processes on 127.0.0.1."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(num_workers, script, *args, timeout=150):
    """Runs `python -m keras_fda.launch --workers N script args`; returns the CompletedProcess.

    The launcher's own --timeout stops its workers (by PID); the subprocess
    timeout bounds the launcher itself, so a regression fails instead of hanging.
    """
    command = [
        sys.executable, "-m", "keras_fda.launch",
        "--workers", str(num_workers), "--timeout", str(timeout),
        os.path.join(REPO, script), *map(str, args),
    ]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout + 30
    )


@pytest.fixture
def run_workers():
    return launch
