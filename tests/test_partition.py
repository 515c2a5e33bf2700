"""keras_fda.partition: determinism, coverage, and the skew each splitter promises."""

import numpy as np
import pytest

from keras_fda import partition

RNG = np.random.default_rng(42)
LABELS = RNG.integers(0, 10, 1000)
WRITERS = np.sort(RNG.integers(0, 40, 1000))

SPLITS = {
    "iid": lambda seed: partition.iid(len(LABELS), 7, seed=seed),
    "by_writer": lambda seed: partition.by_writer(WRITERS, 7, seed=seed),
    "dirichlet": lambda seed: partition.dirichlet(LABELS, 7, alpha=0.3, seed=seed),
    "sorted_by_label": lambda seed: partition.sorted_by_label(LABELS, 7, fraction=0.6, seed=seed),
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_every_sample_exactly_once(name):
    parts = SPLITS[name](0)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 and p.ndim == 1 and p.size for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicate inside
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_deterministic_given_seed(name):
    a, b, c = SPLITS[name](5), SPLITS[name](5), SPLITS[name](6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition.iid(1000, 7)]
    assert max(sizes) - min(sizes) <= 1


def test_by_writer_keeps_writers_whole():
    parts = partition.by_writer(WRITERS, 8, seed=1)
    owners = [set(WRITERS[p]) for p in parts]
    assert sum(len(o) for o in owners) == len(set(WRITERS))  # no writer on two workers
    assert sorted(len(o) for o in owners) == [5] * 8  # 40 writers over 8 workers


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    def mean_classes(alpha):
        parts = partition.dirichlet(LABELS, 5, alpha=alpha, seed=0)
        return np.mean([len(np.unique(LABELS[p])) for p in parts])

    assert mean_classes(0.05) < 5 < mean_classes(1000.0) == 10


def test_sorted_by_label_fully_sorted_gives_contiguous_label_blocks():
    labels = np.repeat(np.arange(4), 25)
    parts = partition.sorted_by_label(labels, 4, fraction=1.0, seed=0)
    assert [np.unique(labels[p]).tolist() for p in parts] == [[0], [1], [2], [3]]
    iid_like = partition.sorted_by_label(labels, 4, fraction=0.0, seed=0)
    assert all(len(np.unique(labels[p])) > 1 for p in iid_like)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: partition.iid(5, 6), ValueError),
        (lambda: partition.iid(5, 2.0), TypeError),
        (lambda: partition.by_writer([1, 1, 2], 3), ValueError),
        (lambda: partition.dirichlet(LABELS, 3, alpha=0), ValueError),
        (lambda: partition.dirichlet(LABELS, 3, alpha=0.1, min_samples=400), ValueError),
        (lambda: partition.sorted_by_label(LABELS, 3, fraction=1.5), ValueError),
        (lambda: partition.sorted_by_label(LABELS.reshape(10, 100), 3, fraction=0.5), ValueError),
    ],
)
def test_bad_arguments_say_what_to_do(call, error):
    with pytest.raises(error):
        call()


def test_batch_schedule_reads_each_partition_in_shuffled_passes():
    parts = [np.arange(0, 5), np.arange(5, 12)]
    order = partition.batch_schedule(parts, batch_size=2, num_steps=5, seed=1)
    assert order.shape == (5, 2, 2)
    first_pass = order[:, 0].reshape(-1)[:5]
    assert sorted(first_pass) == list(range(5))
    assert sorted(order[:, 1].reshape(-1)[:7]) == list(range(5, 12))
    np.testing.assert_array_equal(order, partition.batch_schedule(parts, 2, 5, seed=1))

def test_repartition_switches_each_workers_data_at_the_given_step():
    parts = [np.arange(0, 6), np.arange(6, 10)]
    swapped = parts[::-1]
    order = partition.batch_schedule(parts, 2, 8, seed=3, repartition={5: swapped})
    # Before the change: the schedule of a run without it, step for step.
    np.testing.assert_array_equal(order[:5], partition.batch_schedule(parts, 2, 5, seed=3))
    assert set(order[5:, 0].ravel()) <= set(range(6, 10))
    assert set(order[5:, 1].ravel()) <= set(range(0, 6))
    # A fresh pass over the new partition starts at the change.
    assert sorted(order[5:7, 0].ravel()) == list(range(6, 10))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ({0: [np.arange(3), np.arange(3)]}, ValueError, "outside the run"),
        ({8: [np.arange(3), np.arange(3)]}, ValueError, "outside the run"),
        ({2: [np.arange(3)]}, ValueError, "one index array per worker"),
        ({2.5: [np.arange(3), np.arange(3)]}, TypeError, "integers"),
        ([np.arange(3), np.arange(3)], TypeError, "dict"),
    ],
)
def test_repartition_errors_say_what_to_do(bad, error, match):
    with pytest.raises(error, match=match):
        partition.batch_schedule([np.arange(3), np.arange(3, 6)], 2, 8, repartition=bad)
