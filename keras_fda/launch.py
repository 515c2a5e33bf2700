"""Runs a multi-worker job on this machine: `python -m keras_fda.launch`.

(Also installed as the command `keras-fda-launch`.)

Starts `--workers` copies of a training script, each as its own process with
a `TF_CONFIG` that names all workers on 127.0.0.1 and this worker's index, so
that `keras_fda.connect()` in the script forms the cluster. Every line the
workers print (stdout and stderr) appears on the launcher's stdout prefixed
with the worker index. Everything after the script path is passed verbatim to
the script.

The job ends as a unit: if any worker fails, the others are stopped and the
launcher exits with the failed worker's code (128 + N for a worker killed by
signal N). Ctrl-C or SIGTERM stops all workers (exit code 128 + signal);
`--timeout` stops them after a time limit (exit code 124). POSIX only.

Note that TensorFlow's gRPC server in each worker listens on all network
interfaces, not only on 127.0.0.1: run on a trusted network or behind a
firewall.

Example:

```
python -m keras_fda.launch --workers 4 train.py --epochs=3
```

prints, e.g., `[worker 2] Epoch 1/3` while training, and is equivalent to
starting by hand, for i in 0..3:

```
TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:41235", ...]},
            "task": {"type": "worker", "index": i}}' python train.py --epochs=3
```
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

# How long stopped workers get to exit cleanly after SIGTERM before SIGKILL.
GRACE_SECONDS = 3.0
_POLL_SECONDS = 0.05
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_fda.launch",
        description="Runs a script as a multi-worker keras_fda job on this machine.",
        allow_abbrev=False,
    )
    parser.add_argument("--workers", type=int, required=True, help="number of worker processes")
    parser.add_argument(
        "--port_base",
        type=int,
        help="use ports PORT_BASE .. PORT_BASE + WORKERS - 1 (default: free ports)",
    )
    parser.add_argument(
        "--timeout", type=float, help="stop all workers after this many seconds (exit code 124)"
    )
    parser.add_argument("script", help="the Python script each worker runs")
    parser.add_argument(
        "args", nargs="*", default=[], help="arguments passed to the script, verbatim"
    )
    return parser


def _parse_args(argv):
    parser = _parser()
    # Split before handing argv to argparse: it would strip a "--" from the
    # script's arguments. Every launcher option takes a value, so the script
    # path is the first argument that is not an option or an option's value.
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2
    args = parser.parse_args(argv[: i + 1])
    args.args = argv[i + 1 :]
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}.")
    if args.port_base is not None and not 1 <= args.port_base <= 65536 - args.workers:
        parser.error(f"--port_base {args.port_base} leaves no room for {args.workers} ports.")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout must be positive, got {args.timeout}.")
    if not os.path.isfile(args.script):
        parser.error(f"script {args.script!r} is not a file.")
    return args


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1."""
    # All n sockets stay bound until every port is chosen, so the ports are
    # distinct. Another program could still grab one before the worker binds
    # it; that race is rare enough for a local launcher.
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _log(message):
    print(f"keras_fda.launch: {message}", file=sys.stderr, flush=True)


def _forward(pipe, prefix, lock):
    """Copies a worker's output line by line to stdout, each line prefixed."""
    out = sys.stdout.buffer
    for line in iter(pipe.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        # One write per whole line under the lock: lines never interleave.
        with lock:
            try:
                out.write(prefix + line)
                out.flush()
            except OSError:
                pass  # stdout is gone (e.g. `| head`); keep draining so the worker never blocks.
    pipe.close()


def worker_env(ports, index, base=None):
    """The environment of worker `index` in a cluster on 127.0.0.1 `ports`.

    Public so that tests and other tools can start workers exactly as the
    launcher does: `TF_CONFIG` plus unbuffered output and quiet TF C++ logs.
    """
    addresses = [f"127.0.0.1:{p}" for p in ports]
    tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    env = dict(os.environ if base is None else base)
    env.update(TF_CONFIG=json.dumps(tf_config), PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _start(args, ports, index, lock):
    env = worker_env(ports, index)
    proc = subprocess.Popen(
        [sys.executable, args.script, *args.args],
        env=env,
        # Workers cannot share the terminal's input (and, in a session of
        # their own, could not read it anyway).
        stdin=subprocess.DEVNULL,
        # Merged so that one reader keeps the worker's own line order.
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # A session of its own: the terminal's Ctrl-C reaches only the
        # launcher, which then stops each worker with everything it spawned.
        start_new_session=True,
    )
    reader = threading.Thread(
        target=_forward, args=(proc.stdout, f"[worker {index}] ".encode(), lock), daemon=True
    )
    reader.start()
    return proc, reader


def _describe(returncode):
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _exit_code(returncode):
    # Popen reports death by signal N as -N; shells report it as 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def _supervise(procs, deadline, signals_received):
    """Waits until the job ends; returns the launcher's exit code."""
    while True:
        if signals_received:
            signum = signals_received[0]
            _log(f"received {signal.Signals(signum).name}; stopping all workers.")
            return 128 + signum
        for index, proc in enumerate(procs):
            code = proc.poll()
            # The first failure is the cause; the others would mostly be peers
            # failing their collectives because this worker is gone.
            if code:
                _log(f"worker {index} {_describe(code)}; stopping the other workers.")
                return _exit_code(code)
        if all(proc.returncode == 0 for proc in procs):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            _log("timed out (--timeout); stopping all workers.")
            return 124
        time.sleep(_POLL_SECONDS)


def _signal_groups(procs, sig):
    for proc in procs:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def _stop(procs):
    """SIGTERMs every running worker's process group, SIGKILLs it after a grace period."""
    # Only unreaped workers: their PID, which is also their process group ID,
    # cannot have been reused by an unrelated process.
    running = [proc for proc in procs if proc.poll() is None]
    _signal_groups(running, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    stubborn = [proc for proc in running if proc.poll() is None]
    _signal_groups(stubborn, signal.SIGKILL)
    for proc in stubborn:
        proc.wait()


def main(argv=None):
    """Runs the launcher on `argv` (default: `sys.argv[1:]`); returns the exit code."""
    args = _parse_args(sys.argv[1:] if argv is None else list(argv))
    ports = (
        list(range(args.port_base, args.port_base + args.workers))
        if args.port_base is not None
        else free_ports(args.workers)
    )
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    # Signals only set a flag: the supervising loop then stops the workers,
    # rather than an exception interrupting the launcher at an arbitrary point.
    signals_received = []
    previous = {
        s: signal.signal(s, lambda signum, frame: signals_received.append(signum))
        for s in _STOP_SIGNALS
    }
    lock = threading.Lock()
    procs, readers = [], []
    try:
        for index in range(args.workers):
            proc, reader = _start(args, ports, index, lock)
            procs.append(proc)
            readers.append(reader)
        return _supervise(procs, deadline, signals_received)
    finally:
        _stop(procs)
        # Let the readers print the workers' last lines. A grandchild that
        # outlived its worker may hold a pipe open, so do not wait forever.
        for reader in readers:
            reader.join(timeout=GRACE_SECONDS)
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
