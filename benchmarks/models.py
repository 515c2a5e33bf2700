"""Model builders shared by the benchmarks (28x28x1 inputs, logits outputs)."""

import keras

MODELS = ("lenet5", "cnn", "mlp")


def lenet5(num_classes):
    """LeNet-5 as in the FDA paper: tanh, average pooling; 61,706 parameters at 10 classes."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(6, 5, padding="same", activation="tanh"),
            keras.layers.AveragePooling2D(2),
            keras.layers.Conv2D(16, 5, activation="tanh"),
            keras.layers.AveragePooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="tanh"),
            keras.layers.Dense(84, activation="tanh"),
            keras.layers.Dense(num_classes),
        ],
        name="lenet5",
    )


def cnn(num_classes):
    """A larger CNN, about 1.1M parameters (4 conv + 2 dense 512, dropout).

    Smaller convolutions than the paper's 2.6M "VGG16*" keep a CPU step
    affordable while most parameters sit in the dense layers, so d is large.
    """
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            _conv(16),
            _conv(16),
            keras.layers.MaxPooling2D(2),
            _conv(32),
            _conv(32),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.25),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(num_classes),
        ],
        name="cnn",
    )


def mlp(num_classes):
    """The MLP of benchmarks/overhead.py: 784-1024-256-10, about 1.07M parameters.

    Little compute per parameter, so FDA's per-step work shows most.
    """
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )


def _conv(filters):
    return keras.layers.Conv2D(filters, 3, padding="same", activation="relu")


def build(name, num_classes, seed=0, learning_rate=0.001):
    """A compiled model by name: Adam, sparse cross-entropy on logits, accuracy.

    `learning_rate` is Adam's: a float (Keras's default 0.001) or a
    `keras.optimizers.schedules.LearningRateSchedule`.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; use one of {MODELS}.")
    keras.utils.set_random_seed(seed)
    model = {"lenet5": lenet5, "cnn": cnn, "mlp": mlp}[name](num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,
    )
    return model
