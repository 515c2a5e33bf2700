"""The TensorBoard dashboard: event files read back, and the charts rendered in Chromium."""

import importlib.util
import os
import socket

import numpy as np
import pytest
from conftest import SCALAR_TAGS, check_layout, launch, read_dashboard, read_layout, read_run

from keras_fda.drivers import tensorboard as fda_tensorboard
from keras_fda.engine.accounting import CommunicationStats
from keras_fda.drivers.tensorboard import Dashboard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_demo():
    """examples/dashboard_demo.py, which holds the real-run and browser helpers."""
    spec = importlib.util.spec_from_file_location(
        "dashboard_demo", os.path.join(REPO, "examples", "dashboard_demo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drive(log_dir, update_freq, last_step=6):
    """A known run: syncs after steps 3 and 5 (rounds of 3 and 2 steps)."""
    dashboard = Dashboard(log_dir, update_freq=update_freq)
    expected = {}
    syncs, last_sync = 0, 0
    for step in range(1, last_step + 1):
        if step in (3, 5):
            syncs += 1
            dashboard.write_sync(step, step - last_sync)
            last_sync = step
        stats = CommunicationStats(
            num_workers=4, num_params=1000, state_bytes=8, steps=step, syncs=syncs
        )
        values = {
            "fda/variance": 0.25 * step,
            "fda/threshold": 1.0,
            "fda/syncs": syncs,
            "fda/steps_since_sync": step - last_sync,
            "fda/bytes_sent": stats.paper_bytes,
            "fda/bytes_synchronous": stats.synchronous_paper_bytes,
            "fda/savings": stats.savings,
        }
        force = update_freq == "epoch" and step == last_step
        wrote = dashboard.write_step(
            step,
            statistic=values["fda/variance"],
            threshold=values["fda/threshold"],
            syncs=syncs,
            steps_since_sync=step - last_sync,
            stats=stats,
            force=force,
        )
        if wrote:
            expected[step] = values
    dashboard.close()
    return expected


def test_every_tag_at_its_steps_with_its_value(tmp_path):
    expected = drive(tmp_path, update_freq=2)
    assert sorted(expected) == [2, 4, 6]
    events = read_dashboard(tmp_path / "fda")
    for tag in SCALAR_TAGS:
        assert [step for step, _ in events[tag]] == [2, 4, 6], tag
        for step, value in events[tag]:
            # TensorBoard stores scalars as float32.
            assert value == np.float32(expected[step][tag]), (tag, step)
    # Spot checks against hand-computed paper bytes: (syncs + 1) * 2 K 4 d + 8 steps K.
    assert dict(events["fda/bytes_sent"])[6] == np.float32(3 * 2 * 4 * 4000 + 8 * 6 * 4)
    assert dict(events["fda/bytes_synchronous"])[6] == np.float32(7 * 2 * 4 * 4000)
    assert dict(events["fda/steps_since_sync"])[6] == 1


def test_round_length_histogram_at_each_sync(tmp_path):
    drive(tmp_path, update_freq=2)
    histograms = read_dashboard(tmp_path / "fda")["fda/round_length"]
    assert [step for step, _ in histograms] == [3, 5]
    # Rows of (left edge, right edge, count): one round of 3 steps, then also one of 2.
    first, last = histograms[0][1], histograms[1][1]
    assert first[:, 2].sum() == 1
    assert last[:, 2].sum() == 2
    filled = last[last[:, 2] > 0]
    assert filled[0, 0] == 2.0 and filled[-1, 1] == 3.0


def test_layout_parses_and_names_existing_tags(tmp_path):
    drive(tmp_path, update_freq=1)
    events = read_dashboard(tmp_path / "fda")
    charts = check_layout(events)
    assert list(charts) == list(fda_tensorboard.CHARTS)
    assert read_layout(events).category[0].title == fda_tensorboard.CATEGORY


def test_epoch_update_freq_writes_only_when_forced(tmp_path):
    expected = drive(tmp_path, update_freq="epoch")
    assert sorted(expected) == [6]
    events = read_dashboard(tmp_path / "fda")
    assert all([step for step, _ in events[tag]] == [6] for tag in SCALAR_TAGS)


def test_threshold_none_is_left_out(tmp_path):
    dashboard = Dashboard(tmp_path)
    stats = CommunicationStats(num_workers=2, num_params=10, state_bytes=0, steps=1, syncs=1)
    dashboard.write_step(1, statistic=1.0, threshold=None, syncs=1, steps_since_sync=0, stats=stats)
    dashboard.close()
    events = read_dashboard(tmp_path / "fda")
    assert "fda/threshold" not in events
    assert set(SCALAR_TAGS) - {"fda/threshold"} <= set(events)


@pytest.mark.parametrize("update_freq", [0, -1, 1.5, True, "step"])
def test_bad_update_freq(tmp_path, update_freq):
    with pytest.raises(ValueError, match="update_freq"):
        Dashboard(tmp_path, update_freq=update_freq)


# --- A short real run: FDACallback and keras.callbacks.TensorBoard on one log_dir.

REAL_STEPS = 30


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("fda_logs")
    demo = load_demo()
    fda = demo.train(log_dir, steps=REAL_STEPS, threshold=0.02, steps_per_epoch=15)
    return demo, log_dir, fda.communication


def last_value(events, tag):
    return events[tag][-1][1]


def test_real_run_logs_match_the_callback_totals(real_run):
    _, log_dir, stats = real_run
    assert stats.steps == REAL_STEPS and stats.syncs >= 2
    fda_events = read_dashboard(os.path.join(log_dir, "fda"))
    assert set(SCALAR_TAGS) | {"fda/round_length"} <= set(fda_events)
    check_layout(fda_events)
    assert fda_events["fda/syncs"][-1][0] == REAL_STEPS
    assert last_value(fda_events, "fda/syncs") == stats.syncs
    assert last_value(fda_events, "fda/bytes_sent") == np.float32(stats.paper_bytes)
    assert last_value(fda_events, "fda/bytes_synchronous") == np.float32(
        stats.synchronous_paper_bytes
    )
    assert last_value(fda_events, "fda/savings") == np.float32(stats.savings)
    # One histogram per sync; the last one counts every round.
    assert len(fda_events["fda/round_length"]) == stats.syncs
    assert last_value(fda_events, "fda/round_length")[:, 2].sum() == stats.syncs

    # keras.callbacks.TensorBoard wrote its own run, on the same step axis.
    train_events = read_run(os.path.join(log_dir, "train"))
    assert not any(tag.startswith("fda/") for tag in train_events)
    keras_steps = [step for step, _ in train_events["batch_loss"]]
    assert keras_steps == list(range(1, REAL_STEPS + 1))
    assert {step for step, _ in fda_events["fda/variance"]} == set(keras_steps)


def require_browser(demo):
    """Fails (under CI) or skips with how to install what the browser test needs."""
    missing = [path for path in (demo.CHROMIUM, demo.CHROMEDRIVER) if not os.path.exists(path)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    if missing:
        message = (
            f"The dashboard browser test needs {', '.join(missing)}. Install them with "
            "`apt-get install chromium chromium-driver` and `pip install -e .[test]` "
            "(.ci/run does both)."
        )
        if os.environ.get("CI") or os.environ.get("KERAS_FDA_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)


def test_dashboard_renders_in_chromium(real_run, tmp_path):
    demo, log_dir, stats = real_run
    require_browser(demo)
    screenshot = tmp_path / "dashboard.png"
    with demo.serve_tensorboard(log_dir, last_step=stats.steps) as url:
        port = int(url.rsplit(":", 1)[1])
        with demo.chromium() as driver:
            charts = demo.rendered_charts(driver, url, len(fda_tensorboard.CHARTS))
            driver.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert [c["title"] for c in charts] == list(fda_tensorboard.CHARTS), charts
    for chart, tags in zip(charts, fda_tensorboard.CHARTS.values()):
        assert chart["regexes"] == [f"^{t}$" for t in tags]
        # One drawn line per tag (each tag is in one run only), in an SVG plot; the two
        # lines of a chart are told apart by colour (TensorBoard colours by run).
        assert chart["lines"] == len(tags), chart
        assert len(chart["colors"]) == len(tags), chart
        assert chart["svgs"] >= 1, chart
    assert screenshot.stat().st_size > 10_000
    # The server was stopped: its port no longer accepts connections.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_readme_multiworker_recipe_labels_each_workers_logs(tmp_path):
    result = launch(2, "tests/workers/dashboard_worker.py", tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout[-4000:]
    # One labelled run per worker for Keras' logs, the chief's FDA runs, nothing mixed.
    assert sorted(os.listdir(tmp_path)) == ["fda", "fda_reference", "worker0", "worker1"]
    fda_events = read_dashboard(tmp_path / "fda")
    losses = []
    for worker in ("worker0", "worker1"):
        run = tmp_path / worker / "train"
        assert len([f for f in os.listdir(run) if f.startswith("events.out")]) == 1
        events = read_run(run)
        assert [s for s, _ in events["batch_loss"]] == list(range(1, 21))
        assert {s for s, _ in fda_events["fda/variance"]} == set(range(1, 21))
        losses.append([float(v) for _, v in events["batch_loss"]])
    # Each worker's run holds its own loss (different data), not a copy of the other's.
    assert losses[0] != losses[1]
