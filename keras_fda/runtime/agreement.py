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
