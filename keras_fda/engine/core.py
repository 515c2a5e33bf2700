"""The algorithm of dynamic averaging, written once for every driver.

An `Engine` holds one model's averaging state (the reference weights `w0`
agreed at the last sync, the trigger's round state, the counters, the bound
`SyncRule`) and runs the two operations every driver needs:

    engine.decide(mean_state, since)    # statistic, decided, finite
    engine.sync(mean_payload, assign)   # average (outer step), moments, new round

and, for a decision that lags its message (an overlapped exchange),
`keep_pending` / `decide_pending`. The engines of the drivers supply only
what differs between them: how they all-reduce (a `Transport` in
`WorkerAverager`, `strategy.extended` in `MirroredEngine`, a mean over K
copies in `InProcessEngine`) and how they assign (local variables, mirrored
variables, K copies). The trigger (`keras_fda.triggers`) and the
sync rule (`keras_fda.outer`) are pure policies: a new trigger or outer rule
is one change there and reaches all three drivers through this class.
"""

import tensorflow as tf

from keras_fda.policies import outer as outer_lib
from keras_fda.engine.accounting import CommunicationStats


def traced_per_engine(function):
    """Marks `function`, a `tf.function`, as traced once by each engine: returns it.

    TensorFlow warns ("5 out of the last 5 calls to ... triggered
    tf.function retracing") when the last five calls of functions with the
    same code each traced. The engine's once-per-run functions (the initial
    broadcast, the final sync) close over that run's variables, so a sweep
    of fits or simulator runs traces each of them once per run, by design.
    TensorFlow exempts its own per-object functions (a loaded SavedModel's)
    from the warning with the same attribute.
    """
    function._omit_frequent_tracing_warning = True
    return function


def averaging_dtype(variables):
    """The dtype in which `variables` are averaged: float64 if any is, else float32.

    float32 holds float16 and bfloat16 values exactly, float64 all of them:
    averaging never rounds a weight below its own precision.
    """
    return tf.float64 if any(v.dtype == tf.float64 for v in variables) else tf.float32


