"""Quickstart: train a classifier with FDA across worker processes.

Run it on 4 local workers (no download: scikit-learn's bundled handwritten digits):

    python -m keras_fda.launch --workers 4 examples/quickstart.py

Other data: `--dataset=mnist` (downloads through keras.datasets) or
`--dataset=femnist --data_path=femnist_subset.npz` (whole writers per worker).
Each worker gets a non-IID share: the training set sorted by label and cut into
contiguous pieces, so every worker sees only a few classes.
"""

import math

import keras_fda

# TensorFlow's collective runtime must start before any other TF op.
cluster = keras_fda.connect()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_fda import partition  # noqa: E402

flags.DEFINE_enum("dataset", "digits", ["digits", "mnist", "femnist"], "Training data.")
flags.DEFINE_string("data_path", None, "Path of femnist_subset.npz for --dataset=femnist.")
flags.DEFINE_integer(
    "epochs", 20, "Epochs (one epoch: the worker's share of the data once).", lower_bound=1
)
flags.DEFINE_integer("batch_size", 32, "Batch size per worker.", lower_bound=1)
flags.DEFINE_string(
    "threshold", "auto",
    "FDA threshold Theta on the variance estimate (a number, e.g. 1.5), or auto: set and "
    "adapted from the run (keras_fda.AutoFDA). --trigger=kamp needs a number.",
)
flags.DEFINE_enum(
    "outer_optimizer", "nesterov", ["none", "nesterov"],
    "What a sync does with the average: none (adopt it) or nesterov (DiLoCo's outer "
    "Nesterov step on it).",
)
flags.DEFINE_enum("variant", "linear", ["naive", "linear", "sketch"], "Variance estimator.")
flags.DEFINE_enum(
    "trigger", "fda", ["fda", "synchronous", "periodic", "kamp"], "When to synchronize."
)
flags.DEFINE_integer("tau", 10, "Steps between syncs for --trigger=periodic.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the model initialization and data shuffling.")
flags.DEFINE_integer("verbose", 0, "Keras fit verbosity (0 keeps the output short).")
FLAGS = flags.FLAGS


def load_data():
    """Returns `(x_train, y_train, x_test, y_test, groups)`, images scaled to [0, 1].

    `groups` assigns each training sample to a unit of the non-IID split: its
    writer for FEMNIST, None otherwise (then the split is by sorted label).
    """
    if FLAGS.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")
        y = digits.target.astype("int32")
        order = np.random.default_rng(1234).permutation(len(x))
        x, y = x[order], y[order]
        cut = int(0.8 * len(x))
        return x[:cut], y[:cut], x[cut:], y[cut:], None
    if FLAGS.dataset == "mnist":
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        return x_train / 255.0, y_train, x_test / 255.0, y_test, None
    data = np.load(FLAGS.data_path)
    return (
        data["x_train"] / 255.0,
        data["y_train"].astype("int32"),
        data["x_test"] / 255.0,
        data["y_test"].astype("int32"),
        data["writer_train"],
    )


def worker_share(y, groups, num_workers, index):
    """Indices of this worker's non-IID share of the training set.

    FEMNIST: whole writers. Otherwise, as in the FDA paper, half of the data is
    sorted by label and dealt out in contiguous blocks, the rest at random.
    Every worker computes the same split from the same seed and keeps its part.
    """
    if groups is not None:
        return partition.by_writer(groups, num_workers, seed=0)[index]
    return partition.sorted_by_label(y, num_workers, fraction=0.5, seed=0)[index]


# The flags each trigger reads; one given to another trigger would be ignored.
TRIGGER_FLAGS = {
    "fda": ("threshold", "variant"),
    "kamp": ("threshold",),
    "periodic": ("tau",),
    "synchronous": (),
}


def trigger_args():
    """The FDACallback arguments the flags give; raises app.UsageError on a bad combination.

    Runs before any data is read, so that a mistyped command fails at once, and
    as a usage error (the flags to pass), not a traceback from FDACallback.
    """
    if FLAGS.dataset == "femnist" and not FLAGS.data_path:
        raise app.UsageError("--dataset=femnist needs --data_path=.../femnist_subset.npz.")
    if FLAGS.data_path and FLAGS.dataset != "femnist":
        raise app.UsageError(
            f"--data_path is read only with --dataset=femnist (got --dataset={FLAGS.dataset})."
        )
    uses = TRIGGER_FLAGS[FLAGS.trigger]
    for name in ("threshold", "variant", "tau"):
        if FLAGS[name].present and name not in uses:
            users = " or ".join(f"--trigger={t}" for t, used in TRIGGER_FLAGS.items()
                                if name in used)
            raise app.UsageError(
                f"--{name} is used only by {users}; --trigger={FLAGS.trigger} would ignore it. "
                f"Remove --{name}."
            )
    if FLAGS.trigger == "kamp" and FLAGS.threshold == "auto":
        raise app.UsageError(
            "--trigger=kamp needs a numeric threshold (auto is FDA's only): pass e.g. "
            "--trigger=kamp --threshold=1.5 (Theta on each worker's squared drift)."
        )
    threshold = FLAGS.threshold
    if threshold != "auto":
        try:
            threshold = float(threshold)
        except ValueError:
            threshold = math.nan
        if not (math.isfinite(threshold) and threshold > 0):
            raise app.UsageError(
                f"--threshold={FLAGS.threshold}: use a positive number (e.g. 1.5) or auto."
            )
    given = {"threshold": threshold, "variant": FLAGS.variant, "tau": FLAGS.tau}
    return {name: given[name] for name in uses}


def make_model(input_shape, num_classes):
    return keras.Sequential(
        [
            keras.Input(input_shape + (1,)),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )


def main(argv):
    del argv
    # TF logs every collective it traces at INFO level; keep the output readable.
    tf.get_logger().setLevel("WARNING")
    args = trigger_args()
    keras.utils.set_random_seed(FLAGS.seed + cluster.worker_index)
    x_train, y_train, x_test, y_test, groups = load_data()
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    mine = worker_share(y_train, groups, cluster.num_workers, cluster.worker_index)

    # Every worker must run the same number of steps, so the epoch length comes
    # from the global data size, not from this worker's share.
    steps_per_epoch = max(1, len(x_train) // (FLAGS.batch_size * cluster.num_workers))
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train[mine][..., None], y_train[mine]))
        .shuffle(len(mine), seed=FLAGS.seed)
        .repeat()
        .batch(FLAGS.batch_size)
    )

    model = make_model(x_train.shape[1:], num_classes)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    fda = keras_fda.FDACallback(
        trigger=FLAGS.trigger,
        outer_optimizer=None if FLAGS.outer_optimizer == "none" else FLAGS.outer_optimizer,
        **args,
    )
    model.fit(
        dataset,
        epochs=FLAGS.epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=[fda],
        verbose=FLAGS.verbose,
        shuffle=False,  # tf.data shuffles; Keras warns that its own shuffle would be ignored
    )

    # After fit every worker holds the same averaged model.
    _, accuracy = model.evaluate(x_test[..., None], y_test, verbose=0)
    stats = fda.communication
    if cluster.is_chief:
        print(f"workers: {cluster.num_workers}, trigger: {fda.trigger}")
        print(f"test accuracy of the averaged model: {accuracy:.4f}")
        print(f"syncs: {stats.syncs} in {stats.steps} steps")
        print(stats.summary())


if __name__ == "__main__":
    app.run(main)
