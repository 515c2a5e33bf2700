"""K workers in one process: the research driver.

`Simulation` trains K copies of a compiled Keras model, each with its own
weights, optimizer state and data partition, and synchronizes them with the
same `SyncTrigger` objects that `FDACallback` uses across processes. Only the
transport differs: the "all-reduce MEAN" is a mean over the K in-process
copies. One compiled `tf.function` call advances all K workers by one step
(their K Keras `train_step`s; compiled once per `Simulation`), and a second,
small one (an `InProcessEngine`'s check) runs the trigger and, when it
fires, the average; a step
costs about K plain training steps and no Python loop over workers.

Reported accuracy is that of the average of the workers' current models (as
in the FDA paper), evaluated on held-out data a few times per epoch; an epoch
is `total samples / (batch_size * K)` steps.
"""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_fda import partition as partition_lib
from keras_fda.runtime import transport as transport_lib
from keras_fda.policies import outer as outer_lib
from keras_fda.policies import triggers as triggers_lib
from keras_fda.engine.in_process import InProcessEngine
from keras_fda.drivers.history import SimulationHistory
from keras_fda.drivers.tensorboard import Dashboard, write_row


class _Worker:
    """One simulated worker: a clone of the model with its own optimizer."""

    def __init__(self, model, average_non_trainable):
        self.model = keras.models.clone_model(model)
        optimizer = type(model.optimizer).from_config(model.optimizer.get_config())
        # Only the loss: the averaged model is what gets evaluated, so
        # per-worker metrics would cost time each step and show nothing.
        self.model.compile(optimizer=optimizer, loss=model.loss)
        self.model.optimizer.build(self.model.trainable_variables)
        monitored, extra = outer_lib.synchronized_weights(self.model, average_non_trainable)
        self.monitored = [v.value for v in monitored]
        self.extra = [v.value for v in extra]
        # Restored at each run: the iteration count, moments and (a variable
        # in Keras 3) the learning rate as the user configured them.
        self._fresh_optimizer = [v.numpy() for v in self.model.optimizer.variables]

    def reset(self, weights):
        self.model.set_weights(weights)
        for v, value in zip(self.model.optimizer.variables, self._fresh_optimizer):
            v.assign(value)
        self.model.reset_metrics()


