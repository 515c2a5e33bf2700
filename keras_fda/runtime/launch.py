"""Runs a multi-worker job on this machine: `python -m keras_fda.launch`.

(Also installed as the command `keras-fda-launch`.)

Starts `--workers` copies of a training script, each as its own process with
a `TF_CONFIG` that names all workers on 127.0.0.1 and this worker's index, so
that `keras_fda.connect()` in the script forms the cluster. Everything after
the script path (or after `--`, as in `launch --workers 2 -- train.py`) is
passed verbatim to the script.

Output: everything the workers print (stdout and stderr) appears on the
launcher's stdout, each line prefixed with its worker (`[worker 2] Epoch 1/3`),
lines never mixed. Progress bars redraw their line after a carriage return;
in a terminal, worker 0's progress bar is shown live, prefixed, and the other
workers' redrawn lines appear once, in their final state (for Keras: one line
per epoch), as with Horovod's advice to show progress on rank 0 only;
`--progress=all` shows every worker's progress live (they take turns on the
terminal's last line, each with its prefix, like `torchrun --tee` with every
line labelled). A live line is cut to the terminal's width while it is
redrawn, and written whole once it ends. Written to a file or a pipe, every redrawn line appears once,
in its final state. Output is copied in bounded chunks: a line of any length
passes without being held in memory.

Network: the workers' TensorFlow gRPC servers listen on all interfaces and
accept anyone (see README, Security). On Linux the launcher therefore runs
itself and its workers in a private network namespace that has only loopback,
where nothing outside the job can reach them (as root, or as any user where
unprivileged user namespaces are enabled). The workers then cannot reach other
machines either: `--network=host` runs them in the machine's network, for
scripts that download data. Where a private namespace cannot be made, the
launcher says so once and runs the workers in the machine's network.

The job ends as a unit: if any worker fails, the others are stopped and the
launcher exits with the failed worker's code (128 + N for a worker killed by
signal N). Ctrl-C or SIGTERM stops all workers (exit code 128 + signal);
`--timeout` stops them after a time limit (exit code 124). On Linux the
workers, and the processes they started (in their process groups and
sessions), also die with the launcher if it is killed (SIGKILL, the OOM
killer). POSIX only.

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
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unicodedata

# How long stopped workers get to exit cleanly after SIGTERM before SIGKILL.
GRACE_SECONDS = 3.0
_POLL_SECONDS = 0.05
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Bytes read from a worker at a time, and the most of one unfinished line kept
# to print it in its final state or to redraw it; longer lines are streamed.
_CHUNK_BYTES = 65536
_LINE_BYTES = 16384

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


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
    parser.add_argument(
        "--progress",
        choices=["chief", "all"],
        default="chief",
        help="in a terminal, show live progress bars of worker 0 only (default; the others "
        "show each line in its final state) or of all workers",
    )
    parser.add_argument(
        "--network",
        choices=["private", "host"],
        default="private",
        help="private (default, Linux): the workers reach only each other, over loopback, and "
        "nobody else reaches their ports; host: they use the machine's network (needed to "
        "download data)",
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
    # path is the first argument that is not an option or an option's value,
    # or the one after a "--" that ends the launcher's options.
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2
    options = argv[:i]
    if i < len(argv) and argv[i] == "--":
        i += 1
    args = parser.parse_args([*options, "--", *argv[i : i + 1]])
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


# What a terminal draws without moving the cursor: escape sequences (CSI, as
# in colours and erase-line, OSC, and two-character ones) and other control
# characters but the backspace and the tab.
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?")
_ZERO_WIDTH = re.compile(_ESCAPE.pattern + r"|[\x00-\x07\x0a-\x1f\x7f]")


def fit_to_width(text, columns):
    """The part of a line that a terminal `columns` wide shows without wrapping.

    A live line is redrawn after a carriage return, which returns to the start
    of the terminal's last row only: a line longer than the terminal wraps,
    and each redraw would leave its wrapped rows behind (the line printed
    again at every redraw). So live lines are cut to `columns - 1` characters
    (the last column stays empty: a character there leaves the cursor waiting
    to wrap, which terminals handle differently). Escape sequences are kept,
    also after the cut, so that colours and attributes end as the full line
    would leave them; wide characters count 2 columns, combining ones 0, a
    tab up to the next multiple of 8; a backspace moves back one. Lines of
    any length cost one scan past the cut.

    Args:
        text: the line as bytes (UTF-8; other bytes count one column each).
        columns: the terminal's width, or None for no limit.

    Returns:
        `(the bytes to draw, whether anything was cut)`.
    """
    if columns is None:
        return bytes(text), False
    limit = max(1, columns - 1)
    string = bytes(text).decode("utf-8", "surrogateescape")
    kept, column, position = [], 0, 0
    while position < len(string):
        match = _ZERO_WIDTH.match(string, position)
        if match:
            kept.append(match.group())
            position = match.end()
            continue
        character = string[position]
        if character == "\b":
            width = -min(1, column)
        elif character == "\t":
            width = 8 - column % 8
        elif unicodedata.combining(character) or unicodedata.category(character) in ("Me", "Cf"):
            width = 0
        elif unicodedata.east_asian_width(character) in ("W", "F"):
            width = 2
        else:
            width = 1
        if column + width > limit:
            # Past the cut only escape sequences matter (one scan, for long lines).
            kept += _ESCAPE.findall(string, position)
            return "".join(kept).encode("utf-8", "surrogateescape"), True
        kept.append(character)
        column += width
        position += 1
    return bytes(text), False


class _Worker:
    """What the console knows of one worker's output: its unfinished line."""

    def __init__(self, index, live):
        self.prefix = f"[worker {index}] ".encode()
        self.live = live  # its redraws are shown as they come
        self.line = bytearray()  # the unfinished line's text since its last redraw
        self.before_redraw = b""  # the text the last redraw replaced ("100%\r\n" ends with it)
        self.shown = False  # part of its unfinished line is on the console's last line
        self.streamed = False  # a long line was written out unfinished and cannot be redrawn
        self.clipped = False  # its live line is shown cut to the terminal's width


