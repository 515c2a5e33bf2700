"""Synchronization triggers: when the workers average their models.

A trigger sees, on every step, the workers' averaged local states and the
number of local steps since the last synchronization, and decides. Drivers
(the Keras callback, the tf.distribute strategy, the simulator) run:

    state   = trigger.local_state(drift, round_state)     # on each worker
    mean    = all-reduce MEAN of state                    # skipped if state_size == 0
    value   = trigger.statistic(mean, steps_since_sync)   # logged as fda/variance
    sync    = trigger.should_sync(value, steps_since_sync)

and, after each synchronization,

    round_state = trigger.end_round(round_state, mean u, mean, steps in the round)

`should_sync` is the policy: subclass a trigger and override that one method
to change when synchronizations happen; override `end_round` to adapt the
next round to the one that ended (`AutoFDA`, `threshold="auto"`, sets its
threshold that way). Every decision depends only on all-reduced values and
the shared step count, so all workers decide alike.
"""

import math

import keras
import tensorflow as tf

from keras_fda.policies import estimators as estimators_lib
from keras_fda.policies.estimators import squared_norm


def _check_threshold(threshold):
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or threshold <= 0
    ):
        hint = " (for a self-setting threshold use AutoFDA)" if threshold == "auto" else ""
        raise ValueError(
            f"threshold must be a positive finite number, got {threshold!r}{hint}."
        )
    return float(threshold)


def _inner(optimizer):
    """The optimizer that holds the rate, step count and moments (a LossScaleOptimizer's inner)."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _watched(optimizer, trigger_name):
    if optimizer is None:
        raise ValueError(
            f"{trigger_name} reads the model's optimizer: compile the model with an optimizer "
            "before training (drivers call trigger.watch(optimizer))."
        )
    return optimizer


def learning_rate(optimizer, steps_back=0):
    """The optimizer's learning rate `steps_back` steps before its current step (float32).

    With a Keras learning rate schedule that is the schedule there; a rate
    changed by hand (a variable) is read as it is now.
    """
    schedule = getattr(optimizer, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        rate = schedule(optimizer.iterations - tf.cast(steps_back, tf.int64))
    else:
        rate = optimizer.learning_rate
    return tf.cast(rate, tf.float32)


def rising(optimizer, steps_back=0):
    """Whether the schedule's rate rises after the step `steps_back` steps ago (a warmup)."""
    return learning_rate(optimizer, steps_back - 1) > learning_rate(optimizer, steps_back)


class SyncTrigger:
    """Base class of synchronization triggers.

    Attributes:
        name: short name used in logs and benchmark tables.
        threshold: the number `statistic` is compared with (logged as
            `fda/threshold`).
        state_size: floats each worker all-reduces per step (0: no collective).
    """

    name = None
    threshold = 0.0
    state_size = 0
    _optimizer = None

    def watch(self, *optimizers):
        """Called by the drivers with the Keras optimizer of each local copy of the model.

        One optimizer, except in `Simulation`: its K workers', in the order
        of the drifts it gives `mean_local_state`. The first is kept as
        `_optimizer` (every worker's learning rate and step count are the
        same: `QSR`, `AutoFDA` and `PostLocal` read them there); a trigger
        that reads the optimizers' moments overrides this to keep each copy's.
        """
        self._optimizer = _inner(optimizers[0])

    def build(self, shapes):
        """Prepares for drifts made of tensors of `shapes` (the trainable weights)."""
        del shapes

    @property
    def state_bytes(self):
        """Bytes each worker sends per step to decide (float32 states)."""
        return 4 * self.state_size

    def initial_round_state(self):
        return []

    def next_round_state(self, round_state, global_step):
        del global_step
        return round_state

    def end_round(self, round_state, global_step, mean_state=None, round_steps=None):
        """The round state after a synchronization; drivers call it at every sync.

        Override it (rather than `next_round_state`) to adapt the next round
        to what the ending one observed.

        Args:
            round_state: the ending round's state (a list of tensors).
            global_step: the averaged drift of the round, `w_new - w0` (one
                tensor per monitored variable).
            mean_state: the all-reduced local state of the weights being
                averaged (the deciding step's state; with `FDACallback`'s
                overlap, which decides a step late, the drivers send it
                along with the sync), or None (a trigger with
                `state_size == 0`, or a sync no statistic decided: the
                final one of a run).
            round_steps: local steps in the ending round (a scalar int64
                tensor), or None if the driver does not count them.

        Returns:
            The next round's state (same structure). The default is
            `next_round_state(round_state, global_step)`.
        """
        del mean_state, round_steps
        return self.next_round_state(round_state, global_step)

    def local_state(self, drift, round_state):
        """This worker's 1-D float32 contribution; only called if `state_size > 0`."""
        raise NotImplementedError

    def mean_local_state(self, drifts, round_state):
        """The mean of several workers' local states (what the all-reduce MEAN gives).

        The in-process simulator calls it with all K drifts; override only
        with an exact shortcut.
        """
        return tf.reduce_mean(
            tf.stack([self.local_state(drift, round_state) for drift in drifts]), axis=0
        )

    def statistic(self, mean_state, steps_since_sync):
        """The monitored value, from the averaged state (None if `state_size == 0`)."""
        del mean_state, steps_since_sync
        return tf.constant(0.0)

    def should_sync(self, statistic, steps_since_sync):
        """The policy: a scalar bool tensor, True to synchronize after this step."""
        raise NotImplementedError


