"""Joining a cluster of worker processes: `keras_fda.connect()`.

TensorFlow's collective runtime must be configured before the program runs
any TensorFlow op, so `connect()` belongs on the first lines of every worker.
It reads the standard `TF_CONFIG` environment variable (as written by
`python -m keras_fda.launch`, Kubernetes operators or by hand). Without
`TF_CONFIG` the program is a single local worker and everything still works.
"""

import json
import os

import tensorflow as tf
from tensorflow.python.eager import context

from keras_fda.transport import CollectiveTransport, LocalTransport

DEFAULT_TIMEOUT_SECONDS = 300.0

_current = None

# What TF raises when a collective cannot complete because of another worker.
PEER_FAILURES = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)


class PeerFailureError(RuntimeError):
    """A collective with the other workers failed: a peer died, hung or stopped early."""


class Cluster:
    """The workers this process trains with.

    Attributes:
        transport: the `keras_fda.transport.Transport` carrying collectives.
        num_workers: number of worker processes.
        worker_index: this process's index, 0 .. num_workers - 1.
        is_chief: True on worker 0, the one that writes logs and files.
        strategy: the `MultiWorkerMirroredStrategy` behind the transport, or
            None for a single local worker. Do not build the model in its scope
            when using `FDACallback`: the model must stay local.
    """

    def __init__(self, transport, strategy=None):
        self.transport = transport
        self.strategy = strategy

    @property
    def num_workers(self):
        return self.transport.num_workers

    @property
    def worker_index(self):
        return self.transport.worker_index

    @property
    def is_chief(self):
        return self.transport.is_chief

    def __repr__(self):
        return f"Cluster(num_workers={self.num_workers}, worker_index={self.worker_index})"


def parse_tf_config(value):
    """Validates a TF_CONFIG string; returns `(worker_addresses, worker_index)`."""
    try:
        config = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {value!r}") from None
    example = (
        'Expected e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
        '"task": {"type": "worker", "index": 0}}.'
    )
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object. {example}")
    cluster = config.get("cluster")
    task = config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError(f"TF_CONFIG needs a 'cluster' and a 'task' object. {example}")
    other_jobs = sorted(set(cluster) - {"worker"})
    if other_jobs:
        raise ValueError(
            f"TF_CONFIG has jobs {other_jobs}; keras_fda clusters consist of 'worker' "
            f"tasks only (worker 0 acts as chief). {example}"
        )
    workers = cluster.get("worker")
    if (
        not isinstance(workers, list)
        or not workers
        or not all(isinstance(w, str) and ":" in w for w in workers)
    ):
        raise ValueError(f"TF_CONFIG cluster.worker must be a non-empty list of 'host:port'. {example}")
    if task.get("type") != "worker":
        raise ValueError(f"TF_CONFIG task.type must be 'worker', got {task.get('type')!r}.")
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(workers):
        raise ValueError(
            f"TF_CONFIG task.index must be an integer in [0, {len(workers)}), got {index!r}."
        )
    return workers, index


def connect(timeout_seconds=DEFAULT_TIMEOUT_SECONDS):
    """Joins the cluster described by TF_CONFIG; call it before any other TF op.

    Starts TensorFlow's collective runtime (a gRPC server on this worker's
    address) and returns the `Cluster`. Drivers such as `FDACallback` use the
    connected cluster by default. Without TF_CONFIG (or with a one-worker
    TF_CONFIG) this is a single local worker.

    Args:
        timeout_seconds: how long any collective may wait for the other
            workers before failing with `DeadlineExceededError` instead of
            hanging (for example when a peer died or ran out of data).

    Returns:
        The `Cluster`.

    Example:

    ```python
    cluster = keras_fda.connect()     # first line of the program
    model = make_model()              # outside any strategy scope
    model.fit(ds, callbacks=[keras_fda.FDACallback(threshold=1.5)])
    ```
    """
    global _current
    if not (isinstance(timeout_seconds, (int, float)) and 0 < timeout_seconds < float("inf")):
        raise ValueError(f"timeout_seconds must be a positive number, got {timeout_seconds!r}.")
    raw = os.environ.get("TF_CONFIG", "").strip()
    if _current is not None:
        return _current
    if not raw:
        _current = Cluster(LocalTransport())
        return _current
    workers, index = parse_tf_config(raw)
    if len(workers) == 1:
        _current = Cluster(LocalTransport())
        return _current
    if context.context()._initialized:
        raise RuntimeError(
            "keras_fda.connect() must run before TensorFlow executes any op: TF's "
            "collective runtime can only be configured at program start. Move "
            "connect() to the top of the program, before building models or data."
        )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(timeout_seconds))
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    transport = CollectiveTransport(strategy, len(workers), index, timeout_seconds)
    _current = Cluster(transport, strategy)
    return _current


def current():
    """The connected cluster, or a single local worker if there is no TF_CONFIG.

    Raises:
        RuntimeError: if TF_CONFIG describes several workers but `connect()`
            was not called: training would silently stay local on each worker.
    """
    if _current is not None:
        return _current
    raw = os.environ.get("TF_CONFIG", "").strip()
    if raw and len(parse_tf_config(raw)[0]) > 1:
        raise RuntimeError(
            "TF_CONFIG describes a cluster but keras_fda.connect() was not called. "
            "Call keras_fda.connect() as the first line of the program on every worker."
        )
    return Cluster(LocalTransport())
