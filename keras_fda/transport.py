"""Collectives across workers: the only place keras_fda talks to the network.

A `Transport` all-reduces and all-gathers single tensors among the workers of
a cluster. It knows nothing of models or FDA. `CollectiveTransport` uses
TensorFlow's own collective runtime (gRPC, ring all-reduce) through a
`tf.distribute.MultiWorkerMirroredStrategy` that is used only for its
collectives: the user's model is built outside its scope and stays local.
"""

import tensorflow as tf

_REDUCE_OPS = {"mean": tf.distribute.ReduceOp.MEAN, "sum": tf.distribute.ReduceOp.SUM}


class Transport:
    """Interface of the collectives a driver needs.

    All methods work both eagerly and inside a `tf.function`. Every worker
    must make the same calls in the same order with equally shaped tensors.
    """

    num_workers = 1
    worker_index = 0

    @property
    def is_chief(self):
        return self.worker_index == 0

    def all_reduce(self, tensor, op="mean"):
        """Element-wise mean (or sum) of `tensor` over all workers."""
        raise NotImplementedError

    def all_gather(self, tensor):
        """Stacks every worker's `tensor` along a new leading axis (worker order)."""
        raise NotImplementedError


class LocalTransport(Transport):
    """A cluster of one worker: every collective is the identity."""

    def all_reduce(self, tensor, op="mean"):
        _check_op(op)
        return tf.convert_to_tensor(tensor)

    def all_gather(self, tensor):
        return tf.expand_dims(tf.convert_to_tensor(tensor), 0)

    def __repr__(self):
        return "LocalTransport()"


class CollectiveTransport(Transport):
    """Collectives over TensorFlow's multi-worker runtime.

    Args:
        strategy: a `tf.distribute.MultiWorkerMirroredStrategy` created at
            program start (see `keras_fda.connect`). Only its collectives are used.
        num_workers: number of worker processes in the cluster.
        worker_index: this worker's index in the cluster.
    """

    def __init__(self, strategy, num_workers, worker_index):
        self.strategy = strategy
        self.num_workers = int(num_workers)
        self.worker_index = int(worker_index)
        self._device = strategy.extended.worker_devices[0]

    def _local(self, tensor):
        # Inside a tf.function the strategy only sees a tensor's destination if
        # it is placed on the worker device; otherwise batch_reduce_to fails
        # with "destinations can not be empty".
        with tf.device(self._device):
            return tf.identity(tensor)

    def all_reduce(self, tensor, op="mean"):
        local = self._local(tensor)
        reduced = self.strategy.extended.batch_reduce_to(_check_op(op), [(local, local)])[0]
        return self.strategy.experimental_local_results(reduced)[0]

    def all_gather(self, tensor):
        local = self._local(tf.expand_dims(tf.convert_to_tensor(tensor), 0))
        return self.strategy.gather(local, axis=0)

    def __repr__(self):
        return f"CollectiveTransport(num_workers={self.num_workers}, worker_index={self.worker_index})"


def _check_op(op):
    if op not in _REDUCE_OPS:
        raise ValueError(f"Unsupported reduction {op!r}; use one of {sorted(_REDUCE_OPS)}.")
    return _REDUCE_OPS[op]
