"""FDA as a tf.distribute strategy on a cluster: `FDAStrategy` over `MultiWorkerMirroredStrategy`.

For programs already written for `tf.distribute`. Run it on 2 local workers
(no download: scikit-learn's bundled handwritten digits):

    python -m keras_fda.launch --workers 2 examples/strategy_cluster.py

Each worker trains on its own non-IID share (the training set sorted by label
and cut into contiguous pieces), fed with `distribute_datasets_from_function`,
so no worker reads another's data. The chief writes the FDA dashboard with
`--tensorboard_dir=logs`.
"""

import tensorflow as tf

# TF configures its collective runtime once, before any other op.
base_strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_fda  # noqa: E402
from keras_fda import partition  # noqa: E402

flags.DEFINE_integer("epochs", 10, "Epochs (one epoch: the worker's share of the data once).")
flags.DEFINE_integer("batch_size", 32, "Batch size per replica.")
flags.DEFINE_float("threshold", 1.5, "FDA threshold Theta on the variance estimate.")
flags.DEFINE_enum("variant", "linear", ["naive", "linear", "sketch"], "Variance estimator.")
flags.DEFINE_string("tensorboard_dir", None, "If set, the chief writes the FDA dashboard here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # app.run would print TF's INFO lines
    keras.utils.set_random_seed(0)
    strategy = keras_fda.FDAStrategy(
        base_strategy, threshold=FLAGS.threshold, variant=FLAGS.variant, log_dir=FLAGS.tensorboard_dir
    )
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:cut], y[:cut], x[cut:], y[cut:]
    shares = partition.sorted_by_label(y_train, strategy.num_replicas_in_sync, fraction=1.0, seed=0)
    steps_per_epoch = min(len(s) for s in shares) // FLAGS.batch_size

    def replica_data(context):
        share = shares[context.input_pipeline_id]
        data = tf.data.Dataset.from_tensor_slices((x_train[share], y_train[share]))
        return data.shuffle(len(share), seed=0).repeat().batch(FLAGS.batch_size)

    train = strategy.distribute_datasets_from_function(replica_data)

    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ])
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    model.fit(train, epochs=FLAGS.epochs, steps_per_epoch=steps_per_epoch, verbose=0)
    # Every worker evaluates: the sync before it is a collective.
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    stats = strategy.communication
    print(
        f"worker {base_strategy.cluster_resolver.task_id}: test accuracy {accuracy:.3f}, "
        f"{stats.syncs} syncs in {stats.steps} steps, "
        f"{stats.savings:.1f}x fewer bytes than synchronous averaging"
    )


if __name__ == "__main__":
    app.run(main)