class FDA(SyncTrigger):
    """Federated Dynamic Averaging: sync when the variance estimate exceeds `threshold`.

    Args:
        estimator: a `VarianceEstimator` or one of "naive", "linear", "sketch",
            "exact".
        threshold: Theta; sync when the estimate V is strictly greater. The
            paper's best values grow with the model size d, roughly 4e-5 * d.

    Example:

    >>> trigger = FDA("linear", threshold=1.5)
    """

    name = "fda"

    def __init__(self, estimator="linear", threshold=1.0):
        self.estimator = estimators_lib.get(estimator)
        self.threshold = _check_threshold(threshold)
        self.name = f"fda-{self.estimator.name}" if self.estimator.name else "fda"

    def build(self, shapes):
        self.estimator.build(shapes)

    @property
    def state_size(self):
        return self.estimator.state_size

    def initial_round_state(self):
        return self.estimator.initial_round_state()

    def next_round_state(self, round_state, global_step):
        return self.estimator.next_round_state(round_state, global_step)

    def local_state(self, drift, round_state):
        return self.estimator.local_state(drift, round_state)

    def mean_local_state(self, drifts, round_state):
        if type(self).local_state is not FDA.local_state:
            return super().mean_local_state(drifts, round_state)
        return self.estimator.mean_local_state(drifts, round_state)

    def statistic(self, mean_state, steps_since_sync):
        return self.estimator.estimate(mean_state)

    def should_sync(self, statistic, steps_since_sync):
        return statistic > self.threshold

    def __repr__(self):
        return f"FDA({self.estimator!r}, threshold={self.threshold})"


