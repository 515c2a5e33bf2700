"""A TensorBoard dashboard of FDA's communication: how close to a sync, how much was saved.

`Dashboard` writes two runs of its own, next to the `train` and `validation`
runs of `keras.callbacks.TensorBoard` on the same `log_dir`: `<log_dir>/fda`
holds what FDA measured and did, `<log_dir>/fda_reference` the two lines it is
compared with (``fda/threshold`` and ``fda/bytes_synchronous``). TensorBoard
colours lines by run, so in the two-line charts the reference is a line of
another colour, named in the run selector and the tooltip.

=========================  ===========================================================
Tag                        Value
=========================  ===========================================================
``fda/variance``           the trigger's statistic (FDA: the variance estimate)
``fda/threshold``          the threshold it is compared with (syncs when greater);
                           in the run ``fda_reference``
``fda/syncs``              synchronizations so far (the initial broadcast excluded)
``fda/steps_since_sync``   local steps since the last synchronization
``fda/bytes_sent``         bytes FDA sent so far, whole cluster, paper formula
``fda/bytes_synchronous``  bytes averaging after every step would have sent (same
                           formula); in the run ``fda_reference``
``fda/savings``            ``bytes_synchronous / bytes_sent``
``fda/round_length``       histogram of the round lengths (steps between syncs) so far,
                           written at each sync
=========================  ===========================================================

The byte figures are `keras_fda.accounting.CommunicationStats.paper_bytes` and
`synchronous_paper_bytes`. Every value is logged at the global step (local
steps so far, `optimizer.iterations`), the axis of the `batch_*` scalars of
`keras.callbacks.TensorBoard(update_freq=...)`, so the charts line up.

The run also holds a custom-scalars layout (category "FDA communication"):
estimate vs threshold, FDA vs synchronous bytes, syncs, steps since the last
sync, and the savings ratio. Open it with `tensorboard --logdir <log_dir>` and
the "Custom Scalars" tab (`http://localhost:6006/#custom_scalars`).
"""

import os

import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

CATEGORY = "FDA communication"
REFERENCE_RUN_SUFFIX = "_reference"
# Written to the reference run: each is the other line of a two-line chart.
REFERENCE_TAGS = ("fda/threshold", "fda/bytes_synchronous")

# Chart title -> the tags it draws. Anchored regexes: the plugin uses
# re.match, so "fda/syncs" alone would also match a longer tag.
CHARTS = {
    "Variance estimate (run fda) vs threshold (run fda_reference)": [
        "fda/variance",
        "fda/threshold",
    ],
    "Bytes sent (paper formula): FDA (run fda) vs synchronous averaging (run fda_reference)": [
        "fda/bytes_sent",
        "fda/bytes_synchronous",
    ],
    "Synchronizations": ["fda/syncs"],
    "Steps since the last sync": ["fda/steps_since_sync"],
    "Savings (synchronous bytes / FDA bytes)": ["fda/savings"],
}


def layout():
    """The custom-scalars `layout_pb2.Layout` of the FDA charts."""
    charts = [
        layout_pb2.Chart(
            title=title,
            multiline=layout_pb2.MultilineChartContent(tag=[f"^{t}$" for t in tags]),
        )
        for title, tags in CHARTS.items()
    ]
    return layout_pb2.Layout(category=[layout_pb2.Category(title=CATEGORY, chart=charts)])


def standardize_update_freq(update_freq):
    """`update_freq` as a positive int or "epoch"; ValueError otherwise.

    Every worker checks it, not only the chief that writes, so that a bad
    value stops all of them before training.
    """
    if update_freq == "batch":
        return 1
    if update_freq != "epoch" and (
        isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1
    ):
        raise ValueError(
            f'update_freq must be a positive int, "batch" or "epoch", got {update_freq!r}.'
        )
    return update_freq


def write_row(writer, row, prefix):
    """Writes every value of `row` but its "step" as the scalar `prefix + name` at that step."""
    with writer.as_default():
        for name, value in row.items():
            if name != "step":
                tf.summary.scalar(prefix + name, value, step=row["step"])


