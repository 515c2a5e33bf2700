"""`FDAStrategy`: Federated Dynamic Averaging as a `tf.distribute` strategy.

Several devices of one process (`MirroredStrategy`: GPUs, or logical CPUs in
tests), or the replicas of a cluster of processes
(`MultiWorkerMirroredStrategy`: TF_CONFIG, gRPC). Each replica trains its
own copy of the model on its shard of every global batch, with no per-step
gradient all-reduce. After every step, inside the same compiled
train step, each replica computes the trigger's local state from its drift,
the states are averaged with the strategy's collectives, and the replicas'
weights are averaged (also with the strategy's collectives) only when the
trigger fires. The trigger objects, estimators and accounting are the ones
`FDACallback` and the simulator use; this module plugs them into Keras and
tf.distribute, and `keras_fda.engine.mirrored.MirroredEngine` runs them.

How it plugs into Keras (why it is built this way):

* `FDAStrategy` IS a `tf.distribute.MirroredStrategy` (over the devices of
  the strategy it is given), so Keras records it as the model's strategy and
  calls its `run` for every compiled step. `run` recognizes the model's
  `train_step` and wraps it with the FDA check; any other function run by
  this strategy (the test and predict steps of `evaluate` / `predict`) first
  synchronizes the models that drifted, so they see the averaged model.
* Keras weights made in a MirroredStrategy scope are MirroredVariables with
  aggregation NONE: an update in replica context touches the local copy only,
  so replicas can diverge. Keras 3's optimizer, however, always all-reduces
  the gradients (`_all_reduce_sum_gradients`); the strategy replaces that
  method on the model's optimizer instance by the identity, and multiplies
  the gradients by the replica count before `apply` (Keras divides the loss
  by it), so clipping, weight decay and the update see the replica's own
  full gradient.
* Collectives inside `tf.cond` must be issued in cross-replica context:
  the decision and the averaging run in a `merge_call`.
* `FDAStrategy(...)` returns an instance of one of two concrete classes,
  a `MirroredStrategy` or a `MultiWorkerMirroredStrategy`, because Keras
  and TF choose code paths by the strategy's class. The multi-worker one
  reuses the given strategy's collective runtime (a process configures it
  only once) and works around Keras 3.15's multi-worker `fit`
  (keras-team/keras#20585).
"""

import atexit
import functools
import weakref

import keras
import tensorflow as tf
from tensorflow.python.distribute import values as distribute_values

from keras_fda.policies import outer as outer_lib
from keras_fda.policies import triggers as triggers_lib
from keras_fda.runtime import agreement
from keras_fda.engine.mirrored import MirroredEngine
from keras_fda.drivers import hooks
from keras_fda.drivers.model_checks import check_model
from keras_fda.drivers.tensorboard import Dashboard, standardize_update_freq

# Model methods that read the weights in cross-replica context (which silently
# returns replica 0's copy): the strategy synchronizes before each of them.
_READERS = ("save", "save_weights", "get_weights", "export")
# Model methods that give every replica the same new weights: the next round
# starts from them.
_WRITERS = ("set_weights", "load_weights")


