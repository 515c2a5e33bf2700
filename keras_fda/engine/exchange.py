"""How one worker's state messages reach the others between syncs.

`WorkerAverager.fused_step` composes a message after each step. With the
overlapped exchange at a lag of 1 the message waits in the averager's outbox
and the next step's graph all-reduces it while that step trains. At a longer
lag (`exchange_every >= 2`, or "auto" on a slow link) the message goes in
the background (`Transport.all_reduce_async`) and is collected, and decided
on, that many steps later. `StateExchange` runs a compiled step with this
bookkeeping around it; `exchange_every="auto"` moves the lag from the
workers' timings (`keras_fda.policies.cadence`), at the same step on every
worker. It knows nothing of Keras: `FDACallback` calls it once per step.
"""

import math
import time

import tensorflow as tf

from keras_fda.policies.cadence import StepTiming, agreed_lag


class StateExchange:
    """The exchange of one worker's messages at a fixed or adaptive lag.

    Args:
        averager: the worker's `keras_fda.engine.averager.WorkerAverager`.
        lagged: whether decisions lag their messages (the overlapped
            exchange of a trigger with a state); False: every step decides
            on its own message, or a stateless trigger sends none.
        every: the lag in steps, an int >= 1, or "auto".

    Attributes:
        every: the current lag: steps from a message to its decision.
        timing: the `StepTiming` of an adaptive lag, else None.
        in_flight: the background all-reduce not yet collected, or None.
    """

    def __init__(self, averager, lagged, every):
        self.averager = averager
        self.lagged = lagged
        auto = every == "auto"
        self.every = 1 if auto or not lagged else every
        self.timing = StepTiming() if auto and lagged else None
        self.in_flight = None
        # Passed to every step's call: created once, not per step.
        self._constants = {
            True: tf.constant(True), False: tf.constant(False),
            "nothing": tf.zeros_like(averager.outbox), "never": tf.constant(-1, tf.int64),
        }

    @staticmethod
    def check(every, overlap, trigger):
        """Raises a `ValueError` if `exchange_every=every` is not valid with these settings."""
        if every not in (None, "auto") and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ValueError(f'exchange_every must be an integer >= 1, "auto" or None, got {every!r}.')
        explicit = every not in (None, 1)
        # A class attribute: an estimator's state size is known only once built.
        if explicit and getattr(type(trigger), "state_size", None) == 0:
            raise ValueError(
                f"The {trigger!r} trigger sends nothing between syncs, so "
                f"exchange_every={every!r} would be ignored; remove it."
            )
        if explicit and not overlap:
            raise ValueError(
                f"exchange_every={every} needs overlap=True: the blocking exchange decides "
                "after every step."
            )

    def step(self, step_function, iterator, epoch_ends=False):
        """Runs one `fused_step` with the exchange around it; returns `(logs, result)`.

        Collects a background message when it is due, sends this step's in
        the graph or in the background, and adapts the lag. Call it inside
        the transport's deadline. `epoch_ends`: collect what is in flight
        now, so that checkpoints written at the epoch's end
        (`BackupAndRestore`) hold the exchanged state, decided after the
        next step as usual.
        """
        averager, constants = self.averager, self._constants
        arrived, since = None, None
        if self.lagged and self.every > 1:
            # A collected round trip may shorten the lag to 1 (see `collect`).
            arrived, since = self.collect(due_only=True)
        received = arrived is not None
        # At a lag of 1 this step's message waits in the outbox for the next graph.
        outboxed = self.lagged and self.every == 1
        # Not when a collected message has just shortened the lag to 1: it
        # must be decided now, and the outbox is empty (a longer lag sends
        # from here), so the graph's exchange would put nothing in its
        # place. A stopped worker's flag was lost so: the others went on
        # exchanging with a peer already in its final sync, and hung.
        in_graph = outboxed and not received
        if not received:
            arrived, since = constants["nothing"], constants["never"]
        wanted = self.timing.wanted() if self.timing is not None else 0.0
        logs, packed, message = step_function(
            iterator, arrived, since, constants[received],
            constants[outboxed or self.in_flight is None], constants[outboxed],
            tf.constant(wanted, tf.float32), constants[in_graph],
        )
        result = averager.unpack(packed)
        if self.timing is not None:
            self.timing.measured(result, in_graph)
            # A collected message's wishes were agreed on in `collect`.
            if in_graph and not math.isnan(result["mean_wanted"]):
                self.every = agreed_lag(result["mean_wanted"], self.every)
        if result["composed"] and self.every > 1:
            if outboxed:  # the lag grew: the message waits in the outbox
                averager.outbox_full.assign(False)
            self.in_flight = averager.transport.all_reduce_async(message)
            self._in_flight_steps = 0
            self._in_flight_since = tf.constant(int(result["since"]), tf.int64)
        if self.in_flight is not None and epoch_ends:
            averager.receive(*self.collect())
        return logs, result

    def step_ended(self):
        """Marks the end of a step (a batch end) for an adaptive lag's timings."""
        if self.timing is not None:
            self.timing.step_ended()

    def collect(self, due_only=False):
        """The in-flight all-reduce's result and its round length (waits for it).

        Returns `(None, None)` if nothing is in flight or, with `due_only`,
        until the step `every` steps after the message's is due.
        """
        if self.in_flight is None:
            return None, None
        self._in_flight_steps += 1
        if due_only and self._in_flight_steps < self.every:
            return None, None
        in_flight, self.in_flight = self.in_flight, None
        started = time.perf_counter()
        mean = in_flight.result()
        if self.timing is not None:
            self.timing.exchanged(in_flight.elapsed, waited=time.perf_counter() - started)
            self.every = agreed_lag(float(mean[-1]), self.every)
        return mean, self._in_flight_since

    def settle(self):
        """At a fit's end: the last message's decision, as the averager's `settle` dict.

        Sends what waits in the outbox and collects what is in flight; the
        workers still training apply the same decision after their next
        step. None without lagged decisions.
        """
        if not self.lagged:
            return None
        arrived = self.collect()
        if arrived[0] is not None:
            self.averager.receive(*arrived)
        self.averager.flush()
        return self.averager.settle()
