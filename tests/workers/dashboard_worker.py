"""The README's multi-worker dashboard recipe, as written there, on each worker.

Started by `python -m keras_fda.launch --workers N tests/workers/dashboard_worker.py LOG_DIR`.
"""

import os
import sys

import keras_fda

cluster = keras_fda.connect()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

log_dir = sys.argv[1]
keras.utils.set_random_seed(cluster.worker_index)  # different data, same model below
x = np.random.normal(size=(256, 6)).astype("float32")
y = (x[:, 0] > 0.3 * cluster.worker_index).astype("int32")
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, "tanh"), keras.layers.Dense(2)])
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

# --- the recipe (README, "Watching FDA in TensorBoard") ---
fda = keras_fda.FDACallback(threshold=0.05, log_dir=log_dir)  # the chief writes the FDA runs
tensorboard = keras.callbacks.TensorBoard(  # each worker its own run: worker0/train, ...
    os.path.join(log_dir, f"worker{cluster.worker_index}"), update_freq=1
)
model.fit(
    tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16),
    epochs=2, steps_per_epoch=10, callbacks=[fda, tensorboard], verbose=0,
)
