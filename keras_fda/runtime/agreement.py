"""What the workers check before their first collective: that they agree.

A worker whose graph differs from its peers' (another trigger, model or
number of steps) would join other collectives than they do and hang until the
timeout. Each driver all-gathers one row of numbers per worker (counts, and
fingerprints of what cannot be sent as a number) and `check` turns the first
column that differs into an error that names it and says what to do.
"""

import zlib

import numpy as np


def fingerprint(text):
    """A number that stands for `text` in an all-gathered row (CRC-32)."""
    return zlib.crc32(text.encode())


def setting_checks(owner, settings):
    """The `(what, fix)` of each `(name, value)` setting of `owner` (e.g. "FDACallback")."""
    return [
        (f"the {owner} setting {name} (this worker: {value}; compared as a fingerprint)",
         f"give {name} the same value on every worker")
        for name, value in settings
    ]


def check(everyone, checks, rows="worker"):
    """Raises a `ValueError` for the first column of `everyone` whose values differ.

    Args:
        everyone: one row per worker (or replica), one column per entry of `checks`.
        checks: `(what, fix)` per column: what the column is, and what to do.
        rows: what a row is, for the message ("worker", or "replica").

    Example:

    >>> check(np.array([[8], [10]]), [("the steps", "pass steps=8")])
    Traceback (most recent call last):
    ...
    ValueError: Workers disagree on the steps: [8, 10] (worker 0, 1, ...); pass steps=8.
    """
    everyone = np.asarray(everyone)
    for column, (what, fix) in enumerate(checks):
        values = everyone[:, column]
        if (values != values[0]).any():
            raise ValueError(
                f"Workers disagree on {what}: {values.tolist()} ({rows} 0, 1, ...); {fix}."
            )


def agree_on_run(transport, variables, settings, *, steps, epochs, resumed_step=-1,
                 initial_epoch=-1, owner="FDACallback"):
    """Checks that all workers run the same steps, model and settings; returns how they resume.

    Runs before any training step, so that a mismatch is a clear error on
    every worker instead of a collective that hangs or mixes unrelated
    tensors.

    Args:
        transport: the `keras_fda.runtime.transport.Transport`.
        variables: the averaged variables (their count, shapes and dtypes
            are compared).
        settings: `(name, description)` pairs every worker must share.
        steps: this worker's steps per epoch; None (unknown) is an error
            among several workers.
        epochs: its number of epochs.
        resumed_step: the step its state was restored from (-1: none).
        initial_epoch: the epoch it resumes at (-1: none).
        owner: the driver, for the messages.

    Returns:
        Every worker's `[resumed_step, initial_epoch]`, one row per worker.
    """
    if steps is None and transport.num_workers > 1:
        raise ValueError(
            f"{owner} cannot tell how many steps this worker will run: the dataset is an "
            "infinite dataset (dataset.repeat()) or has unknown length (a generator, "
            "dataset.filter()), and fit() got no steps_per_epoch. Pass steps_per_epoch= to "
            "fit() (with a repeated dataset) so all workers run the same number of steps."
        )
    layout = repr([(tuple(v.shape), v.dtype.name) for v in variables])
    mine = np.array([
        resumed_step, initial_epoch, -1 if steps is None else steps, epochs,
        sum(int(np.prod(v.shape)) for v in variables), fingerprint(layout),
        *(fingerprint(value) for _, value in settings),
    ], np.int64)  # fmt: skip
    everyone = transport.all_gather(mine).numpy()
    check(everyone[:, 2:], [
        ("the number of steps per epoch", "pass the same steps_per_epoch= to fit() with a "
         "repeated dataset (dataset.repeat()) on every worker"),
        ("the number of epochs", "pass the same epochs= to fit() on every worker"),
        ("the number of averaged weights", "build the same model, with the same frozen "
         "layers, on every worker"),
        ("the weight shapes and dtypes (layout fingerprint)", "build the same model, "
         "with the same dtype policy, on every worker"),
        *setting_checks(owner, settings),
    ])
    return everyone[:, :2]
