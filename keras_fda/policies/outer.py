"""What a synchronization sends, and what it does with the average.

A `SyncRule` is the part of dynamic averaging that runs once a trigger has
fired, the same in every driver (`FDACallback`, `FDAStrategy`, `Simulation`):

    state   = rule.build(reference, dtype)             # once, eagerly
    payload = state.payload(values, reference values)   # on each worker
    mean    = all-reduce MEAN of payload                # the driver's transport
    average = state.mean_weights(mean)                  # the workers' average model
    new     = state.step(average)                       # w0's new value (outer optimizer)
    every worker's weights := new; state.update_moments(...)

Three levers, each off by default (today's plain average of float weights):

* `sync_dtype`: the payload. With a narrower dtype than the weights'
  averaging dtype each worker sends its drift `w_k - w0` cast down (the
  drift is small, so its rounding error is small next to the weights), and
  the average is `w0 + mean drift` computed at full precision from a `w0`
  that is identical everywhere. TensorFlow's collectives all-reduce bfloat16
  and float16 natively (the ring adds in the payload's dtype). "int8" and
  "int4" quantize the drift in blocks of `BLOCK_SIZE` entries with one
  float32 scale each; what a worker's quantization drops is kept locally
  and added to its next sync's drift (error feedback). Integers cannot be
  averaged in their own dtype without overflow or re-rounding, so the
  drivers all-gather the quantized payloads and every worker dequantizes the
  same numbers in the same order: the average is bit-identical everywhere.
* `outer_optimizer`: a Keras optimizer applied to `w0` with the negative
  mean drift `-(average - w0)` as its gradient (DiLoCo's outer Nesterov,
  FedAvgM, FedAdam). Every worker applies it to the same `w0` with the same
  all-reduced gradient, so its state is identical everywhere and costs no
  bytes. `SGD(1.0)` without momentum is the plain average.
* `optimizer_state`: what happens to the workers' own optimizer moments at
  a sync: kept (`"local"`), averaged like the weights (`"average"`, counted
  in bytes) or zeroed (`"reset"`).
"""

import keras
import tensorflow as tf

_SYNC_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
_HALF = (tf.float16, tf.bfloat16)
# The largest quantization level of each integer payload (symmetric: -L..L).
_LEVELS = {"int8": 127, "int4": 7}
# Entries per quantization block, each with one float32 scale (4 bytes): the
# scale costs 0.5 bits per entry, and a block's scale follows the drift's
# magnitude within a tensor. Chosen by benchmarks/quantization.py.
BLOCK_SIZE = 64
_OPTIMIZER_STATES = ("local", "average", "reset")


