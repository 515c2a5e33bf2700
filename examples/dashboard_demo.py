"""The FDA TensorBoard dashboard from a short real run, and a screenshot of it.

Trains the quickstart's classifier on scikit-learn's digits in this one process
(a single worker) with `FDACallback` and `keras.callbacks.TensorBoard` on the
same log directory, then, with `--screenshot`, serves the logs with TensorBoard
and saves the "Custom Scalars" tab as rendered by headless Chromium:

    python examples/dashboard_demo.py --log_dir /tmp/fda_logs --screenshot docs/dashboard.png
    tensorboard --logdir /tmp/fda_logs     # then open http://localhost:6006/#custom_scalars

The screenshot needs Debian's `chromium` and `chromium-driver` and the
`selenium` package. `tests/test_tensorboard.py` uses the same helpers.
"""

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Flags that let Chromium run headless as root in a container, without any
# network traffic of its own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def make_model(num_classes=10):
    import keras

    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )


def train(log_dir, steps=200, threshold=0.2, steps_per_epoch=40, seed=0):
    """Trains `steps` steps with FDA, its dashboard and Keras' TensorBoard; returns the callback."""
    import keras
    import tensorflow as tf
    from sklearn.datasets import load_digits

    import keras_fda

    keras.utils.set_random_seed(seed)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    model = make_model()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat().batch(32)
    )
    fda = keras_fda.FDACallback(threshold=threshold, log_dir=log_dir)
    callbacks = [fda]
    # Keras' own TensorBoard on the same log_dir (runs train/ and validation/);
    # batch-level scalars share the FDA charts' step axis.
    callbacks.append(keras.callbacks.TensorBoard(log_dir, update_freq=1))
    model.fit(
        dataset,
        epochs=max(1, steps // steps_per_epoch),
        steps_per_epoch=min(steps, steps_per_epoch),
        callbacks=callbacks,
        verbose=0,
        shuffle=False,  # The dataset is shuffled already.
    )
    return fda


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def serve_tensorboard(log_dir, last_step=None, timeout=60):
    """Runs `tensorboard --logdir log_dir` on a free port; yields its URL, then stops it by PID.

    Ready when the custom-scalars layout is served and, if `last_step` is
    given, the `fda/syncs` scalars reach it (the logs are fully loaded).
    """
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "tensorboard.main", "--logdir", os.fspath(log_dir),
            "--host", "127.0.0.1", "--port", str(port),
            # The pure-Python loader: no separate data-server process to stop.
            "--load_fast=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"tensorboard exited with {server.returncode}: {server.stderr.read()[-2000:]}"
                )
            try:
                ready = bool(_get_json(f"{url}/data/plugin/custom_scalars/layout"))
                if ready and last_step is not None:
                    points = _get_json(f"{url}/data/plugin/scalars/scalars?run=fda&tag=fda/syncs")
                    ready = bool(points) and points[-1][1] >= last_step
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                ready = False
            if ready:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensorboard did not serve the FDA logs within {timeout} s")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stderr.close()


@contextlib.contextmanager
def chromium(width=1400, height=1250):
    """A headless Chromium driven by Selenium through Debian's chromedriver; quits it afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    # Both paths given: Selenium does not try to download a driver or browser.
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        service = Service(CHROMEDRIVER)
        driver = webdriver.Chrome(options=options, service=service)
        try:
            yield driver
        finally:
            driver.quit()  # Closes the browser, then stops chromedriver.
            if service.process is not None and service.process.poll() is None:
                service.process.kill()
                service.process.wait()


# The custom-scalars dashboard is a Polymer app: its chart cards live in nested
# shadow roots, which querySelectorAll does not enter, so walk them.
_CHARTS_JS = """
function all(root, selector, out) {
  out.push(...root.querySelectorAll(selector));
  for (const el of root.querySelectorAll('*')) if (el.shadowRoot) all(el.shadowRoot, selector, out);
  return out;
}
return all(document, 'tf-custom-scalar-multi-line-chart-card', []).map(card => ({
  title: card.title,
  regexes: card.tagRegexes,
  // Plottable draws each series as an SVG path; an empty chart has none.
  lines: all(card.shadowRoot, 'path.line', [])
    .filter(p => (p.getAttribute('d') || '').length > 10).length,
  colors: [...new Set(all(card.shadowRoot, 'path.line', [])
    .filter(p => (p.getAttribute('d') || '').length > 10)
    .map(p => getComputedStyle(p).stroke))],
  svgs: all(card.shadowRoot, 'svg', []).filter(s => s.getBoundingClientRect().width > 100).length,
}));
"""


def rendered_charts(driver, url, expected_charts, timeout=30):
    """Opens the Custom Scalars tab; returns its chart cards once each has drawn a line per tag.

    Returns a list of dicts: `title`, `regexes`, `lines` (drawn series),
    `colors` (their distinct stroke colours), `svgs`.
    On timeout, returns what was rendered by then.
    """
    # Charts that show every point: no outlier clipping (a setting kept in
    # localStorage, so set it on a page of the same origin first) and no
    # smoothing (FDA's statistic is a saw-tooth; smoothing would blur the syncs).
    driver.get(f"{url}/data/plugins_listing")
    driver.execute_script("localStorage.setItem('_ignoreYOutliers', 'false');")
    driver.get(f"{url}/#custom_scalars&_smoothingWeight=0")
    deadline = time.monotonic() + timeout
    while True:
        charts = driver.execute_script(_CHARTS_JS)
        done = len(charts) >= expected_charts and all(
            c["lines"] >= len(c["regexes"]) for c in charts
        )
        if done or time.monotonic() > deadline:
            return charts
        time.sleep(0.25)


def screenshot(log_dir, path, last_step=None, width=1400, height=1250):
    """Serves `log_dir`, renders the FDA charts in Chromium, saves a PNG; returns the charts."""
    from keras_fda.drivers import tensorboard as fda_tensorboard

    with serve_tensorboard(log_dir, last_step) as url, chromium(width, height) as driver:
        charts = rendered_charts(driver, url, len(fda_tensorboard.CHARTS))
        time.sleep(1.0)  # Let the last chart finish its draw before the snapshot.
        driver.save_screenshot(os.fspath(path))
    return charts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log_dir", default=None, help="TensorBoard log directory (default: a new temporary one)."
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--threshold", type=float, default=0.2, help="FDA threshold (13 syncs in 200 steps here)."
    )
    parser.add_argument("--screenshot", default=None, help="Save the dashboard as this PNG.")
    args = parser.parse_args()
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="fda_logs_")
    fda = train(log_dir, steps=args.steps, threshold=args.threshold)
    print(fda.communication.summary())
    print(f"logs in {log_dir}: tensorboard --logdir {log_dir}, then the Custom Scalars tab")
    if args.screenshot:
        charts = screenshot(log_dir, args.screenshot, last_step=fda.communication.steps)
        for chart in charts:
            print(f"rendered: {chart['title']} ({chart['lines']} lines)")
        print(f"saved {args.screenshot}")


if __name__ == "__main__":
    main()