class FDAStrategy(tf.distribute.Strategy):
    """Federated Dynamic Averaging across the replicas of a tf.distribute strategy.

    A drop-in replacement for the strategy: build and compile the model in
    `scope()`, then call `fit`. Each replica trains its own copy of the model
    on its shard of each global batch (no gradient all-reduce; each replica's
    optimizer state stays its own, as in the paper). After every step the
    compiled train step computes the trigger's local state on each replica,
    averages it with the strategy's collectives, and averages the weights
    only when the trigger fires (for FDA: when the variance estimate is
    strictly greater than `threshold`).

    What `evaluate`, `predict` and saving see: the averaged model. Before
    running any other step function (test, predict) and before the model's
    `save`, `save_weights`, `get_weights` and `export`, the strategy
    synchronizes the replicas if they drifted since the last sync. That is a
    real synchronization: it is counted in `fda/syncs` and `communication`,
    and the next FDA round starts from it. Reading a weight directly (e.g.
    `model.weights[0].numpy()`) returns replica 0's copy: call
    `strategy.synchronize()` first. `fit` synchronizes at its end, as
    `FDACallback` does, so after `fit` every replica holds the averaged model.

    What is averaged: the trainable weights and, if `average_non_trainable`,
    the non-trainable float weights of the layers that train; frozen layers
    are never sent or touched. (Weights whose aggregation is not NONE,
    such as BatchNorm moving statistics, are kept equal across replicas by
    tf.distribute itself on every update.)

    Logs: every batch and epoch gets `fda/variance` (the trigger's
    statistic), `fda/threshold`, `fda/syncs` and `fda/comm_bytes`
    (paper-formula bytes so far, all replicas), as with `FDACallback`.

    Multi-worker clusters: given a `tf.distribute.MultiWorkerMirroredStrategy`
    (created at program start, as TF requires), the replicas are those of
    every worker and the FDA state and weights are averaged with the
    cluster's collectives. Each worker's batch logs are its own replicas'
    loss and metrics (Keras would otherwise all-reduce every logged value at
    every step); the epoch's logs, which `EarlyStopping`, `ModelCheckpoint`,
    `ReduceLROnPlateau` and `History` see, are averaged over the workers
    (one small all-reduce per epoch), so every worker's callbacks decide
    alike. The `fda/*` values are the same on every worker. Each step waits
    for the state all-reduce: across slow links prefer `FDACallback`. As with any
    MultiWorkerMirroredStrategy, every worker must call `fit`, `evaluate`,
    `predict` and `save` (a sync is a collective), and a callback must not
    stop one worker's `fit` mid-epoch on that worker's own batch logs. The
    given strategy object is taken over: use the `FDAStrategy` from then on.

    Checkpoints (`ModelCheckpoint`, `BackupAndRestore`) save the averaged
    model. The FDA counters are not in them: a restored run starts a new
    round from the restored weights and counts from zero. After
    `set_weights` or `load_weights` (every replica gets the same weights)
    the next round starts from those weights.

    Weights of any float dtype (float64, float16, bfloat16 policies) are
    averaged in float32, or float64 if any weight is float64. A replica
    whose weights become NaN or Inf stops `fit` on every worker with an
    `InvalidArgumentError` that says "FDA stopped training at step N"
    (raised inside the compiled step, before anything is averaged).

    Compiling the model again (a new optimizer, other settings) is
    supported: the next `fit` checks the new settings and keeps the new
    optimizer's updates local. The counters go on across fits.

    Not supported (clear errors): other base strategies (one process per
    worker without tf.distribute: `keras_fda.FDACallback`), a second
    `FDAStrategy` over the same multi-worker strategy, `steps_per_execution`
    other than 1, `jit_compile=True`, `LossScaleOptimizer`, an optimizer
    with `use_ema=True` or created outside `scope()`, models without
    trainable weights.

    Args:
        strategy: the `tf.distribute.MirroredStrategy` (one machine) or
            `tf.distribute.MultiWorkerMirroredStrategy` (a cluster) whose
            devices and collectives to use.
        threshold: Theta (FDA syncs when the estimate is strictly greater), or
            "auto": an `AutoFDA` trigger that sets and adapts it (see its docs).
        variant: the variance estimator: "linear" (default), "naive",
            "sketch", "exact", or a `keras_fda.estimators.VarianceEstimator`.
        trigger: None for FDA, or "synchronous", "periodic", "kamp", or a
            `keras_fda.triggers.SyncTrigger`. Arguments the chosen trigger
            does not use (`threshold`, `variant`, `tau`) are a `ValueError`.
        tau: steps between syncs for the "periodic" trigger.
        average_non_trainable: also average non-trainable float weights at
            each sync (default True, as `FDACallback`).
        log_dir: if set, the chief writes the FDA dashboard (see
            `keras_fda.tensorboard`) to `<log_dir>/fda`, next to the runs of
            `keras.callbacks.TensorBoard(log_dir)`, on the same step axis.
        update_freq: write the dashboard every this many steps (an int, or
            "batch" for every step); syncs are always written.
        sync_dtype: None (default: each replica sends its weights' values,
            in float32 or float64), or "float32", "bfloat16", "float16": it
            sends its drift `w_k - w0` in that dtype (2 bytes per parameter
            for the half types); `w0` and the average stay full precision.
            "int8" or "int4": the drift quantized in blocks with error
            feedback, all-gathered (one replica per worker only).
        outer_optimizer: None (the plain average), "nesterov", or a Keras
            optimizer that steps `w0` at each sync with the gradient
            `-(mean drift)`: "nesterov" is DiLoCo's
            `keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)`,
            `SGD(1.0, momentum=0.9)` is FedAvgM, `Adam(...)` FedAdam. It
            runs alike on every replica, so it sends nothing;
            like the FDA counters, its state is not in Keras checkpoints.
            It steps at the syncs the trigger decides; the sync before the
            weights are read (evaluate, predict, save) is a plain average.
        optimizer_state: what each replica's optimizer moments become at a
            sync: "local" (default, kept), "average" (averaged with the
            weights, counted in the bytes) or "reset" (zeroed); after a
            recompile, the new optimizer's. See `keras_fda.SyncRule` for all
            three options.
        error_feedback: with sync_dtype "int8" or "int4", whether each
            worker adds what its last quantization dropped to its next
            sync's drift (default True; False only to measure what it buys).

    Attributes:
        communication: the `keras_fda.CommunicationStats` of the last model
            trained under this strategy, over all its fits.

    Example:

    ```python
    strategy = keras_fda.FDAStrategy(
        tf.distribute.MirroredStrategy(), threshold=1.5, variant="linear")
    with strategy.scope():
        model = make_model()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    model.fit(dataset, epochs=5)      # ends with a sync
    model.evaluate(test_dataset)
    print(strategy.communication.summary())
    ```
    """

    def __new__(cls, strategy=None, *args, **kwargs):
        # An instance of the concrete class for the given strategy's kind, so
        # that Keras and TF take the code paths they have for that kind.
        if cls is FDAStrategy:
            if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
                cls = _MultiWorkerFDAStrategy
            else:
                cls = _MirroredFDAStrategy
        return super().__new__(cls)

    def __init__(
        self,
        strategy,
        threshold=None,
        variant=None,
        *,
        trigger=None,
        tau=None,
        average_non_trainable=True,
        log_dir=None,
        update_freq=1,
        sync_dtype=None,
        outer_optimizer=None,
        optimizer_state="local",
        error_feedback=True,
    ):
        self.trigger = triggers_lib.get(trigger, threshold=threshold, variant=variant, tau=tau)
        self.sync_rule = outer_lib.SyncRule(
            sync_dtype=sync_dtype, outer_optimizer=outer_optimizer, optimizer_state=optimizer_state,
            error_feedback=error_feedback,
        )
        self.average_non_trainable = bool(average_non_trainable)
        self.log_dir = log_dir
        self.update_freq = standardize_update_freq(update_freq)
        if self.update_freq == "epoch":
            raise ValueError(
                "FDAStrategy writes its dashboard from the compiled train step, which has no "
                'notion of epochs: pass update_freq as a number of steps (or "batch").'
            )
        self._dashboard = None
        self._states = []
        self._adopt(strategy)
        self._agree()
        if log_dir is not None and self.extended.should_save_summary:
            # The chief's only; the values are the same on every worker.
            self._dashboard = Dashboard(log_dir, self.update_freq)
            # The writer flushes every few seconds; the rest when Python exits.
            atexit.register(self._dashboard.close)

    def _adopt(self, strategy):
        """Initializes the tf.distribute side over `strategy`'s devices."""
        raise NotImplementedError

    def _train_logs(self, logs):
        """What the train step's `run` returns to Keras."""
        return logs

    def _agree(self):
        """Checks that every process of the cluster has the same FDA settings."""

    def _settings(self):
        return [
            ("trigger", triggers_lib.describe(self.trigger)),
            *self.sync_rule.describe(),
            ("average_non_trainable", repr(self.average_non_trainable)),
        ]

    @property
    def communication(self):
        if not self._states:
            raise ValueError("No communication yet: no model has been trained under FDAStrategy.")
        return self._states[-1][1].communication()

    def synchronize(self, model=None):
        """Averages the replicas of `model` (default: every trained model) if they drifted.

        Returns True if a synchronization happened.
        """
        synced = False
        for owner, state in self._states:
            if model is None or owner is model:
                result = state.synchronize()
                synced = bool(self.experimental_local_results(result)[0]) or synced
        if self._dashboard is not None:
            self._dashboard.flush()
        return synced

    def run(self, fn, args=(), kwargs=None, options=None):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, keras.Model) and getattr(fn, "__name__", None) == "train_step":
            state = self._state_for(owner)
            fn = functools.partial(state.replica_step, fn)
            return self._train_logs(super().run(fn, args=args, kwargs=kwargs, options=options))
        # evaluate / predict / any other step: never on divergent copies.
        for _, state in self._states:
            state._synchronize_if_drifted()
        return super().run(fn, args=args, kwargs=kwargs, options=options)

    def _state_for(self, model):
        """The model's FDA state; checks the compile settings of every trace.

        Runs when Keras traces the train step: at the first `fit` and again
        after each `compile`, whose new optimizer must be made local too.
        """
        self._check(model)
        if not getattr(model.optimizer, "_fda_local", False):
            self._make_optimizer_local(model)
        state = next((s for owner, s in self._states if owner is model), None)
        if state is not None and model.optimizer is state.inner_optimizer:
            return state
        # The first trace, or a recompile: the rule acts on this optimizer's moments.
        moments = self._moments_of(model)
        if state is None:
            state = self._new_state(model)
        state.moments, state.inner_optimizer = moments, model.optimizer
        self.trigger.watch(model.optimizer)
        return state

    def _new_state(self, model):
        """A `MirroredEngine` for `model`, and the model's hooks that keep it in step."""
        trainable, extra = outer_lib.synchronized_weights(model, self.average_non_trainable)
        state = MirroredEngine(
            self, self.trigger, [w.value for w in trainable], [w.value for w in extra],
            self.sync_rule, dashboard=self._dashboard,
        )
        self._states.append((model, state))
        for name in _READERS:
            if hasattr(model, name):
                hooks.hook(model, name, before=functools.partial(self.synchronize, model))
        for name in _WRITERS:
            hooks.hook(model, name, after=state.rebase)
        self._wrap_model(model)
        return state

    def _moments_of(self, model):
        """The moments of `model`'s optimizer that the sync rule acts on (none if "local")."""
        if self.sync_rule.optimizer_state == "local":
            return []
        with tf.init_scope(), self.scope():
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            return outer_lib.moment_variables(model.optimizer)

    def _wrap_model(self, model):
        """Further per-model hooks of the concrete strategy."""
        del model

    def _check(self, model):
        if getattr(model, "distribute_strategy", None) is not self:
            raise ValueError("Build and compile the model inside FDAStrategy.scope().")
        check_model(model, "FDAStrategy")
        if getattr(model, "jit_compile", False):
            raise ValueError(
                "FDAStrategy's train step uses merge_call, which XLA cannot compile: pass "
                "jit_compile=False to model.compile()."
            )
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("FDAStrategy needs a model compiled with an optimizer.")
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise TypeError(
                "FDAStrategy does not support LossScaleOptimizer (mixed_float16); use a "
                "float32 or bfloat16 policy."
            )
        if getattr(optimizer, "use_ema", False):
            raise ValueError(
                "FDAStrategy does not average the optimizer's moving-average (EMA) weights, "
                "which differ per replica: compile with an optimizer with use_ema=False."
            )
        if getattr(optimizer, "_distribution_strategy", None) is not self:
            raise ValueError(
                "The optimizer was created outside FDAStrategy.scope(): create it (or pass "
                "its name to compile) inside the scope."
            )

    def _make_optimizer_local(self, model):
        """Keeps the optimizer's updates on each replica's own copy."""
        optimizer = model.optimizer
        num_replicas = self.num_replicas_in_sync
        original_apply = optimizer.apply

        def apply(grads, trainable_variables=None):
            # Keras divided the loss by the replica count, expecting a SUM
            # all-reduce; undo it before clipping and weight decay.
            grads = [_scale(g, num_replicas) for g in grads]
            return original_apply(grads, trainable_variables)

        object.__setattr__(optimizer, "apply", apply)
        object.__setattr__(optimizer, "_all_reduce_sum_gradients", list)
        # Keras calls it once at the end of every fit, on every worker: fit
        # then leaves one averaged model, as with FDACallback.
        hooks.hook(
            optimizer, "finalize_variable_values", before=functools.partial(self.synchronize, model)
        )
        object.__setattr__(optimizer, "_fda_local", True)


