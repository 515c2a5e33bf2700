"""Worker processes on an emulated slow network: namespaces, rate limits, delay.

`Network(num_workers, rate_mbit=..., delay_ms=...)` builds, on this Linux
machine, one network namespace per worker and one for a bridge that joins
them:

    [ns worker 0] eth0 ==veth== w0 -+
    [ns worker 1] eth0 ==veth== w1 -+- br0 (10.77.0.254)   [ns bridge]
    ...                             |
                                  relay (only with a delay)

Worker i has the address 10.77.0.(i+1) and nothing else to talk to: the
namespaces have no route anywhere but to each other. Each worker's link is
limited to `rate_mbit` in both directions (`tc tbf` on the egress of both
ends of its veth pair). This kernel has no `netem`, so a one-way delay is
emulated by a relay that the harness runs in the bridge namespace: worker i's
TF_CONFIG names every *other* worker j at the relay's port for j, and the
relay forwards the bytes of every connection unchanged, each chunk `delay_ms`
after it arrived (in both directions, so a round trip between two workers
costs 2 x delay_ms). TensorFlow's gRPC runs over it as it is.

`Network.run(command)` starts one process per worker inside its namespace
with `TF_CONFIG` set, prints every output line prefixed with `[worker i] `,
collects the lines and returns when all have exited (or kills them all, by
process group, when one fails or a timeout passes). Leaving the `with` block
(normally, on an exception, on Ctrl-C or SIGTERM) stops the processes and
deletes the namespaces, which removes their veths and the bridge. Names carry
this process's PID and a random tag, so parallel runs never collide and a
run only ever deletes what it created; `--cleanup_stale` removes what a
killed harness (SIGKILL) left behind, and only namespaces whose creating
process is gone.

Needs root (CAP_NET_ADMIN) and iproute2 (`ip`, `tc`).

CLI (same as `python -m keras_fda.launch`, plus the link):

    python benchmarks/network.py --workers 2 --rate_mbit 100 --delay_ms 25 \
        benchmarks/network_allreduce.py --megabytes=4

Library:

    with Network(2, rate_mbit=100, delay_ms=25) as net:
        results = net.run([sys.executable, "train.py"], timeout=600)
    results[0].lines   # worker 0's output lines
"""

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from keras_fda.runtime.launch import _describe, _stop

SUBNET = "10.77.0"
RELAY_ADDRESS = f"{SUBNET}.254"
BASE_PORT = 23400
PREFIX = "kfda"  # namespace names: kfda-<pid>-<tag>-<role>
_ROOT_MESSAGE = (
    "benchmarks/network.py needs root (CAP_NET_ADMIN) to create network namespaces, veth "
    "pairs and tc qdiscs; run it as root (e.g. sudo), or use `python -m keras_fda.launch` "
    "for workers on 127.0.0.1 without a link model."
)


class NetworkError(RuntimeError):
    """The emulated network could not be built (missing tools, no permission)."""


def check_available():
    """Raises `NetworkError` saying what is missing if the harness cannot run here."""
    if os.geteuid() != 0:
        raise NetworkError(_ROOT_MESSAGE)
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetworkError(
            f"benchmarks/network.py needs iproute2 ({', '.join(missing)} not found): "
            "apt-get install iproute2."
        )


def _sh(*command, check=True):
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode:
        raise NetworkError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result


def tbf_arguments(rate_mbit):
    """`tc` arguments of a token bucket at `rate_mbit` (10^6 bit/s) on one link direction.

    The bucket holds 4 ms at the rate (at least 32 KiB, so that segmentation
    offload packets pass whole), and the queue 100 ms: enough for TCP to keep
    the link busy without dropping, as a router's buffer would.
    """
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(32 * 1024, int(rate_bytes * 0.004))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]


@dataclasses.dataclass
class WorkerResult:
    """One worker's exit: `returncode` (Popen's: -N for signal N) and its output `lines`."""

    returncode: int
    lines: list


