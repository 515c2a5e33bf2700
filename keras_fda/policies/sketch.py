"""AMS (Alon-Matias-Szegedy) sketch of a vector held as a list of tensors.

The sketch is a `depth x width` matrix. Row `j` sends coordinate `i` to the
bucket `h_j(i)` with sign `g_j(i)`; `sketch[j, b] = sum_{i: h_j(i)=b} g_j(i) v_i`.
It is linear in `v`, so the mean of the workers' sketches is the sketch of the
workers' mean vector, and `median_j sum_b sketch[j, b]^2` estimates `||v||^2`.

Buckets come from a pairwise-independent hash and signs from a four-wise
independent one (polynomials over the Mersenne prime 2^31 - 1), drawn from a
seed, so every worker that uses the same seed gets the same sketch.
"""

import numpy as np
import tensorflow as tf

_PRIME = (1 << 31) - 1


def _poly_hash(coeffs, index):
    """Evaluates the polynomial `coeffs` at `index` modulo 2^31 - 1 (Horner)."""
    acc = np.zeros_like(index)
    for c in coeffs:
        # acc, index < 2^31, so the product stays below 2^62: no int64 overflow.
        acc = (acc * index + c) % _PRIME
    return acc


class AMSSketch:
    """AMS sketch over a fixed list of tensor shapes.

    Bucket and sign of every coordinate are precomputed once and folded into
    one int32 segment id per row (`depth` ids per coordinate): the row's
    `2 * width` segments hold the positive and the negative half, so one
    `unsorted_segment_sum` per tensor builds the sketch without a multiply.

    Memory cost: `4 * depth` bytes per sketched parameter (20 bytes at the
    paper's depth 5), held as constant tensors.

    Args:
        shapes: the shapes of the tensors that together form the vector.
        depth: number of rows (independent estimates; the median is taken).
        width: buckets per row. The relative error is about `1 / sqrt(width)`.
        seed: hash seed; all workers must use the same one.
    """

    def __init__(self, shapes, depth=5, width=250, seed=0):
        if int(depth) != depth or depth < 1:
            raise ValueError(f"Sketch depth must be an integer >= 1, got {depth!r}.")
        if int(width) != width or width < 1:
            raise ValueError(f"Sketch width must be an integer >= 1, got {width!r}.")
        self.depth = int(depth)
        self.width = int(width)
        rng = np.random.default_rng(seed)
        # Row j: 2 coefficients for the bucket hash, 4 for the sign hash.
        bucket_coeffs = rng.integers(1, _PRIME, size=(self.depth, 2))
        sign_coeffs = rng.integers(1, _PRIME, size=(self.depth, 4))
        row_offset = (2 * self.width * np.arange(self.depth))[:, None]

        self._segment_ids = []
        start = 0
        for shape in shapes:
            size = int(np.prod(shape, dtype=np.int64))
            index = np.arange(start, start + size, dtype=np.int64)[None, :]
            start += size
            bucket = np.stack([_poly_hash(c, index[0]) for c in bucket_coeffs]) % self.width
            negative = np.stack([_poly_hash(c, index[0]) for c in sign_coeffs]) & 1
            ids = row_offset + bucket + self.width * negative
            self._segment_ids.append(tf.constant(ids.reshape(-1).astype(np.int32)))
        self.num_params = start

    @property
    def size(self):
        """Number of floats in one sketch (`depth * width`)."""
        return self.depth * self.width

    @property
    def epsilon(self):
        """The AMS relative-error scale `1 / sqrt(width)`."""
        return 1.0 / np.sqrt(self.width)

    def memory_bytes(self):
        """Bytes held by the precomputed hash ids (`4 * depth` per parameter)."""
        return 4 * self.depth * self.num_params

    def sketch(self, tensors):
        """Sketches the concatenation of `tensors`; returns shape `[depth * width]`."""
        num_segments = 2 * self.size
        halves = tf.zeros([num_segments], tf.float32)
        for tensor, ids in zip(tensors, self._segment_ids):
            flat = tf.reshape(tf.cast(tensor, tf.float32), [-1])
            halves += tf.math.unsorted_segment_sum(
                tf.tile(flat, [self.depth]), ids, num_segments
            )
        halves = tf.reshape(halves, [self.depth, 2, self.width])
        return tf.reshape(halves[:, 0] - halves[:, 1], [-1])

    def norm_squared(self, sketch):
        """AMS estimate of `||v||^2` from `sketch(v)`: the median of row norms."""
        rows = tf.reduce_sum(tf.square(tf.reshape(sketch, [self.depth, self.width])), axis=1)
        rows = tf.sort(rows)
        mid = self.depth // 2
        if self.depth % 2:
            return rows[mid]
        return 0.5 * (rows[mid - 1] + rows[mid])