class SyncRule:
    """What a synchronization sends and what it does with the average.

    Args:
        sync_dtype: the dtype of what each worker all-reduces at a sync.
            None (default): the weights themselves in their averaging dtype
            (float32; float64 if a weight is float64), as without a rule.
            "float32", "bfloat16" or "float16": when narrower than the
            averaging dtype, the drift `w_k - w0` cast to it (2 bytes per
            parameter for the half types), while `w0` and the average stay
            at full precision. float16 flushes drift entries below about
            6e-8 to zero and rounds those below 6e-5 coarsely; bfloat16 has
            float32's range and 8 bits of precision. "int8" (1 byte per
            parameter) and "int4" (half a byte) quantize the drift in
            blocks of `BLOCK_SIZE` entries, each with a float32 scale (its
            largest magnitude / 127 or / 7), with error feedback: the part
            of a worker's drift that its quantization dropped is added to
            its next sync's drift. The payloads are all-gathered, not
            all-reduced, so that the average is bit-identical on every
            worker; a ring all-gather sends K - 1 payloads per worker where
            an all-reduce sends 2 (K - 1) / K, so int8 sends fewer bytes on
            the wire than float32 below K = 8 and int4 below K = 16
            (the paper formula counts the payload once). Not-monitored weights
            (BatchNorm statistics) are values, not drift: they are sent in
            the averaging dtype, which holds any of them (a BatchNorm
            variance above float16's 65504 would overflow a float16 payload).
        outer_optimizer: None, or a Keras optimizer applied at each sync to
            `w0` with the gradient `-(mean of the workers' weights - w0)`;
            the workers then start the next round from the new `w0`. It is
            copied from its config for each model, so one instance can serve
            several runs. Its variables are identical on every worker and are
            part of the averaging state (checkpointed with it). The string
            "nesterov" stands for DiLoCo's outer step,
            `keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)`.
        optimizer_state: "local" (default: each worker keeps its optimizer's
            moments), "average" (the moments are averaged across workers at
            each sync, in float32, and counted in the bytes) or "reset"
            (back to their initial values at each sync: zeros for Adam's,
            `initial_accumulator_value` for Adagrad's). The moments are the
            optimizer's slots (see `moment_variables`); its iteration count
            (hence the learning-rate schedule and Adam's bias correction),
            learning rate, a `LossScaleOptimizer`'s loss scale, `use_ema`'s
            moving averages and accumulated gradients are never touched.
        error_feedback: with sync_dtype "int8" or "int4", whether each
            worker adds what its last quantization dropped to its next
            sync's drift (default True; False only to measure what it buys).

    Example:

    ```python
    rule = keras_fda.SyncRule(
        sync_dtype="bfloat16",
        outer_optimizer=keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True),
    )
    sync = rule.build(reference, dtype=tf.float32)  # in a driver
    ```

    Users pass the three options to a driver, e.g.
    `Simulation(model, 10).run(trigger, x, y, parts, sync_dtype="bfloat16")`.
    """

    def __init__(self, *, sync_dtype=None, outer_optimizer=None, optimizer_state="local",
                 error_feedback=True):
        self.sync_dtype = _check_sync_dtype(sync_dtype)
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be True or False, got {error_feedback!r}.")
        self.error_feedback = error_feedback
        self.outer_optimizer = _check_outer_optimizer(outer_optimizer)
        if optimizer_state not in _OPTIMIZER_STATES:
            raise ValueError(
                f"optimizer_state must be one of {_OPTIMIZER_STATES}, got {optimizer_state!r}."
            )
        self.optimizer_state = optimizer_state

    def build(self, reference, dtype):
        """Binds the rule to one model's reference weights `w0`; call it eagerly.

        Args:
            reference: the tf.Variables holding `w0` (one per monitored
                weight, in the order of the payload's first entries).
            dtype: the dtype in which the driver averages the weights
                (`keras_fda.engine.core.averaging_dtype`).

        Returns:
            A `SyncState`.
        """
        return SyncState(self, reference, dtype)

    def describe(self):
        """`(option, text)` pairs, equal across processes for equal options."""
        return [
            ("sync_dtype", repr(self.sync_dtype)),
            ("outer_optimizer", describe_optimizer(self.outer_optimizer, with_config=True)),
            ("optimizer_state", repr(self.optimizer_state)),
            ("error_feedback", repr(self.error_feedback)),
        ]

    def get_config(self):
        return {
            "sync_dtype": self.sync_dtype,
            "outer_optimizer": self.outer_optimizer,
            "optimizer_state": self.optimizer_state,
            "error_feedback": self.error_feedback,
        }

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"SyncRule({args})"


