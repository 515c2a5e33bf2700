"""Estimators of the model variance across workers.

With `u_k` worker k's drift since the last synchronization (its weights minus
the weights all workers agreed on), the variance of the K models is

    Var = mean_k ||u_k||^2 - ||mean_k u_k||^2.

The first term is exact and costs one float per worker. An estimator decides
how each worker summarizes its drift in a small *local state*; the states are
averaged across workers (by whatever transport the driver uses) and the
estimator turns the averaged state into the estimate `V`.

Estimators are pure tensor math. They see a drift as a list of tensors (one per
model variable, together forming one flat vector, of any float dtype; states
and estimates are float32) and know nothing of workers,
collectives or Keras. Their only state besides constants is the per-round
state (the direction `xi` of the linear estimator), passed in and returned
explicitly so that every driver can hold it where it likes.
"""

import numpy as np
import tensorflow as tf

from keras_fda.policies.sketch import AMSSketch


def as_float32(tensors):
    """`tensors` in float32, the dtype of every local state and round state.

    Weights may be float64, float16 or bfloat16 (`keras.config.set_floatx`,
    dtype policies); the estimates are float32 whatever their dtype, and a
    float32 tensor passes through unchanged (no op in a graph).
    """
    return [tf.cast(t, tf.float32) for t in tensors]


def squared_norm(tensors):
    """`||v||^2` (float32) of the vector formed by concatenating `tensors`."""
    return tf.add_n([tf.reduce_sum(tf.square(t)) for t in as_float32(tensors)])


def _mean(tensors):
    return tf.reduce_mean(tf.stack(tensors), axis=0)


def dot(a, b):
    """Inner product (float32) of two vectors given as equally shaped tensor lists."""
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(as_float32(a), as_float32(b))])


