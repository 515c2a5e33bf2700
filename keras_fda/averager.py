"""One worker's side of dynamic averaging over a set of local variables.

`WorkerAverager` composes a trigger (the algorithm) with a transport (the
collectives) for variables that live in this process. It holds the reference
weights `w0` agreed at the last synchronization, the trigger's round state and
the counters, and runs one compiled `tf.function` per step:

    drift -> local state -> all-reduce -> statistic -> should_sync -> [average]

It knows nothing of Keras: `FDACallback` feeds it a model's variables.
"""

import tensorflow as tf

from keras_fda.accounting import CommunicationStats


def _flatten(tensors):
    return tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors], 0)


class WorkerAverager:
    """Dynamic averaging of `variables` (plus `extra_variables`) across workers.

    Args:
        trigger: a built-in or custom `keras_fda.triggers.SyncTrigger`.
        transport: the `keras_fda.transport.Transport` to the other workers.
        variables: the tf.Variables whose drift is monitored and averaged
            (a model's trainable weights).
        extra_variables: tf.Variables averaged at each sync but not monitored
            (e.g. BatchNorm moving statistics).
    """

    def __init__(self, trigger, transport, variables, extra_variables=()):
        self.trigger = trigger
        self.transport = transport
        self.variables = list(variables)
        self.averaged = self.variables + list(extra_variables)
        trigger.build([v.shape for v in self.variables])
        self.reference = [
            tf.Variable(v, trainable=False, name="fda_reference") for v in self.variables
        ]
        self.round_state = [
            tf.Variable(x, trainable=False, name="fda_round_state")
            for x in trigger.initial_round_state()
        ]
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="fda_steps")
        self.syncs = tf.Variable(0, dtype=tf.int64, trainable=False, name="fda_syncs")
        self.steps_since_sync = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="fda_steps_since_sync"
        )
        self.num_params = sum(int(v.shape.num_elements()) for v in self.averaged)

    def _assign_flat(self, flat):
        sizes = [int(v.shape.num_elements()) for v in self.averaged]
        for v, part in zip(self.averaged, tf.split(flat, sizes)):
            v.assign(tf.cast(tf.reshape(part, v.shape), v.dtype))

    @tf.function
    def broadcast(self):
        """Gives every worker worker 0's values and makes them the reference."""
        flat = _flatten(self.averaged)
        if not self.transport.is_chief:
            flat = tf.zeros_like(flat)
        self._assign_flat(self.transport.all_reduce(flat, "sum"))
        for r, v in zip(self.reference, self.variables):
            r.assign(v)
        self.steps_since_sync.assign(0)

    def _average(self):
        self._assign_flat(self.transport.all_reduce(_flatten(self.averaged), "mean"))
        global_step = [v - r for v, r in zip(self.variables, self.reference)]
        next_round = self.trigger.next_round_state(
            [s.read_value() for s in self.round_state], global_step
        )
        for s, value in zip(self.round_state, next_round):
            s.assign(value)
        for r, v in zip(self.reference, self.variables):
            r.assign(v)
        self.steps_since_sync.assign(0)
        self.syncs.assign_add(1)
        return tf.constant(True)

    @tf.function
    def step(self):
        """Runs after one local step; returns `(statistic, synced)`."""
        self.steps.assign_add(1)
        steps_since_sync = self.steps_since_sync.assign_add(1)
        mean_state = None
        if self.trigger.state_size:
            drift = [v - r for v, r in zip(self.variables, self.reference)]
            local = self.trigger.local_state(drift, [s.read_value() for s in self.round_state])
            mean_state = self.transport.all_reduce(local, "mean")
        statistic = self.trigger.statistic(mean_state, steps_since_sync)
        # The predicate depends only on all-reduced values and the shared step
        # count, so every worker takes the same branch and joins its collective.
        synced = tf.cond(
            self.trigger.should_sync(statistic, steps_since_sync),
            self._average,
            lambda: tf.constant(False),
        )
        return tf.cast(statistic, tf.float32), synced

    @tf.function
    def finish(self):
        """Averages once more unless the last step already did; returns whether it did."""
        return tf.cond(self.steps_since_sync > 0, self._average, lambda: tf.constant(False))

    def communication(self):
        """The `CommunicationStats` of the steps and syncs so far."""
        return CommunicationStats(
            num_workers=self.transport.num_workers,
            num_params=self.num_params,
            state_bytes=self.trigger.state_bytes,
            steps=int(self.steps.numpy()),
            syncs=int(self.syncs.numpy()),
        )
