"""Faults across real worker processes: each must end in a clear error, never a hang."""

import pytest

from conftest import launch

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