class _Console:
    """Interleaves the workers' output on one stream, each line prefixed with its worker.

    A finished line is written whole. The unfinished line of a live worker is
    drawn on the stream's last line and redrawn at each "\\r"; when another
    worker's line or a launcher message comes, the live line is erased (a
    terminal's "\\r" and erase-line), the other line written, and the live line
    drawn again below it. Other workers' redraws only replace the text kept
    for the line, which is written once it ends. A line longer than
    `_LINE_BYTES` is written out in pieces as it comes; if another line must
    be written before it ends, it is broken there and continues, prefixed
    again, on a line of its own.
    """

    def __init__(self, out, err, erase, columns=None):
        self._out = out
        self._err = err
        self._erase = erase  # the stream is a terminal, whose last line can be erased
        self._columns = columns or (lambda: None)  # the terminal's width now, or None
        self._lock = threading.Lock()
        self._on_screen = None  # the _Worker whose unfinished line ends the stream
        self._last_live = None  # the live worker to draw again after other output

    def feed(self, worker, data):
        """Writes what `worker` printed (any bytes; lines may be split anywhere)."""
        out = bytearray()
        with self._lock:
            for part in re.split(rb"(\r\n|\r|\n)", data):
                if part in (b"\n", b"\r\n"):
                    self._end_line(worker, out)
                elif part == b"\r":
                    self._redraw(worker, out)
                elif part:
                    self._text(worker, part, out)
            self._write(out)

    def close(self, worker):
        """Ends `worker`'s output: an unfinished last line is written as it stands."""
        if worker.line or worker.before_redraw or worker.shown:
            self.feed(worker, b"\n")

    def message(self, text):
        """Writes a launcher message to the error stream, below any live line."""
        with self._lock:
            out = bytearray()
            self._clear_last_line(out)
            self._write(out)
            try:
                self._err.write(text)
                self._err.flush()
            except OSError:
                pass
            out = bytearray()
            self._draw_live(out)
            self._write(out)

    def _text(self, worker, text, out):
        worker.line += text
        if worker.live:
            if self._on_screen is not worker:
                self._clear_last_line(out)
            else:
                out += b"\r"  # drawn whole each time: the cut may fall elsewhere now
            self._draw(worker, worker.line, out)
            self._last_live = worker
            del worker.line[:-_LINE_BYTES]  # only a redraw after other output needs it
        elif len(worker.line) > _LINE_BYTES:
            if self._on_screen is not worker:
                self._clear_last_line(out)
                out += worker.prefix
            out += worker.line
            worker.line.clear()
            worker.shown = worker.streamed = True
            self._on_screen = worker

    def _redraw(self, worker, out):
        if worker.streamed:  # what was written cannot be taken back: end that line
            self._end_line(worker, out)
        elif worker.live:
            worker.before_redraw = bytes(worker.line)
            worker.line.clear()
        elif worker.line:
            worker.before_redraw = bytes(worker.line)
            worker.line.clear()

    def _end_line(self, worker, out):
        text = worker.line or (b"" if worker.shown else worker.before_redraw)
        if self._on_screen is worker:
            if worker.clipped:  # its final state in full: wrapped rows stay, none repeats
                out += b"\r" + worker.prefix + (worker.line or worker.before_redraw)
                out += b"\x1b[K" if self._erase else b""
            out += (text if worker.streamed else b"") + b"\n"
            self._on_screen = None
        else:
            self._clear_last_line(out)
            out += worker.prefix + text + b"\n"
        worker.line.clear()
        worker.before_redraw = b""
        worker.shown = worker.streamed = worker.clipped = False
        if self._last_live is worker:
            self._last_live = None
        self._draw_live(out)

    def _clear_last_line(self, out):
        other = self._on_screen
        if other is None:
            return
        if other.live and self._erase:
            out += b"\r\x1b[K"  # erased now, drawn again after the other output
        else:
            out += b"\n"  # cannot be erased: break the line; it goes on under a new prefix
        other.shown = other.streamed = False
        self._on_screen = None

    def _draw_live(self, out):
        live = self._last_live
        if self._on_screen is None and live is not None and live.line:
            self._draw(live, live.line, out)

    def _draw(self, worker, line, out):
        """Writes a live worker's line at the cursor, cut to the terminal's width."""
        visible, worker.clipped = fit_to_width(worker.prefix + line, self._columns())
        out += visible
        if self._erase:
            out += b"\x1b[K"  # what the redrawn line no longer covers
        worker.shown = True
        self._on_screen = worker

    def _write(self, data):
        if not data:
            return
        try:
            self._out.write(data)
            self._out.flush()
        except OSError:
            pass  # stdout is gone (e.g. `| head`); keep draining so the workers never block


