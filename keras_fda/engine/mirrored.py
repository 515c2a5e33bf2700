"""The engine over the mirrored variables of a `tf.distribute` strategy's replicas.

`FDAStrategy`'s engine, as `WorkerAverager` is `FDACallback`'s: the
trigger's local state per replica, the decision and the sync with the
strategy's collectives, all inside the compiled train step. It knows
nothing of Keras models: `FDAStrategy` hands it a model's variables.
"""

import contextlib

import tensorflow as tf
from tensorflow.python.distribute import values as distribute_values

from keras_fda.policies import outer as outer_lib
from keras_fda.engine.core import Engine, traced_per_engine

_MEAN = tf.distribute.ReduceOp.MEAN


class MirroredEngine(Engine):
    """The engine of one model's mirrored variables under a `tf.distribute` strategy.

    `replica_step` runs in each replica's train step; the decision and the
    sync run in cross-replica context (a `merge_call`), with the strategy's
    collectives.

    Args:
        strategy: the strategy whose replicas train copies of the model.
        trigger, variables, extra_variables, sync_rule, moments: as `Engine`'s
            (the variables are mirrored).
        dashboard: the chief's `keras_fda.tensorboard.Dashboard`, or None.

    Attributes:
        inner_optimizer: set by the driver: the optimizer whose `moments`
            these are, so that it notices a recompile.
    """

    inner_optimizer = None

    def __init__(
        self, strategy, trigger, variables, extra_variables=(), sync_rule=None, moments=(),
        dashboard=None,
    ):
        self.strategy = strategy
        self.dashboard = dashboard
        # Created eagerly even when first seen while Keras traces its train
        # function. Mirrored (one copy per replica) so that replica-context
        # reads are local; they are only assigned in cross-replica context,
        # so the copies stay equal. The replicas are equal here (fresh model).
        # The outer optimizer's variables, built here too, are mirrored alike.
        with tf.init_scope(), strategy.scope():
            super().__init__(trigger, variables, extra_variables, sync_rule, moments)
        if self.sync_state.quantized and len(strategy.extended.worker_devices) > 1:
            raise ValueError(
                f"sync_dtype={sync_rule.sync_dtype!r} keeps one error-feedback residual per "
                f"worker; this FDAStrategy has {len(strategy.extended.worker_devices)} replicas "
                "per worker. Use one device per worker, sync_dtype='bfloat16', or FDACallback."
            )
        # One replica per worker: a gather's rows are in task order.
        resolver = getattr(strategy, "cluster_resolver", None)
        self.rank = (resolver.task_id or 0) if resolver is not None else 0
        self.synchronize = traced_per_engine(tf.function(self._synchronize_if_drifted))

    # --- replica context -------------------------------------------------

    def replica_step(self, train_step, *args, **kwargs):
        """The model's train step followed by the FDA check (per replica)."""
        logs = train_step(*args, **kwargs)
        if self.trigger.state_size:
            local = self.local_state(self._reads(self.variables))
        else:
            local = tf.zeros([0])
        fda_logs = tf.distribute.get_replica_context().merge_call(self._decide, args=(local,))
        logs = dict(logs)
        logs.update(fda_logs)
        return logs

    def _reads(self, variables):
        """The values of `variables` (one replica's copies) in the averaging dtype.

        float32 or float64: exact for every float weight, and the collectives
        need not support half precision.
        """
        return [tf.cast(v.read_value(), self.dtype) for v in variables]

    def _replica_sync(self):
        return tf.distribute.get_replica_context().merge_call(self._sync_if_drifted)

    # --- cross-replica context -------------------------------------------

    def _decide(self, strategy, local):
        """Averages the states, asks the trigger, maybe averages the weights."""
        self.steps.assign_add(1)
        self.steps_since_sync.assign_add(1)
        steps_since_sync = self.steps_since_sync.read_value()
        mean_state = None
        if self.trigger.state_size:
            mean_state = strategy.reduce(_MEAN, local, axis=None)
        statistic, decided, finite = self.decide(mean_state, steps_since_sync)
        # The statistic is all-reduced: every worker fails here together,
        # before anything is averaged.
        _assert_finite(
            finite, self.steps.read_value(), f"the {self.trigger.name} statistic (fda/variance)"
        )
        # One tf.cond in one graph: every replica is averaged or none is.
        synced = tf.cond(
            decided,
            lambda: self._average(strategy, mean_state),
            lambda: tf.constant(False),
        )
        if self.dashboard is not None:
            self._write_dashboard(statistic, synced, round_length=steps_since_sync)
        return self._logs(statistic)

    def _write_dashboard(self, statistic, synced, round_length):
        """Hands this step's values to the chief's `Dashboard` (host Python)."""
        steps = self.steps.read_value()
        # Only the steps that write leave the graph.
        due = synced | (steps % self.dashboard.update_freq == 0)
        values = [
            steps, statistic, synced, round_length, self.syncs.read_value(),
            self.steps_since_sync.read_value(),
        ]

        def write():
            tf.py_function(self._dashboard_step, values, Tout=[])
            return tf.constant(True)

        tf.cond(due, write, lambda: tf.constant(False))

    def _dashboard_step(self, steps, statistic, synced, round_length, syncs, steps_since_sync):
        steps, syncs = int(steps), int(syncs)
        if bool(synced):
            self.dashboard.write_sync(steps, int(round_length))
        # This step's snapshot, passed in: no second read of the counters.
        stats = self.communication(steps=steps, syncs=syncs)
        self.dashboard.write_step(
            steps,
            statistic=float(statistic),
            threshold=self.trigger.threshold,
            syncs=syncs,
            steps_since_sync=int(steps_since_sync),
            stats=stats,
        )

    def _sync_if_drifted(self, strategy):
        return tf.cond(
            self.steps_since_sync.read_value() > 0,
            lambda: self._average(strategy, plain=True),
            lambda: tf.constant(False),
        )

    def _payload(self, strategy):
        """What each replica all-reduces at a sync: the rule's payload, then its moments.

        A list of PerReplica values, each replica's made on its device from
        its own copies. Built in cross-replica context, inside the sync's
        branch, so that only the steps that sync pay for it (a quantized
        payload costs milliseconds per million weights): built in replica
        context it would run at every step, since a replica cannot
        `merge_call` from inside a `tf.cond`.
        """
        replicas = []
        for index, device in enumerate(strategy.extended.worker_devices):
            weights, moments = (
                [strategy.experimental_local_results(v)[index] for v in variables]
                for variables in (self.averaged, self.moments)
            )
            with tf.device(device):
                replicas.append(
                    self.payload(self._reads(weights)) + self.sync_state.moments_payload(moments)
                )
        return [distribute_values.PerReplica(values) for values in zip(*replicas)]

    def _average(self, strategy, mean_state=None, plain=False):
        """Gives every replica the sync rule's step from the mean payload; returns True.

        `mean_state`: the all-reduced trigger state that decided the sync, for
        `trigger.end_round` (None for the final sync).

        Fails (on every worker: the mean is all-reduced) before assigning
        anything if the mean is NaN or Inf.
        """
        payload = self._payload(strategy)
        # The per-replica values, not variables: given a MirroredVariable the
        # strategy assumes its copies are equal and returns it unchanged.
        # One batch per dtype: TensorFlow packs a batch into one tensor.
        mean = [None] * len(payload)
        local = [strategy.experimental_local_results(p)[0] for p in payload]
        reduced, gathered = outer_lib.gather_groups(local)
        for indices in reduced.values():
            means = strategy.extended.batch_reduce_to(
                _MEAN, [(payload[i], payload[i]) for i in indices]
            )
            # Every device holds the same mean; this process's first one's is used.
            for i, m in zip(indices, means):
                mean[i] = strategy.experimental_local_results(m)[0]
        for i in sum(gathered.values(), []):
            rows = strategy.gather(payload[i], axis=0)
            mean[i] = tf.reshape(rows, [strategy.num_replicas_in_sync, int(local[i].shape[0])])
        finite = self.sync_state.finite(mean)
        # No apostrophes: TF's message would show them escaped.
        what = "the average of the weights of the replicas"
        with tf.control_dependencies([_assert_finite(finite, self.steps.read_value(), what)]):

            def assign(values):
                for variable, value in zip(self.averaged, values):
                    for copy in variable.values:
                        copy.assign(tf.cast(value, variable.dtype))

            # Cross-replica context: the outer optimizer and the moments'
            # assignments update every copy alike.
            with _merged(strategy):
                return self.sync(
                    mean[: len(self.averaged)], assign, mean_state=mean_state,
                    mean_moments=mean[len(self.averaged):], plain=plain,
                )

    def _logs(self, statistic):
        syncs = tf.cast(self.syncs.read_value(), tf.float64)
        # CommunicationStats' formula is plain arithmetic: it takes tensors.
        stats = self.communication(
            steps=tf.cast(self.steps.read_value(), tf.float64), syncs=syncs
        )
        return {
            "fda/variance": statistic,
            "fda/threshold": tf.constant(self.trigger.threshold, tf.float32),
            "fda/syncs": syncs,
            "fda/comm_bytes": stats.paper_bytes,
        }

    # --- eager -----------------------------------------------------------

    def _synchronize_if_drifted(self):
        return tf.distribute.Strategy.run(self.strategy, self._replica_sync)

    def communication(self, **counters):
        return super().communication(self.strategy.num_replicas_in_sync, **counters)


@contextlib.contextmanager
def _merged(strategy):
    """Lets a Keras optimizer update mirrored variables in cross-replica context.

    Keras' optimizer reaches its per-variable `extended.update` through a
    `merge_call` of the replica context, which cross-replica context (where
    the outer optimizer steps, every copy of `w0` alike) has not; it is
    merged already, so TF's `maybe_merge_call` may call the update directly.
    """
    extended = strategy.extended
    extended._use_merge_call = lambda: False
    try:
        yield
    finally:
        del extended._use_merge_call


def _assert_finite(value, steps, what):
    """Fails the step if `value` (a statistic, or a bool) is NaN or Inf."""
    ok = value if value.dtype == tf.bool else tf.math.is_finite(value)
    return tf.debugging.Assert(
        ok,
        [
            "FDA stopped training at step", steps,
            f": {what} is NaN or Inf, so nothing was averaged. Training diverged on a "
            "replica: lower the learning rate, clip gradients, or check its data.",
        ],
    )
