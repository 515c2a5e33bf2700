"""Splitting a data set over K simulated workers.

Every partitioner returns a list of K sorted 1-D int64 arrays of sample
indices, one per worker. Together they hold every sample exactly once (the
Dirichlet partitioner included), and the same arguments and seed always give
the same split.

* `iid`: uniform random split, equal sizes (up to one sample).
* `by_writer`: whole writers (clients) per worker: the natural non-IID split
  of FEMNIST-like data, with its quantity and label skew.
* `dirichlet`: label skew; each class is spread over the workers in
  proportions drawn from Dirichlet(alpha). Small alpha: few classes per worker.
* `sorted_by_label`: the FDA paper's non-IID split; a fraction of the data
  is sorted by label and dealt out in contiguous blocks, the rest is IID.

`batch_schedule` then gives the order in which each worker reads its
partition, step by step: the simulator's, and replayable by real workers.

Example:

```python
from keras_fda import partition
parts = partition.by_writer(writer_train, num_workers=10, seed=0)
x_worker0, y_worker0 = x_train[parts[0]], y_train[parts[0]]
```
"""

import numpy as np


def _check_num_workers(num_workers, num_items, what):
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)):
        raise TypeError(f"num_workers must be an integer, got {num_workers!r}.")
    if not 1 <= num_workers <= num_items:
        raise ValueError(
            f"num_workers must be between 1 and the number of {what} ({num_items}), "
            f"got {num_workers}."
        )
    return int(num_workers)


def _as_1d(values, name):
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array (one entry per sample), got shape {values.shape}."
        )
    return values


def _sorted_parts(parts):
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(num_samples, num_workers, seed=0):
    """Uniform random split into `num_workers` parts of (almost) equal size.

    Args:
        num_samples: number of samples in the data set.
        num_workers: K, the number of parts.
        seed: seed of the shuffle.

    Returns:
        A list of K sorted int64 index arrays.

    Example:

    >>> [len(p) for p in iid(10, 3)]
    [4, 3, 3]
    """
    num_workers = _check_num_workers(num_workers, int(num_samples), "samples")
    order = np.random.default_rng(seed).permutation(int(num_samples))
    return _sorted_parts(np.array_split(order, num_workers))


def by_writer(writer_ids, num_workers, seed=0):
    """Assigns whole writers (clients) to workers, (almost) equally many per worker.

    Workers get the samples of their writers, so sizes and label mixes differ
    as they do between real clients (FEMNIST's natural non-IID split).

    Args:
        writer_ids: the writer (client) id of every sample.
        num_workers: K; at most the number of distinct writers.
        seed: seed of the shuffle of the writers.

    Returns:
        A list of K sorted int64 index arrays.

    Example:

    >>> [p.tolist() for p in by_writer([7, 7, 3, 3, 5], num_workers=3, seed=0)]
    [[0, 1], [2, 3], [4]]
    """
    writer_ids = _as_1d(writer_ids, "writer_ids")
    writers, inverse = np.unique(writer_ids, return_inverse=True)
    num_workers = _check_num_workers(num_workers, len(writers), "distinct writers")
    order = np.random.default_rng(seed).permutation(len(writers))
    owner = np.empty(len(writers), np.int64)
    for worker, group in enumerate(np.array_split(order, num_workers)):
        owner[group] = worker
    sample_owner = owner[inverse]
    return [np.flatnonzero(sample_owner == k) for k in range(num_workers)]


def dirichlet(labels, num_workers, alpha, seed=0, min_samples=1, max_draws=100):
    """Label skew: each class is split over the workers in Dirichlet(alpha) proportions.

    alpha -> infinity approaches an IID split; alpha = 0.1 gives most workers
    only a few classes. Draws are repeated (deterministically) until every
    worker holds at least `min_samples` samples.

    Args:
        labels: the class of every sample.
        num_workers: K.
        alpha: the Dirichlet concentration, a positive number.
        seed: seed of the proportions and shuffles.
        min_samples: the fewest samples any worker may get (a worker needs
            data to train on).
        max_draws: how many draws to try before giving up.

    Returns:
        A list of K sorted int64 index arrays.

    Raises:
        ValueError: if no draw in `max_draws` gives every worker `min_samples`
            samples; raise alpha, lower K or lower min_samples.

    Example:

    >>> parts = dirichlet(np.repeat(np.arange(10), 100), num_workers=5, alpha=0.5)
    >>> sum(len(p) for p in parts)
    1000
    """
    labels = _as_1d(labels, "labels")
    num_workers = _check_num_workers(num_workers, len(labels), "samples")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
    if min_samples * num_workers > len(labels):
        raise ValueError(
            f"min_samples={min_samples} for {num_workers} workers needs more than the "
            f"{len(labels)} samples; lower min_samples or num_workers."
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_draws):
        parts = [[] for _ in range(num_workers)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_workers, float(alpha)))
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for worker, chunk in enumerate(np.split(members, cuts)):
                parts[worker].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if min(len(p) for p in parts) >= min_samples:
            return _sorted_parts(parts)
    raise ValueError(
        f"No Dirichlet(alpha={alpha}) split in {max_draws} draws gave all {num_workers} "
        f"workers at least {min_samples} samples; raise alpha or lower num_workers."
    )


