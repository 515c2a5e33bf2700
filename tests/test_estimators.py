"""Estimators and the AMS sketch against numpy on random drifts."""

import numpy as np
import pytest
import tensorflow as tf

from keras_fda.policies import estimators
from keras_fda.policies.sketch import AMSSketch

SHAPES = [(7, 5), (5,), (3, 2, 4)]
K = 4


def random_drifts(seed, scale_common=1.0):
    """K workers' drifts (lists of float32 arrays) with a shared component."""
    rng = np.random.default_rng(seed)
    common = [rng.standard_normal(s) * scale_common for s in SHAPES]
    return [
        [(c + rng.standard_normal(s)).astype(np.float32) for c, s in zip(common, SHAPES)]
        for _ in range(K)
    ]


def flat(tensors):
    return np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in tensors])


def true_variance(drifts):
    u = np.stack([flat(d) for d in drifts])
    return float(np.mean(np.sum((u - u.mean(0)) ** 2, axis=1)))


def estimate(estimator, drifts, round_state=None):
    """Runs the estimator as a driver would: local states, mean, estimate."""
    if not estimator.built:
        estimator.build(SHAPES)
    if round_state is None:
        round_state = estimator.initial_round_state()
    states = [estimator.local_state([tf.constant(t) for t in d], round_state) for d in drifts]
    return float(estimator.estimate(tf.reduce_mean(tf.stack(states), 0)))


@pytest.mark.parametrize("seed", range(5))
def test_exact_estimator_equals_numpy_variance(seed):
    drifts = random_drifts(seed)
    assert estimate(estimators.ExactEstimator(), drifts) == pytest.approx(
        true_variance(drifts), rel=1e-5
    )


@pytest.mark.parametrize("seed", range(5))
def test_naive_and_linear_are_upper_bounds(seed):
    drifts = random_drifts(seed, scale_common=3.0)
    var = true_variance(drifts)
    naive = estimate(estimators.NaiveEstimator(), drifts)
    linear = estimate(estimators.LinearEstimator(seed=seed), drifts)
    s1 = np.mean([np.sum(flat(d) ** 2) for d in drifts])
    assert naive == pytest.approx(s1, rel=1e-5)
    assert naive >= var
    assert var * (1 - 1e-5) <= linear <= naive * (1 + 1e-6)


def test_linear_is_exact_when_xi_is_parallel_to_mean_drift():
    drifts = random_drifts(7, scale_common=2.0)
    est = estimators.LinearEstimator()
    est.build(SHAPES)
    mean_drift = [np.mean([d[i] for d in drifts], 0) for i in range(len(SHAPES))]
    # next_round_state normalizes the global step it is given into xi.
    xi = est.next_round_state(est.initial_round_state(), [tf.constant(m) for m in mean_drift])
    np.testing.assert_allclose(np.linalg.norm(flat(xi)), 1.0, rtol=1e-6)
    assert estimate(est, drifts, xi) == pytest.approx(true_variance(drifts), rel=1e-4)


def test_linear_keeps_direction_on_zero_global_step():
    est = estimators.LinearEstimator(seed=3)
    est.build(SHAPES)
    xi0 = est.initial_round_state()
    xi1 = est.next_round_state(xi0, [tf.zeros(s) for s in SHAPES])
    np.testing.assert_array_equal(flat(xi0), flat(xi1))


def test_linear_initial_direction_depends_only_on_seed():
    a, b, c = (estimators.LinearEstimator(seed=s) for s in (5, 5, 6))
    for e in (a, b, c):
        e.build(SHAPES)
    np.testing.assert_array_equal(flat(a.initial_round_state()), flat(b.initial_round_state()))
    assert not np.allclose(flat(a.initial_round_state()), flat(c.initial_round_state()))


def test_sketch_is_linear():
    drifts = random_drifts(11)
    sketch = AMSSketch(SHAPES, depth=5, width=50, seed=1)
    sketches = [sketch.sketch([tf.constant(t) for t in d]).numpy() for d in drifts]
    mean_drift = [tf.constant(np.mean([d[i] for d in drifts], 0)) for i in range(len(SHAPES))]
    np.testing.assert_allclose(
        np.mean(sketches, 0), sketch.sketch(mean_drift).numpy(), rtol=1e-4, atol=1e-5
    )


