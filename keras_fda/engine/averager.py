"""One worker's side of dynamic averaging over a set of local variables.

`WorkerAverager` composes a trigger (the algorithm) with a transport (the
collectives) for variables that live in this process. It holds the reference
weights `w0` agreed at the last synchronization, the trigger's round state and
the counters. Its per-step work runs in the same compiled call as the
driver's training step (`fused_step`; `FDACallback` puts that call in place
of the train function Keras builds for `fit`):

    [train] -> drift -> local state -> all-reduce -> statistic -> should_sync -> [average]

It knows nothing of Keras: `FDACallback` feeds it a model's variables.
"""

import math

import tensorflow as tf

from keras_fda.policies import outer as outer_lib
from keras_fda.engine.core import Engine, traced_per_engine


def _flatten(tensors, dtype):
    flat = [tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors]
    # The empty head makes an empty list an empty tensor.
    return tf.concat([tf.zeros([0], dtype)] + flat, 0)


class WorkerAverager(Engine):
    """Dynamic averaging of `variables` (plus `extra_variables`) across workers.

    Each step has two halves: the message (this worker's local state on its
    drift, for the all-reduce) and the decision on the all-reduced state
    (which may average the weights). `step` runs them back to back around a
    blocking all-reduce. A driver that overlaps the all-reduce with the next
    training step calls `lagged_step` inside that step's graph: it decides
    on an earlier step's all-reduced message and composes this step's into
    the `outbox`, which `send_outbox` all-reduces while the next step trains
    (`FDACallback(overlap=True)`), so the decision on step t's state is
    applied after step t+1. Between the halves the all-reduced state waits in
    `pending_state` (`Engine.keep_pending`); both it and the outbox are part
    of the checkpointed state, so a resumed run decides as the uninterrupted
    one would.

    Args:
        trigger: a built-in or custom `keras_fda.triggers.SyncTrigger`.
        transport: the `keras_fda.runtime.transport.Transport` to the other workers.
        variables: the tf.Variables whose drift is monitored and averaged
            (a model's trainable weights).
        extra_variables: tf.Variables averaged at each sync but not monitored
            (e.g. BatchNorm moving statistics).
        sync_rule: the `keras_fda.SyncRule`.
        moments: the optimizer moments the rule's `optimizer_state` acts on.
        timed: messages carry one more float after the 'still training'
            flag: the lag the sender wants (`exchange_every="auto"`).
    """

    def __init__(
        self, trigger, transport, variables, extra_variables=(), sync_rule=None, moments=(),
        timed=False,
    ):
        super().__init__(trigger, variables, extra_variables, sync_rule, moments, lagged=True)
        self.transport = transport
        self.rank = transport.worker_index
        self.timed = bool(timed)
        self.exchanges = tf.Variable(0, dtype=tf.int64, trainable=False, name="fda_exchanges")
        # This worker's message composed after a step and not yet sent, the
        # round length it was composed at, and whether it awaits sending.
        self.outbox = tf.Variable(
            tf.zeros([trigger.state_size + 1 + self.timed]), trainable=False, name="fda_outbox"
        )
        self.outbox_since = tf.Variable(0, dtype=tf.int64, trainable=False, name="fda_outbox_since")
        self.outbox_full = tf.Variable(False, trainable=False, name="fda_outbox_full")
        # 1.0 when this worker's weights were set from outside training since
        # the last step (see `_adopt`); local, so not checkpointed.
        self.replaced = tf.Variable(0.0, trainable=False, name="fda_replaced")
        # Called about once per fit (`receive` once per epoch), by a new averager per fit.
        for function in (
            self.broadcast, self.adopt, self.receive, self.flush, self.settle, self.stop,
            self.finish,
        ):
            traced_per_engine(function)

    def state_variables(self):
        return [
            *super().state_variables(), self.exchanges,
            self.outbox, self.outbox_since, self.outbox_full,
        ]

    def _assign_flat(self, flat, variables):
        sizes = [int(v.shape.num_elements()) for v in variables]
        for v, part in zip(variables, tf.split(flat, sizes)):
            v.assign(tf.cast(tf.reshape(part, v.shape), v.dtype))

    def _broadcast(self, source, variables, dtype):
        """Gives every worker worker `source`'s values of `variables`."""
        flat = _flatten(variables, dtype)
        if self.transport.worker_index != source:
            flat = tf.zeros_like(flat)
        self._assign_flat(self.transport.all_reduce(flat, "sum"), variables)

    @tf.function
    def broadcast(self):
        """Gives every worker worker 0's values and makes them the reference."""
        self._broadcast(0, self.averaged, self.dtype)
        for r, v in zip(self.reference, self.variables):
            r.assign(v)
        self.steps_since_sync.assign(0)
        self.pending_since.assign(-1)
        self.outbox_full.assign(False)

    @tf.function
    def adopt(self, source):
        """Every worker takes worker `source`'s weights and averaging state.

        The state (reference, round state, counters) goes as float64: exact
        for float32 values and for counters below 2^53.
        """
        self._broadcast(source, self.averaged + self.state_variables(), tf.float64)

    def _average(self, active=None, measured=False, plain=False):
        """Averages the variables across workers; returns `(adopted, active_fraction)`.

        With `active`, the 'still training' flag rides in the same all-reduce,
        and so does `replaced` (weights set from outside training, which
        make this a plain average). Nothing is assigned if the mean is
        NaN/Inf or a worker has stopped; every worker sees the same mean, so
        all of them refuse it together. `measured`: the trigger state of the
        weights being averaged rides along, for `end_round`. `plain`: a
        plain average in any case (a sync the trigger did not decide).
        """
        payload = self.payload([v.read_value() for v in self.averaged])
        reduced, gathered = outer_lib.gather_groups(payload)
        # The first collective carries the control floats: with a quantized
        # drift and nothing else averaged, it carries only them.
        groups = list(reduced.items()) or [(self.dtype, [])]
        first_dtype, first_indices = groups[0]
        # What rides along goes with the first dtype's tensors (the drift's):
        # `replaced`; if `measured`, the state of the weights being averaged
        # (the deciding state may be a step older, and a round's variance
        # must be measured where its step is); last, the 'still training'
        # flag. Flattened with the payload in one concat and split once: each
        # copy of the weights more costs a sync about a millisecond per
        # million weights.
        control = [self.replaced] + ([self._local_state()] if measured else [])
        control += [] if active is None else [active]
        sizes = [int(payload[i].shape.num_elements()) for i in first_indices]
        first = _flatten([payload[i] for i in first_indices] + control, first_dtype)
        mean = self.transport.all_reduce(first, "mean")
        *pieces, control_mean = tf.split(mean, sizes + [int(first.shape[0]) - sum(sizes)])
        replaced = control_mean[0] > 0
        state_size = self.trigger.state_size if measured else 0
        mean_state = tf.cast(control_mean[1:1 + state_size], tf.float32) if measured else None
        active_fraction = (
            tf.constant(1.0) if active is None else tf.cast(control_mean[-1], tf.float32)
        )

        def adopt():
            parts = [None] * len(payload)
            for i, piece in zip(first_indices, pieces):
                parts[i] = tf.reshape(piece, payload[i].shape)
            # The other dtypes' collectives only once every worker is known
            # to be here: a stopped worker answered the first one alone.
            for dtype, indices in groups[1:]:
                means = tf.split(
                    self.transport.all_reduce(_flatten([payload[i] for i in indices], dtype)),
                    [int(payload[i].shape.num_elements()) for i in indices],
                )
                for i, piece in zip(indices, means):
                    parts[i] = tf.reshape(piece, payload[i].shape)
            for dtype, indices in gathered.items():
                rows = tf.reshape(
                    self.transport.all_gather(_flatten([payload[i] for i in indices], dtype)),
                    [self.transport.num_workers, -1],
                )
                sizes = [int(payload[i].shape[0]) for i in indices]
                for i, piece in zip(indices, tf.split(rows, sizes, axis=1)):
                    parts[i] = piece
            return tf.cond(
                self.sync_state.finite(parts),
                lambda: self._adopt(parts, mean_state, True if plain else replaced),
                lambda: tf.constant(False),
            )

        # A mean of K ones is exactly 1.0 in float32, float16 and bfloat16 (K <= 256).
        adopted = tf.cond(active_fraction >= 1.0, adopt, lambda: tf.constant(False))
        return adopted, active_fraction

    def _adopt(self, parts, mean_state, replaced):
        def assign(values):
            for v, value in zip(self.averaged, values):
                v.assign(tf.cast(value, v.dtype))

        synced = self.sync(
            parts, assign, mean_state=mean_state, mean_moments=self._mean_moments(),
            plain=replaced,
        )
        self.replaced.assign(0.0)
        return synced

    def _mean_moments(self):
        """The workers' mean moments for optimizer_state="average" (one more all-reduce)."""
        payload = self.moments_payload()
        if not payload:
            return []
        sizes = [int(m.shape.num_elements()) for m in payload]
        flat = self.transport.all_reduce(_flatten(payload, tf.float32), "mean")
        return [tf.reshape(p, m.shape) for m, p in zip(payload, tf.split(flat, sizes))]

    def _first_collective(self):
        """`(entries, dtype)` of the payload in `_average`'s first collective."""
        sync = self.sync_state
        monitored = sum(int(v.shape.num_elements()) for v in self.variables)
        if not sync.sends_drift:
            return self.num_params, self.dtype
        if sync.quantized:
            return self.num_params - monitored, self.dtype
        return monitored, sync.payload_dtype

    def _exchange(self, payload, active):
        """All-reduces `payload` with a trailing 'still training' flag.

        The flag is the one float keras_fda adds to a message: a worker that
        stops early sends 0 in place of a message, so the others learn it
        from the collective they are already waiting in.
        """
        mean = self.transport.all_reduce(_with_flag(payload, active), "mean")
        return mean[:-1], tf.cast(mean[-1], tf.float32)

    def _advance(self):
        self.steps.assign_add(1)
        return self.steps_since_sync.assign_add(1)

    def _local_state(self):
        return self.local_state([v.read_value() for v in self.variables])

    def _message(self, state, active, wanted=0.0):
        """A message: the state, the 'still training' flag and, if `timed`, `wanted`."""
        message = _with_flag(state, active)
        return _with_flag(message, wanted) if self.timed else message

    def send_outbox(self):
        """All-reduces the outbox if a message awaits; returns `(mean, sent)`.

        Called at the start of a step's graph, with nothing of the step as
        input, so the collective runs while the step trains.
        """
        sent = self.outbox_full.read_value()
        mean = tf.cond(
            sent,
            lambda: self.transport.all_reduce(self.outbox.read_value(), "mean"),
            lambda: tf.zeros_like(self.outbox),
        )
        return mean, sent

    def lagged_step(self, mean_message, since, received, compose, keep, wanted=0.0):
        """After a local step: receive, decide, compose this step's message.

        Runs inside the driver's compiled step, after its training.

        Args:
            mean_message: an earlier step's all-reduced message (`send_outbox`
                or the driver's own all-reduce of `message`), with `since`,
                the round length it was composed at. Decided now if
                `received`.
            compose: whether to compose this step's message (False while
                the driver still has one in flight).
            keep: leave the message in the outbox for `send_outbox`
                (otherwise the driver sends the returned `message`).
            wanted: the lag this worker wants, for a `timed` message.

        Returns:
            The dict of `step`, plus `message` (this step's, if composed),
            `composed` and, for `timed` messages, `mean_wanted` (the
            received message's, or NaN).
        """
        received = tf.convert_to_tensor(received)
        tf.cond(received, lambda: self.keep_pending(mean_message, since), lambda: received)
        self._advance()
        result = self._decide()
        composed = tf.logical_and(compose, result["peers_active"])
        self.exchanges.assign_add(tf.cast(composed, tf.int64))
        message = tf.cond(
            composed,
            lambda: self._post(self._message(self._local_state(), 1.0, wanted)),
            lambda: tf.zeros_like(self.outbox),
        )
        self.outbox_full.assign(composed & keep)
        result["message"], result["composed"] = message, composed
        if self.timed:
            result["mean_wanted"] = tf.where(received, mean_message[-1], float("nan"))
        return result

    def fused_step(self, train_step, overlap, compiled=True):
        """A driver's training step and this worker's FDA step in one function.

        With the overlapped exchange the graph all-reduces the previous
        step's message (the outbox) with nothing of this step as input, so
        the collective runs while the step trains; the decision and this
        step's message follow the training. With a longer lag the driver
        sends the message in the background instead, and hands a later call
        its result as `mean_message`. The exchange's round trip and the
        step's compute are timed inside the graph, for a cadence that adapts.

        Args:
            train_step: `train_step(data)` returns the step's logs (Keras'
                `Model.train_step`).
            overlap: decide on an earlier step's message (`lagged_step`);
                False (or a stateless trigger): `blocking_step`.
            compiled: wrap it in a `tf.function` (False: run it eagerly).

        Returns:
            `step(iterator, mean_message, since, received, compose, keep,
            wanted, in_graph)` -> `(logs, packed, message)`: `packed` is the
            step's result for `unpack`, `message` this step's (if composed).
            `in_graph` (a bool tensor, so that a change of lag does not
            retrace the step) sends the outbox inside the graph.
        """
        lagged = overlap and self.trigger.state_size > 0

        def step(iterator, mean_message, since, received, compose, keep, wanted, in_graph):
            data = iterator.get_next() if hasattr(iterator, "get_next") else next(iterator)
            # After the data arrived: a worker whose data ran out sends nothing.
            with tf.control_dependencies(tf.nest.flatten(data)):
                began = tf.timestamp()

            def send():
                with tf.control_dependencies([began]):
                    sent, arrived = self.send_outbox()
                    sent_since = self.outbox_since.read_value()
                with tf.control_dependencies([sent]):
                    return sent, arrived, sent_since, tf.timestamp()

            mean_message, received, since, exchanged = tf.cond(
                in_graph, send, lambda: (mean_message, received, since, began)
            )
            logs = train_step(data)
            # The logs come before the optimizer's update; reading the weights
            # waits for it (reads follow earlier writes), so `trained` is the
            # end of the whole step.
            updated = [v.read_value()[..., :0] for v in self.variables]
            with tf.control_dependencies(tf.nest.flatten(logs) + updated):
                trained = tf.timestamp()
            with tf.control_dependencies(tf.nest.flatten(logs)):
                if lagged:
                    result = self.lagged_step(mean_message, since, received, compose, keep, wanted)
                else:
                    result = self.blocking_step()
                    result["composed"] = tf.constant(False)
            message = result.pop("message", tf.zeros([0]))
            with tf.control_dependencies([message]):
                finished = tf.timestamp()
            result.update(
                since=self.steps_since_sync, steps=self.steps, syncs=self.syncs,
                exchanges=self.exchanges, received=received,
                mean_wanted=result.get("mean_wanted", math.nan),
                # The step's timeline (seconds), for an adaptive cadence.
                exchange_s=exchanged - began, train_s=trained - began, fda_s=finished - trained,
            )
            packed = tf.stack([tf.cast(result[k], tf.float64) for k in _RESULT_NAMES])
            return logs, packed, message

        if not compiled:
            return step
        # Without AutoGraph, as Keras traces its own train step: every branch
        # on a tensor here is an explicit tf.cond.
        return tf.function(step, reduce_retracing=True, autograph=False)

    @staticmethod
    def unpack(packed):
        """A `fused_step`'s packed result as a dict of Python floats and bools."""
        result = dict(zip(_RESULT_NAMES, packed.numpy().tolist()))
        for name in ("synced", "peers_active", "healthy", "exchanged", "composed", "received"):
            result[name] = bool(result[name])
        return result

    def _post(self, message):
        self.outbox.assign(message)
        self.outbox_since.assign(self.steps_since_sync)
        return message

    @tf.function
    def flush(self):
        """Sends the outbox, if full, and stores the mean for `settle` (at a fit's end)."""
        mean, sent = self.send_outbox()
        since = self.outbox_since.read_value()
        tf.cond(sent, lambda: self.keep_pending(mean, since), lambda: sent)
        self.outbox_full.assign(False)

    @tf.function
    def receive(self, mean_message, since):
        """Stores an all-reduced message for the next decision (at an epoch's end)."""
        self.keep_pending(mean_message, since)

    def _decide(self):
        """The trigger's decision on the pending state, if any, and maybe the average.

        Every predicate depends only on all-reduced values and the shared
        step count, so all workers take the same branch and join the same
        collectives.
        """
        statistic, decided, finite, exchanged, active_fraction = self.decide_pending()
        synced = tf.cond(
            decided,
            lambda: self._average(measured=True)[0],
            lambda: tf.constant(False),
        )
        return {
            "statistic": statistic,
            "synced": synced,
            "peers_active": ~exchanged | (active_fraction >= 1.0),
            "healthy": ~exchanged | (finite & (synced | ~decided)),
            "exchanged": exchanged,
        }

    @tf.function
    def settle(self):
        """Acts on the pending state without a step (the last decision of a fit).

        Returns:
            The dict of `step`; `exchanged` is False (and `statistic`
            meaningless) when no state was pending.
        """
        return self._decide()

    def _planned_step(self, steps_since_sync):
        """A stateless trigger's step: nothing is sent between syncs.

        Its decision is known from the step count alone; on a sync step the
        'still training' flag rides in the weights' all-reduce, so a
        synchronous step costs one collective. A worker that stopped early
        meets the others in their next scheduled sync (see `stop`).
        """
        statistic, decided, _ = self.decide(None, steps_since_sync)
        synced, active_fraction = tf.cond(
            decided,
            lambda: self._average(1.0),
            lambda: (tf.constant(False), tf.constant(1.0)),
        )
        return {
            "statistic": statistic,
            "synced": synced,
            "peers_active": active_fraction >= 1.0,
            "healthy": synced | ~decided | (active_fraction < 1.0),
            "exchanged": decided,
        }

    def blocking_step(self):
        """After a local step: message, blocking all-reduce, decision (see `step`)."""
        steps_since_sync = self._advance()
        if not self.trigger.state_size:
            return self._planned_step(steps_since_sync)
        self.exchanges.assign_add(1)
        self.keep_pending(
            self.transport.all_reduce(self._message(self._local_state(), 1.0), "mean"),
            steps_since_sync,
        )
        return self._decide()

    @tf.function
    def step(self):
        """Runs after one local step: message, blocking all-reduce, decision.

        Returns:
            A dict of scalar tensors: `statistic` (the trigger's monitored
            value), `synced`, `peers_active` (False if another worker has
            stopped: nothing was averaged and this worker must stop too),
            `healthy` (False if the statistic or the average was NaN/Inf:
            nothing was averaged) and `exchanged` (False on a stateless
            trigger's steps between syncs, which send nothing).
        """
        return self.blocking_step()

    @tf.function
    def stop(self):
        """Tells the other workers that this one stopped.

        Pairs with the others' next message: a state all-reduce, or for a
        stateless trigger the weights' all-reduce of the next scheduled sync
        (or their own `stop`). The message has that shape, with the 'still
        training' flag at 0 and, in place of a state, whether this worker
        has steps since the last sync.

        Returns:
            A dict: `others_active`, True if another worker still trains,
            and `unsynced` (meaningful when none does): whether any worker
            has steps since the last sync, so that all of them agree on
            whether to make a final sync.
        """
        if self.trigger.state_size:
            unsynced = tf.cast(self.steps_since_sync > 0, tf.float32)
            state = tf.one_hot(0, self.trigger.state_size) * unsynced
            mean = self.transport.all_reduce(self._message(state, 0.0), "mean")
            active_fraction = mean[self.trigger.state_size]
        else:
            # The first collective of `_average`: the payload's first dtype
            # and the `replaced` flag.
            size, dtype = self._first_collective()
            size += 1
            unsynced = tf.cast(self.steps_since_sync > 0, dtype)
            mean, active_fraction = self._exchange(
                tf.one_hot(0, size, dtype=dtype) * unsynced, 0.0
            )
        return {"others_active": active_fraction > 0.0, "unsynced": mean[0] > 0}

    @tf.function
    def finish(self, force):
        """Averages once more if `force` or steps remain since the last sync, plainly.

        Returns:
            A dict: `synced`, and `healthy` (False if the average was NaN/Inf
            and nothing was assigned).
        """
        attempted = force | (self.steps_since_sync > 0)
        synced = tf.cond(
            attempted, lambda: self._average(plain=True)[0], lambda: tf.constant(False)
        )
        return {"synced": synced, "healthy": synced | ~attempted}

    def communication(self, *, steps=None, syncs=None, exchanges=None):
        """The `CommunicationStats` so far (or at the given counters).

        A trigger with a state sends 4 bytes with each state (the 'still
        training' flag), 8 if `timed` (and the lag wanted); a stateless one
        sends nothing between syncs (its flag's 4 bytes per sync are not
        counted).
        """
        return super().communication(
            self.transport.num_workers,
            control_bytes=4 * (1 + self.timed) if self.trigger.state_size else 0,
            steps=steps,
            syncs=syncs,
            exchanges=int(self.exchanges.numpy()) if exchanges is None else exchanges,
        )


# The values of a fused step's result, in the order it packs them.
_RESULT_NAMES = (
    "composed", "exchange_s", "exchanged", "exchanges", "fda_s", "healthy", "mean_wanted",
    "peers_active", "received", "since", "statistic", "steps", "synced", "syncs", "train_s",
)


def _with_flag(payload, active):
    return tf.concat([payload, [tf.cast(active, payload.dtype)]], 0)
