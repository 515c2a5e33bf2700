"""Sync signals tried for issue 25 and removed from the library because they lost.

Both ran in all three drivers as `keras_fda.SyncTrigger` subclasses (the
simulator, `FDACallback` on 2 real workers and `FDAStrategy` on 2 replicas
gave the same decisions, tested while they were built-in triggers); they
are kept here so that `benchmarks/frontier.py` reproduces
`benchmarks/results/frontier.md`, where BENCHMARKS.md section 9 says by how
much each lost and why.
"""

import tensorflow as tf

from keras_fda.policies import triggers


def _inner(optimizer):
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


class CurvatureFDA(triggers.FDA):
    """FDA in Adam's own metric: sync when averaging is predicted to gain `threshold` in loss.

    Adam steps each weight as if the loss had the diagonal curvature
    `H = (sqrt(v_hat) + epsilon) / lr` (`v_hat`: its bias-corrected second
    moments). To second order, the workers' models then lose `1/2 sum_j H_j
    Var_j` more than their average does (`Var_j`: the variance of weight j
    across workers; the first-order terms cancel in the mean), so that gap
    is what a sync is worth now. The statistic is that gap, estimated by
    `estimator` on each worker's drift scaled by `sqrt(H)`: drift along
    flat directions (small second moments) costs little, drift where the
    loss is steep costs much, and a lower learning rate makes the same
    drift worth more. Each worker scales by its own optimizer's moments:
    where those differ the estimator's bound holds only approximately.

    Reads the second moments of Adam, AdamW, Nadam or RMSprop (any Keras
    optimizer with `velocity` slots); the drivers pass the optimizer via
    `watch`.

    Args:
        threshold: the predicted loss gap of averaging, in the loss's units
            (nats for a cross-entropy); sync when the estimate exceeds it.
        estimator: a `VarianceEstimator` or one of "naive", "linear",
            "sketch", "exact", run on the scaled drifts.

    Example:

    >>> trigger = CurvatureFDA(threshold=0.05)
    """

    def __init__(self, threshold, estimator="linear"):
        super().__init__(estimator, threshold)
        self.name = "fda-curvature"
        self._optimizers = ()

    def watch(self, *optimizers):
        self._optimizers = [_inner(o) for o in optimizers]

    def scaled(self, drift, optimizer):
        """`drift * sqrt(H)` per tensor, H the curvature `optimizer` assumes now."""
        velocities = getattr(optimizer, "_velocities", None)
        if not velocities:
            raise ValueError(
                f"CurvatureFDA reads the optimizer's second moments; {type(optimizer).__name__} "
                "has none. Compile the model with Adam, AdamW, Nadam or RMSprop."
            )
        if [v.shape for v in velocities] != [d.shape for d in drift]:
            raise ValueError(
                "CurvatureFDA needs the optimizer's second moments of exactly the monitored "
                "(trainable) weights, in order; build the optimizer on "
                "model.trainable_variables."
            )
        rate = tf.maximum(triggers.learning_rate(optimizer, 1), 1e-12)
        correction = 1.0
        if getattr(optimizer, "beta_2", None) is not None:
            steps = tf.maximum(tf.cast(optimizer.iterations, tf.float32), 1.0)
            correction = 1.0 - tf.pow(tf.cast(optimizer.beta_2, tf.float32), steps)
        epsilon = float(getattr(optimizer, "epsilon", 1e-7))
        scaled = []
        for d, v in zip(drift, velocities):
            v_hat = tf.cast(v, tf.float32) / correction
            scale = tf.sqrt((tf.sqrt(v_hat) + epsilon) / rate)
            scaled.append(tf.cast(d, tf.float32) * scale)
        return scaled

    def local_state(self, drift, round_state):
        optimizer = self._optimizers[0]
        return self.estimator.local_state(self.scaled(drift, optimizer), round_state)

    def mean_local_state(self, drifts, round_state):
        if len(self._optimizers) != len(drifts):
            raise ValueError(
                f"CurvatureFDA was given {len(drifts)} drifts and {len(self._optimizers)} "
                "optimizers: the driver must watch one optimizer per local copy."
            )
        return tf.reduce_mean(tf.stack([
            self.estimator.local_state(self.scaled(d, o), round_state)
            for d, o in zip(drifts, self._optimizers)
        ]), axis=0)  # fmt: skip

    def statistic(self, mean_state, steps_since_sync):
        return 0.5 * self.estimator.estimate(mean_state)

    def __repr__(self):
        return f"CurvatureFDA(threshold={self.threshold:g}, estimator={self.estimator!r})"


class RatePeriod(triggers.QSR):
    """A period proportional to the learning rate: more syncs as the rate decays.

    `H = max(1, floor(period * lr / rate))`, `lr` the optimizer's rate at
    the round's first step: `period` steps at the rate `rate`, shorter
    rounds below it (but `period` while the rate still rises, in a warmup).
    QSR's mirror image: it spends syncs late in a decaying schedule, where
    a unit of the workers' disagreement costs the final accuracy most
    (BENCHMARKS.md, section 4's diagnosis). Nothing is exchanged between
    syncs.

    Args:
        period: the period, in steps, at the learning rate `rate`.
        rate: the learning rate at which rounds last `period` steps (e.g.
            the schedule's peak).

    Example:

    >>> trigger = RatePeriod(period=64, rate=3e-3)
    """

    name = "rate-period"

    def __init__(self, period, rate):
        # QSR's rounds (statistic, decision, watched optimizer) with another period.
        super().__init__(alpha=1.0, base_period=period)
        self.period_at_rate = period
        self.rate = float(rate)

    def period(self, steps_since_sync):
        """H (float32) of the round that has run `steps_since_sync` steps."""
        optimizer = self._optimizer
        rate = triggers.learning_rate(optimizer, steps_since_sync)
        # Under a warmup the rate is low but not decayed: rounds keep `period`.
        ratio = tf.where(triggers.rising(optimizer, steps_since_sync), 1.0, rate / self.rate)
        return tf.maximum(1.0, tf.floor(self.period_at_rate * ratio))

    def __repr__(self):
        return f"RatePeriod(period={self.period_at_rate}, rate={self.rate:g})"