class Simulation:
    """Trains K workers in one process and synchronizes them with a `SyncTrigger`.

    Each worker is a clone of `model` with its own weights, its own copy of
    the model's optimizer (state stays local, as in the paper, unless
    `run(optimizer_state=...)` says otherwise) and its own data partition.
    After every step the trigger decides, exactly as `FDACallback` does
    across processes, whether the workers synchronize; what a sync sends and
    does (`sync_dtype`, `outer_optimizer`) is `keras_fda.outer.SyncRule`'s,
    as in the other drivers. The compiled training step is kept between `run`
    calls, so one `Simulation` serves a sweep over triggers and thresholds.

    Memory: K copies of the weights and optimizer state, plus one reference
    copy of the weights (and for the linear estimator one direction vector;
    for the sketch estimator `4 * depth` bytes per parameter of hash ids).

    Args:
        model: a built Keras model compiled with an optimizer and a loss (and
            the metrics to evaluate, e.g. "accuracy"). It must be clonable by
            `keras.models.clone_model` (Sequential or functional). Runs start
            from its weights as they are now; after a run it holds the
            workers' model after the final sync (their plain average).
        num_workers: K, an integer >= 1.
        average_non_trainable: also average non-trainable float weights
            (BatchNorm statistics) of the layers that train at each
            synchronization, as `FDACallback` does by default; frozen layers
            are left as they are. The evaluated model always gets the average.

    Example:

    ```python
    from keras_fda import partition
    from keras_fda.drivers.simulation import Simulation

    model = make_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    sim = Simulation(model, num_workers=10)
    parts = partition.iid(len(x), num_workers=10)
    history = sim.run(keras_fda.FDA("linear", threshold=2.5), x, y, parts,
                      epochs=5, validation_data=(x_test, y_test))
    print(history.first_reaching("accuracy", 0.9))
    ```
    """

    def __init__(self, model, num_workers, *, average_non_trainable=True):
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
        if not getattr(model, "compiled", False) or model.optimizer is None or model.loss is None:
            raise ValueError(
                "Simulation needs a model compiled with an optimizer and a loss: call "
                "model.compile(optimizer=..., loss=..., metrics=[...]) first."
            )
        if not model.built or not model.trainable_variables:
            raise ValueError(
                "Simulation needs a built model with trainable weights: give it an Input "
                "shape or call model.build() first."
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}.")
        self.model = model
        self.num_workers = num_workers
        self._initial_weights = model.get_weights()
        self._workers = [_Worker(model, average_non_trainable) for _ in range(num_workers)]
        first = self._workers[0]
        self.num_params = sum(int(v.shape.num_elements()) for v in first.monitored + first.extra)
        # Evaluation averages every float weight into `model`, whatever is
        # averaged during training.
        self._eval_pairs = [
            (target, [w.model.weights[i] for w in self._workers])
            for i, target in enumerate(model.weights)
            if target.dtype.startswith("float")
        ]
        # Compiled once per Simulation and reused by every run: the K train
        # steps are the large graph, and tracing and optimizing it again for
        # each trigger of a sweep cost seconds per run. The trigger's check is
        # a second, small compiled call per run (`InProcessEngine.check`).
        self._train_step = tf.function(self._train_all)

    def _train_all(self, x_data, y_data, indices):
        """One local step on every worker; returns the mean of their running losses."""
        x, y = tf.gather(x_data, indices), tf.gather(y_data, indices)
        losses = [w.model.train_step((x[k], y[k]))["loss"] for k, w in enumerate(self._workers)]
        return tf.add_n(losses) / self.num_workers

    def _build_step(self, trigger, x_data, y_data, rule, lag=0):
        """The step of one run: K local steps, then the engine's check (maybe a sync by `rule`).

        Returns the step function and the run's `InProcessEngine`.
        """
        workers = self._workers
        # In the order of the drifts the engine gives the trigger.
        trigger.watch(*[w.model.optimizer for w in workers])
        engine = InProcessEngine(
            trigger, [w.monitored for w in workers], [w.extra for w in workers],
            [outer_lib.moment_variables(w.model.optimizer) for w in workers], rule, lagged=lag,
        )

        def step(indices):
            # Eager calls run in order: the check sees the weights after the K steps.
            loss = self._train_step(x_data, y_data, indices)
            statistic, synced = engine.check()
            return statistic, synced, loss

        return step, engine

    def _reset(self):
        for w in self._workers:
            w.reset(self._initial_weights)

    def _evaluate(self, validation_data, batch_size):
        for target, copies in self._eval_pairs:
            target.assign(transport_lib.mean([v.value for v in copies]))
        if validation_data is None:
            return {}
        x_val, y_val = validation_data
        return self.model.evaluate(x_val, y_val, batch_size=batch_size, verbose=0, return_dict=True)

    def run(
        self,
        trigger,
        x,
        y,
        partitions,
        *,
        batch_size=32,
        epochs=1,
        steps=None,
        evaluations_per_epoch=1,
        validation_data=None,
        eval_batch_size=1024,
        seed=0,
        repartition=None,
        sync_dtype=None,
        outer_optimizer=None,
        optimizer_state="local",
        error_feedback=True,
        lag=0,
        csv_path=None,
        tensorboard_dir=None,
        verbose=0,
    ):
        """Trains the K workers from the initial weights and returns a `SimulationHistory`.

        Every run starts from `model`'s weights at construction time and from
        fresh optimizer states, so runs of different triggers compare fairly.

        Args:
            trigger: a `keras_fda.SyncTrigger` (`FDA`, `Synchronous`,
                `Periodic`, `Kamp` or a custom one).
            x, y: the training data (numpy arrays or tensors indexable by the
                partitions), held in memory.
            partitions: K index arrays into `x`/`y`, one per worker
                (see `keras_fda.partition`).
            batch_size: samples per worker per step.
            epochs: epochs to train; an epoch is `len of all partitions //
                (batch_size * K)` steps.
            steps: total steps instead of `epochs`.
            evaluations_per_epoch: how often per epoch the averaged model is
                evaluated on `validation_data` (more often gives finer
                steps-to-target figures).
            validation_data: `(x_val, y_val)` for the averaged model, or None.
            eval_batch_size: batch size of the evaluation.
            seed: seed of every worker's data order (see `keras_fda.partition.batch_schedule`).
            repartition: concept drift: a dict `{step: partitions}`; from
                that step on, the workers train on these K index arrays (e.g.
                `{n // 2: parts[1:] + parts[:1]}` hands each worker its
                neighbour's data at mid-run). Epoch length stays that of
                `partitions`.
            sync_dtype: what a sync sends: None (the weights, as they
                are averaged), or "float32", "bfloat16", "float16": the
                drift `w_k - w0` in that dtype when it is narrower (see
                `keras_fda.outer.SyncRule`). The simulated all-reduce adds
                in that dtype, as TensorFlow's collectives do. "int8" or
                "int4": the drift quantized in blocks with error feedback,
                gathered and averaged in worker order.
            outer_optimizer: None, "nesterov" (DiLoCo's
                `keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)`),
                or a Keras optimizer applied to `w0` at each sync with the
                negative mean drift as its gradient; a fresh copy per run.
                The evaluations are of the plain average of the workers'
                models at that step; the model a run leaves has had the
                final syncs a fit with `FDACallback` ends with: the pending
                decision (with the outer step), then a plain average if the
                workers trained since the last sync.
            optimizer_state: "local" (each worker keeps its optimizer's
                moments), "average" (averaged at each sync) or "reset"
                (zeroed at each sync).
            error_feedback: with sync_dtype "int8" or "int4", whether each
                worker adds what its last quantization dropped to its next
                sync's drift (default True; False only to measure what it buys).
            lag: 0 (default) decides on the state of the same step, as
                `FDAStrategy` and `FDACallback(overlap=False)` do; 1 decides
                on the previous step's state (composed after that step's
                sync), as `FDACallback`'s default overlapped exchange does.
            csv_path: if given, the evaluations are written there as CSV.
            tensorboard_dir: if given, the FDA dashboard of
                `keras_fda.tensorboard.Dashboard` (per step, in the run
                `<dir>/fda`) and the evaluations (scalars `simulation/*`, in
                `<dir>/simulation`) are written there.
            verbose: 1 prints one line per evaluation.

        Returns:
            A `SimulationHistory`.
        """
        if not isinstance(trigger, triggers_lib.SyncTrigger):
            raise TypeError(
                f"trigger must be a keras_fda.SyncTrigger such as keras_fda.FDA('linear', "
                f"threshold=2.5), got {trigger!r}."
            )
        if lag not in (0, 1) or isinstance(lag, bool):
            raise ValueError(
                f"lag must be 0 (decide on the same step) or 1 (on the previous step, as "
                f"FDACallback's overlapped exchange), got {lag!r}."
            )
        rule = outer_lib.SyncRule(
            sync_dtype=sync_dtype, outer_optimizer=outer_optimizer, optimizer_state=optimizer_state,
            error_feedback=error_feedback,
        )
        partitions = partition_lib.checked(partitions)
        if len(partitions) != self.num_workers:
            raise ValueError(
                f"Got {len(partitions)} partitions for {self.num_workers} workers; pass one "
                "index array per worker."
            )
        if batch_size < 1 or evaluations_per_epoch < 1:
            raise ValueError("batch_size and evaluations_per_epoch must be >= 1.")
        total = sum(len(p) for p in partitions)
        steps_per_epoch = max(1, total // (batch_size * self.num_workers))
        num_steps = int(steps) if steps is not None else int(epochs * steps_per_epoch)
        if num_steps < 1:
            raise ValueError("Nothing to train: epochs or steps must be positive.")
        eval_every = max(1, steps_per_epoch // evaluations_per_epoch)
        eval_steps = sorted({0, num_steps, *range(eval_every, num_steps, eval_every)})

        schedule = partition_lib.batch_schedule(
            partitions, batch_size, num_steps, seed, repartition
        )
        self._reset()
        step, engine = self._build_step(
            trigger, tf.convert_to_tensor(x), tf.convert_to_tensor(y), rule, lag
        )
        writer = dashboard = None
        if tensorboard_dir:
            writer = tf.summary.create_file_writer(os.path.join(tensorboard_dir, "simulation"))
            dashboard = Dashboard(os.fspath(tensorboard_dir))
        history = SimulationHistory(
            trigger=trigger.name or type(trigger).__name__,
            threshold=float(trigger.threshold),
            num_workers=self.num_workers,
            num_params=self.num_params,
            state_bytes=trigger.state_bytes,
            steps_per_epoch=steps_per_epoch,
            evaluations={},
            statistic=np.zeros(num_steps, np.float32),
            synced=np.zeros(num_steps, bool),
            step_seconds=np.zeros(num_steps),
            sync_bytes=engine.sync_state.sync_bytes(
                self.num_params, engine.moments, param_bytes=4
            ),
            gathered_bytes=engine.sync_state.gathered_bytes(),
        )
        rows = []
        train_loss = math.nan
        for t in range(num_steps + 1):
            if t in eval_steps:
                # Before the final sync: the row evaluates the plain average
                # (with an outer optimizer the final model is another).
                metrics = self._evaluate(validation_data, eval_batch_size)
                if t == num_steps:
                    # Counted in the last row: that sync's all-reduce is what
                    # yields the average the row evaluates.
                    history.final_syncs = engine.finish()
                row = history.evaluation_row(t, train_loss, metrics)
                rows.append(row)
                # Each worker's loss tracker then averages over one evaluation period.
                for w in self._workers:
                    w.model.reset_metrics()
                if writer:
                    write_row(writer, row, "simulation/")
                if verbose:
                    print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
            if t == num_steps:
                if dashboard and history.final_syncs:
                    # As FDACallback's dashboard: the final sync at the last step.
                    dashboard.record(
                        history.communication(), statistic=float(history.statistic[-1]),
                        threshold=history.threshold, synced=True, force=True,
                    )
                self._evaluate(None, eval_batch_size)  # leaves the final model in self.model
                break
            start = time.perf_counter()
            statistic, synced, loss = step(schedule[t])
            history.statistic[t] = statistic.numpy()
            history.synced[t] = synced.numpy()
            train_loss = float(loss)
            history.step_seconds[t] = time.perf_counter() - start
            if dashboard:
                dashboard.record(
                    history.communication(t + 1), statistic=float(history.statistic[t]),
                    threshold=history.threshold, synced=history.synced[t],
                )
        history.evaluations = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        if csv_path:
            history.to_csv(csv_path)
        if writer:
            writer.close()
            dashboard.close()
        return history


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def simulate(model, trigger, x, y, partitions, **kwargs):
    """Runs one `Simulation` of `len(partitions)` workers; see `Simulation.run` for kwargs.

    Example:

    ```python
    from keras_fda.drivers.simulation import simulate

    history = simulate(model, keras_fda.FDA("linear", threshold=2.5),
                       x, y, partition.iid(len(x), 10),
                       epochs=5, validation_data=(x_test, y_test))
    ```
    """
    return Simulation(model, len(partitions)).run(trigger, x, y, partitions, **kwargs)
