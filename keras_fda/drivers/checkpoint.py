"""How `FDACallback`'s averaging state rides in Keras' weight files during `fit`."""

import keras


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
