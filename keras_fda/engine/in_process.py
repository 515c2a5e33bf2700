"""The engine over K copies of a model's variables in one process: the simulator's.

`Simulation`'s engine, as `WorkerAverager` is `FDACallback`'s and
`MirroredEngine` is `FDAStrategy`'s. Its all-reduce is a mean over the
copies, added as TensorFlow's collectives add
(`keras_fda.runtime.transport.payload_mean`), and a sync assigns the result
to every copy. It knows nothing of Keras models: `Simulation` hands it the
copies' variables and optimizer moments.
"""

import contextlib

import tensorflow as tf

from keras_fda.engine.core import Engine, traced_per_engine
from keras_fda.runtime import cluster as cluster_lib
from keras_fda.runtime import transport as transport_lib

_DIVERGED = "FDA simulation stopped"


class InProcessEngine(Engine):
    """Dynamic averaging of K in-process copies of a model's variables.

    Worker 0's copy seeds `w0` (the copies start equal). `check` runs after
    each step of all K copies and `finish` at the end of a run; both are
    compiled once per engine and raise `FloatingPointError` if a statistic
    or an average is NaN or Inf (nothing is then averaged).

    Args:
        trigger: the `keras_fda.triggers.SyncTrigger` (watching the copies'
            optimizers in copy order).
        copies: per copy, the variables whose drift is monitored and averaged.
        extra_copies: per copy, the variables averaged but not monitored.
        moment_copies: per copy, its optimizer moments
            (`keras_fda.outer.moment_variables`).
        sync_rule: the `keras_fda.SyncRule`.
        lagged: decide on the previous step's state (composed after that
            step's sync), as `FDACallback`'s overlapped exchange does;
            False: on the same step's, as `FDAStrategy` does.
    """

    def __init__(self, trigger, copies, extra_copies, moment_copies, sync_rule=None,
                 lagged=False):
        self.copies = [list(c) for c in copies]
        self.averaged_copies = [c + list(e) for c, e in zip(self.copies, extra_copies)]
        self.moment_copies = list(moment_copies)
        super().__init__(
            trigger, self.copies[0], extra_copies[0], sync_rule, self.moment_copies[0],
            copies=len(self.copies), lagged=bool(lagged and trigger.state_size),
        )
        self._check = tf.function(self._decide_and_sync)
        self._finish = traced_per_engine(tf.function(self._final_syncs))

    def check(self):
        """After a step of every copy: the decision, maybe a sync; returns `(statistic, synced)`.

        With `lagged`, the statistic is NaN until a state was kept.
        """
        with _diverged_as_floating_point_error():
            return self._check()

    def finish(self):
        """Ends a run as a fit with `FDACallback` ends; returns how many syncs it made.

        The lagged decision still pending (with the outer step), then a
        plain average if the copies trained since the last sync.
        """
        with _diverged_as_floating_point_error():
            return int(self._finish())

    def _mean_local_state(self):
        return self.mean_local_state(self.copies)

    def _decide_and_sync(self):
        since = self.steps_since_sync.assign_add(1)
        mean_state, exchanged = None, tf.constant(True)
        if self.pending:
            statistic, decided, finite, exchanged, _ = self.decide_pending()
        else:
            mean_state = self._mean_local_state() if self.trigger.state_size else None
            statistic, decided, finite = self.decide(mean_state, since)
        with tf.control_dependencies([_assert_finite(finite | ~exchanged, "the statistic")]):
            statistic = tf.identity(statistic)
        # end_round measures the round where its step is: with the lag, on
        # the weights being averaged, not the deciding (older) state.
        synced = tf.cond(
            exchanged & decided,
            lambda: self._average(self._mean_local_state() if self.pending else mean_state),
            lambda: tf.constant(False),
        )
        if self.pending:
            with tf.control_dependencies([synced]):
                message = tf.concat([tf.cast(self._mean_local_state(), tf.float32), [1.0]], 0)
                self.keep_pending(message, self.steps_since_sync.read_value())
            statistic = tf.where(exchanged, statistic, float("nan"))
        return statistic, synced

    def _final_syncs(self):
        settled = tf.constant(False)
        if self.pending:
            settled = tf.cond(
                self.decide_pending()[1],
                lambda: self._average(self._mean_local_state()),
                lambda: tf.constant(False),
            )
        with tf.control_dependencies([settled]):
            final = tf.cond(
                self.steps_since_sync.read_value() > 0,
                lambda: self._average(None, plain=True),
                lambda: tf.constant(False),
            )
        return tf.cast(settled, tf.int32) + tf.cast(final, tf.int32)

    def _average(self, mean_state, plain=False):
        sync = self.sync_state
        payloads = [
            self.payload([v.read_value() for v in averaged], copy=k)
            for k, averaged in enumerate(self.averaged_copies)
        ]
        mean_payload = [
            transport_lib.payload_mean(
                list(p), ring=sync.sends_drift and p[0].dtype == sync.payload_dtype
            )
            for p in zip(*payloads)
        ]
        mean_moments = [
            transport_lib.mean(list(per_copy))
            for per_copy in zip(*[sync.moments_payload(m) for m in self.moment_copies])
        ]
        # All checked before any is assigned: a NaN is never averaged in.
        finite = sync.finite(mean_payload + mean_moments)
        with tf.control_dependencies([_assert_finite(finite, "the workers' average")]):
            return self.sync(
                mean_payload, self._assign, mean_state=mean_state, mean_moments=mean_moments,
                moment_copies=self.moment_copies, copies=self.copies, plain=plain,
            )

    def _assign(self, values):
        for value, *variables in zip(values, *self.averaged_copies):
            for v in variables:
                v.assign(tf.cast(value, v.dtype))


@contextlib.contextmanager
def _diverged_as_floating_point_error():
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        if _DIVERGED not in str(e):
            raise
        raise FloatingPointError(cluster_lib.error_cause(e)) from None


def _assert_finite(ok, what):
    return tf.debugging.Assert(
        ok,
        [f"{_DIVERGED}: {what} is NaN or Inf, so nothing was averaged. Training diverged on a "
         "worker: lower the learning rate, clip gradients, or check its data."],
    )