class _MirroredFDAStrategy(FDAStrategy, tf.distribute.MirroredStrategy):
    """`FDAStrategy` over the devices of one process."""

    def _adopt(self, strategy):
        if type(strategy) is not tf.distribute.MirroredStrategy:
            raise TypeError(
                "FDAStrategy wraps a tf.distribute.MirroredStrategy or "
                f"MultiWorkerMirroredStrategy, got {type(strategy).__name__}. For processes "
                "without tf.distribute use keras_fda.FDACallback."
            )
        # A MirroredStrategy over the same devices: Keras then calls this
        # object's `run` for every compiled step.
        tf.distribute.MirroredStrategy.__init__(
            self,
            devices=strategy.extended.worker_devices,
            cross_device_ops=strategy.extended._cross_device_ops,  # None: TF's default
        )


class _MultiWorkerFDAStrategy(FDAStrategy, tf.distribute.MultiWorkerMirroredStrategy):
    """`FDAStrategy` over the replicas of a multi-worker cluster."""

    def _adopt(self, strategy):
        if isinstance(strategy, FDAStrategy):
            raise TypeError("The strategy is already an FDAStrategy.")
        if strategy.extended._container_strategy() is not strategy:
            raise ValueError(
                "This MultiWorkerMirroredStrategy is already taken over by an FDAStrategy "
                "(a process has one collective runtime): use that FDAStrategy."
            )
        # A process can configure TF's collective runtime only once, so this
        # strategy reuses the given one's (as tf.distribute's own deepcopy
        # does) instead of building a second one.
        tf.distribute.Strategy.__init__(self, strategy.extended)
        self.extended._container_strategy_weakref = weakref.ref(self)

    def _agree(self):
        # Each worker builds its own graph from its settings: different ones
        # would join different collectives and hang until the timeout.
        settings = self._settings()
        mine = tf.constant([agreement.fingerprint(text) for _, text in settings], tf.float64)
        per_replica = self.experimental_distribute_values_from_function(lambda _: mine)
        everyone = tf.reshape(
            tf.distribute.Strategy.gather(self, per_replica, axis=0), [-1, len(settings)]
        ).numpy()
        agreement.check(everyone, agreement.setting_checks("FDAStrategy", settings), "replica")

    def reduce(self, reduce_op, value, axis=None):
        # Keras 3.15 under a multi-worker strategy (keras-team/keras#20585)
        # reduces a whole (x, y) batch in one call and scalars along axis 0.
        def reduce_one(v):
            shape = getattr(v, "shape", None)
            scalar = axis is not None and shape is not None and shape.rank == 0
            return super(_MultiWorkerFDAStrategy, self).reduce(
                reduce_op, v, None if scalar else axis
            )

        return tf.nest.map_structure(reduce_one, value)

    def _wrap_model(self, model):
        # Keras builds each epoch's logs (what EarlyStopping, ModelCheckpoint,
        # ReduceLROnPlateau and History see) from the last step's logs: this
        # worker's own. Averaged over the workers once per epoch, every
        # worker's callbacks decide alike and join the same collectives.
        original = model._get_metrics_result_or_logs

        @functools.wraps(original)
        def epoch_logs(logs):
            logs = original(logs)
            if isinstance(logs, dict) and "fda/syncs" in logs:  # a train step's
                logs = self._mean_over_workers(logs)
            return logs

        object.__setattr__(model, "_get_metrics_result_or_logs", epoch_logs)

    def _mean_over_workers(self, logs):
        """`logs` with every value but fda/* (equal everywhere) averaged over the workers."""
        keys = sorted(k for k in logs if not k.startswith("fda/"))
        if not keys:
            return logs
        values = [tf.convert_to_tensor(logs[k]) for k in keys]
        flat = tf.concat([tf.reshape(tf.cast(v, tf.float64), [-1]) for v in values], 0)
        per_replica = self.experimental_distribute_values_from_function(lambda _: flat)
        mean = tf.distribute.Strategy.reduce(
            self, tf.distribute.ReduceOp.MEAN, per_replica, axis=None
        )
        parts = tf.split(mean, [int(v.shape.num_elements()) for v in values])
        logs = dict(logs)
        for key, value, part in zip(keys, values, parts):
            logs[key] = tf.cast(tf.reshape(part, value.shape), value.dtype)
        return logs

    def _train_logs(self, logs):
        # Keras would all-reduce every logged value at every step, the
        # traffic FDA exists to avoid. Each worker logs the mean over its
        # own replicas, marked mirrored: Keras' MEAN reduction then returns
        # it as is (the fda/* values are equal on every worker anyway).
        def local(value):
            results = self.experimental_local_results(value)
            mean = results[0] if len(results) == 1 else tf.reduce_mean(tf.stack(results), 0)
            return distribute_values.Mirrored((mean,))

        return tf.nest.map_structure(local, logs)


def _scale(gradient, factor):
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            gradient.values * tf.cast(factor, gradient.values.dtype),
            gradient.indices,
            gradient.dense_shape,
        )
    return gradient * tf.cast(factor, gradient.dtype)
