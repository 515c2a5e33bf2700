"""How often FDACallback exchanges its state: the policy of `exchange_every="auto"`.

Pure bookkeeping on timings (no TensorFlow): each worker turns what it
measured into the lag it wants, the workers all-reduce their wishes, and
`agreed_lag` turns the mean into the lag every worker takes at the same step.
"""

import math
import time

# exchange_every="auto" spends at most this fraction of the steps' compute on
# FDA's work per message (the local state's pass over the weights), by
# exchanging less often when it costs more.
_BUDGET = 0.05
_LONGEST_LAG = 100


def agreed_lag(mean_wanted, lag):
    """The lag every worker takes after `lag`, from the mean of the lags they want.

    `mean_wanted` is all-reduced, so every worker computes the same. The
    lag at most doubles per exchange: one slow first exchange (a peer still
    tracing) must not set a lag of 100 steps before the next measurement.

    >>> agreed_lag(1.0, 4), agreed_lag(2.5, 4), agreed_lag(50.0, 4)
    (1, 3, 8)
    """
    if not math.isfinite(mean_wanted):
        mean_wanted = _LONGEST_LAG
    return int(min(max(math.ceil(mean_wanted - 1e-6), 1), 2 * lag, _LONGEST_LAG))


def exchange_period(ratio, longest=_LONGEST_LAG):
    """Steps per state exchange that hide a round trip of `ratio` steps.

    A quarter more than the ratio, so that a round trip a little slower than
    measured still ends before its result is due.

    >>> exchange_period(0.3), exchange_period(8.0)
    (1, 10)
    """
    if not math.isfinite(ratio):
        return longest
    return int(min(max(math.ceil(1.25 * ratio), 1), longest))


class StepTiming:
    """The lag this worker wants for exchange_every="auto", from its timings.

    Two needs, the larger wins. Hiding: a round trip of r steps needs
    `exchange_period(r)` steps to hide behind; one is the exchange inside
    the step's own graph (lag 1), more run in the background and are
    received one call later. Cost: FDA's work per message (the local
    state's pass over the weights and the decision, timed inside the step's
    graph after the training, so an exchange it waits for counts too) may
    take `_BUDGET` of the compute of the steps between two messages. Steps
    are timed between batch ends, less the time spent waiting there for a
    background exchange; every value is smoothed over about ten samples.
    """

    def __init__(self):
        self._step = self._round_trip = None
        self._in_graph = self._pass = None
        self._last_end = None
        self._waited = 0.0

    def step_ended(self):
        now = time.perf_counter()
        if self._last_end is not None:
            self._step = _smooth(self._step, now - self._last_end - self._waited)
        self._last_end, self._waited = now, 0.0

    def exchanged(self, round_trip, waited):
        """A background exchange took `round_trip` seconds, of which the step waited `waited`."""
        self._round_trip = _smooth(self._round_trip, round_trip)
        self._waited += waited

    def measured(self, result, in_graph):
        """Takes a compiled step's timeline (`exchange_s`, `train_s`, `fda_s`)."""
        train = max(result["train_s"], 1e-6)
        if in_graph and result["received"]:
            self._in_graph = _smooth(self._in_graph, result["exchange_s"] / train)
        if result["composed"] and not result["synced"]:  # a sync's time is not per message
            self._pass = _smooth(self._pass, result["fda_s"] / train)

    def wanted(self):
        if self._round_trip is not None and self._step is not None:
            ratio = self._round_trip / max(self._step, 1e-6)
        else:
            ratio = self._in_graph or 0.0
        hidden = exchange_period(ratio)
        hiding = 1 if hidden == 1 else hidden + 1
        cost = (self._pass or 0.0) / _BUDGET
        return float(min(max(hiding, math.ceil(cost)), _LONGEST_LAG))


def _smooth(average, sample):
    return sample if average is None else 0.9 * average + 0.1 * sample