class AutoFDA(SyncTrigger):
    """FDA whose threshold sets and adapts itself (`threshold="auto"`).

    The rule. After every synchronization the trigger knows, for free, how
    far the round moved the averaged model (`||mean u||^2`, the averaged
    step) and how much the workers disagreed (the exact variance `Var =
    mean ||u_k||^2 - ||mean u||^2`; the first term is in the all-reduced
    state). Their ratio `rho = Var / ||mean u||^2` does not depend on d or
    on the learning rate: around or below 1 the workers mostly agree, above
    it they pull their own ways (BENCHMARKS.md section 4 has the values
    measured under each kind of skew).

    * Round length. The next round lasts `L = max(L_prev, horizon /
      sqrt(rho))` steps: as long as the workers' disagreement allows, and
      never shorter than the last one, so rounds settle on a period (where
      workers agree, a period longer than the run: no sync before the end).
      Never shortening is deliberate: rho measured on a longer round is
      lower (noise adds to the variance linearly, the common progress
      quadratically), so a rule that also shortened would chase its own
      measurements; and what a sync buys is not a variance level (that
      costs 10x more accuracy late in training than early), so a variance
      level is a poor reason to sync more often.
    * Drift guard. Within a round, the variance estimate is compared with
      the last round's, extrapolated quadratically to L steps: `Theta =
      V_r (L / E_r)^2` (E_r: the last round's length). It is reached before
      L only if the variance grows faster than in the last round (the data
      changed, or the learning rate rose), and then the round ends early.
    * The first round, with nothing to learn from, lasts `first_round`
      steps; so does every round that ends while the learning rate still
      rises (a warmup of a Keras schedule). There the workers still learn
      what they all share, so they agree far more than they will later, and
      a round calibrated on them can outlast the run.

    The state each worker all-reduces per step is the estimator's plus two
    floats (`1 / Theta` and `1 / L`, equal on all workers); the statistic
    is `max(V / Theta, steps / L)` and a round ends when it reaches 1.
    Drivers must call `end_round` with the sync step's all-reduced state
    and the round's length; otherwise every round keeps the first round's
    length.

    Use it with the outer Nesterov step (`outer_optimizer="nesterov"` in
    every driver): each of its few syncs then counts for more. Where it
    stands against synchronous averaging and fixed periods with the same
    outer step, and when it loses, is measured in BENCHMARKS.md (section
    4). A larger `horizon` sends less and ends lower. With one worker, or
    identical data, rho is 0: it never syncs after the first round.

    Args:
        estimator: a `VarianceEstimator` or one of "naive", "linear",
            "sketch", "exact" (its state must begin with `||u_k||^2`, as the
            built-in ones' do).
        horizon: the one knob, in local steps: the round length while the
            workers disagree as much as they agree (rho = 1). Rounds last
            about `horizon / sqrt(rho)` steps; larger sends less.
        first_round: length of the first round, in steps.

    Example:

    >>> trigger = AutoFDA("linear", horizon=128)
    """

    name = "fda-auto"
    threshold = 1.0

    def __init__(self, estimator="linear", *, horizon=128, first_round=32):
        self.estimator = estimators_lib.get(estimator)
        for arg, value in (("horizon", horizon), ("first_round", first_round)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
                raise ValueError(f"{arg} must be a number of steps >= 1, got {value!r}.")
        self.horizon = float(horizon)
        self.first_round = int(first_round)
        self.name = f"fda-auto-{self.estimator.name}"

    def build(self, shapes):
        self.estimator.build(shapes)

    @property
    def state_size(self):
        return self.estimator.state_size + 2

    def initial_round_state(self):
        # 1 / Theta = 0: the first round ends at its length.
        control = tf.constant([0.0, 1.0 / self.first_round], tf.float32)
        return [*self.estimator.initial_round_state(), control]

    @staticmethod
    def _split(round_state):
        return list(round_state[:-1]), round_state[-1]

    def local_state(self, drift, round_state):
        rounds, control = self._split(round_state)
        return tf.concat([self.estimator.local_state(drift, rounds), control], 0)

    def mean_local_state(self, drifts, round_state):
        rounds, control = self._split(round_state)
        return tf.concat([self.estimator.mean_local_state(drifts, rounds), control], 0)

    def statistic(self, mean_state, steps_since_sync):
        variance = self.estimator.estimate(mean_state[:-2])
        by_length = tf.cast(steps_since_sync, tf.float32) * mean_state[-1]
        # A mean of K equal floats may be an ulp off: round the length's ratio.
        return tf.maximum(variance * mean_state[-2], tf.round(by_length * 1e4) / 1e4)

    def should_sync(self, statistic, steps_since_sync):
        return statistic >= 1.0

    def next_round_state(self, round_state, global_step):
        return self.end_round(round_state, global_step)

    def end_round(self, round_state, global_step, mean_state=None, round_steps=None):
        rounds, control = self._split(round_state)
        next_rounds = self.estimator.next_round_state(rounds, global_step)
        if mean_state is None or round_steps is None:
            return [*next_rounds, control]
        steps = tf.cast(round_steps, tf.float32)
        progress = estimators_lib.squared_norm(global_step)
        variance = tf.maximum(mean_state[0] - progress, 0.0)
        rho = variance / tf.maximum(progress, 1e-30)
        length = tf.maximum(1.0 / control[1], self.horizon / tf.sqrt(tf.maximum(rho, 1e-30)))
        # The estimator's own value at the sync, in the units of its checks.
        theta = self.estimator.estimate(mean_state[:-2]) * tf.square(length / steps)
        inverse = tf.where(theta > 0, 1.0 / tf.maximum(theta, 1e-30), control[0])
        learned = tf.stack([inverse, 1.0 / length])
        if self._optimizer is not None:
            learned = tf.where(rising(self._optimizer), control, learned)
        return [*next_rounds, learned]

    def __repr__(self):
        return (
            f"AutoFDA({self.estimator!r}, horizon={self.horizon:g}, "
            f"first_round={self.first_round})"
        )


class Synchronous(SyncTrigger):
    """Average after every step (the communication-heavy baseline)."""

    name = "synchronous"

    def should_sync(self, statistic, steps_since_sync):
        return tf.constant(True)

    def __repr__(self):
        return "Synchronous()"


class Periodic(SyncTrigger):
    """Average every `tau` local steps (FedAvg / local SGD).

    The statistic is the number of steps since the last sync, so logs show it
    climbing to `threshold = tau`.

    Args:
        tau: steps between synchronizations, an integer >= 1.
    """

    name = "periodic"

    def __init__(self, tau):
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise ValueError(f"tau must be an integer >= 1, got {tau!r}.")
        self.tau = tau
        self.threshold = float(tau)
        self.name = f"periodic-{tau}"

    def statistic(self, mean_state, steps_since_sync):
        return tf.cast(steps_since_sync, tf.float32)

    def should_sync(self, statistic, steps_since_sync):
        return steps_since_sync >= self.tau

    def __repr__(self):
        return f"Periodic(tau={self.tau})"


class Kamp(SyncTrigger):
    """Kamp et al.'s local condition: sync if any worker has `||u_k||^2 > threshold`.

    Each worker sends one float: 1.0 if its own condition is violated. The
    statistic is the fraction of workers in violation; any violation syncs.

    Args:
        threshold: the bound on each worker's squared drift norm.
    """

    name = "kamp"
    state_size = 1

    def __init__(self, threshold):
        self.threshold = _check_threshold(threshold)

    def local_state(self, drift, round_state):
        violated = squared_norm(drift) > self.threshold
        return tf.reshape(tf.cast(violated, tf.float32), [1])

    def statistic(self, mean_state, steps_since_sync):
        return mean_state[0]

    def should_sync(self, statistic, steps_since_sync):
        return statistic > 0.0

    def __repr__(self):
        return f"Kamp(threshold={self.threshold})"


class QSR(SyncTrigger):
    """Gu et al.'s Quadratic Synchronization Rule (ICLR 2024): sync every H steps.

    `H = max(base_period, floor((alpha / lr) ** 2))`, with `lr` the
    optimizer's learning rate at the first step of the round: frequent syncs
    while the rate is high, longer rounds as it decays. With a Keras learning
    rate schedule that is the schedule at the round's first step (a round
    that starts while the rate still rises, in a warmup, lasts `base_period`);
    a rate changed by hand (a variable) is read as it is now. Nothing is exchanged
    between syncs. The statistic is the round's progress, steps since the
    last sync / H: a sync comes when it reaches `threshold` = 1.

    Args:
        alpha: the rule's coefficient: the period at a rate `lr` is
            `(alpha / lr)^2` (e.g. alpha 0.01 with Adam at 1e-3: 100 steps).
        base_period: the shortest period, an integer >= 1.

    Example:

    ```python
    trigger = keras_fda.QSR(alpha=0.01, base_period=4)
    callback = keras_fda.FDACallback(trigger=trigger)
    ```
    """

    name = "qsr"
    threshold = 1.0

    def __init__(self, alpha, base_period):
        self.alpha = _check_threshold(alpha)
        if isinstance(base_period, bool) or not isinstance(base_period, int) or base_period < 1:
            raise ValueError(f"base_period must be an integer >= 1, got {base_period!r}.")
        self.base_period = base_period

    def period(self, steps_since_sync):
        """H (float32) of the round that has run `steps_since_sync` steps."""
        optimizer = _watched(self._optimizer, "QSR")
        rate = learning_rate(optimizer, steps_since_sync)
        # A warmup's low rates would make the first rounds (nearly) endless.
        period = tf.where(rising(optimizer, steps_since_sync), 0.0, tf.square(self.alpha / rate))
        return tf.maximum(float(self.base_period), tf.floor(period))

    def statistic(self, mean_state, steps_since_sync):
        return tf.cast(steps_since_sync, tf.float32) / self.period(steps_since_sync)

    def should_sync(self, statistic, steps_since_sync):
        return tf.cast(steps_since_sync, tf.float32) >= self.period(steps_since_sync)

    def __repr__(self):
        return f"QSR(alpha={self.alpha:g}, base_period={self.base_period})"


class PostLocal(Periodic):
    """Post-local SGD (Lin et al., ICLR 2020): synchronous first, then every `tau` steps.

    Syncs after every step until the optimizer has taken `switch_step`
    steps (Lin et al. switch at the first learning-rate decay), then every
    `tau` local steps, as `Periodic`.

    Args:
        tau: the period after the switch, an integer >= 1.
        switch_step: the optimizer step at which periods begin, >= 0.

    Example:

    >>> trigger = PostLocal(tau=32, switch_step=500)
    """

    def __init__(self, tau, switch_step):
        super().__init__(tau)
        if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 0:
            raise ValueError(f"switch_step must be an integer >= 0, got {switch_step!r}.")
        self.switch_step = switch_step
        self.name = f"post-local-{tau}"

    def should_sync(self, statistic, steps_since_sync):
        # The optimizer has counted the step just taken.
        early = _watched(self._optimizer, "PostLocal").iterations <= self.switch_step
        return early | super().should_sync(statistic, steps_since_sync)

    def __repr__(self):
        return f"PostLocal(tau={self.tau}, switch_step={self.switch_step})"


def describe(trigger):
    """The trigger's settings as text, equal across processes for equal settings.

    Its repr, or its class's name where the repr is the default one (whose
    address differs from process to process).
    """
    text = repr(trigger)
    if " object at 0x" in text:
        text = f"{type(trigger).__module__}.{type(trigger).__qualname__}"
    return text


def get(trigger=None, *, threshold=None, variant=None, tau=None):
    """Resolves the trigger arguments of the drivers into a `SyncTrigger`.

    Args:
        trigger: a `SyncTrigger`, or one of "fda" (default), "synchronous",
            "periodic", "kamp", "qsr".
        threshold: Theta for "fda" and "kamp"; for "fda" also "auto" (an
            `AutoFDA`: the threshold sets and adapts itself); alpha for "qsr".
        variant: estimator name or instance for "fda" (default "linear").
        tau: period for "periodic"; the shortest period for "qsr".

    Raises:
        ValueError: for an unknown trigger, a missing argument, or an argument
            that the chosen trigger does not use (it would be silently ignored).
    """
    given = {"threshold": threshold, "variant": variant, "tau": tau}
    name = "fda" if trigger is None else trigger
    uses = {"fda": ("threshold", "variant"), "kamp": ("threshold",),
            "periodic": ("tau",), "synchronous": (), "qsr": ("threshold", "tau")}
    if isinstance(trigger, SyncTrigger):
        name, used = repr(trigger), ()
    elif name in uses:
        used = uses[name]
    else:
        raise ValueError(
            f"Unknown trigger {trigger!r}. Use 'fda', 'synchronous', 'periodic', 'kamp', "
            "'qsr' or a keras_fda.triggers.SyncTrigger instance."
        )
    unused = sorted(k for k, v in given.items() if v is not None and k not in used)
    if unused:
        raise ValueError(
            f"The {name} trigger does not use {', '.join(unused)}; remove "
            f"{' and '.join(f'{k}=' for k in unused)} (it would be ignored)."
        )
    if isinstance(trigger, SyncTrigger):
        return trigger
    if name == "fda":
        if threshold is None:
            raise ValueError(
                "FDA needs a threshold, e.g. FDACallback(threshold='auto') or threshold=1.5."
            )
        variant = "linear" if variant is None else variant
        if threshold == "auto":
            return AutoFDA(variant)
        return FDA(variant, threshold)
    if name == "kamp":
        if threshold is None or threshold == "auto":
            raise ValueError("The 'kamp' trigger needs a numeric threshold.")
        return Kamp(threshold)
    if name == "periodic":
        if tau is None:
            raise ValueError("The 'periodic' trigger needs tau (steps between syncs).")
        return Periodic(tau)
    if name == "qsr":
        if threshold is None or tau is None:
            raise ValueError(
                "The 'qsr' trigger needs threshold= (its alpha) and tau= (the shortest period), "
                "e.g. trigger='qsr', threshold=0.05, tau=4."
            )
        return QSR(threshold, tau)
    return Synchronous()