class VarianceEstimator:
    """Base class: how a worker summarizes its drift and how V is computed.

    Subclasses set `name` and implement `local_state` and `estimate`; those
    that carry information from one round to the next (the linear estimator's
    direction) also override `initial_round_state` and `next_round_state`.

    A driver calls `build(shapes)` once, then on every step
    `local_state(drift, round_state)` on each worker, averages the states
    across workers, and calls `estimate(mean_state)`.
    """

    name = None

    def __init__(self, seed=0):
        self.seed = int(seed)
        self.shapes = None

    def build(self, shapes):
        """Prepares constants for vectors made of tensors of `shapes`."""
        self.shapes = [tuple(s) for s in shapes]
        self.num_params = int(sum(np.prod(s, dtype=np.int64) for s in self.shapes))

    @property
    def built(self):
        return self.shapes is not None

    @property
    def state_size(self):
        """Floats in the local state each worker contributes per step."""
        raise NotImplementedError

    @property
    def state_bytes(self):
        """Bytes each worker contributes per step (float32 states)."""
        return 4 * self.state_size

    def initial_round_state(self):
        """Round state before the first synchronization (a list of tensors)."""
        return []

    def next_round_state(self, round_state, global_step):
        """Round state after a sync; `global_step` = new minus previous reference."""
        del global_step
        return round_state

    def local_state(self, drift, round_state):
        """Summarizes this worker's `drift` as a 1-D float32 tensor."""
        raise NotImplementedError

    def mean_local_state(self, drifts, round_state):
        """The mean of the local states of several workers' `drifts` (one process).

        What the all-reduce MEAN of their `local_state`s gives; the in-process
        simulator calls it. Subclasses may override it with an exact shortcut.
        """
        return _mean([self.local_state(drift, round_state) for drift in drifts])

    def estimate(self, mean_state):
        """The variance estimate V from the workers' averaged local state."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(seed={self.seed})"


class NaiveEstimator(VarianceEstimator):
    """`V = mean_k ||u_k||^2`, an upper bound of the variance. 4 bytes per step.

    Example:

    >>> est = NaiveEstimator()
    >>> est.build([(3,)])
    >>> float(est.estimate(est.local_state([tf.constant([3.0, 4.0, 0.0])], [])))
    25.0
    """

    name = "naive"
    state_size = 1

    def local_state(self, drift, round_state):
        return tf.reshape(squared_norm(drift), [1])

    def estimate(self, mean_state):
        return mean_state[0]


class LinearEstimator(VarianceEstimator):
    """`V = mean_k ||u_k||^2 - (mean_k <xi, u_k>)^2`. 8 bytes per step.

    `xi` is the unit vector along the last global step (the difference of the
    last two agreed models), so `<xi, u_mean>^2 <= ||u_mean||^2` and V stays an
    upper bound of the variance; V is exact when `xi` is parallel to the mean
    drift. Before the first synchronization `xi` is a random unit vector drawn
    from `seed`, which must be the same on every worker.

    The direction costs one float per parameter of memory.

    Args:
        seed: seed of the random direction used before the first sync.

    Example:

    >>> est = LinearEstimator(seed=0)
    >>> est.build([(2,)])
    >>> xi = est.next_round_state(est.initial_round_state(), [tf.constant([1.0, 0.0])])
    >>> float(est.estimate(est.local_state([tf.constant([2.0, 1.0])], xi)))
    1.0
    """

    name = "linear"
    state_size = 2

    def initial_round_state(self):
        rng = np.random.default_rng(self.seed)
        xi = [rng.standard_normal(s).astype(np.float32) for s in self.shapes]
        norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in xi))
        return [tf.constant((x / norm).astype(np.float32)) for x in xi]

    def next_round_state(self, round_state, global_step):
        global_step = as_float32(global_step)
        norm = tf.sqrt(squared_norm(global_step))
        # A zero global step (e.g. a sync right after a sync) has no direction:
        # keep the previous one rather than divide by zero.
        return [
            tf.where(norm > 0.0, g / tf.maximum(norm, 1e-30), xi)
            for g, xi in zip(global_step, round_state)
        ]

    def local_state(self, drift, round_state):
        return tf.stack([squared_norm(drift), dot(round_state, drift)])

    def estimate(self, mean_state):
        return mean_state[0] - tf.square(mean_state[1])


class SketchEstimator(VarianceEstimator):
    """`V = mean_k ||u_k||^2 - M / (1 + eps)` with M the AMS estimate of ||u_mean||^2.

    Each worker sends `||u_k||^2` and an AMS sketch of its drift
    (`4 * (depth * width + 1)` bytes per step; 5004 at the paper's 5 x 250).
    Sketches are linear, so the averaged sketch is the sketch of the mean drift.
    `eps = 1 / sqrt(width)` makes V an upper bound of the variance with high
    probability.

    Memory: the precomputed hash ids cost `4 * depth` bytes per parameter
    (20 bytes at depth 5), plus one `depth * width` float vector.

    Args:
        depth: sketch rows; the median over rows is taken. Must be >= 1.
        width: buckets per row; error scale `1 / sqrt(width)`. Must be >= 1.
        seed: hash seed; all workers must use the same one.

    Example:

    >>> est = SketchEstimator(depth=5, width=250, seed=0)
    >>> est.build([(1000,)])
    >>> est.state_size
    1251
    """

    name = "sketch"

    def __init__(self, depth=5, width=250, seed=0):
        super().__init__(seed=seed)
        self.sketch = None
        # Validate now so that bad arguments fail at construction, not in fit().
        AMSSketch([], depth=depth, width=width, seed=seed)
        self.depth = int(depth)
        self.width = int(width)

    def build(self, shapes):
        super().build(shapes)
        self.sketch = AMSSketch(self.shapes, self.depth, self.width, self.seed)

    @property
    def state_size(self):
        return self.depth * self.width + 1

    def local_state(self, drift, round_state):
        return tf.concat([tf.reshape(squared_norm(drift), [1]), self.sketch.sketch(drift)], 0)

    def mean_local_state(self, drifts, round_state):
        if type(self).local_state is not SketchEstimator.local_state:
            return super().mean_local_state(drifts, round_state)
        # The sketch is linear: the mean of the K sketches is the sketch of
        # the mean drift, so one sketch replaces K (equal up to rounding).
        norms = _mean([squared_norm(drift) for drift in drifts])
        mean_drift = [_mean(list(copies)) for copies in zip(*drifts)]
        return tf.concat([tf.reshape(norms, [1]), self.sketch.sketch(mean_drift)], 0)

    def estimate(self, mean_state):
        mean_norm = self.sketch.norm_squared(mean_state[1:])
        return mean_state[0] - mean_norm / (1.0 + self.sketch.epsilon)

    def __repr__(self):
        return f"SketchEstimator(depth={self.depth}, width={self.width}, seed={self.seed})"


class ExactEstimator(VarianceEstimator):
    """The exact variance; each worker sends its whole drift (`4 * (d + 1)` bytes).

    Only sensible for tests and simulations: it costs as much per step as a
    synchronization.
    """

    name = "exact"

    @property
    def state_size(self):
        return self.num_params + 1

    def local_state(self, drift, round_state):
        flat = [tf.reshape(squared_norm(drift), [1])]
        flat += [tf.reshape(t, [-1]) for t in as_float32(drift)]
        return tf.concat(flat, 0)

    def estimate(self, mean_state):
        return mean_state[0] - tf.reduce_sum(tf.square(mean_state[1:]))


ESTIMATORS = {
    cls.name: cls
    for cls in (NaiveEstimator, LinearEstimator, SketchEstimator, ExactEstimator)
}


def get(identifier, **kwargs):
    """Returns an estimator from a name ("naive", "linear", "sketch", "exact") or instance."""
    if isinstance(identifier, VarianceEstimator):
        if kwargs:
            raise ValueError(
                f"Got keyword arguments {sorted(kwargs)} with an estimator instance; "
                "pass them to the estimator's constructor instead."
            )
        return identifier
    if isinstance(identifier, str) and identifier in ESTIMATORS:
        return ESTIMATORS[identifier](**kwargs)
    raise ValueError(
        f"Unknown FDA variant {identifier!r}. Use one of {sorted(ESTIMATORS)} "
        "or a `keras_fda.estimators.VarianceEstimator` instance."
    )