def test_sketch_matches_definition():
    """Bucket/sign folding equals sum_i g(i) v_i per bucket, computed in numpy."""
    sketch = AMSSketch([(10,), (3, 3)], depth=3, width=4, seed=2)
    v = [np.arange(10, dtype=np.float32), np.ones((3, 3), np.float32)]
    ids = np.concatenate([i.numpy().reshape(3, -1) for i in sketch._segment_ids], axis=1)
    row, rest = np.divmod(ids, 8)
    assert (row == np.arange(3)[:, None]).all()
    negative, bucket = np.divmod(rest, 4)
    values = np.concatenate([x.ravel() for x in v])
    expected = np.zeros((3, 4))
    for j in range(3):
        np.add.at(expected[j], bucket[j], np.where(negative[j] == 1, -values, values))
    np.testing.assert_allclose(sketch.sketch([tf.constant(x) for x in v]).numpy(), expected.ravel())


def test_sketch_error_within_ams_bound():
    """Each row has variance <= 2||v||^4/width; by Chebyshev a row errs by more
    than 2*sqrt(2/width)*||v||^2 with probability <= 1/4, so the median of 5
    rows does with probability <= 10/64 + 5/256 + 1/1024 < 0.18."""
    width, depth, trials = 250, 5, 100
    rng = np.random.default_rng(0)
    bound = 2 * np.sqrt(2 / width)
    within = 0
    for t in range(trials):
        sketch = AMSSketch([(2000,)], depth=depth, width=width, seed=t)
        v = rng.standard_normal(2000).astype(np.float32) * rng.uniform(0.1, 10)
        est = float(sketch.norm_squared(sketch.sketch([tf.constant(v)])))
        true = float(np.sum(v.astype(np.float64) ** 2))
        within += abs(est - true) <= bound * true
    assert within >= 0.82 * trials


def test_sketch_estimator_close_to_variance():
    drifts = random_drifts(3, scale_common=3.0)
    var = true_variance(drifts)
    est = estimate(estimators.SketchEstimator(depth=7, width=500, seed=4), drifts)
    s1 = np.mean([np.sum(flat(d) ** 2) for d in drifts])
    # Far better than naive (which ignores the common component) and near Var.
    assert abs(est - var) < 0.25 * (s1 - var)


def test_sketch_hashes_depend_only_on_seed():
    a, b, c = (AMSSketch(SHAPES, depth=3, width=20, seed=s) for s in (9, 9, 10))
    for x, y in zip(a._segment_ids, b._segment_ids):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert any(
        not np.array_equal(x.numpy(), z.numpy()) for x, z in zip(a._segment_ids, c._segment_ids)
    )


def test_sketch_memory_cost_is_4_bytes_per_row_per_parameter():
    sketch = AMSSketch([(1000,), (10, 10)], depth=5, width=250)
    assert sketch.memory_bytes() == 20 * 1100
    assert sum(i.numpy().nbytes for i in sketch._segment_ids) == sketch.memory_bytes()


def test_state_sizes_and_bytes():
    naive, linear, sk, exact = (
        estimators.NaiveEstimator(),
        estimators.LinearEstimator(),
        estimators.SketchEstimator(depth=5, width=250),
        estimators.ExactEstimator(),
    )
    for e in (naive, linear, sk, exact):
        e.build(SHAPES)
    assert (naive.state_bytes, linear.state_bytes, sk.state_bytes) == (4, 8, 5004)
    assert exact.state_size == 35 + 5 + 24 + 1


@pytest.mark.parametrize(
    "kwargs", [dict(depth=0), dict(width=0), dict(depth=2.5), dict(width=-3)]
)
def test_sketch_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="depth|width"):
        estimators.SketchEstimator(**kwargs)


def test_get_rejects_unknown_variant():
    with pytest.raises(ValueError, match="Unknown FDA variant 'cubic'"):
        estimators.get("cubic")
    assert isinstance(estimators.get("sketch", width=10), estimators.SketchEstimator)
