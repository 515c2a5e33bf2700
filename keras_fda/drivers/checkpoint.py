"""How `FDACallback`'s averaging state rides in Keras' weight files, and which one a run resumes."""

import keras
import numpy as np
from absl import logging


class CheckpointedState(keras.layers.Layer):
    """Carries `WorkerAverager.state_variables()` in the model's weight files.

    Attached to the model only while `fit` runs, so the checkpoints written
    during training (`BackupAndRestore`, `ModelCheckpoint`) can resume FDA,
    while a model saved after `fit` holds only its own weights. Restoring
    sets `restored`: each worker then resumes from its own saved weights and
    FDA state instead of taking worker 0's weights.
    """

    def __init__(self, variables):
        super().__init__(name="fda_state", trainable=False)
        # A plain attribute would be tracked as Keras weights; these are tf.Variables.
        object.__setattr__(self, "_state", list(variables))
        self.restored = False
        self.built = True

    def save_own_variables(self, store):
        for i, variable in enumerate(self._state):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        if not len(store.keys()):
            # Weights saved without FDA (pretrained, or after a fit): the
            # model's weights load, the FDA state stays as it is.
            return
        if len(store.keys()) != len(self._state):
            raise ValueError(
                f"The checkpoint's FDA state has {len(store.keys())} variables, this "
                f"FDACallback has {len(self._state)}: it was saved with another model "
                "or trigger. Use a fresh backup directory."
            )
        for i, variable in enumerate(self._state):
            variable.assign(store[str(i)])
        self.restored = True


def resume_source(resumed, can_choose=True):
    """The worker whose restored state every worker resumes from.

    Workers restored from backups of different steps (one crashed between
    the workers' epoch-end saves, or before its first save) cannot go back,
    but the ones behind can catch up: they take the most advanced worker's
    weights and state and start at its epoch.

    Args:
        resumed: `agree_on_run`'s rows `[resumed_step, initial_epoch]`.
        can_choose: whether the driver can move the workers behind to
            another epoch; if not, different steps are a `ValueError`.

    Returns:
        None if no worker restored anything, -1 if all restored the same
        step, else the index of the most advanced worker.
    """
    steps, epochs = resumed[:, 0], resumed[:, 1]
    if (steps == -1).all():
        return None
    if (steps == steps[0]).all():
        return -1
    leader = int(np.argmax(steps))
    if not can_choose:
        raise ValueError(
            f"Workers disagree on the step they resumed from: {steps.tolist()} (worker 0, 1, "
            "...; -1: not resumed): a worker stopped between the workers' BackupAndRestore "
            "saves. FDACallback can resume them from the most advanced worker's backup only "
            "if fit() keeps its default History callback at the end of the callback list; "
            "otherwise delete the backups and restart."
        )
    logging.warning(
        "keras_fda: the workers' backups are from different steps %s (worker 0, 1, ...; "
        "-1: none): worker %d's backup (step %d, epoch %d) is the latest; every worker "
        "resumes from its weights and FDA state.",
        steps.tolist(), leader, steps[leader], epochs[leader],
    )
    return leader