class Dashboard:
    """Writes the FDA dashboard (scalars, round-length histogram, custom-scalars layout).

    Create it on one worker only (the chief): the values are cluster-wide, and
    several writers on one run would interleave. It writes to
    `os.path.join(log_dir, run)`, so it can share `log_dir` with
    `keras.callbacks.TensorBoard`. See the module docstring for the tags.

    Args:
        log_dir: the TensorBoard log directory.
        update_freq: write the scalars every `update_freq` steps (an int;
            `"batch"` is 1), or `"epoch"`: only when `write_step(...,
            force=True)` is called (the caller does so at each epoch's end),
            as with `keras.callbacks.TensorBoard(update_freq=...)`.
        run: the run (subfolder of `log_dir`) to write to; the threshold and
            the synchronous bytes go to the run `run + "_reference"`.

    Example (what `FDACallback(log_dir=...)` does on the chief):

    ```python
    dashboard = Dashboard("logs", update_freq=10)
    for step in range(1, num_steps + 1):
        ...  # one training step, then the trigger's check (maybe a sync)
        dashboard.record(averager.communication(), statistic=statistic,
                         threshold=1.5, synced=synced)
    dashboard.close()
    ```
    """

    def __init__(self, log_dir, update_freq=1, run="fda"):
        self.update_freq = standardize_update_freq(update_freq)
        self.log_dir = os.path.join(log_dir, run)
        self.reference_log_dir = self.log_dir + REFERENCE_RUN_SUFFIX
        # A large queue so that the writer does not flush every few steps (7
        # events a step), but at most every 5 s so the dashboard stays live.
        self._writer, self._reference_writer = (
            tf.summary.create_file_writer(path, max_queue=1000, flush_millis=5000)
            for path in (self.log_dir, self.reference_log_dir)
        )
        self.round_lengths = []
        # The step of the last sync `record` saw (a resumed driver sets it).
        self.last_sync = 0
        with self._writer.as_default(step=0):
            # The plugin finds the layout by this tag and plugin name, in any run.
            tf.summary.write(
                custom_scalar_metadata.CONFIG_SUMMARY_TAG,
                tf.constant(layout().SerializeToString()),
                metadata=custom_scalar_metadata.create_summary_metadata(),
            )
        # Write the layout now: TensorBoard shows the tab as soon as it exists.
        self._writer.flush()

    def record(self, stats, *, statistic, threshold, synced=False, force=False):
        """After a step: `write_sync` if it `synced`, then `write_step`, at `stats.steps`.

        Args:
            stats: the `keras_fda.accounting.CommunicationStats` after the step.
            statistic, threshold, force: as for `write_step`.
            synced: whether the step ended with a sync; round lengths are
                counted from the last sync recorded (or `last_sync`).
        """
        if synced:
            self.write_sync(stats.steps, stats.steps - self.last_sync)
            self.last_sync = stats.steps
        return self.write_step(
            stats.steps, statistic=statistic, threshold=threshold, syncs=stats.syncs,
            steps_since_sync=stats.steps - self.last_sync, stats=stats, force=force,
        )

    def write_step(
        self, step, *, statistic, threshold, syncs, steps_since_sync, stats, force=False
    ):
        """Writes the scalars at `step` if it is due (every `update_freq` steps) or `force`.

        Args:
            step: the global step (local steps so far, `optimizer.iterations`).
            statistic: the trigger's statistic (FDA: the variance estimate).
            threshold: the trigger's threshold; None to leave it out.
            syncs: synchronizations so far.
            steps_since_sync: local steps since the last synchronization.
            stats: the `keras_fda.accounting.CommunicationStats` so far.
            force: write even if the step is not due (e.g. at an epoch's end).

        Returns:
            Whether it wrote.
        """
        due = self.update_freq != "epoch" and step % self.update_freq == 0
        if not (due or force):
            return False
        values = {
            "fda/variance": statistic,
            "fda/threshold": threshold,
            "fda/syncs": syncs,
            "fda/steps_since_sync": steps_since_sync,
            "fda/bytes_sent": stats.paper_bytes,
            "fda/bytes_synchronous": stats.synchronous_paper_bytes,
            "fda/savings": stats.savings,
        }
        values = {tag: v for tag, v in values.items() if v is not None}
        # Tensors, not Python numbers, so the compiled writers are traced once
        # (twice at most: with and without the threshold).
        step = tf.constant(step, tf.int64)
        for writer, tags in (
            (self._writer, [t for t in values if t not in REFERENCE_TAGS]),
            (self._reference_writer, [t for t in values if t in REFERENCE_TAGS]),
        ):
            self._write_scalars(
                writer, step, tuple(tags), tf.constant([float(values[t]) for t in tags], tf.float64)
            )
        return True

    def write_sync(self, step, round_length):
        """Records a sync after a round of `round_length` steps; writes the histogram so far.

        Args:
            step: the global step of the sync.
            round_length: local steps since the previous sync (or since the start).
        """
        self.round_lengths.append(int(round_length))
        self._write_histogram(
            tf.constant(step, tf.int64), tf.constant(self.round_lengths, tf.float64)
        )

    # Compiled: eager tf.summary costs about 0.3 ms per scalar, one graph call
    # writing all of them about 0.1 ms per scalar.
    @tf.function
    def _write_scalars(self, writer, step, tags, values):
        with writer.as_default(step=step):
            for i, tag in enumerate(tags):
                tf.summary.scalar(tag, values[i])

    @tf.function(reduce_retracing=True)
    def _write_histogram(self, step, round_lengths):
        # The whole distribution at each sync: TensorBoard's histogram and
        # distribution views then show how round lengths evolve over training.
        with self._writer.as_default(step=step):
            tf.summary.histogram(
                "fda/round_length",
                round_lengths,
                description="Local steps between consecutive FDA synchronizations.",
            )

    def flush(self):
        """Writes pending events to disk."""
        self._writer.flush()
        self._reference_writer.flush()

    def close(self):
        """Flushes and closes the writers."""
        self._writer.close()
        self._reference_writer.close()