class SyncState:
    """A `SyncRule` bound to one model: its `w0`, payload dtype and outer optimizer.

    Every method works eagerly and inside a `tf.function` (also in a branch of
    `tf.cond`): the outer optimizer's variables are created here, eagerly.

    Attributes:
        rule: the `SyncRule`.
        reference: the tf.Variables of `w0`.
        dtype: the averaging dtype of the weights.
        payload_dtype: the dtype of the weights' payload.
        sends_drift: True if the payload is the drift `w_k - w0` (cast to
            `payload_dtype`), False if it is the weights' values.
        optimizer: the outer optimizer of this model (a copy of the rule's),
            built on `reference`, or None.
    """

    def __init__(self, rule, reference, dtype):
        self.rule = rule
        self.reference = list(reference)
        self.dtype = tf.as_dtype(dtype)
        self.levels = _LEVELS.get(rule.sync_dtype)
        wanted = self.dtype if rule.sync_dtype is None or self.levels else tf.as_dtype(
            rule.sync_dtype
        )
        if wanted in _HALF and self.dtype == tf.float64:
            raise ValueError(
                f"sync_dtype={rule.sync_dtype!r} would send the drift of float64 weights with "
                "2 bytes per parameter, below the precision the float64 weights were chosen "
                "for; use sync_dtype='float32' (4 bytes) or None (8 bytes), or float32 weights."
            )
        if self.levels is not None:
            if self.dtype == tf.float64:
                raise ValueError(
                    f"sync_dtype={rule.sync_dtype!r} quantizes float32 weights; these are "
                    "float64. Use sync_dtype=None or 'float32', or float32 weights."
                )
            # An int32 container of the packed bytes: TensorFlow's collectives
            # gather no 8-bit dtype.
            self.sends_drift, self.payload_dtype = True, tf.int32
        else:
            self.sends_drift = wanted.size < self.dtype.size
            self.payload_dtype = wanted if self.sends_drift else self.dtype
        self.optimizer = None
        if rule.outer_optimizer is not None:
            outer = rule.outer_optimizer
            with tf.init_scope():
                self.optimizer = type(outer).from_config(outer.get_config())
                self.optimizer.build(self.reference)

    @property
    def quantized(self):
        """True if the payload is an integer quantization of the drift (int8, int4)."""
        return self.levels is not None

    def state_variables(self):
        """The variables to checkpoint with the averaging state (the outer optimizer's)."""
        return list(self.optimizer.variables) if self.optimizer is not None else []

    def new_residuals(self):
        """One worker's error-feedback residuals (zeros like `reference`); [] without them."""
        if not (self.quantized and self.rule.error_feedback):
            return []
        with tf.init_scope():
            return [
                tf.Variable(tf.zeros(r.shape, self.dtype), trainable=False, name="fda_residual")
                for r in self.reference
            ]

    def payload(self, values, reference_values, residuals=()):
        """What one worker all-reduces (MEAN) at a sync, one tensor per averaged weight.

        Args:
            values: this worker's values of every averaged weight, the
                monitored ones first (in the order of `reference`), then
                the others (e.g. BatchNorm statistics).
            reference_values: the values of `reference` (`w0`).

        Returns:
            The values themselves (the driver averages them in `dtype`), or,
            if `sends_drift`, `w_k - w0` of the monitored weights cast to
            `payload_dtype`, then the others' values in `dtype`. The dtypes
            may then differ: a driver all-reduces each dtype's tensors
            together (`dtype_groups`), as TensorFlow packs one dtype per
            collective. A quantized drift (int8, int4: `quantized`) is one
            1-D int32 tensor per weight, the drift plus `residuals` (this
            worker's values of `new_residuals()`) in blocks with their
            scales; a driver all-gathers the integer tensors
            (`gather_groups`) instead of averaging them.
        """
        if not self.sends_drift:
            return list(values)
        n = len(reference_values)
        drift = [
            tf.cast(v, self.dtype) - tf.cast(r, self.dtype)
            for v, r in zip(values[:n], reference_values)
        ]
        others = [tf.cast(v, self.dtype) for v in values[n:]]
        if self.quantized:
            fed_back = [d + tf.cast(e, self.dtype) for d, e in zip(drift, residuals)] or drift
            return [self._quantize(d) for d in fed_back] + others
        return [tf.cast(d, self.payload_dtype) for d in drift] + others

    def feed_back(self, values, residuals, mean_payload, rank):
        """After a sync: what this worker's quantization dropped becomes its residuals.

        Args:
            values: this worker's monitored weights' values its payload was
                made from (before the average is assigned).
            residuals: its `new_residuals()` variables.
            mean_payload: the all-gathered payloads of the sync.
            rank: this worker's row in them.
        """
        for v, r, e, gathered in zip(values, self.reference, residuals, mean_payload):
            fed = tf.cast(v, self.dtype) - tf.cast(r, self.dtype) + e
            sent = self._dequantize(gathered[rank : rank + 1])[0, : e.shape.num_elements()]
            e.assign(fed - tf.reshape(sent, e.shape))

    @property
    def _bits(self):
        return 8 if self.levels == _LEVELS["int8"] else 4

    def _quantize(self, tensor):
        """A float tensor -> 1-D int32: the packed levels of its blocks, then their scales."""
        flat = tf.reshape(tf.cast(tensor, tf.float32), [-1])
        size = int(flat.shape[0])
        blocks = -(-size // BLOCK_SIZE)
        x = tf.reshape(tf.pad(flat, [[0, blocks * BLOCK_SIZE - size]]), [blocks, BLOCK_SIZE])
        scale = tf.reduce_max(tf.abs(x), axis=1) / self.levels
        # An all-zero block sends zeros; a NaN scale travels and fails the finite check.
        divisor = tf.where(scale > 0, scale, tf.ones_like(scale))
        q = tf.clip_by_value(tf.round(x / divisor[:, None]), -self.levels, self.levels)
        if self._bits == 8:
            packed = tf.cast(q, tf.int8)
        else:  # two levels (offset to 1..15) per byte
            nibbles = tf.reshape(tf.cast(q + 8.0, tf.uint8), [-1, 2])
            packed = tf.bitwise.bitwise_or(nibbles[:, 0], tf.bitwise.left_shift(nibbles[:, 1], 4))
        words = tf.bitcast(tf.reshape(packed, [-1, 4]), tf.int32)
        return tf.concat([tf.reshape(words, [-1]), tf.bitcast(scale, tf.int32)], 0)

    def _blocks(self, gathered):
        """`(blocks, words of levels)` of `[K, words]` gathered payloads of one weight."""
        per_block = BLOCK_SIZE * self._bits // 32
        blocks = int(gathered.shape[1]) // (per_block + 1)
        return blocks, blocks * per_block

    def _dequantize(self, gathered):
        """`[K, words]` int32 payloads of one weight -> `[K, padded size]` float32 drifts."""
        blocks, levels = self._blocks(gathered)
        if self._bits == 8:
            q = tf.cast(tf.bitcast(gathered[:, :levels], tf.int8), tf.float32)
        else:
            byte = tf.bitcast(gathered[:, :levels], tf.uint8)
            nibbles = tf.stack(
                [tf.bitwise.bitwise_and(byte, 15), tf.bitwise.right_shift(byte, 4)], -1
            )
            q = tf.cast(nibbles, tf.float32) - 8.0
        q = tf.reshape(q, [-1, blocks, BLOCK_SIZE])
        scale = tf.bitcast(gathered[:, levels:], tf.float32)
        return tf.reshape(q * scale[:, :, None], [-1, blocks * BLOCK_SIZE])

    def finite(self, mean_payload):
        """Whether the all-reduced (or all-gathered) payload is free of NaN and Inf."""
        checks = []
        for m in mean_payload:
            if m.dtype.is_integer:
                m = tf.bitcast(m[:, self._blocks(m)[1]:], tf.float32)  # the scales
            checks.append(tf.reduce_all(tf.math.is_finite(m)))
        return tf.reduce_all(checks)

    def mean_weights(self, mean_payload):
        """The workers' average model from the all-reduced payload.

        Returns the mean itself if the payload is values, else `w0 + mean
        drift` in `dtype` (then the not-monitored weights' mean values).
        """
        if not self.sends_drift:
            return list(mean_payload)
        n = len(self.reference)
        if self.quantized:
            drifts = [
                _mean_in_order(self._dequantize(g))[: r.shape.num_elements()]
                for r, g in zip(self.reference, mean_payload[:n])
            ]
            return [
                r + tf.cast(tf.reshape(d, r.shape), self.dtype)
                for r, d in zip(self.reference, drifts)
            ] + [tf.cast(m, self.dtype) for m in mean_payload[n:]]
        averaged = [
            tf.cast(r, self.dtype) + tf.cast(m, self.dtype)
            for r, m in zip(self.reference, mean_payload[:n])
        ]
        return averaged + [tf.cast(m, self.dtype) for m in mean_payload[n:]]

    def step(self, mean_weights):
        """The values every worker adopts: `w0`'s new value, then the others' means.

        Without an outer optimizer that is `mean_weights` itself. With one,
        the optimizer moves `reference` in place with the gradient
        `w0 - mean` and its new value is returned: the caller must read
        anything it needs of the old `w0` (the round's global step) first.
        """
        if self.optimizer is None:
            return list(mean_weights)
        n = len(self.reference)
        gradients = [
            r - tf.cast(m, r.dtype) for r, m in zip(self.reference, mean_weights[:n])
        ]
        self.optimizer.apply(gradients, self.reference)
        return [r.read_value() for r in self.reference] + list(mean_weights[n:])

    # --- the workers' optimizer moments ----------------------------------

    def moments_payload(self, moments):
        """This worker's moments to all-reduce (MEAN) with the weights: all, or none."""
        if self.rule.optimizer_state != "average":
            return []
        return [m.read_value() for m in moments]

    def update_moments(self, moments, mean_moments=()):
        """Applies `optimizer_state` to this worker's `moments` (a `Moments`) after a sync."""
        if self.rule.optimizer_state == "average":
            for m, mean in zip(moments, mean_moments):
                m.assign(tf.cast(mean, m.dtype))
        elif self.rule.optimizer_state == "reset":
            for m, initial in zip(moments, moments.initial_values()):
                m.assign(tf.fill(tf.shape(m), tf.constant(initial, m.dtype)))

    def sync_bytes(self, num_params, moments=(), param_bytes=None):
        """Bytes one worker all-reduces at one sync.

        Args:
            num_params: parameters averaged per sync (monitored and others).
            moments: one worker's moment variables (see `moment_variables`).
            param_bytes: bytes per parameter when the values themselves are
                sent (default: `dtype`'s size).
        """
        if self.sends_drift:
            monitored = sum(int(r.shape.num_elements()) for r in self.reference)
            # The others travel as values, in the averaging dtype.
            total = self.gathered_bytes() + (num_params - monitored) * self.dtype.size
            if not self.quantized:
                total += monitored * self.payload_dtype.size
        else:
            total = num_params * (self.dtype.size if param_bytes is None else param_bytes)
        if self.rule.optimizer_state == "average":
            total += sum(int(m.shape.num_elements()) * m.dtype.size for m in moments)
        return total


    def gathered_bytes(self):
        """Bytes of one worker's payload that are all-gathered (quantized), per sync."""
        if not self.quantized:
            return 0
        per_block = 4 + BLOCK_SIZE * self._bits // 8
        return sum(-(-int(r.shape.num_elements()) // BLOCK_SIZE) * per_block
                   for r in self.reference)


def _mean_in_order(rows):
    """The mean of `rows` ([K, n]) summed in worker order: the same bits on every worker."""
    total = rows[0]
    for k in range(1, int(rows.shape[0])):
        total = total + rows[k]
    return total / int(rows.shape[0])


def gather_groups(payload):
    """`(reduced, gathered)`: `dtype_groups` of `payload` split into float and integer.

    Float tensors are averaged by an all-reduce; integer ones (a quantized
    drift) are all-gathered, `[K, size]`, for `SyncState.mean_weights`.
    """
    groups = dtype_groups(payload)
    return (
        {d: i for d, i in groups.items() if not d.is_integer},
        {d: i for d, i in groups.items() if d.is_integer},
    )


def describe_optimizer(optimizer, with_config=False):
    """An optimizer's classes (a wrapper's, then its inner one's) and, optionally, configs."""
    parts = []
    while optimizer is not None:
        parts.append(type(optimizer).__name__)
        if with_config:
            config = {k: v for k, v in optimizer.get_config().items() if k != "name"}
            parts.append(repr(sorted(config.items())))
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return "/".join(parts) or "None"


def dtype_groups(tensors):
    """`{dtype: [indices]}` of `tensors`, in first-seen order: what one collective may pack."""
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def synchronized_weights(model, average_non_trainable=True):
    """The Keras variables a sync averages: `(monitored, others)`.

    `monitored` are the trainable weights (their drift drives the trigger);
    `others`, with `average_non_trainable`, the non-trainable float weights
    of the layers that train (BatchNorm moving statistics). Frozen layers
    (`layer.trainable = False`) are left out of both: they are identical on
    every worker and never change, so a sync would only send them and round
    them.
    """
    # Keras' own walk over nested layers (a frozen base inside a model).
    frozen = {
        id(w)
        for layer in model._flatten_layers(include_self=True)
        if not layer.trainable
        for w in layer.weights
    }
    others = []
    if average_non_trainable:
        others = [
            w for w in model.non_trainable_weights
            if w.dtype.startswith("float") and id(w) not in frozen
        ]
    return list(model.trainable_weights), others


class Moments(list):
    """An optimizer's moments: the variables `optimizer_state` acts on (a list).

    Built by `moment_variables`. `initial_values()` gives the value each
    moment starts from (what "reset" restores), read once from a fresh copy
    of the optimizer built on weights of the same shapes.
    """

    def __init__(self, variables, optimizer, weights):
        super().__init__(variables)
        self._optimizer = optimizer
        self._shapes = [(tuple(w.shape), w.dtype) for w in weights]
        self._initial = None

    def initial_values(self):
        if self._initial is None:
            with tf.init_scope():
                optimizer = self._optimizer
                fresh = _moment_holder(type(optimizer).from_config(optimizer.get_config()))
                fresh_weights = [
                    keras.Variable(tf.zeros(shape, dtype), dtype=dtype, trainable=True)
                    for shape, dtype in self._shapes
                ]
                fresh.build(fresh_weights)
                values = [v.numpy() for v in _slots(fresh)]
            initial = []
            for variable, value in zip(self, values):
                flat = value.reshape(-1)
                if flat.size and (flat != flat[0]).any():
                    raise ValueError(
                        f'optimizer_state="reset" cannot reset {variable.name}: it does not '
                        f"start from one value in {type(self._optimizer).__name__}; use "
                        'optimizer_state="local" or "average".'
                    )
                initial.append(flat[0].item() if flat.size else 0.0)
            self._initial = initial
        return self._initial


def moment_variables(optimizer):
    """The moments of a built Keras optimizer, as a `Moments` list.

    The moments are the optimizer's slots: its variables but the iteration
    count, the learning rate, `use_ema`'s moving averages of the weights and
    the gradient accumulators (e.g. Adam's `momentum` and `velocity`). A
    `LossScaleOptimizer`'s are its inner optimizer's: its loss scale and step
    counter are never touched.
    """
    inner = _moment_holder(optimizer)
    return Moments([v.value for v in _slots(inner)], inner, inner._trainable_variables)


def _moment_holder(optimizer):
    """The optimizer that holds the moments (a LossScaleOptimizer's inner one)."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _slots(optimizer):
    skip = {id(optimizer.iterations)}
    rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(rate, keras.Variable):
        skip.add(id(rate))
    for name in ("_model_variables_moving_average", "_accumulated_gradients"):
        skip.update(id(v) for v in getattr(optimizer, name, None) or ())
    return [v for v in optimizer.variables if id(v) not in skip]


def _check_sync_dtype(sync_dtype):
    if sync_dtype is None or sync_dtype in _LEVELS:
        return sync_dtype
    try:
        name = tf.as_dtype(sync_dtype).name
    except TypeError:
        name = None
    if name not in _SYNC_DTYPES:
        raise ValueError(
            f"sync_dtype must be None or one of {_SYNC_DTYPES}, got {sync_dtype!r}."
        )
    return name


def _check_outer_optimizer(optimizer):
    if optimizer is None:
        return None
    if optimizer == "nesterov":
        return keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "outer_optimizer must be None, \"nesterov\" or a Keras optimizer instance, e.g. "
            f"keras.optimizers.SGD(1.0, momentum=0.9), got {optimizer!r}."
        )
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise TypeError(
            "outer_optimizer cannot be a LossScaleOptimizer: the outer gradient is an "
            "average of weights, never a scaled loss's gradient; pass its inner optimizer."
        )
    if optimizer.use_ema:
        raise ValueError(
            "outer_optimizer has use_ema=True: nothing would ever swap the moving average "
            "into the reference weights, so it would only cost memory; pass use_ema=False."
        )
    if optimizer.gradient_accumulation_steps:
        raise ValueError(
            "outer_optimizer has gradient_accumulation_steps set: it would skip the updates "
            "of most syncs while the workers adopt w0; pass gradient_accumulation_steps=None."
        )
    return optimizer
