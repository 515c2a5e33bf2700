"""Collectives across workers: the only place keras_fda talks to the network.

A `Transport` all-reduces and all-gathers single tensors among the workers of
a cluster. It knows nothing of models or FDA. `CollectiveTransport` uses
TensorFlow's own collective runtime (gRPC, ring all-reduce) through a
`tf.distribute.MultiWorkerMirroredStrategy` that is used only for its
collectives: the user's model is built outside its scope and stays local.
`mean` and `ring_mean` are the same MEAN over K copies of a tensor in one
process, for the simulator, rounding as TensorFlow's collectives do.
"""

import contextlib
import queue
import threading
import time
import zlib

import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import errors

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

    def all_reduce_async(self, tensor, op="mean"):
        """Starts `all_reduce(tensor, op)` in the background; returns its `InFlight`.

        One background thread per transport runs the collectives in the
        order they were started, so a driver can overlap a small all-reduce
        with its next training step. Collectives started here and ones called
        directly must not be in flight together (the runtime pairs them by
        order): take the result before the next direct call.
        """
        if getattr(self, "_background", None) is None:
            self._background = _Background()
        return self._background.start(self.all_reduce, tensor, op)

    def deadline(self):
        """A context manager bounding how long the collectives run inside it may wait.

        Drivers wrap each call of a compiled step in it. A collective still
        waiting when the deadline passes fails with `DeadlineExceededError`
        (and the collective runtime of this process cannot be used again).
        """
        return contextlib.nullcontext()


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

    Float all-reduces of static shape (every per-step state and every sync)
    run as one raw `CollectiveReduceV2` op in a collective group of their own,
    with one instance key per (shape, dtype, reduction): the runtime resolves
    such an instance once and reuses it on every later call, and the mean is
    divided inside the collective. The strategy instead feeds a fresh instance
    key from Python on every call (a new instance for the runtime to set up)
    and divides in a separate pass over the result, a quarter of a small
    all-reduce's time on CPU workers. Other tensors (unknown shape,
    integers) and all-gathers go through the strategy.

    Args:
        strategy: a `tf.distribute.MultiWorkerMirroredStrategy` created at
            program start (see `keras_fda.connect`). Only its collectives are used.
        num_workers: number of worker processes in the cluster.
        worker_index: this worker's index in the cluster.
        timeout_seconds: how long the collectives inside one `deadline()`
            block may wait for the other workers before they are aborted with
            `DeadlineExceededError` (None or 0: no limit).
    """

    # Far above the group keys the strategy hands out (1, 2, ... per device
    # set), so the two never share a group and their instance keys never mix.
    GROUP_KEY = 0x46444100
    # Half precision included: a sync's bfloat16/float16 payload must meet a
    # stopped worker's message of the same signature whatever function each
    # worker traced it in, which only a key derived from the signature does.
    _FAST_DTYPES = (tf.float32, tf.float64, tf.bfloat16, tf.float16)

    def __init__(self, strategy, num_workers, worker_index, timeout_seconds=None):
        self.strategy = strategy
        self.num_workers = int(num_workers)
        self.worker_index = int(worker_index)
        self._device = strategy.extended.worker_devices[0]
        self.timeout_seconds = float(timeout_seconds or 0.0)
        self._watchdog = _Watchdog(self.timeout_seconds) if self.timeout_seconds else None
        # Collectives that share this resource are ordered by tf.function's
        # automatic control dependencies: each worker issues them in program
        # order, so no two with the same instance key are ever in flight.
        with tf.init_scope(), tf.device(self._device):
            self._ordering_token = tf.Variable(0.0, trainable=False, name="fda_collective_order")

    def _local(self, tensor):
        # Inside a tf.function the strategy only sees a tensor's destination if
        # it is placed on the worker device; otherwise batch_reduce_to fails
        # with "destinations can not be empty".
        with tf.device(self._device):
            return tf.identity(tensor)

    def all_reduce(self, tensor, op="mean"):
        reduce_op = _check_op(op)
        tensor = tf.convert_to_tensor(tensor)
        if tensor.dtype in self._FAST_DTYPES and tensor.shape.is_fully_defined():
            with tf.device(self._device):
                return tf.raw_ops.CollectiveReduceV2(
                    input=tensor,
                    group_size=self.num_workers,
                    group_key=self.GROUP_KEY,
                    instance_key=_instance_key(tensor, op),
                    ordering_token=[self._ordering_token.handle],
                    merge_op="Add",
                    final_op="Div" if op == "mean" else "Id",
                    # No per-op timeout: TF gives each timed collective a
                    # thread that sleeps for the whole timeout, thousands per
                    # minute at one collective per step. `deadline()` bounds
                    # the wait with one watchdog thread instead.
                    timeout_seconds=0.0,
                )
        local = self._local(tensor)
        reduced = self.strategy.extended.batch_reduce_to(reduce_op, [(local, local)])[0]
        return self.strategy.experimental_local_results(reduced)[0]

    def all_gather(self, tensor):
        local = self._local(tf.expand_dims(tf.convert_to_tensor(tensor), 0))
        return self.strategy.gather(local, axis=0)

    def deadline(self):
        if self._watchdog is None:
            return contextlib.nullcontext()
        return self._watchdog.guard()

    def __repr__(self):
        return f"CollectiveTransport(num_workers={self.num_workers}, worker_index={self.worker_index})"


class InFlight:
    """The result of a collective started with `Transport.all_reduce_async`."""

    def __init__(self):
        self._done = threading.Event()
        self._value = self._error = None
        self.elapsed = None  # seconds the collective ran, once done

    def _set(self, value=None, error=None):
        self._value, self._error = value, error
        self._done.set()

    def done(self):
        return self._done.is_set()

    def result(self):
        """Waits for the collective; returns its tensor or raises its error.

        Call it inside `Transport.deadline()`: a collective that waits on a
        dead worker is then aborted like one called directly.
        """
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Background:
    """One daemon thread that runs queued calls in order.

    A daemon, not a `concurrent.futures` pool: a pool's threads are joined at
    interpreter exit, and one stuck in a collective of a dead peer would keep
    the process from exiting.
    """

    def __init__(self):
        self._queue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="keras_fda-collectives", daemon=True).start()

    def start(self, fn, *args):
        result = InFlight()
        self._queue.put((fn, args, result))
        return result

    def _run(self):
        while True:
            fn, args, result = self._queue.get()
            started = time.perf_counter()
            try:
                value, error = fn(*args), None
            except Exception as e:  # noqa: BLE001 - handed to the caller of result()
                value, error = None, e
            result.elapsed = time.perf_counter() - started
            result._set(value, error)


class _Watchdog:
    """Aborts this process's pending collectives when a guarded block overruns.

    One daemon thread polls the deadline of the block in progress, so the
    per-step cost is two attribute writes.
    """

    def __init__(self, timeout_seconds):
        self.timeout_seconds = timeout_seconds
        self._deadline = None
        self._thread = None
        # The watchdog reads the deadline, then the clock. A block that ends between
        # the two, and the next block that begins, must not be taken for an overrun:
        # the abort is decided and made under the lock that guard() takes, against
        # the same deadline object it read. A block that ends while its abort is
        # being made still fails (aborted collectives stay aborted), at its own end.
        self._lock = threading.Lock()
        self._aborted = False

    def _message(self):
        return (
            f"no answer from the other workers within {self.timeout_seconds:g} s "
            "(keras_fda.connect(timeout_seconds=...))"
        )

    @contextlib.contextmanager
    def guard(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="keras_fda-watchdog", daemon=True)
            self._thread.start()
        with self._lock:
            self._deadline = [time.monotonic() + self.timeout_seconds]
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None
                aborted, self._aborted = self._aborted, False
            if aborted:
                raise errors.DeadlineExceededError(None, None, self._message())

    def _watch(self):
        period = min(1.0, self.timeout_seconds / 10)
        while True:
            time.sleep(period)
            deadline = self._deadline
            if deadline is None or time.monotonic() <= deadline[0]:
                continue
            with self._lock:
                if self._deadline is not deadline:  # that block ended in time
                    continue
                self._deadline = None
                self._aborted = True
                context.context().abort_collective_ops(errors.DEADLINE_EXCEEDED, self._message())


def _instance_key(tensor, op):
    """The same positive int32 on every worker for the same shape, dtype and op.

    A collective instance is bound to one shape, so each signature needs its
    own key; a hash (not a counter) keeps the key independent of the order in
    which each worker happens to trace its functions. Two signatures share a
    key with probability about 1e-9 per pair.
    """
    signature = f"{op}:{tensor.dtype.name}:{tensor.shape.as_list()}".encode()
    return 1 + zlib.crc32(signature) % (2**31 - 2)


def _check_op(op):
    if op not in _REDUCE_OPS:
        raise ValueError(f"Unsupported reduction {op!r}; use one of {sorted(_REDUCE_OPS)}.")
    return _REDUCE_OPS[op]


# --- In one process: the simulator's collectives over K copies of a tensor.


def mean(per_worker):
    """All-reduce MEAN over K copies in one process (the simulator's): their mean.

    Half-precision weights are summed in float32, as the real drivers do.
    """
    stacked = tf.stack(per_worker)
    if stacked.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(tf.reduce_mean(tf.cast(stacked, tf.float32), axis=0), stacked.dtype)
    return tf.reduce_mean(stacked, axis=0)


def ring_mean(per_worker):
    """All-reduce MEAN over K copies in one process, added in their own dtype.

    TensorFlow's collectives add a half-precision payload in half precision
    (one rounding per worker along the ring) and divide it, rounding once:
    so does this, in worker order. Each operation goes through float32 and is
    rounded back explicitly: in half precision grappler would fuse the adds
    into one more exact AddN and turn the division by a constant into a
    multiplication by its rounded reciprocal.
    """
    dtype = per_worker[0].dtype

    def rounded(value):
        return tf.cast(value, dtype)

    total = per_worker[0]
    for tensor in per_worker[1:]:
        total = rounded(tf.cast(total, tf.float32) + tf.cast(tensor, tf.float32))
    return rounded(tf.cast(total, tf.float32) / len(per_worker))


def payload_mean(per_worker, ring=False):
    """What the drivers' collectives make of K in-process copies of one sync payload tensor.

    An integer (quantized) payload is all-gathered: `[K, size]`, in worker
    order. With `ring` (a drift in a narrower payload dtype) it is added
    along the ring in that dtype (`ring_mean`); values are averaged (`mean`).
    """
    if per_worker[0].dtype.is_integer:
        return tf.stack(per_worker)
    return ring_mean(per_worker) if ring else mean(per_worker)
