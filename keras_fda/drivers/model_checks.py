"""What the drivers that join Keras' own `fit` require of the user's model."""


def check_model(model, owner):
    """Raises a `ValueError` unless `model` is compiled, has trainable weights and steps singly.

    Args:
        model: the Keras model about to be trained.
        owner: the driver, for the message (e.g. "FDACallback").
    """
    if not getattr(model, "compiled", False):
        raise ValueError(f"{owner} needs a compiled model: call model.compile() first.")
    if not model.built or not model.trainable_weights:
        raise ValueError(
            f"{owner} needs a built model with trainable weights: give the model an Input "
            "shape or call model.build() before fit()."
        )
    if getattr(model, "steps_per_execution", 1) != 1:
        raise ValueError(
            f"{owner} checks after every step and needs steps_per_execution=1 in "
            f"model.compile(), got {model.steps_per_execution}."
        )