class Network:
    """K worker namespaces joined by a bridge, each link rate-limited, an optional delay.

    Args:
        num_workers: K, the number of worker namespaces.
        rate_mbit: each worker's link rate in Mbit/s (10^6 bit/s), both
            directions; None for no limit.
        delay_ms: one-way delay between any two workers (a round trip costs
            twice this), emulated by a relay; 0 for a direct path.
        echo: print the workers' prefixed output lines as they come.

    Example:

    ```python
    with Network(2, rate_mbit=20) as net:
        results = net.run([sys.executable, "benchmarks/network_allreduce.py"], timeout=300)
    ```
    """

    def __init__(self, num_workers, rate_mbit=None, delay_ms=0.0, echo=True):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int):
            raise TypeError(f"num_workers must be an integer, got {num_workers!r}.")
        if not 1 <= num_workers <= 200:
            raise ValueError(f"num_workers must be between 1 and 200, got {num_workers}.")
        if rate_mbit is not None and not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be positive (or None for no limit), got {rate_mbit}.")
        if not delay_ms >= 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}.")
        self.num_workers = num_workers
        self.rate_mbit = rate_mbit
        self.delay_ms = float(delay_ms)
        self.echo = echo
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.tag}-br"
        self.worker_ns = [f"{self.tag}-w{i}" for i in range(num_workers)]
        self._created = []  # namespaces this object created, deleted by close()
        self._relay = None
        self._procs = []
        self._previous_handlers = {}

    # --- topology ---

    def address(self, index):
        return f"{SUBNET}.{index + 1}"

    def port(self, index):
        return BASE_PORT + index

    def tf_config(self, index):
        """Worker `index`'s TF_CONFIG: its own address, and the others' as it reaches them."""
        workers = []
        for j in range(self.num_workers):
            via_relay = self.delay_ms > 0 and j != index
            host = RELAY_ADDRESS if via_relay else self.address(j)
            workers.append(f"{host}:{self.port(j)}")
        return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}

    def _add_namespace(self, name):
        _sh("ip", "netns", "add", name)
        self._created.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")

    def _shape(self, namespace, device):
        if self.rate_mbit is not None:
            _sh("tc", "-n", namespace, "qdisc", "add", "dev", device, "root",
                *tbf_arguments(self.rate_mbit))

    def open(self):
        """Creates the namespaces, links, limits and (with a delay) the relay."""
        check_available()
        self._install_signal_handlers()
        try:
            self._add_namespace(self.bridge_ns)
            _sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.bridge_ns, "addr", "add", f"{RELAY_ADDRESS}/24", "dev", "br0")
            _sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
            for i, ns in enumerate(self.worker_ns):
                self._add_namespace(ns)
                # Created inside the namespaces: no name ever exists in the host's.
                _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth",
                    "peer", "name", f"w{i}", "netns", self.bridge_ns)
                _sh("ip", "-n", self.bridge_ns, "link", "set", f"w{i}", "master", "br0", "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                self._shape(ns, "eth0")
                self._shape(self.bridge_ns, f"w{i}")
            if self.delay_ms > 0:
                self._start_relay()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def _install_signal_handlers(self):
        # SIGTERM/SIGHUP would end the process without unwinding; as an
        # exception they unwind through close() like Ctrl-C does.
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

        for s in (signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[s] = signal.signal(s, interrupt)

    def close(self):
        """Stops every process this network started and deletes its namespaces."""
        _stop(self._procs)
        self._procs = []
        if self._relay is not None:
            _stop([self._relay])
            self._relay = None
            self._relay_log.close()
        for name in reversed(self._created):
            _sh("ip", "netns", "del", name, check=False)
        self._created = []
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)
        self._previous_handlers = {}

    # --- the relay (one-way delay) ---

    def _start_relay(self):
        self._relay_log = tempfile.TemporaryFile("w+")
        routes = [
            f"{RELAY_ADDRESS}:{self.port(j)}={self.address(j)}:{self.port(j)}"
            for j in range(self.num_workers)
        ]
        self._relay = subprocess.Popen(
            ["ip", "netns", "exec", self.bridge_ns, sys.executable, os.path.abspath(__file__),
             "--relay", "--delay_ms", str(self.delay_ms),
             "--buffer_bytes", str(self._relay_buffer_bytes()), *routes],
            # stderr to a file: a pipe nobody reads could fill up and stall the relay.
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._relay_log,
            start_new_session=True, text=True,
        )
        # The relay prints one line once it listens on every port.
        ready = self._relay.stdout.readline()
        if ready.strip() != "ready":
            self._relay.wait(10)
            self._relay_log.seek(0)
            raise NetworkError(f"the delay relay did not start: {self._relay_log.read()}")

    def _relay_buffer_bytes(self):
        # What a connection may have in flight inside the relay: two
        # bandwidth-delay products, so the delay alone never throttles a link.
        rate_bytes = (self.rate_mbit or 10_000) * 1e6 / 8
        return int(max(4 << 20, 2 * rate_bytes * self.delay_ms / 1e3))

    # --- running workers ---

    def environment(self, index, base=None):
        env = dict(os.environ if base is None else base)
        env.update(TF_CONFIG=json.dumps(self.tf_config(index)), PYTHONUNBUFFERED="1")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return env

    def link_bytes(self):
        """`[(tx_bytes, rx_bytes)]` of every worker's link so far, as the worker's eth0 counts."""
        counts = []
        for ns in self.worker_ns:
            info = json.loads(_sh("ip", "-n", ns, "-j", "-s", "link", "show", "eth0").stdout)[0]
            stats = info["stats64"]
            counts.append((stats["tx"]["bytes"], stats["rx"]["bytes"]))
        return counts

    def run(self, command, timeout=None, env=None):
        """Runs `command` once per worker in its namespace; returns one `WorkerResult` each.

        Every worker gets `TF_CONFIG` (and `env`'s variables, if given). If a
        worker fails, the others are stopped; after `timeout` seconds all are
        stopped and `TimeoutError` is raised.
        """
        if not self._created:
            raise ValueError("Network.run() needs an open network: use `with Network(...) as net:`.")
        lock = threading.Lock()
        outputs = [[] for _ in range(self.num_workers)]
        readers = []
        try:
            for i, ns in enumerate(self.worker_ns):
                worker_env = self.environment(i)
                worker_env.update(env or {})
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", ns, *command], env=worker_env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self._procs.append(proc)
                reader = threading.Thread(
                    target=self._collect, args=(proc.stdout, i, outputs[i], lock), daemon=True
                )
                reader.start()
                readers.append(reader)
            self._wait(timeout)
        finally:
            procs, self._procs = self._procs, []
            _stop(procs)
            for reader in readers:
                reader.join(timeout=5)
        return [WorkerResult(p.returncode, lines) for p, lines in zip(procs, outputs)]

    def _collect(self, pipe, index, lines, lock):
        prefix = f"[worker {index}] "
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if self.echo:
                with lock:
                    print(prefix + line, flush=True)
        pipe.close()

    def _wait(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in self._procs]
            failed = [(i, c) for i, c in enumerate(codes) if c]
            if failed:
                i, code = failed[0]
                print(f"network: worker {i} {_describe(code)}; stopping the others.",
                      file=sys.stderr, flush=True)
                return
            if all(c == 0 for c in codes):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not finish within {timeout} s; stopped them.")
            time.sleep(0.05)


def cleanup_stale():
    """Deletes namespaces left by harness processes that no longer exist; returns their names."""
    removed = []
    for line in _sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) != 4 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if os.path.exists(f"/proc/{parts[1]}"):
            continue  # its harness still runs (or the PID was reused): not ours to delete
        _sh("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


# --- the relay process (runs inside the bridge namespace) ---


async def _delayed_copy(reader, writer, delay, buffer_bytes):
    """Copies reader to writer, each chunk `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    pending = collections.deque()
    state = {"buffered": 0}
    changed = asyncio.Condition()

    async def take_in():
        while True:
            data = await reader.read(1 << 16)
            async with changed:
                await changed.wait_for(lambda: state["buffered"] < buffer_bytes)
                pending.append((loop.time() + delay, data))
                state["buffered"] += len(data)
                changed.notify_all()
            if not data:
                return

    async def give_out():
        while True:
            async with changed:
                await changed.wait_for(lambda: pending)
                due, data = pending.popleft()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            async with changed:
                state["buffered"] -= len(data)
                changed.notify_all()

    try:
        await asyncio.gather(take_in(), give_out())
    except (ConnectionError, OSError):
        pass


async def _serve(routes, delay, buffer_bytes):
    async def handle(client_reader, client_writer, target):
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _delayed_copy(client_reader, server_writer, delay, buffer_bytes),
            _delayed_copy(server_reader, client_writer, delay, buffer_bytes),
        )
        client_writer.close()
        server_writer.close()

    servers = []
    for (host, port), target in routes:
        servers.append(await asyncio.start_server(
            lambda r, w, t=target: handle(r, w, t), host, port, reuse_address=True
        ))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _endpoint(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def relay_main(args):
    routes = []
    for route in args.routes:
        listen, target = route.split("=")
        routes.append((_endpoint(listen), _endpoint(target)))
    asyncio.run(_serve(routes, args.delay_ms / 1e3, args.buffer_bytes))


# --- CLI ---


def _parser():
    parser = argparse.ArgumentParser(
        prog="python benchmarks/network.py",
        description="Runs a script as a multi-worker job, each worker in its own network "
        "namespace behind a rate-limited (and optionally delayed) link.",
        allow_abbrev=False,
    )
    parser.add_argument("--workers", type=int, help="number of worker processes")
    parser.add_argument("--rate_mbit", type=float, help="rate of each worker's link, Mbit/s")
    parser.add_argument("--delay_ms", type=float, default=0.0,
                        help="one-way delay between workers (round trip: twice this)")
    parser.add_argument("--timeout", type=float, help="stop all workers after this many seconds")
    parser.add_argument("--cleanup_stale", action="store_true",
                        help="delete namespaces left by killed harness processes, then exit")
    parser.add_argument("--relay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--buffer_bytes", type=int, default=4 << 20, help=argparse.SUPPRESS)
    parser.add_argument("script", nargs="?", help="the Python script each worker runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def main(argv=None):
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.relay:
        args.routes = [args.script, *args.args]
        relay_main(args)
        return 0
    try:
        check_available()
    except NetworkError as e:
        print(f"network: {e}", file=sys.stderr)
        return 2
    if args.cleanup_stale:
        print("\n".join(cleanup_stale()) or "network: nothing to clean up")
        return 0
    if args.workers is None or args.script is None:
        _parser().error("--workers and a script are required.")
    try:
        with Network(args.workers, rate_mbit=args.rate_mbit, delay_ms=args.delay_ms) as net:
            results = net.run([sys.executable, args.script, *args.args], timeout=args.timeout)
    except TimeoutError as e:
        print(f"network: {e}", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        print("network: interrupted; removed the namespaces.", file=sys.stderr)
        return 130
    codes = [r.returncode for r in results]
    failed = [c for c in codes if c]
    return (128 - failed[0] if failed[0] < 0 else failed[0]) if failed else 0


if __name__ == "__main__":
    sys.exit(main())