class Engine:
    """The state of dynamic averaging over `variables`, and its decide / sync steps.

    Every method works eagerly and inside a `tf.function` (also in a branch
    of `tf.cond`); the variables are created here, eagerly.

    Args:
        trigger: a built-in or custom `keras_fda.triggers.SyncTrigger`.
        variables: the tf.Variables whose drift is monitored and averaged
            (a model's trainable weights; in `Simulation`, worker 0's copy).
        extra_variables: tf.Variables averaged at each sync but not monitored
            (e.g. BatchNorm moving statistics).
        sync_rule: a `keras_fda.SyncRule` (what a sync sends and does with
            the average; default: the plain average of the weights).
        moments: one copy's optimizer moments (`keras_fda.outer.moment_variables`),
            for the rule's `optimizer_state` and its bytes.
        copies: how many local copies of the model this engine averages
            (`Simulation`'s K; 1 elsewhere): each keeps its own residuals of
            a quantized sync (`sync_dtype="int8"` or `"int4"`).
        lagged: keep an all-reduced message for a later decision
            (`keep_pending`, `decide_pending`), as an overlapped exchange does.

    Attributes:
        sync_state: the `SyncRule` bound to `reference` (`keras_fda.outer.SyncState`).
        residuals: per copy, the error-feedback residuals of a quantized
            sync (empty lists otherwise).
    """

    def __init__(self, trigger, variables, extra_variables=(), sync_rule=None, moments=(),
                 copies=1, lagged=False):
        self.trigger = trigger
        self.variables = list(variables)
        self.averaged = self.variables + list(extra_variables)
        self.num_params = sum(int(v.shape.num_elements()) for v in self.averaged)
        self.dtype = averaging_dtype(self.averaged)
        trigger.build([v.shape for v in self.variables])
        self.reference = [
            tf.Variable(v.read_value(), trainable=False, name="fda_reference")
            for v in self.variables
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
        self.sync_state = (sync_rule or outer_lib.SyncRule()).build(self.reference, self.dtype)
        self.moments = moments
        self.residuals = [self.sync_state.new_residuals() for _ in range(copies)]
        # This process's row in an all-gathered payload; drivers of one copy
        # among several processes set it.
        self.rank = 0
        self.pending = []
        if lagged:
            # The all-reduced message (the state and the 'still training'
            # fraction) that awaits its decision, and the round length it was
            # composed at (-1: none awaits).
            self.pending_state = tf.Variable(
                tf.zeros([trigger.state_size + 1]), trainable=False, name="fda_pending_state"
            )
            self.pending_since = tf.Variable(
                -1, dtype=tf.int64, trainable=False, name="fda_pending_since"
            )
            self.pending = [self.pending_state, self.pending_since]

    def state_variables(self):
        """Every variable of the averaging state, for checkpoints (fixed order)."""
        return [
            *self.reference, *self.round_state, self.steps, self.syncs, self.steps_since_sync,
            *self.sync_state.state_variables(), *sum(self.residuals, []), *self.pending,
        ]

    # --- decide ------------------------------------------------------------

    def local_state(self, values):
        """The trigger's local state (float32) of one copy whose monitored weights are `values`.

        The drift is computed in the dtype of `values`.
        """
        drift = [v - tf.cast(r, v.dtype) for v, r in zip(values, self.reference)]
        local = self.trigger.local_state(drift, [s.read_value() for s in self.round_state])
        return tf.cast(local, tf.float32)

    def mean_local_state(self, copies):
        """The mean local state of several copies (each a list of monitored values) in one pass."""
        drifts = [[v - tf.cast(r, v.dtype) for v, r in zip(c, self.reference)] for c in copies]
        return self.trigger.mean_local_state(drifts, [s.read_value() for s in self.round_state])

    def decide(self, mean_state, since):
        """The trigger's decision on the all-reduced `mean_state` (None if stateless).

        Args:
            mean_state: the mean of the workers' local states.
            since: the round length the state was composed at.

        Returns:
            `(statistic, decided, finite)`: the float32 statistic
            (`fda/variance`), whether to sync (never on a NaN/Inf
            statistic) and whether the statistic is finite. Every input is
            all-reduced or shared, so every worker decides alike.
        """
        statistic = tf.cast(self.trigger.statistic(mean_state, since), tf.float32)
        finite = tf.math.is_finite(statistic)
        return statistic, self.trigger.should_sync(statistic, since) & finite, finite

    def keep_pending(self, mean_message, since):
        """Keeps an all-reduced message (state, then the 'still training' fraction) for later.

        `since`: the round length the message was composed at. Returns True.
        """
        self.pending_state.assign(mean_message[: self.trigger.state_size + 1])
        self.pending_since.assign(since)
        return tf.constant(True)

    def decide_pending(self):
        """The decision on the kept message, which it consumes (see `keep_pending`).

        Returns:
            `(statistic, decided, finite, exchanged, active_fraction)`:
            `decide`'s values on the kept state, `decided` only if a message
            was kept (`exchanged`) and every worker still trains.
        """
        exchanged = self.pending_since >= 0
        active_fraction = self.pending_state[-1]
        statistic, decided, finite = self.decide(
            self.pending_state[:-1], self.pending_since.read_value()
        )
        self.pending_since.assign(-1)
        decided = exchanged & decided & (active_fraction >= 1.0)
        return statistic, decided, finite, exchanged, active_fraction

    # --- sync --------------------------------------------------------------

    def payload(self, values, copy=0):
        """What one copy all-reduces (MEAN) at a sync: the rule's payload of `values`.

        `values` are the copy's values of `averaged`; the tensors may have
        several dtypes, and a quantized drift's are all-gathered instead
        (`keras_fda.outer.gather_groups`).
        """
        residuals = [e.read_value() for e in self.residuals[copy]]
        return self.sync_state.payload(values, [r.read_value() for r in self.reference], residuals)

    def sync(self, mean_payload, assign, *, mean_state=None, mean_moments=(), moment_copies=None,
             copies=None, plain=False):
        """Adopts the all-reduced `mean_payload` and starts a new round; returns True.

        The rule's average of the workers' weights (`w0 + mean drift`, or
        the mean of the values), its outer step unless `plain`, handed to
        `assign`; then the rule's `optimizer_state` and the trigger's
        `end_round`.

        Args:
            mean_payload: the MEAN over the workers of `payload`, per tensor.
            assign: `assign(values)` gives every local copy of `averaged`
                these values (in the averaging dtype; cast them).
            mean_state: the all-reduced trigger state of the weights being
                averaged (None for a final or planned sync), for `end_round`.
            mean_moments: the mean of `moments_payload` (optimizer_state="average").
            moment_copies: the moments of every local copy (default: `moments`).
            copies: the monitored variables of every local copy, in the
                order of `residuals` and of the rows of a gathered payload
                (default: `variables`, row `rank`), still holding the values
                their payloads were made from.
            plain: True (or a bool tensor) for a plain average with no outer
                step. Drivers pass it for the syncs the trigger did not
                decide: the final sync of a fit and a sync before the
                weights are read (an outer step there, after a round of any
                length with momentum from other rounds, left the language
                model of BENCHMARKS.md section 7 worse than the average), and
                for weights set from outside training, which are what the
                user asked for, not a step from a `w0` they no longer continue.
        """
        means = [tf.cast(m, self.dtype) for m in self.sync_state.mean_weights(mean_payload)]
        ranks = range(len(copies)) if copies else [self.rank]
        for variables, residuals, rank in zip(copies or [self.variables], self.residuals, ranks):
            self.sync_state.feed_back(
                [v.read_value() for v in variables], residuals, mean_payload, rank
            )
        # The round's progress, read before an outer optimizer moves w0.
        global_step = [tf.cast(m, r.dtype) - r for m, r in zip(means, self.reference)]
        if plain is False or self.sync_state.optimizer is None:
            # Without an outer optimizer the step is the plain average itself.
            new = self.sync_state.step(means)
        elif plain is True:
            new = means
        else:
            new = tf.cond(
                plain, lambda: means,
                lambda: [tf.cast(v, self.dtype) for v in self.sync_state.step(means)],
            )
        assign(new)
        for moments in [self.moments] if moment_copies is None else moment_copies:
            self.sync_state.update_moments(moments, mean_moments)
        return self._start_round(
            [tf.cast(value, v.dtype) for value, v in zip(new, self.variables)],
            mean_state,
            global_step,
        )

    def moments_payload(self):
        """This copy's moments to all-reduce (MEAN) at a sync: all, or none."""
        return self.sync_state.moments_payload(self.moments)

    def rebase(self):
        """Starts a new round from the current weights (every copy was given the same)."""
        for reference, variable in zip(self.reference, self.variables):
            reference.assign(variable.read_value())
        self.steps_since_sync.assign(0)

    def _start_round(self, new_reference, mean_state, global_step):
        """After a sync: `new_reference` (the new trainable values) becomes w0.

        `mean_state` is the all-reduced trigger state of the averaged weights
        (None for a final or planned sync); with the round's length and
        `global_step` (the round's averaged drift, read before an outer
        optimizer moved w0) it goes to `trigger.end_round`, which may adapt
        the next round (AutoFDA).
        """
        next_round = self.trigger.end_round(
            [s.read_value() for s in self.round_state],
            global_step,
            mean_state,
            self.steps_since_sync.read_value(),
        )
        for s, value in zip(self.round_state, next_round):
            s.assign(value)
        for r, value in zip(self.reference, new_reference):
            r.assign(value)
        self.steps_since_sync.assign(0)
        self.syncs.assign_add(1)
        return tf.constant(True)

    def communication(
        self, num_workers, control_bytes=0, *, steps=None, syncs=None, exchanges=None
    ):
        """The `CommunicationStats` of the steps and syncs so far.

        `steps` and `syncs` default to the counters' current values;
        `exchanges` (state all-reduces) to one per step.
        """
        return CommunicationStats(
            num_workers=num_workers,
            num_params=self.num_params,
            state_bytes=self.trigger.state_bytes,
            steps=int(self.steps.numpy()) if steps is None else steps,
            syncs=int(self.syncs.numpy()) if syncs is None else syncs,
            control_bytes=control_bytes,
            param_bytes=self.dtype.size,
            sync_bytes=self.sync_state.sync_bytes(
                self.num_params, self.moments, param_bytes=self.dtype.size
            ),
            gathered_bytes=self.sync_state.gathered_bytes(),
            exchanges=exchanges,
        )
