"""The README's quickstart, end to end through the launcher (small settings)."""

import os
import re
import subprocess
import sys

from conftest import REPO, check_flags, launch


def test_quickstart_trains_and_reports_savings():
    result = launch(2, "examples/quickstart.py", "--epochs=4", timeout=240)
    assert result.returncode == 0, result.stdout[-4000:]
    out = result.stdout
    accuracy = float(re.search(r"\[worker 0\] test accuracy of the averaged model: ([\d.]+)", out)[1])
    syncs, steps = map(int, re.search(r"syncs: (\d+) in (\d+) steps", out).groups())
    sent, sync_sent, ratio = map(
        float,
        re.search(
            r"FDA sent ([\d.]+) MB; synchronous averaging would have sent ([\d.]+) MB "
            r"\(([\d.]+) times more\)",
            out,
        ).groups(),
    )
    assert accuracy > 0.6  # 10 classes: chance is 0.1
    assert steps == 4 * (1437 // (32 * 2))
    assert 0 < syncs < steps
    assert sent < sync_sent and ratio > 1
    # Only the chief prints the summary.
    assert "[worker 1] test accuracy" not in out


def test_strategy_cluster_example_trains_with_fewer_bytes(tmp_path):
    result = launch(
        2, "examples/strategy_cluster.py", "--epochs=3", f"--tensorboard_dir={tmp_path}",
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    lines = re.findall(
        r"\[worker (\d)\] worker \d: test accuracy ([\d.]+), (\d+) syncs in (\d+) steps, "
        r"([\d.]+)x fewer bytes",
        result.stdout,
    )
    assert sorted(line[0] for line in lines) == ["0", "1"]
    # One averaged model and one set of FDA counters on every worker.
    assert lines[0][1:] == lines[1][1:]
    accuracy, syncs, steps, savings = float(lines[0][1]), *map(int, lines[0][2:4]), float(lines[0][4])
    assert accuracy > 0.6  # 10 classes: chance is 0.1
    assert 0 < syncs < steps and savings > 1
    # The chief's dashboard only.
    assert sorted(os.listdir(tmp_path)) == ["fda", "fda_reference"]


def test_quickstart_alone_claims_no_savings():
    # Without TF_CONFIG the program is one local worker: nothing crosses a network.
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "quickstart.py"), "--epochs=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "workers: 1" in result.stdout
    assert "One worker: nothing was sent" in result.stdout
    assert "times more" not in result.stdout


# Runs the quickstart's flag handling through absl's app.run, as the command
# line does, for several argument lists in one process (one TensorFlow
# import): "bad" ones through main, which must stop before reading data, and
# "good" ones through the trigger_args it calls first.
FLAG_CHECKS = """
import json, runpy, sys
from absl import app, flags

cases = json.load(sys.stdin)
sys.argv = ["quickstart.py"]
quickstart = runpy.run_path("examples/quickstart.py", run_name="quickstart")
for kind, args in cases:
    flags.FLAGS.unparse_flags()
    main = quickstart["main"] if kind == "bad" else (
        lambda argv: print("ARGS", json.dumps(quickstart["trigger_args"]()), flush=True))
    print("=== case", file=sys.stderr, flush=True)
    try:
        app.run(main, argv=["quickstart.py", "--epochs=1", *args])
    except SystemExit as e:
        print("=== exit", e.code, file=sys.stderr, flush=True)
"""

BAD_FLAGS = [
    (["--trigger=kamp"], "--trigger=kamp needs a numeric threshold"),
    (["--trigger=kamp", "--threshold=auto"], "--threshold=1.5"),
    (["--threshold=-2"], "use a positive number"),
    (["--threshold=often"], "use a positive number"),
    (["--trigger=periodic", "--threshold=1.5"], "--threshold is used only by --trigger=fda or"),
    (["--trigger=synchronous", "--tau=5"], "--tau is used only by --trigger=periodic"),
    (["--trigger=kamp", "--threshold=2", "--variant=sketch"], "--variant is used only by"),
    (["--tau=0"], "--tau=0: 0 is not a positive integer"),
    (["--dataset=femnist"], "--dataset=femnist needs --data_path"),
    (["--data_path=x.npz"], "--data_path is read only with --dataset=femnist"),
]
GOOD_FLAGS = [
    ([], {"threshold": "auto", "variant": "linear"}),
    (["--trigger=kamp", "--threshold=2"], {"threshold": 2.0}),
    (["--trigger=periodic", "--tau=4"], {"tau": 4}),
    (["--trigger=synchronous"], {}),
]


def test_bad_flag_combinations_are_usage_errors_naming_what_to_pass():
    check_flags(FLAG_CHECKS, BAD_FLAGS, GOOD_FLAGS)