def sorted_by_label(labels, num_workers, fraction, seed=0):
    """The FDA paper's non-IID split: a `fraction` of the data is sorted by label.

    A random `fraction` of the samples is sorted by label and cut into K
    contiguous blocks, so each worker gets a block of one or a few classes;
    the other samples are split IID. fraction=0 is IID, fraction=1 fully sorted.

    Args:
        labels: the class of every sample.
        num_workers: K.
        fraction: the share of samples that is sorted, in [0, 1].
        seed: seed of the choice of samples and of the IID part.

    Returns:
        A list of K sorted int64 index arrays.

    Example:

    >>> labels = np.repeat(np.arange(4), 5)
    >>> parts = sorted_by_label(labels, num_workers=4, fraction=1.0)
    >>> [np.unique(labels[p]).tolist() for p in parts]
    [[0], [1], [2], [3]]
    """
    labels = _as_1d(labels, "labels")
    num_workers = _check_num_workers(num_workers, len(labels), "samples")
    is_number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
    if not is_number or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}.")
    order = np.random.default_rng(seed).permutation(len(labels))
    num_sorted = int(round(fraction * len(labels)))
    # A stable sort keeps the random order within each class.
    sorted_part = order[:num_sorted][np.argsort(labels[order[:num_sorted]], kind="stable")]
    blocks = np.array_split(sorted_part, num_workers)
    rest = np.array_split(order[num_sorted:], num_workers)
    return _sorted_parts(np.concatenate([b, r]) for b, r in zip(blocks, rest))


def batch_schedule(partitions, batch_size, num_steps, seed=0, repartition=None):
    """The sample indices each worker trains on, step by step.

    Worker k reads its partition in passes, each pass a fresh permutation
    drawn from `np.random.default_rng([seed, k])`, and takes `batch_size`
    consecutive samples per step (a pass may end inside a batch). Exposed so
    that a real multi-process run can replay a simulation's exact data order.

    Args:
        partitions: K 1-D index arrays (e.g. from `iid` or `by_writer`).
        batch_size: samples per worker per step.
        num_steps: steps to schedule.
        seed: seed of the shuffles.
        repartition: optional `{step: partitions}`: from that step on, the
            workers read these K index arrays instead (concept drift). The
            i-th change starts fresh passes from `default_rng([seed, k, i])`.

    Returns:
        An int64 array of shape `[num_steps, K, batch_size]`.

    Example:

    >>> batch_schedule([np.arange(4), np.arange(4, 10)], 2, 3).shape
    (3, 2, 2)
    """
    partitions = checked(partitions)
    changes = _check_repartition(repartition, len(partitions), num_steps)
    bounds = [0, *changes, num_steps]
    segments = []
    for i, parts in enumerate([partitions, *changes.values()]):
        steps = bounds[i + 1] - bounds[i]
        needed = steps * batch_size
        streams = []
        for k, part in enumerate(parts):
            # Segment 0 keeps the seeds of runs without changes.
            rng = np.random.default_rng([seed, k] if i == 0 else [seed, k, i])
            passes = [rng.permutation(part) for _ in range(-(-needed // len(part)))]
            streams.append(np.concatenate(passes)[:needed].reshape(steps, batch_size))
        segments.append(np.stack(streams, axis=1))
    return np.concatenate(segments, axis=0)


def _check_repartition(repartition, num_workers, num_steps):
    """`{step: partitions}` sorted by step, each change checked; {} for None."""
    if repartition is None:
        return {}
    if not isinstance(repartition, dict):
        raise TypeError(
            "repartition must be a dict {step: partitions}, e.g. {256: parts[1:] + parts[:1]}."
        )
    changes = {}
    for step in sorted(repartition):
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"repartition steps must be integers, got {step!r}.")
        if not 0 < step < num_steps:
            raise ValueError(
                f"repartition step {step} is outside the run; use steps in 1..{num_steps - 1}."
            )
        parts = checked(repartition[step])
        if len(parts) != num_workers:
            raise ValueError(
                f"repartition at step {step} gives {len(parts)} partitions for "
                f"{num_workers} workers; pass one index array per worker."
            )
        changes[int(step)] = parts
    return changes


def checked(partitions):
    """`partitions` as K 1-D int64 index arrays; raises on anything else or an empty one."""
    if isinstance(partitions, np.ndarray) or not isinstance(partitions, (list, tuple)):
        raise TypeError(
            "partitions must be a list of K index arrays, one per worker, e.g. from "
            "keras_fda.partition.iid(len(x), num_workers=K)."
        )
    parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in partitions]
    empty = [k for k, p in enumerate(parts) if p.size == 0]
    if empty:
        raise ValueError(f"Workers {empty} have no samples; every partition needs at least one.")
    return parts
