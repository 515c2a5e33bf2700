"""`FDACallback`: Federated Dynamic Averaging for `model.fit` across worker processes."""

import math

import keras
import tensorflow as tf
from absl import logging

from keras_fda.runtime import agreement
from keras_fda.runtime import cluster as cluster_lib
from keras_fda.policies import outer as outer_lib
from keras_fda.policies import triggers as triggers_lib
from keras_fda.engine.averager import WorkerAverager
from keras_fda.engine.exchange import StateExchange
from keras_fda.drivers import hooks
from keras_fda.drivers.checkpoint import CheckpointedState, resume_source
from keras_fda.drivers.model_checks import check_model
from keras_fda.drivers.tensorboard import Dashboard, standardize_update_freq

# Model methods that give the model new weights from outside training.
_WRITERS = ("set_weights", "load_weights")


class FDACallback(keras.callbacks.Callback):
    """Averages the workers' models when they drift apart (or on another trigger).

    Each worker runs `model.fit` on its own data with a model compiled outside
    any strategy scope, so every step is purely local. After each step the
    callback computes a few bytes of local state from the model's drift since
    the last synchronization, all-reduces them across the workers, and averages
    the full weights only when the trigger fires (for FDA: when the variance
    estimate strictly exceeds `threshold`). This work runs inside the compiled
    function `fit` calls for each step (the callback wraps it for the fit), so
    a step between syncs costs about a local step: the other callbacks'
    `on_train_batch_end` see the weights after FDA acted, and weights a
    callback changes there are seen by the next step's FDA part.

    What is averaged: the trainable weights and, if `average_non_trainable`,
    the non-trainable float weights of the layers that train (BatchNorm
    moving statistics); frozen layers are never sent or touched (see
    `keras_fda.outer.synchronized_weights`). Optimizer state (Adam moments,
    momentum) stays local on each worker, as in the paper, unless
    `optimizer_state` says otherwise.

    Before the first step the workers check that they agree on the number of
    steps per epoch, on the model and on the FDA settings (trigger, sync
    rule, overlap, `exchange_every`, `average_non_trainable`, the optimizer's
    class), and take worker 0's initial weights. If
    one worker's `fit` ends early (its data ran out, or a callback stopped it),
    the others stop after their next step instead of hanging. At train end the
    workers synchronize once more, after every other callback's
    `on_train_end` (e.g. `EarlyStopping(restore_best_weights=True)`), in
    whichever order the callbacks are listed, so every worker leaves `fit`
    with identical weights; weights a callback set during `fit` are averaged
    plainly, without an outer optimizer's step.

    During `fit` the FDA state (reference weights, direction, counters) is
    part of the model's weight files, so `keras.callbacks.BackupAndRestore`
    resumes it; workers whose backups are from different steps (one died
    between the workers' saves) all resume from the most advanced one. A
    model saved after `fit` holds only its own weights, and weights saved
    without FDA load as usual. Several fits of one model continue the same
    counters and `communication` totals.

    Weights may be float32, float64, float16 or bfloat16: they are averaged
    in float32, or float64 if any weight is float64.

    Logs: every batch and epoch gets `fda/variance` (the trigger's statistic:
    the variance estimate for FDA), `fda/threshold`, `fda/syncs` and
    `fda/comm_bytes` (paper-formula bytes so far, whole cluster). Place this
    callback before `CSVLogger` or `TensorBoard` so that they see these keys.

    Args:
        threshold: Theta (FDA syncs when the estimate is strictly greater), or
            "auto": an `AutoFDA` trigger that sets and adapts it (see its docs).
            The paper's best values grow with the model size d (about 4e-5 * d).
        variant: the variance estimator: "linear" (default), "naive",
            "sketch", "exact", or a `keras_fda.estimators.VarianceEstimator`
            instance (e.g. `SketchEstimator(depth=5, width=250)`).
        trigger: None for FDA, or "synchronous", "periodic", "kamp", or a
            `keras_fda.triggers.SyncTrigger`. Arguments the chosen trigger
            does not use (`threshold`, `variant`, `tau`) are a `ValueError`.
        tau: steps between syncs for the "periodic" trigger.
        average_non_trainable: also average non-trainable float weights at each
            sync (default True; the paper did not).
        log_dir: if set, the chief writes the TensorBoard dashboard (variance
            vs threshold, FDA vs synchronous bytes, syncs, round lengths) to
            `<log_dir>/fda`; it can share `log_dir` with
            `keras.callbacks.TensorBoard`. See `keras_fda.tensorboard`.
        update_freq: write the dashboard every this many steps (an int), or
            "epoch" for once per epoch.
        overlap: all-reduce each step's state while the next step trains
            (default True): the next step's graph starts the all-reduce with
            nothing of the step as its input. The decision on step t's state
            is then applied after step t+1 (a one-step lag; all workers still
            decide alike), and a step no longer waits for a network round
            trip shorter than itself. False restores the blocking exchange
            (decision after the same step). Stateless triggers (periodic,
            synchronous) send nothing between syncs either way.
        exchange_every: with `overlap`, exchange the state every this many
            steps (an int >= 1), for links whose round trip is longer than a
            step; the decision then lags this many steps, and from 2 on the
            all-reduce runs in the background across the steps in between.
            "auto" sets it from what the workers measure: the lag that hides
            the exchange's round trip, and at least the lag that keeps FDA's
            work per message (the local state's pass over the weights) within
            5% of the steps' compute. Each message carries
            the lag its worker wants (4 bytes); all workers take the mean of
            the all-reduced values, so all of them switch at the same step.
            None (default): "auto" for an overlapped exchange among several
            workers, so that neither a slow link nor a small model pays
            FDA's work on every step (where both are cheap, the lag stays
            1); 1 otherwise. Pass 1 for decisions that do not depend on
            timing (reproducible runs).
        sync_dtype: what a sync all-reduces: None (the weights in float32,
            or float64), or "float32", "bfloat16", "float16": the drift
            `w_k - w0` in that dtype (2 bytes per parameter for the half
            types) while `w0` stays full precision; "int8" or "int4": the
            drift quantized in blocks with error feedback (about 1.06 and
            0.56 bytes per parameter), all-gathered. See `keras_fda.SyncRule`.
        outer_optimizer: None (the plain average), "nesterov", or a Keras
            optimizer applied to `w0` at each sync with the negative mean
            drift as its gradient: "nesterov" is DiLoCo's
            `keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)` (with
            `threshold="auto"`, the recommended setting), `SGD(1.0,
            momentum=0.9)` is FedAvgM, `Adam(...)` FedAdam. Its state is
            identical on every worker, sends nothing, and is checkpointed
            with the FDA state. It steps at the syncs the trigger decides;
            the final sync at train end is a plain average.
        optimizer_state: the workers' optimizer moments at a sync: "local"
            (default, kept), "average" (averaged, counted in the bytes) or
            "reset" (zeroed). A recompile with a new optimizer then starts a
            new FDA state (counters included).
        error_feedback: with sync_dtype "int8" or "int4", whether each
            worker adds what its last quantization dropped to its next
            sync's drift (default True; False only to measure what it buys).
        cluster: the `keras_fda.Cluster`; defaults to the one `keras_fda.connect()`
            joined (a single local worker without TF_CONFIG).

    Attributes:
        communication: after (or during) training, a
            `keras_fda.CommunicationStats` with the paper-formula and wire bytes.

    Example:

    ```python
    cluster = keras_fda.connect()   # first line of the program
    model = make_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    fda = keras_fda.FDACallback(threshold="auto", outer_optimizer="nesterov")
    model.fit(dataset.repeat(), epochs=5, steps_per_epoch=200, callbacks=[fda])
    print(fda.communication.summary())
    ```
    """

    # Must run synchronously between training steps: it reads and writes the
    # weights and joins collectives in step order.
    async_safe = False

    def __init__(
        self,
        threshold=None,
        variant=None,
        *,
        trigger=None,
        tau=None,
        average_non_trainable=True,
        log_dir=None,
        update_freq=1,
        overlap=True,
        exchange_every=None,
        sync_dtype=None,
        outer_optimizer=None,
        optimizer_state="local",
        error_feedback=True,
        cluster=None,
    ):
        super().__init__()
        self.trigger = triggers_lib.get(trigger, threshold=threshold, variant=variant, tau=tau)
        self.sync_rule = outer_lib.SyncRule(
            sync_dtype=sync_dtype, outer_optimizer=outer_optimizer, optimizer_state=optimizer_state,
            error_feedback=error_feedback,
        )
        StateExchange.check(exchange_every, overlap, self.trigger)
        self.overlap = bool(overlap)
        self.exchange_every = exchange_every
        self.average_non_trainable = bool(average_non_trainable)
        self.log_dir = log_dir
        self.update_freq = standardize_update_freq(update_freq)
        self._dashboard = None
        self._cluster = cluster
        self._averager = None
        self._checkpoint = None
        self._started = False
        self._last_statistic = math.nan
        self._peer_stopped = False
        self._owner = None
        self._began = False
        self._ended = False
        self._end_deferred = False
        self._exchange = None

    @property
    def cluster(self):
        if self._cluster is None:
            self._cluster = cluster_lib.current()
        return self._cluster

    @property
    def communication(self):
        if self._averager is None:
            raise ValueError("No communication yet: FDACallback has not been used in fit().")
        return self._averager.communication()

    def _check_model(self):
        model = self.model
        check_model(model, "FDACallback")
        if isinstance(model.trainable_weights[0].value, tf.distribute.DistributedValues):
            raise ValueError(
                "FDACallback needs a model built outside any tf.distribute strategy "
                "scope (its weights must be local). Build the model without "
                "strategy.scope(), or use keras_fda.FDAStrategy for in-graph replicas."
            )

    def _settings(self):
        """The settings every worker must share, as `(name, description)` pairs.

        A worker that decides or averages differently would join other
        collectives than its peers and hang until the timeout.
        """
        return [
            ("trigger", triggers_lib.describe(self.trigger)),
            *self.sync_rule.describe(),
            ("overlap", repr(self.overlap)),
            ("exchange_every", repr(self.exchange_every)),
            ("average_non_trainable", repr(self.average_non_trainable)),
            ("the model's optimizer class", outer_lib.describe_optimizer(self.model.optimizer)),
        ]

    def _collective(self, where):
        """Bounds the collectives inside by the cluster's timeout (`where` may name {step})."""

        def described():
            return where.format(step=int(self._averager.steps.numpy()) if self._averager else 0)

        return cluster_lib.bounded(self.cluster.transport, described)

    def set_model(self, model):
        super().set_model(model)
        if not model.built:
            return
        trainable, extra = outer_lib.synchronized_weights(model, self.average_non_trainable)
        trainable, extra = [w.value for w in trainable], [w.value for w in extra]
        self.trigger.watch(model.optimizer)
        moments = []
        if self.sync_rule.optimizer_state != "local" and model.optimizer is not None:
            if not model.optimizer.built:
                # Keras would build it at the first step, after the averager's variables.
                model.optimizer.build(model.trainable_variables)
            moments = outer_lib.moment_variables(model.optimizer)
        every = self.exchange_every
        if every is None:
            every = "auto" if self.cluster.transport.num_workers > 1 else 1
        auto = self.overlap and every == "auto"
        same = self._averager is not None and self._owner is model and [
            id(v) for v in self._averager.averaged + self._averager.moments
        ] == [id(v) for v in trainable + extra + moments]
        if not same:
            # Kept across fits of the same model: the counters, communication
            # totals and dashboard steps go on, and the step is not retraced.
            self._averager = WorkerAverager(
                self.trigger, self.cluster.transport, trainable, extra, self.sync_rule, moments,
                timed=auto,
            )
            self._checkpoint = CheckpointedState(self._averager.state_variables())
            self._owner = model
            self._step_function = None
        # Only a trigger with a state (built with the averager) has a per-step
        # exchange to overlap.
        self._exchange = StateExchange(
            self._averager, self.overlap and self.trigger.state_size > 0, every
        )
        self._checkpoint.restored = False
        # Found by Keras' weight saving (which walks the model's attributes), so
        # checkpoints written during fit (BackupAndRestore, ModelCheckpoint)
        # carry the FDA state. Set without Keras' layer tracking: the model's
        # layers and weights stay exactly what the user built. Removed at
        # train end.
        object.__setattr__(model, "_fda_state", self._checkpoint)
        # Weights set after training started (EarlyStopping's
        # restore_best_weights, a callback's load_weights) make the next
        # sync a plain average of them: see `WorkerAverager._adopt`.
        for name in _WRITERS:
            if name not in vars(model):
                hooks.hook(model, name, after=self._mark_replaced)
        self._started = self._began = self._ended = self._end_deferred = False
        # Keras hands the fit's History to the model before any callback's
        # set_model and calls it after the callbacks the user listed: hooked
        # there, the start and the final sync see every other callback's
        # on_train_begin (BackupAndRestore's restore) and on_train_end
        # (EarlyStopping's restore_best_weights), whatever the list's order.
        history = getattr(model, "history", None)
        if isinstance(history, keras.callbacks.History):
            hooks.run_once_after(history, "on_train_begin", lambda logs: self._start(True))
            hooks.run_once_after(history, "on_train_end", self._end_after_all_callbacks)
            self._end_deferred = True

    def _mark_replaced(self):
        if self._started and self._averager is not None:
            self._averager.replaced.assign(1.0)

    def _detach(self):
        """Leaves the model as the user built it (no FDA state, no hooks)."""
        vars(self.model).pop("_fda_state", None)
        keras_function = getattr(self.model.train_function, "_fda_keras", None)
        if keras_function is not None:
            self.model.train_function = keras_function
        hooks.unhook(self.model, _WRITERS)

    def on_test_end(self, logs=None):
        # evaluate(callbacks=[fda]) outside a fit: set_model attached the
        # state, and no train end will remove it.
        if not self._began:
            self._detach()

    on_predict_end = on_test_end

    def on_train_begin(self, logs=None):
        self._check_model()
        self._peer_stopped = False
        self._began = True
        if self.log_dir is not None and self.cluster.is_chief:
            self._dashboard = Dashboard(self.log_dir, self.update_freq)
        self._wrap_train_function()

    def _start(self, can_change_epoch):
        """Agrees on the run and starts every worker from the same weights and state."""
        if self._started or not self._began:
            return
        with self._collective("at train begin"):
            initial_epoch = getattr(self.model, "_initial_epoch", None)
            resumed = agreement.agree_on_run(
                self.cluster.transport, self._averager.averaged, self._settings(),
                steps=self.params.get("steps"), epochs=self.params.get("epochs", 1),
                resumed_step=int(self._averager.steps.numpy()) if self._checkpoint.restored else -1,
                initial_epoch=-1 if initial_epoch is None else int(initial_epoch),
            )
            source = resume_source(resumed, can_change_epoch)
            if source is None:
                self._averager.broadcast()
            elif source >= 0:
                self._averager.adopt(source)
                epoch = int(resumed[source, 1])
                self.model._initial_epoch = epoch if epoch >= 0 else None
        self._started = True
        if self._dashboard is not None:
            self._dashboard.last_sync = int(
                self._averager.steps.numpy() - self._averager.steps_since_sync.numpy()
            )

    def on_train_batch_begin(self, batch, logs=None):
        self._batch = batch
        # Without the History hook: deferred to the first step so that every
        # callback's on_train_begin has run, BackupAndRestore's restore included.
        self._start(False)

    def _record(self, logs, synced=False, force=False, counters=None):
        """Puts the fda/* values into Keras' logs and, on the chief, the dashboard.

        `counters` (a step's result) spares reading the counters again.
        """
        if counters is None:
            stats = self.communication
        else:
            stats = self._averager.communication(
                **{k: int(counters[k]) for k in ("steps", "syncs", "exchanges")}
            )
        if logs is not None:
            logs["fda/variance"] = self._last_statistic
            logs["fda/threshold"] = self.trigger.threshold
            logs["fda/syncs"] = stats.syncs
            logs["fda/comm_bytes"] = float(stats.paper_bytes)
        if self._dashboard is not None:
            self._dashboard.record(
                stats, statistic=self._last_statistic, threshold=self.trigger.threshold,
                synced=synced, force=force,
            )

    def on_train_batch_end(self, batch, logs=None):
        self._exchange.step_ended()
        result = self._result
        self._check(result)
        self._record(logs, synced=result["synced"], counters=result)

    def _wrap_train_function(self):
        """Puts the per-step FDA work into the function `fit` calls for each step.

        Keras has just built `model.train_function`; it is replaced, for this
        fit, by `_train_function`, which runs the training step and FDA's
        step in one compiled call (see `_build_step_function`). The wrapper
        hands the call back to Keras' own function once this fit is over,
        even one ended by an error, so a later fit without the callback
        trains as usual.
        """
        model = self.model
        keras_function = getattr(model.train_function, "_fda_keras", model.train_function)
        if self._step_function is None or self._step_function_for is not keras_function:
            self._step_function = self._build_step_function()
            self._step_function_for = keras_function

        history = getattr(model, "history", None)

        def train_function(iterator):
            # Another fit (this one ended by an error, or a later one without
            # the callback) gets Keras' own function back.
            if self._ended or getattr(model, "history", None) is not history:
                model.train_function = keras_function
                return keras_function(iterator)
            return self._train_function(iterator)

        train_function._fda_keras = keras_function
        model.train_function = train_function

    def _build_step_function(self):
        """The model's training step and FDA's step in one compiled call (see `fused_step`)."""
        model = self.model
        train_step = model.train_step
        if model.jit_compile and not model.run_eagerly:
            # XLA compiles the training alone; the collectives stay outside it.
            train_step = tf.function(train_step, jit_compile=True, reduce_retracing=True)
        return self._averager.fused_step(train_step, self.overlap, compiled=not model.run_eagerly)

    def _train_function(self, iterator):
        """One step of `fit`: the compiled step and its state exchange."""
        with self._collective("after step {step}"):
            logs, self._result = self._exchange.step(
                self._step_function, iterator,
                epoch_ends=self._batch + 1 == self.params.get("steps"),
            )
        return logs

    def _check(self, result):
        """Raises on NaN/Inf; stops this worker if another one stopped."""
        if bool(result["exchanged"]):
            self._last_statistic = float(result["statistic"])
        if not bool(result["healthy"]):
            what = (
                "average of the workers' weights"
                if math.isfinite(self._last_statistic)
                else f"{self.trigger.name} statistic (fda/variance)"
            )
            raise FloatingPointError(
                f"FDA stopped training at step {int(self._averager.steps.numpy())}: the "
                f"{what} is NaN or Inf, so nothing was averaged. A worker's training "
                "diverged: lower the learning rate, clip gradients, or check its data."
            )
        if not bool(result["peers_active"]) and not self._peer_stopped:
            self._peer_stopped = True
            # Another worker ended fit (its data ran out, or a callback such as
            # EarlyStopping stopped it); going on alone would leave it out.
            self.model.stop_training = True
            logging.warning(
                "keras_fda: another worker stopped training; stopping this worker "
                "after step %d and synchronizing.", int(self._averager.steps.numpy())
            )

    def on_epoch_end(self, epoch, logs=None):
        self._record(logs, force=self.update_freq == "epoch")

    def on_train_end(self, logs=None):
        self._ended = True
        if not self._end_deferred:
            self._finish(logs)

    def _end_after_all_callbacks(self, logs):
        self._end_deferred = False
        if self._ended:
            self._finish(logs)

    def _finish(self, logs):
        """The final synchronization: every worker leaves fit with the same weights."""
        self._detach()
        with self._collective("of the final synchronization at train end"):
            # The last exchanged state's decision: the workers still
            # training apply it after their next step, in the same collective.
            settled = self._exchange.settle()
            if settled is not None:
                self._check(settled)
                if bool(settled["synced"]):
                    self._record(None, synced=True)
            # A worker that already saw a peer stop must not announce its own
            # stop: the others are no longer stepping and would not answer it.
            force = self._peer_stopped or any(bool(x) for x in self._averager.stop().values())
            result = self._averager.finish(force)
        if not bool(result["healthy"]):
            raise FloatingPointError(
                "FDA's final synchronization at train end found NaN or Inf in the "
                "average of the workers' weights, so the workers keep their own weights. "
                "A worker's training diverged: lower the learning rate or clip gradients."
            )
        self._record(logs, synced=bool(result["synced"]), force=True)
        if self._dashboard is not None:
            self._dashboard.close()
            self._dashboard = None

