"""Shared test helpers: real worker processes on 127.0.0.1, and reading TensorBoard event files."""

import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

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


def check_flags(flag_checks, bad, good, *argv):
    """Runs `flag_checks` (a script reading JSON cases on stdin) over flag lists.

    `bad` and `good` are lists of `(flags, expected)`: each bad list must end in
    an absl usage error (exit 1, no traceback) whose output holds `expected`;
    each good one must print `ARGS <json>` equal to `expected`. Returns the
    script's stdout.
    """
    cases = [("bad", args) for args, _ in bad] + [("good", args) for args, _ in good]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-c", flag_checks, *argv], input=json.dumps(cases), cwd=REPO,
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    outputs = result.stderr.split("=== case")[1:]
    assert len(outputs) == len(cases), result.stderr[-4000:]
    for (args, message), output in zip(bad, outputs):
        assert "=== exit 1" in output, (args, output[-2000:])
        assert message in output, (args, output[-2000:])
    accepted = [
        json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("ARGS ")
    ]
    assert accepted == [want for _, want in good]
    return result.stdout


@pytest.fixture
def run_workers():
    return launch


# --- TensorBoard event files (the FDA dashboard) ---

SCALAR_TAGS = [
    "fda/variance",
    "fda/threshold",
    "fda/syncs",
    "fda/steps_since_sync",
    "fda/bytes_sent",
    "fda/bytes_synchronous",
    "fda/savings",
]


def read_run(run_dir):
    """`{tag: [(step, numpy value), ...]}` of a run's TF2 summaries (all kept, none sampled)."""
    accumulator = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, tf.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)]
        for tag in accumulator.Tags()["tensors"]
    }


def read_dashboard(run_dir):
    """The FDA dashboard's events: the run `run_dir` and its reference run, merged.

    Checks the split on the way: the threshold and the synchronous bytes are in
    the reference run only (so TensorBoard draws them in another colour).
    """
    from keras_fda.drivers.tensorboard import REFERENCE_RUN_SUFFIX, REFERENCE_TAGS

    events = read_run(run_dir)
    reference = read_run(os.fspath(run_dir) + REFERENCE_RUN_SUFFIX)
    assert not set(REFERENCE_TAGS) & set(events), sorted(events)
    assert set(reference) <= set(REFERENCE_TAGS), sorted(reference)
    return {**events, **reference}


def read_layout(events):
    (step, serialized), = events[custom_scalar_metadata.CONFIG_SUMMARY_TAG]
    layout = layout_pb2.Layout()
    layout.ParseFromString(serialized.item())
    return layout


def check_layout(events):
    """Every chart regex matches a tag of the run (as the plugin matches: re.match)."""
    layout = read_layout(events)
    tags = [t for t in events if t != custom_scalar_metadata.CONFIG_SUMMARY_TAG]
    charts = {}
    for category in layout.category:
        for chart in category.chart:
            matched = set()
            for regex in chart.multiline.tag:
                hits = [t for t in tags if re.match(regex, t)]
                assert hits, f"{chart.title!r}: {regex!r} matches no tag of {tags}"
                matched.update(hits)
            charts[chart.title] = matched
    # The charts: estimate vs threshold, FDA vs synchronous bytes, syncs.
    assert {"fda/variance", "fda/threshold"} in charts.values()
    assert {"fda/bytes_sent", "fda/bytes_synchronous"} in charts.values()
    assert {"fda/syncs"} in charts.values()
    return charts
