"""Joining a cluster of worker processes: `keras_fda.connect()`.

TensorFlow's collective runtime must be configured before the program runs
any TensorFlow op, so `connect()` belongs on the first lines of every worker.
It finds the cluster, in this order, in: a `cluster_resolver` argument (any
`tf.distribute.cluster_resolver.ClusterResolver`); the standard `TF_CONFIG`
environment variable (as written by `python -m keras_fda.launch`, Kubeflow's
TFJob operator or by hand); a SLURM job step (`srun`). Without any of them the
program is a single local worker and everything still works.
"""

import atexit
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import tensorflow as tf
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.eager import context

from keras_fda.runtime.transport import CollectiveTransport, LocalTransport

DEFAULT_TIMEOUT_SECONDS = 300.0

# Without SLURM_STEP_RESV_PORTS, SLURM task i listens on
# SLURM_PORT_BASE + 16 * (SLURM_JOB_ID % 1000) + (its index on its node): two
# jobs sharing a node get different ports unless their IDs agree mod 1000, and
# the range stays below Linux's ephemeral ports (32768 and up). So at most 16
# tasks may share a node (more is a ValueError): a 17th would take a port of
# the job whose ID is one higher.
SLURM_PORT_BASE = 12000
SLURM_PORTS_PER_JOB = 16

# How long worker 0 waits at exit for the other workers' processes to end.
EXIT_WAIT_SECONDS = 45.0
# After how long without heartbeats TF's coordination service (in worker 0)
# declares a worker dead; TF's default is 10 s. A worker's heartbeats stop when
# its process starts to end, and ending TF takes several seconds on a loaded
# machine: with 10 s, worker 0, waiting for that worker to end, logged that it
# "stopped sending heartbeats". Dead workers are found sooner anyway: a closed
# connection fails the next collective at once, a silent worker fails it after
# connect()'s timeout_seconds.
HEARTBEAT_TIMEOUT_SECONDS = 60.0

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


def error_cause(error):
    """The line of a TensorFlow error that says what went wrong.

    Errors raised inside a `tf.function` start with `Graph execution error:`
    and the Python stack of the failing op; the cause follows the stack.

    Args:
        error: a `tf.errors.OpError` (or any exception).

    Returns:
        That line, e.g. `Collective ops is aborted by: ...`.
    """
    message = getattr(error, "message", None) or str(error)
    lines = message.splitlines()
    if lines and lines[0].strip() == "Graph execution error:":
        stack_ends = [i for i, line in enumerate(lines) if line.strip().startswith('File "')]
        # Lines indented under the last "File" line quote its source code.
        lines = lines[stack_ends[-1] + 1 :] if stack_ends else lines[1:]
        lines = [line for line in lines if line[:1].strip()]
    for line in lines:
        line = line.strip()
        if line and not line.startswith(("[[{{node", "Detected at node")):
            return line
    return type(error).__name__


@contextlib.contextmanager
def bounded(transport, where):
    """Bounds the collectives run inside by `transport`'s deadline; explains failures.

    A collective that fails because of another worker raises a
    `PeerFailureError` naming this worker and `where` (a string, or a
    callable that returns one, e.g. with the current step: called only on
    failure), the cause, and what to check.
    """
    try:
        with transport.deadline():
            yield
    except PEER_FAILURES as e:
        where = where() if callable(where) else where
        raise PeerFailureError(
            f"Worker {transport.worker_index} of {transport.num_workers} could not complete "
            f"the collective {where}: {type(e).__name__}: {error_cause(e)}. Another worker "
            "probably died, ran out of data or stopped early, or is unreachable. Check the "
            "other workers' output; give every worker the same steps_per_epoch with a "
            "repeated dataset."
        ) from e