def _forward(pipe, worker, console):
    """Copies a worker's output in bounded chunks to the console."""
    while True:
        try:
            data = os.read(pipe.fileno(), _CHUNK_BYTES)
        except OSError:
            data = b""
        if not data:
            break
        console.feed(worker, data)
    console.close(worker)
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


def _die_with(launcher_pid):
    """Runs in each worker before the script: the kernel kills it when the launcher ends."""
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(128 + signal.SIGKILL)


# The guard: a small process that outlives a SIGKILLed launcher (the kernel's
# PR_SET_PDEATHSIG kills only the workers themselves; whatever a worker
# started, a data loader or a shell, lives on, reparented to init). It reads
# the workers' PIDs, each also the ID of the worker's session and process
# group, from a pipe that only the launcher can write to; an end of file
# without "done" means the launcher died, and the guard then kills each
# worker's process group and every other process left in its session. A
# worker that already ended may have freed its PID for an unrelated process:
# the guard kills only where /proc shows the same process (by its start
# time) or no process with that PID, so a reused PID is never hit. Runs with
# -I -S: the standard library only, in well under a second.
_GUARD = r"""
import os, signal, sys

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()  # [state, ppid, pgrp, session, ...]
    except (OSError, ValueError):
        return None

def start_time(pid):
    fields = stat(pid)
    return fields and fields[19]

workers = {}
for line in sys.stdin:
    line = line.strip()
    if line == "done":
        sys.exit(0)
    if line.isdigit():
        workers[int(line)] = start_time(int(line))
ours = {pid for pid, started in workers.items() if start_time(pid) in (None, started)}
for pid in ours:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
for _ in range(20):  # again while processes of the sessions fork during the sweep
    found = False
    for entry in os.listdir("/proc"):
        fields = stat(entry) if entry.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[3]) in ours:
            try:
                os.kill(int(entry), signal.SIGKILL)
                found = True
            except OSError:
                pass
    if not found:
        break
"""


class _Guard:
    """Kills the workers' sessions if the launcher dies without stopping them (Linux)."""

    def __init__(self):
        self._proc = None
        if _LIBC is None or not os.path.exists("/proc/self/stat"):
            return  # elsewhere the workers have no PR_SET_PDEATHSIG either
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _GUARD],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # never holds the launcher's output open
            stderr=subprocess.DEVNULL,
            # Out of the terminal's reach: Ctrl-C or a hangup stops the
            # launcher, which stops the workers itself and then says "done".
            start_new_session=True,
        )

    def _send(self, line):
        if self._proc is None:
            return
        try:
            self._proc.stdin.write(f"{line}\n".encode())
            self._proc.stdin.flush()
        except OSError:
            pass  # the guard is gone; PR_SET_PDEATHSIG still kills the workers

    def watch(self, pid):
        self._send(pid)

    def release(self):
        """The launcher has stopped the workers itself: the guard leaves without killing."""
        if self._proc is None:
            return
        self._send("done")
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass


def _start(args, ports, index):
    launcher_pid = os.getpid()
    return subprocess.Popen(
        [sys.executable, args.script, *args.args],
        env=worker_env(ports, index),
        # Workers cannot share the terminal's input (and, in a session of
        # their own, could not read it anyway).
        stdin=subprocess.DEVNULL,
        # Merged so that one reader keeps the worker's own line order.
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # A session of its own: the terminal's Ctrl-C reaches only the
        # launcher, which then stops each worker with everything it spawned.
        start_new_session=True,
        # Safe as a preexec_fn: no other launcher thread runs while workers start.
        preexec_fn=None if _LIBC is None else lambda: _die_with(launcher_pid),
    )


def _unshare(flags):
    if _LIBC.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _enter_private_network():
    """Moves this process into a new network namespace with only loopback, up.

    Returns None on success, else why it could not (nothing changed then).
    Children started afterwards share the namespace.
    """
    if _LIBC is None:
        return "network namespaces exist on Linux only"
    try:
        _unshare(_CLONE_NEWNET)  # root, or CAP_SYS_ADMIN
    except OSError as e:
        if e.errno != errno.EPERM:
            return f"unshare: {e.strerror}"
        uid, gid = os.getuid(), os.getgid()
        try:
            # Unprivileged: a user namespace of our own, where we may make one
            # (the same user ID inside, so files keep their owner).
            _unshare(_CLONE_NEWUSER)
        except OSError as e:
            return f"unshare of a user namespace: {e.strerror}"
        for name, text in [("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")]:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        try:
            _unshare(_CLONE_NEWNET)
        except OSError as e:
            return f"unshare of a network namespace: {e.strerror}"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            request = struct.pack("16sH22x", b"lo", 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
    except OSError as e:
        raise RuntimeError(
            f"keras_fda.launch: made a private network namespace but could not bring up its "
            f"loopback interface ({e.strerror}); run with --network=host."
        ) from None
    return None


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


def _supervise(procs, deadline, signals_received, log):
    """Waits until the job ends; returns the launcher's exit code."""
    while True:
        if signals_received:
            signum = signals_received[0]
            log(f"received {signal.Signals(signum).name}; stopping all workers.")
            return 128 + signum
        for index, proc in enumerate(procs):
            code = proc.poll()
            # The first failure is the cause; the others would mostly be peers
            # failing their collectives because this worker is gone.
            if code:
                log(f"worker {index} {_describe(code)}; stopping the other workers.")
                return _exit_code(code)
        if all(proc.returncode == 0 for proc in procs):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            log("timed out (--timeout); stopping all workers.")
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
    """Runs the launcher on `argv` (default: `sys.argv[1:]`); returns the exit code.

    With `--network=private` (the default) on Linux, this moves the calling
    process into the job's private network namespace for good.
    """
    args = _parse_args(sys.argv[1:] if argv is None else list(argv))
    terminal = sys.stdout.isatty()
    console = _Console(
        sys.stdout.buffer, sys.stderr, erase=terminal,
        # Asked at every draw: the terminal may be resized while the job runs.
        columns=(lambda: shutil.get_terminal_size().columns) if terminal else None,
    )

    def log(message):
        console.message(f"keras_fda.launch: {message}\n")

    # Before any thread starts: a user namespace can only be entered by a
    # single-threaded process.
    if args.network == "private":
        why_not = _enter_private_network()
        if why_not:
            log(
                f"cannot run the workers in a private network namespace ({why_not}); they use "
                "the machine's network, where anyone who reaches their ports can join the job. "
                "--network=host skips this attempt."
            )
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
    live = range(args.workers) if args.progress == "all" else [0]
    procs, readers = [], []
    guard = _Guard()
    try:
        # All workers start before the first reader thread (see _start).
        for index in range(args.workers):
            procs.append(_start(args, ports, index))
            guard.watch(procs[-1].pid)
        for index, proc in enumerate(procs):
            worker = _Worker(index, live=terminal and index in live)
            reader = threading.Thread(
                target=_forward, args=(proc.stdout, worker, console), daemon=True
            )
            reader.start()
            readers.append(reader)
        return _supervise(procs, deadline, signals_received, log)
    finally:
        _stop(procs)
        guard.release()
        # Let the readers print the workers' last lines. A grandchild that
        # outlived its worker may hold a pipe open, so do not wait forever.
        for reader in readers:
            reader.join(timeout=GRACE_SECONDS)
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