class Cluster:
    """The workers this process trains with.

    Attributes:
        transport: the `keras_fda.runtime.transport.Transport` carrying collectives.
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


def connect(timeout_seconds=DEFAULT_TIMEOUT_SECONDS, cluster_resolver=None):
    """Joins the cluster of this worker; call it before any other TF op.

    The cluster comes from `cluster_resolver` if given, else from `TF_CONFIG`,
    else from the SLURM job step this process runs in (`srun -n N python
    train.py`: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` and the step's nodes,
    `SLURM_STEP_NODELIST`, expanded with `scontrol show hostnames`; task i
    listens on a port from `SLURM_STEP_RESV_PORTS` (`srun --resv-ports`) or
    else on `SLURM_PORT_BASE + 16 * (SLURM_JOB_ID % 1000) + its index on its
    node`). Without any of them (or with a one-worker cluster) this is a single
    local worker.

    Starts TensorFlow's collective runtime (a gRPC server on this worker's
    address) and returns the `Cluster`. Drivers such as `FDACallback` use the
    connected cluster by default. At the end of a program that did not fail,
    the workers leave together: each waits (up to `timeout_seconds`) until
    every other worker reached its end or its process is gone, and worker 0,
    which hosts TensorFlow's coordination service, exits last, so no worker
    reports the service gone.

    Args:
        timeout_seconds: how long any collective may wait for the other
            workers before failing with `DeadlineExceededError` instead of
            hanging (for example when a peer died or ran out of data).
        cluster_resolver: a `tf.distribute.cluster_resolver.ClusterResolver`
            (e.g. `SimpleClusterResolver`, `KubernetesClusterResolver`) whose
            cluster consists of `worker` tasks only, with this process's
            `task_type` and `task_id` set. Takes precedence over `TF_CONFIG`
            and SLURM.

    Returns:
        The `Cluster`.

    Raises:
        ValueError: if the cluster description (`TF_CONFIG`, the SLURM
            environment, the resolver) is malformed; the message names the
            bad field.
        TypeError: if `cluster_resolver` is not a `ClusterResolver`.

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
    if cluster_resolver is not None and not isinstance(
        cluster_resolver, tf.distribute.cluster_resolver.ClusterResolver
    ):
        raise TypeError(
            "cluster_resolver must be a tf.distribute.cluster_resolver.ClusterResolver, "
            f"got {type(cluster_resolver).__name__}."
        )
    if _current is not None:
        return _current
    if cluster_resolver is None:
        workers, index, cluster_resolver = _cluster_from_environment()
    else:
        workers, index = _workers_of(cluster_resolver)
    if len(workers) <= 1:
        _current = Cluster(LocalTransport())
        return _current
    if context.context()._initialized:
        raise RuntimeError(
            "keras_fda.connect() must run before TensorFlow executes any op: TF's "
            "collective runtime can only be configured at program start. Move "
            "connect() to the top of the program, before building models or data."
        )
    # As MultiWorkerMirroredStrategy would configure it, but for the heartbeat timeout.
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader="/job:worker/replica:0/task:0",
        heartbeat_timeout_in_ms=int(HEARTBEAT_TIMEOUT_SECONDS * 1000),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=len(workers))
        ],
    )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(timeout_seconds))
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=cluster_resolver, communication_options=options
    )
    transport = CollectiveTransport(strategy, len(workers), index, timeout_seconds)
    _current = Cluster(transport, strategy)
    leave_together_at_exit(workers, index, timeout_seconds)
    return _current


def current():
    """The connected cluster, or a single local worker if there is no cluster.

    Raises:
        RuntimeError: if TF_CONFIG or a SLURM step describes several workers
            but `connect()` was not called: training would silently stay
            local on each worker.
    """
    if _current is not None:
        return _current
    if len(_cluster_from_environment()[0]) > 1:
        raise RuntimeError(
            "TF_CONFIG (or the SLURM job step) describes a cluster but keras_fda.connect() "
            "was not called. Call keras_fda.connect() as the first line of the program on "
            "every worker."
        )
    return Cluster(LocalTransport())


def _cluster_from_environment():
    """`(worker addresses, this worker's index, resolver or None)` from TF_CONFIG or SLURM.

    No workers (an empty list) means no cluster: a single local worker.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if raw:
        workers, index = parse_tf_config(raw)
        return workers, index, None  # MultiWorkerMirroredStrategy reads TF_CONFIG itself
    step = slurm_cluster(os.environ)
    if step is None:
        return [], 0, None
    workers, index = step
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": workers}),
        task_type="worker",
        task_id=index,
        rpc_layer="grpc",
        # Listing physical devices does not start TF's runtime.
        num_accelerators={"GPU": len(tf.config.list_physical_devices("GPU"))},
    )
    return workers, index, resolver


def _workers_of(resolver):
    """`(worker addresses, this worker's index)` of a ClusterResolver, validated."""
    jobs = resolver.cluster_spec().as_dict()
    if not jobs:
        return [], 0
    what = f"The cluster of {type(resolver).__name__}"
    other_jobs = sorted(set(jobs) - {"worker"})
    if other_jobs:
        raise ValueError(
            f"{what} has jobs {other_jobs}; keras_fda clusters consist of 'worker' tasks only "
            "(worker 0 acts as chief)."
        )
    workers = jobs.get("worker")
    if not isinstance(workers, list) or not workers:
        raise ValueError(
            f"{what} must list its workers densely as ['host:port', ...], got {workers!r}."
        )
    if resolver.task_type != "worker":
        raise ValueError(f"{what}: task_type must be 'worker', got {resolver.task_type!r}.")
    index = resolver.task_id
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(workers):
        raise ValueError(
            f"{what}: task_id must be an integer in [0, {len(workers)}), got {index!r}."
        )
    return workers, index


# --- SLURM ---


def slurm_cluster(environ, expand_hostnames=None):
    """The cluster of the SLURM job step this process runs in, or None outside one.

    `srun` sets, for every task of a step, `SLURM_STEP_NODELIST` (the step's
    nodes, compressed as in `node[01-04]`), `SLURM_STEP_TASKS_PER_NODE` (as in
    `2(x3),1`), `SLURM_PROCID` (the task's rank) and `SLURM_STEP_NUM_TASKS`;
    an `sbatch` script itself (outside `srun`) is not a step. Tasks are laid
    out on the nodes as SLURM does: in blocks (the default, also
    `SLURM_DISTRIBUTION=*`) or cyclically (`SLURM_DISTRIBUTION=cyclic`). Without
    `SLURM_STEP_RESV_PORTS` at most `SLURM_PORTS_PER_JOB` (16) tasks may share
    a node.

    Args:
        environ: the environment to read (e.g. `os.environ`).
        expand_hostnames: a function from a compressed node list to host
            names; default: `scontrol show hostnames`.

    Returns:
        `(worker addresses, this task's index)`, or None outside a step.

    Raises:
        ValueError: if the SLURM variables are malformed or inconsistent,
            more than 16 tasks share a node without reserved ports, or
            `scontrol` is missing; the message names the variable.
    """
    if "SLURM_STEP_NODELIST" not in environ or "SLURM_PROCID" not in environ:
        return None
    num_tasks = _slurm_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    index = _slurm_int(environ, "SLURM_PROCID")
    if not 0 <= index < num_tasks:
        raise ValueError(
            f"SLURM_PROCID={index} is not a task of this step of {num_tasks} tasks; "
            "start every task with the same srun."
        )
    nodes = (expand_hostnames or _scontrol_hostnames)(environ["SLURM_STEP_NODELIST"])
    per_node = _tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", str(num_tasks)))
    if len(per_node) != len(nodes) or sum(per_node) != num_tasks:
        raise ValueError(
            f"SLURM_STEP_TASKS_PER_NODE={environ.get('SLURM_STEP_TASKS_PER_NODE')!r} does not "
            f"lay out {num_tasks} tasks on the {len(nodes)} nodes of SLURM_STEP_NODELIST="
            f"{environ['SLURM_STEP_NODELIST']!r}; start the workers with srun, or set TF_CONFIG."
        )
    # "<nodes>[:<sockets>[:<cores>]][,Pack|NoPack]": only the first field
    # places tasks on nodes; "*" (or nothing) there is SLURM's default, block.
    distribution = environ.get("SLURM_DISTRIBUTION", "").split(",")[0].split(":")[0].strip()
    distribution = "block" if distribution in ("", "*") else distribution
    if distribution not in ("block", "cyclic"):
        raise ValueError(
            f"SLURM_DISTRIBUTION={environ['SLURM_DISTRIBUTION']!r}: keras_fda can place only "
            "block and cyclic task layouts; use srun --distribution=block, or set TF_CONFIG."
        )
    placement = []  # (node, index on the node) of task 0, 1, ...
    if distribution == "block":
        for node, count in enumerate(per_node):
            placement += [(node, local) for local in range(count)]
    else:
        for local in range(max(per_node)):
            placement += [(node, local) for node, count in enumerate(per_node) if local < count]
    ports = _slurm_ports(environ, max(per_node))
    workers = [f"{_host(nodes[node])}:{ports[local]}" for node, local in placement]
    return workers, index


def _slurm_int(environ, name, fallback=None):
    key = name if name in environ or fallback is None else fallback
    try:
        return int(environ[key])
    except KeyError:
        raise ValueError(f"{name} is not set; start the workers with srun.") from None
    except ValueError:
        raise ValueError(f"{key}={environ[key]!r} is not an integer.") from None


def _tasks_per_node(value):
    """`'2(x3),1'` -> `[2, 2, 2, 1]`."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(
                f"SLURM_STEP_TASKS_PER_NODE={value!r} is not of the form '2(x3),1'."
            )
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _slurm_ports(environ, needed):
    """A port per task index on a node: the step's reserved ports, else the documented base."""
    reserved = environ.get("SLURM_STEP_RESV_PORTS", "").strip()
    if not reserved:
        job = _slurm_int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        if needed > SLURM_PORTS_PER_JOB:
            # More would take the ports of the job whose ID is one higher (mod 1000).
            raise ValueError(
                f"{needed} tasks of this SLURM step share a node, but without reserved ports "
                f"keras_fda gives each job {SLURM_PORTS_PER_JOB} ports per node ("
                f"{SLURM_PORT_BASE} + {SLURM_PORTS_PER_JOB} * (SLURM_JOB_ID mod 1000) + the "
                f"task's index on its node). Reserve ports with srun --resv-ports={needed} "
                f"(needs MpiParams=ports=... in slurm.conf), run at most {SLURM_PORTS_PER_JOB} "
                "tasks per node (e.g. srun --ntasks-per-node), or set TF_CONFIG."
            )
        base = SLURM_PORT_BASE + SLURM_PORTS_PER_JOB * (job % 1000)
        return list(range(base, base + needed))
    ports = []
    for part in reserved.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise ValueError(
                f"SLURM_STEP_RESV_PORTS={reserved!r} is not of the form '12000-12003,12010'."
            )
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        ports += range(first, last + 1)
    if len(ports) < needed:
        raise ValueError(
            f"SLURM_STEP_RESV_PORTS={reserved!r} has {len(ports)} ports, but {needed} tasks "
            f"share a node; reserve at least {needed} (srun --resv-ports={needed})."
        )
    return ports


def _scontrol_hostnames(nodelist):
    try:
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
    except FileNotFoundError:
        raise ValueError(
            f"SLURM_STEP_NODELIST={nodelist!r} needs `scontrol show hostnames` to expand, "
            "but scontrol is not on PATH; add SLURM's bin directory to PATH, or set TF_CONFIG."
        ) from None
    hosts = result.stdout.split()
    if result.returncode or not hosts:
        raise ValueError(
            f"`scontrol show hostnames {nodelist}` failed (exit code {result.returncode}): "
            f"{result.stderr.strip()}"
        )
    return hosts


def _host(name):
    return f"[{name}]" if ":" in name else name  # an IPv6 address


# --- Leaving the cluster ---

_exit_state = {"registered": False, "failed": False}

# How long `_listening` waits for a forwarder to close a connection whose
# server is gone (a refused connect behind it takes a round trip).
_FORWARDER_CLOSE_SECONDS = 0.25

# How long one look for a peer's "reached the end" key in the coordination
# service waits, between checks that the peer's process is still there.
_EXIT_POLL_MS = 200


def leave_together_at_exit(workers, index, timeout_seconds):
    """Makes the workers of a cluster end their processes in an order that fails no RPC.

    TensorFlow's coordination service runs in worker 0; every worker's agent
    sends it heartbeats until its process ends. A worker still running when
    worker 0 has gone logs `Failed to send RPC to coordination service ...
    Connection refused`; worker 0 still running `HEARTBEAT_TIMEOUT_SECONDS`
    after another worker stopped its heartbeats logs that the worker `stopped
    sending heartbeats`. So at exit each worker waits until every other worker
    either reached its end too or is gone (its server no longer accepts
    connections: it crashed, was killed or raised), at most `timeout_seconds`,
    and worker 0 then waits (at most `EXIT_WAIT_SECONDS`) until the others'
    servers are gone. A program ending with an uncaught exception leaves at
    once: its peers see it gone. Registered once per process by `connect()`.

    Args:
        workers: the cluster's worker addresses, `host:port`, in worker order.
        index: this worker's index.
        timeout_seconds: the longest wait for the other workers.
    """
    if _exit_state["registered"]:
        return
    _exit_state["registered"] = True
    previous_hook = sys.excepthook

    def excepthook(*exc_info):
        _exit_state["failed"] = True
        previous_hook(*exc_info)

    sys.excepthook = excepthook
    atexit.register(_leave, list(workers), index, timeout_seconds)


def _exit_key(index):
    return f"keras_fda/exit/{index}"


def _leave(workers, index, timeout_seconds):
    if _exit_state["failed"]:
        return
    # Not TF's wait_at_barrier: it returns only when every task arrived, or
    # when the coordination service declares a missing task dead, which takes
    # the heartbeat timeout (a peer that failed after fit held worker 0 here
    # for ~54 s, after which TF logged `E0000 ... StartAbort UNAVAILABLE ...
    # stopped sending heartbeats`). A blocking call cannot be told that a
    # peer's process is gone; polling keys with a short timeout, between
    # looks at the peers' servers, can, and keeps every TF call on this thread
    # and bounded (nothing is left blocked inside TF while the process ends).
    context_ = context.context()
    try:
        context_.set_config_key_value(_exit_key(index), "done")
    except tf.errors.OpError:
        return  # worker 0, and its coordination service, is gone: nobody to wait for
    deadline = time.monotonic() + timeout_seconds
    pending = [i for i in range(len(workers)) if i != index]
    while pending and time.monotonic() < deadline:
        still = []
        for i in pending:
            try:
                context_.get_config_key_value(_exit_key(i), _EXIT_POLL_MS)
                continue  # it reached its end
            except tf.errors.DeadlineExceededError:
                pass
            except tf.errors.OpError:
                return  # the coordination service is gone: there is no orderly exit to make
            if _listening(workers[i]):
                still.append(i)
            # else its process is gone (crashed, killed, raised, os._exit): it
            # will never arrive, and waiting for TF to notice takes a minute.
        pending = still
    if index != 0:
        return
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    others = workers[1:]
    while others and time.monotonic() < deadline:
        others = [address for address in others if _listening(address)]
        if others:
            time.sleep(0.05)


def _listening(address):
    """Whether a worker's server still takes connections at `address`.

    A forwarder between the workers (a TCP proxy, a port forward, the
    benchmark harness's relay) accepts a connection even when the server
    behind it is gone, and then closes it: that end of file means gone.
    Without this look worker 0 waited the whole `EXIT_WAIT_SECONDS` at the
    end of every run whose peers it reached through a forwarder.
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5) as connection:
            connection.settimeout(_FORWARDER_CLOSE_SECONDS)
            try:
                return connection.recv(1) != b""  # bytes: a server's greeting
            except socket.timeout:
                return True  # open and silent: a server waiting for the client
    except socket.timeout:
        return True  # no answer yet: it may still be there
    except OSError:
        return False
